"""Pair accounting: what happens to every row between a dataset file and the pairs a job trains and scores.

    prepared = prepare_pairs(objectives, tokenizer, cfg.dataset, cfg.model.max_length, seed)
    prepared.train[name], prepared.eval[name]   # tokenized splits (seqdpo.logprobs.tokenize_pairs)
    prepared.table()                             # {objective: {split: counts}}: matrix.json "pairs"

Per objective x split it counts: the rows the builder read and the pairs it built, with its drops by
reason; the draw of `dataset.n_train` / `n_eval` pairs in a seeded order, where a pair that
tokenization drops is replaced by the next one in that order, so a split holds the requested number
of pairs whenever the data have them (fewer is a "cap", logged); the pairs `model.max_length` drops
(prompt alone too long, truncation left chosen == rejected) and truncates (pairs, tokens lost); the
pairs kept. Built pairs never tokenized because the split was already full are `unused`. For every
objective x split:

    built + builder drops == kept + every drop + unused

(for every builder but helpsteer2 the left side is the rows read; for helpsteer2 it is its
`same_prompt_pairs`, every two responses to one prompt).
Kept pairs that both splits hold (prompt, chosen and rejected alike) are counted (`in_both_splits`);
more than `dataset.max_overlap` of a split's eval pairs among them is a DataError naming the dataset's
path. Each objective gets one log line. More than `dataset.warn_fraction` of a split's pairs dropped or
truncated by `model.max_length` is a warning; fewer than `dataset.min_pairs` pairs kept is a DataError
naming the objective, the split and `model.max_length`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from seqdpo.data.registry import DataError, Objective
from seqdpo.logprobs import TOKEN_DROP_REASONS, tokenize_pairs_counted

if TYPE_CHECKING:
    from seqdpo.config import DatasetConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
SPLIT_SIZE_KEYS = {"train": "n_train", "eval": "n_eval"}
_DRAW_SEED_OFFSET = {"train": 0, "eval": 1}  # the train and eval draws of one run differ


@dataclass
class SplitAccount:
    objective: str
    split: str
    rows: int  # rows the builder read
    built: int  # pairs the builder made
    requested: int | None  # dataset.n_train / n_eval (None = all)
    tokenized: int  # pairs drawn and tokenized
    kept: int  # pairs the job uses
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs: the builder's, then tokenization's
    truncated: int = 0  # kept pairs that lost completion tokens to model.max_length
    tokens_lost: int = 0  # completion tokens (chosen + rejected) those pairs lost
    builder_counts: dict = field(default_factory=dict)  # the builder's other counts (e.g. unpaired_rows)
    in_both_splits: int = 0  # kept pairs (prompt, chosen and rejected alike) the other split also keeps

    @property
    def unused(self) -> int:
        return self.built - self.tokenized

    @property
    def capped(self) -> bool:
        return self.requested is not None and self.kept < self.requested

    @property
    def max_length_losses(self) -> int:
        """Pairs dropped or truncated by model.max_length."""
        return sum(self.dropped.get(r, 0) for r in TOKEN_DROP_REASONS) + self.truncated

    @property
    def lost_fraction(self) -> float:
        return self.max_length_losses / self.tokenized if self.tokenized else 0.0

    @property
    def overlap_fraction(self) -> float:
        return self.in_both_splits / self.kept if self.kept else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("objective"), d.pop("split")
        d.update(unused=self.unused, capped=self.capped, lost_fraction=self.lost_fraction,
                 overlap_fraction=self.overlap_fraction)
        return d

    def line(self, max_length: int | None) -> str:
        """The split's counts in words: '<split>: 24 kept of 24 requested (27 rows read, ...)'."""
        drops = ", ".join(f"{reason} {n}" for reason, n in self.dropped.items() if n) or "none"
        want = "all" if self.requested is None else str(self.requested)
        text = (
            f"{self.split}: {self.kept} kept of {want} requested ({self.rows} rows read, {self.built} pairs built; "
            f"dropped: {drops}; truncated at model.max_length={max_length}: {self.truncated} pairs, "
            f"{self.tokens_lost} tokens"
        )
        if self.unused:
            text += f"; {self.unused} built pairs unused"
        if self.in_both_splits:
            text += f"; {self.in_both_splits} pairs also in the other split"
        if self.builder_counts:
            text += "; builder: " + ", ".join(f"{k} {_short(v)}" for k, v in self.builder_counts.items())
        return text + ")"


@dataclass
class PreparedPairs:
    train: dict  # objective -> tokenized train split
    eval: dict  # objective -> tokenized eval split
    accounts: list[SplitAccount]

    def table(self) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for a in self.accounts:
            out.setdefault(a.objective, {})[a.split] = a.to_dict()
        return out

    def summary_keys(self) -> dict[str, float]:
        """Flat `pairs/<objective>/<split>/<count>` keys (W&B summary)."""
        flat = {}
        for a in self.accounts:
            d = a.to_dict()
            for key in ("rows", "built", "kept", "truncated", "tokens_lost", "unused", "lost_fraction", "in_both_splits"):
                flat[f"pairs/{a.objective}/{a.split}/{key}"] = d[key]
            for reason, n in a.dropped.items():
                flat[f"pairs/{a.objective}/{a.split}/dropped_{reason}"] = n
        return flat


