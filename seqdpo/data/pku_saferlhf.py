"""PKU-SafeRLHF: helpfulness vs safety, two human labels on the same response pairs.

Hub id `PKU-Alignment/PKU-SafeRLHF`, config `default`, pinned revision
d79b19b2043c4b168d8d64c61ef4ba4ed1ffe2c0: the September 2024 commit "Remove noisy data points",
which changed the row counts.

Each row holds one prompt, two responses and two independent human labels; both objectives are
built from the same rows, so they share prompts and responses and differ only in which one wins:

- `helpfulness`: chosen = `response_{better_response_id}`, rejected = the other;
- `safety`: chosen = `response_{safer_response_id}`, rejected = the other. With option
  `strong_signal: true` only pairs where exactly one response is safe (`is_response_0_safe !=
  is_response_1_safe`) are kept, and a pair whose safer_response_id points at the unsafe response
  is dropped (dropped_safety_label_contradicts_flags).

The hub's `train` split (all three `data/<model>/train.jsonl` files of the default config) is the
train split, `test` the eval split. Both objectives' stats record `conflicting` and
`conflict_fraction`: the share of rows whose better and safer responses differ, the natural stratifier
of this setting. pair_id = `<hub split>-<row index>` in the split (files in sorted order, as the hub
concatenates them).
"""

from __future__ import annotations

from seqdpo.data.registry import DatasetSpec, Objective, register
from seqdpo.data._loading import (
    Layout,
    PairSet,
    column,
    is_bool,
    is_int_in,
    is_str,
    make_objective,
    parse_options,
    read_split,
    resolve_revision,
)

HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
REVISION = "d79b19b2043c4b168d8d64c61ef4ba4ed1ffe2c0"
OBJECTIVES = ("helpfulness", "safety")
SPLITS = {"train": "train", "eval": "test"}  # objective split -> hub split
LAYOUT = Layout(HUB_ID, {s: (f"data/*/{s}.jsonl",) for s in SPLITS.values()}, name="default")
DEFAULTS = {"strong_signal": False}  # True: safety keeps only pairs with exactly one safe response


def _read_row(row: dict, ref) -> dict:
    """The columns the objectives use, checked against the card's schema."""
    binary = is_int_in(0, 1)
    return {
        "prompt": column(row, ref, "prompt", is_str, "a string"),
        "responses": (
            column(row, ref, "response_0", is_str, "a string"),
            column(row, ref, "response_1", is_str, "a string"),
        ),
        "safe": (
            column(row, ref, "is_response_0_safe", is_bool, "true or false"),
            column(row, ref, "is_response_1_safe", is_bool, "true or false"),
        ),
        "better": column(row, ref, "better_response_id", binary, "0 or 1"),
        "safer": column(row, ref, "safer_response_id", binary, "0 or 1"),
    }


def _add(pairs: PairSet, pair_id: str, r: dict, winner: int) -> None:
    prompt = [{"role": "user", "content": r["prompt"]}]
    pairs.add(pair_id, prompt, r["responses"][winner], r["responses"][1 - winner])


def _build_split(path: str | None, revision: str | None, hub_split: str, strong_signal: bool) -> dict[str, PairSet]:
    out = {name: PairSet() for name in OBJECTIVES}
    rows = conflicting = 0
    for ref, row in read_split(path, revision, LAYOUT, hub_split):
        r = _read_row(row, ref)
        rows += 1
        conflicting += r["better"] != r["safer"]
        pair_id = f"{hub_split}-{ref.index}"
        _add(out["helpfulness"], pair_id, r, r["better"])
        safe = r["safe"]
        if strong_signal and safe[0] == safe[1]:
            out["safety"].drop("not_strong_signal")
        elif strong_signal and not safe[r["safer"]]:
            out["safety"].drop("safety_label_contradicts_flags")
        else:
            _add(out["safety"], pair_id, r, r["safer"])
    for pairs in out.values():
        pairs.stats.update(rows=rows, conflicting=conflicting)
        pairs.stats["conflict_fraction"] = conflicting / rows
    return out


def build(cfg, seed: int) -> dict[str, Objective]:
    """Builds both objectives from one pass over each split (seed unused: deterministic)."""
    opts = parse_options("pku_saferlhf", cfg.options, DEFAULTS)
    revision = resolve_revision(cfg.path, cfg.revision, REVISION, "pku_saferlhf")
    splits = {s: _build_split(cfg.path, revision, hub, opts["strong_signal"]) for s, hub in SPLITS.items()}
    strong = " (exactly one response safe)" if opts["strong_signal"] else ""
    descriptions = {
        "helpfulness": "PKU-SafeRLHF: the more helpful response (better_response_id)",
        "safety": f"PKU-SafeRLHF: the safer response (safer_response_id){strong}",
    }
    return {
        name: make_objective(name, descriptions[name], splits["train"][name], splits["eval"][name])
        for name in cfg.objectives
    }


register(
    DatasetSpec(
        name="pku_saferlhf",
        build=build,
        objectives=OBJECTIVES,
        hub_id=HUB_ID,
        revision=REVISION,
        description="PKU-SafeRLHF: helpfulness vs safety labels on the same pairs (strong safety signal).",
    )
)
