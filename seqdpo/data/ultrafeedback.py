"""UltraFeedback: one preference objective per GPT-4-rated aspect.

Hub id `openbmb/UltraFeedback`, pinned revision 40b436560ca83a8dba36114c22ab3c66e43f6d5e: the
one HuggingFaceH4 built `ultrafeedback_binarized` from.

Each row holds an `instruction` and (usually four) `completions`, each rated by GPT-4 on four
aspects (`annotations[aspect]["Rating"]`, a string "1".."5" or "N/A"). Construction, per aspect:

- the prompt is the instruction as one user message (the per-completion `custom_system_prompt`
  that steered generation is not part of the preference and is left out);
- "N/A" and missing ratings are left out (stats: unrated_completions); a row with fewer than two
  rated completions (dropped_fewer_than_two_rated) or with all ratings equal (dropped_all_equal) is
  dropped;
- chosen = the highest-rated completion, rejected = the lowest-rated one; ties for the highest or
  the lowest rating go to the completion listed first in the row, so the construction is
  deterministic and needs no seed;
- the dataset has only a `train` split: a prompt goes to eval when the SHA-256 of its instruction,
  read as a fraction of 2**64, is below option `eval_fraction` (default 0.05). The same instruction
  always lands on the same side, so train and eval prompts never overlap, whatever the row order.

pair_id = `train-<row index>` in the hub split (the six source files in sorted order, as the hub
concatenates them).
"""

from __future__ import annotations

import hashlib

from seqdpo.data.registry import DataError, DatasetSpec, Objective, register
from seqdpo.data._loading import (
    Layout,
    PairSet,
    RowRef,
    column,
    is_dict,
    is_str,
    make_objective,
    parse_options,
    read_split,
    resolve_revision,
)

HUB_ID = "openbmb/UltraFeedback"
REVISION = "40b436560ca83a8dba36114c22ab3c66e43f6d5e"
ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
RATINGS = {"1", "2", "3", "4", "5", "N/A"}
LAYOUT = Layout(HUB_ID, {"train": ("*.jsonl",)})
DEFAULTS = {"eval_fraction": 0.05}  # share of prompts held out for eval, by hash of the instruction


def is_eval_prompt(instruction: str, eval_fraction: float) -> bool:
    """Deterministic held-out assignment: depends only on the instruction text."""
    digest = hashlib.sha256(instruction.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _ratings(completions: list, ref: RowRef, aspect: str) -> list[tuple[int, int]]:
    """(completion index, rating) for the completions rated on `aspect`, validating each Rating."""
    rated = []
    for j, completion in enumerate(completions):
        annotation = completion["annotations"].get(aspect)
        rating = annotation.get("Rating") if isinstance(annotation, dict) else None
        if rating is None or rating == "N/A":
            continue
        if rating not in RATINGS:
            raise DataError(
                f"{ref}: column 'completions[{j}].annotations.{aspect}.Rating' must be one of "
                f"{sorted(RATINGS)}, got {rating!r}"
            )
        rated.append((j, int(rating)))
    return rated


def _completions(row: dict, ref: RowRef) -> list[dict]:
    completions = column(row, ref, "completions", lambda v: isinstance(v, list), "a list of completion objects")
    for j, completion in enumerate(completions):
        if not isinstance(completion, dict):
            raise DataError(f"{ref}: column 'completions[{j}]' must be an object, got {type(completion).__name__}")
        column(completion, ref, "response", is_str, "a string", label=f"completions[{j}].response")
        column(completion, ref, "annotations", is_dict, "an object", label=f"completions[{j}].annotations")
    return completions


def _add_pair(pairs: PairSet, pair_id: str, instruction: str, completions: list, rated: list[tuple[int, int]]) -> None:
    pairs.stats["unrated_completions"] += len(completions) - len(rated)
    if len(rated) < 2:
        pairs.drop("fewer_than_two_rated")
        return
    best = max(rated, key=lambda r: r[1])  # max/min return the first of equal ratings: the documented tie rule
    worst = min(rated, key=lambda r: r[1])
    if best[1] == worst[1]:
        pairs.drop("all_equal")
        return
    prompt = [{"role": "user", "content": instruction}]
    pairs.add(pair_id, prompt, completions[best[0]]["response"], completions[worst[0]]["response"])


def build(cfg, seed: int) -> dict[str, Objective]:
    """Builds the requested aspect objectives from one pass over the train split (seed unused: deterministic)."""
    opts = parse_options("ultrafeedback", cfg.options, DEFAULTS)
    if not 0.0 < opts["eval_fraction"] < 1.0:
        raise DataError(
            f"dataset 'ultrafeedback': option 'eval_fraction' must be in (0, 1), got {opts['eval_fraction']}"
        )
    revision = resolve_revision(cfg.path, cfg.revision, REVISION, "ultrafeedback")
    out = {a: {"train": PairSet(), "eval": PairSet()} for a in cfg.objectives}
    for ref, row in read_split(cfg.path, revision, LAYOUT, "train"):
        instruction = column(row, ref, "instruction", is_str, "a string")
        completions = _completions(row, ref)
        split = "eval" if is_eval_prompt(instruction, opts["eval_fraction"]) else "train"
        for aspect, splits in out.items():
            splits[split].stats["rows"] += 1
            _add_pair(splits[split], f"train-{ref.index}", instruction, completions, _ratings(completions, ref, aspect))
    return {
        a: make_objective(a, f"UltraFeedback: the completion rated highest on {a}", s["train"], s["eval"])
        for a, s in out.items()
    }


register(
    DatasetSpec(
        name="ultrafeedback",
        build=build,
        objectives=ASPECTS,
        hub_id=HUB_ID,
        revision=REVISION,
        description="UltraFeedback: one objective per GPT-4-rated aspect (compatible response quality).",
    )
)