def prepare_pairs(
    objectives: dict[str, Objective], tokenizer, cfg: "DatasetConfig", max_length: int | None, seed: int
) -> PreparedPairs:
    """Draws, tokenizes and accounts every objective's splits; logs one line per split.

    Raises:
        DataError: a split keeps fewer than `cfg.min_pairs` pairs (the message names the objective, the
            split, what dropped its pairs and `model.max_length`).
    """
    prepared = PreparedPairs({}, {}, [])
    for name, obj in objectives.items():
        for split in SPLITS:
            requested = getattr(cfg, SPLIT_SIZE_KEYS[split])
            ds, account = _draw_split(
                name, split, getattr(obj, split), obj.stats.get(split, {}), requested, tokenizer, max_length,
                seed + _DRAW_SEED_OFFSET[split],
            )
            getattr(prepared, split)[name] = ds
            prepared.accounts.append(account)
        _count_overlap(prepared.train[name], prepared.eval[name], prepared.accounts[-2:])
    for name in objectives:
        mine = [a for a in prepared.accounts if a.objective == name]
        log.info("pairs %s: %s", name, " | ".join(a.line(max_length) for a in mine))
        for account in mine:
            _check(account, cfg, max_length)
    return prepared


def _pair_keys(ds) -> list[str]:
    cols = ds.select_columns(["prompt", "chosen", "rejected"]).to_dict()
    return [json.dumps(row, sort_keys=True) for row in zip(cols["prompt"], cols["chosen"], cols["rejected"])]


def _count_overlap(train, eval_, accounts: list[SplitAccount]) -> None:
    """Kept pairs that both splits hold: evaluated on what was trained on (e.g. a test file copied to train)."""
    train_keys, eval_keys = _pair_keys(train), _pair_keys(eval_)
    in_train, in_eval = set(train_keys), set(eval_keys)
    for account, keys, other in zip(accounts, (train_keys, eval_keys), (in_eval, in_train)):
        account.in_both_splits = sum(k in other for k in keys)


def _draw_split(name, split, ds, builder_stats: dict, requested, tokenizer, max_length, seed):
    from datasets import concatenate_datasets

    built = len(ds)
    order = ds.shuffle(seed=seed) if requested is not None and requested < built else ds
    want = built if requested is None else min(requested, built)
    parts, counts, start, kept = [], {}, 0, 0
    # Tokenize only as many pairs as are still missing: a split of 10k pairs drawn from 160k rows
    # never tokenizes the 150k it does not use.
    while kept < want and start < built:
        chunk = order.select(range(start, min(built, start + want - kept)))
        start += len(chunk)
        tokenized, c = tokenize_pairs_counted(chunk, tokenizer, max_length)
        parts.append(tokenized)
        kept += len(tokenized)
        counts = {k: counts.get(k, 0) + v for k, v in c.items()}
    builder_drops = {k.removeprefix("dropped_"): v for k, v in builder_stats.items() if k.startswith("dropped_")}
    token_drops = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}
    account = SplitAccount(
        objective=name,
        split=split,
        rows=int(builder_stats.get("rows", built + sum(builder_drops.values()))),
        built=built,
        requested=requested,
        tokenized=start,
        kept=kept,
        dropped={**builder_drops, **token_drops},
        truncated=counts.get("truncated", 0),
        tokens_lost=counts.get("tokens_lost", 0),
        builder_counts={k: v for k, v in builder_stats.items() if not k.startswith("dropped_") and k not in ("rows", "pairs")},
    )
    ds_out = concatenate_datasets(parts) if len(parts) > 1 else (parts[0] if parts else order.select([]))
    return ds_out, account


def _check(a: SplitAccount, cfg: "DatasetConfig", max_length: int | None) -> None:
    size_key = f"dataset.{SPLIT_SIZE_KEYS[a.split]}"
    if a.kept < cfg.min_pairs:
        raise DataError(
            f"objective '{a.objective}', {a.split} split: {a.kept} pairs left, fewer than dataset.min_pairs="
            f"{cfg.min_pairs} ({a.line(max_length)}). "
            + (
                f"model.max_length={max_length} dropped {a.max_length_losses - a.truncated} of them: raise "
                "model.max_length"
                if a.max_length_losses > a.truncated
                else f"the data hold no more: check {size_key}, dataset.path and the builder's drops"
            )
        )
    if a.split == "eval" and a.overlap_fraction > cfg.max_overlap:
        raise DataError(
            f"objective '{a.objective}': {a.in_both_splits} of its {a.kept} eval pairs ({100 * a.overlap_fraction:.1f}%) "
            f"are also training pairs (same prompt, chosen and rejected), more than dataset.max_overlap="
            f"{cfg.max_overlap}: the job would score what it trained on. Check the splits of "
            f"{cfg.path or f'the hub copy of {cfg.name}'} (was one file copied to the other?), or set "
            "dataset.max_overlap=1 to run anyway"
        )
    if a.capped:
        log.warning(
            "pairs %s/%s: %s=%d asks for more pairs than the split has; using all %d",
            a.objective, a.split, size_key, a.requested, a.kept,
        )
    if a.lost_fraction > cfg.warn_fraction:
        log.warning(
            "pairs %s/%s: model.max_length=%s dropped or truncated %.1f%% of the pairs (%d of %d; "
            "dataset.warn_fraction=%s): raise model.max_length to keep them whole",
            a.objective, a.split, max_length, 100 * a.lost_fraction, a.max_length_losses, a.tokenized,
            cfg.warn_fraction,
        )


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
