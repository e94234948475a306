"""HelpSteer2: one preference objective per rated attribute.

Hub id `nvidia/HelpSteer2`, pinned revision 990b2711a36180dd19d9c94b8627844866f8982a.

Each row is one response to a prompt with five human scores on 0..4 (helpfulness, correctness,
coherence, complexity, verbosity); the card pairs consecutive rows with the same prompt (rows 0 and 1,
2 and 3, ...). HelpSteer (v1), same schema, holds 1 to 4 consecutive responses per prompt. Construction:

- rows are grouped into runs of consecutive rows with the same `prompt`; every two responses of a run
  are a candidate pair (a run of n gives n(n-1)/2; stats: same_prompt_pairs), so HelpSteer2's two
  responses give its one pair and a v1 prompt with 3 or 4 responses gives 3 or 6. A row alone in its
  run has nothing to be compared with (stats: unpaired_rows). Rows are never paired across prompts;
- for attribute k, chosen = the response with the higher score on k; pairs whose scores differ by
  less than option `min_margin` (default 1: only exact ties) are dropped (dropped_tie,
  dropped_small_margin);
- multi-turn prompts (about 29% per the card) hold earlier turns separated by
  `<extra_id_1>Assistant` / `<extra_id_1>User` lines; they are split into user/assistant messages,
  and a prompt that does not alternate is dropped (dropped_malformed);
- `train` is the train split, `validation` the eval split; pair_id = `<hub split>-<row index of the
  pair's first row>` for a prompt with two responses, `<hub split>-<row i>-<row j>` for each pair of a
  prompt with more.
"""

from __future__ import annotations

import itertools
import re

from seqdpo.data.registry import DataError, DatasetSpec, Objective, register
from seqdpo.data._loading import (
    Layout,
    PairSet,
    RowRef,
    column,
    is_alternating,
    is_int_in,
    is_str,
    make_objective,
    parse_options,
    read_split,
    resolve_revision,
    to_messages,
)

HUB_ID = "nvidia/HelpSteer2"
REVISION = "990b2711a36180dd19d9c94b8627844866f8982a"
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
SPLITS = {"train": "train", "eval": "validation"}  # objective split -> hub split
LAYOUT = Layout(HUB_ID, {s: (f"{s}.jsonl.gz",) for s in SPLITS.values()})
DEFAULTS = {"min_margin": 1}  # smallest score difference (0..4 scale) that makes a pair
_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")
_ROLES = {"User": "user", "Assistant": "assistant"}


def parse_prompt(prompt: str) -> list[tuple[str, str]] | None:
    """The prompt's turns as (role, content); None unless they alternate from a user turn to a user turn."""
    parts = _TURN.split(prompt)
    turns = [("user", parts[0].strip())] + [(_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    return turns if is_alternating(turns) else None


def _read_row(row: dict, ref: RowRef) -> dict:
    score = is_int_in(0, 4)
    out = {
        "prompt": column(row, ref, "prompt", is_str, "a string"),
        "response": column(row, ref, "response", is_str, "a string"),
    }
    out.update({a: column(row, ref, a, score, "an integer score in 0..4") for a in ATTRIBUTES})
    return out


def _pairs(rows: list[tuple[int, dict]]) -> tuple[list[tuple[str, dict, dict]], int]:
    """Every two rows of each run of consecutive same-prompt rows: ([(pair id suffix, row a, row b)], unpaired rows).

    The suffix is the first row's index for a run of two (HelpSteer2's pairs), `<i>-<j>` in a longer run.
    """
    pairs, unpaired = [], 0
    for _, run in itertools.groupby(rows, key=lambda r: r[1]["prompt"]):
        run = list(run)
        if len(run) == 1:
            unpaired += 1
        elif len(run) == 2:
            pairs.append((str(run[0][0]), run[0][1], run[1][1]))
        else:
            pairs.extend((f"{i}-{j}", a, b) for (i, a), (j, b) in itertools.combinations(run, 2))
    return pairs, unpaired


def _build_split(path, revision, hub_split: str, attributes: list[str], min_margin: int) -> dict[str, PairSet]:
    rows = [(ref.index, _read_row(raw, ref)) for ref, raw in read_split(path, revision, LAYOUT, hub_split)]
    pairs, unpaired = _pairs(rows)
    out = {a: PairSet() for a in attributes}
    for pair_set in out.values():
        pair_set.stats.update(rows=len(rows), unpaired_rows=unpaired, same_prompt_pairs=len(pairs))
    for suffix, a, b in pairs:
        turns = parse_prompt(a["prompt"])
        for attr, pair_set in out.items():
            diff = a[attr] - b[attr]
            if turns is None:
                pair_set.drop("malformed")
            elif diff == 0:
                pair_set.drop("tie")
            elif abs(diff) < min_margin:
                pair_set.drop("small_margin")
            else:
                chosen, rejected = (a, b) if diff > 0 else (b, a)
                pair_set.add(f"{hub_split}-{suffix}", to_messages(turns), chosen["response"], rejected["response"])
    return out


def build(cfg, seed: int) -> dict[str, Objective]:
    """Builds the requested attribute objectives from one pass over each split (seed unused: deterministic)."""
    opts = parse_options("helpsteer2", cfg.options, DEFAULTS)
    if opts["min_margin"] < 1:
        raise DataError(f"dataset 'helpsteer2': option 'min_margin' must be >= 1, got {opts['min_margin']}")
    revision = resolve_revision(cfg.path, cfg.revision, REVISION, "helpsteer2")
    attrs = list(cfg.objectives)
    splits = {s: _build_split(cfg.path, revision, hub, attrs, opts["min_margin"]) for s, hub in SPLITS.items()}
    return {
        a: make_objective(a, f"HelpSteer2: the response scored higher on {a}", splits["train"][a], splits["eval"][a])
        for a in attrs
    }


register(
    DatasetSpec(
        name="helpsteer2",
        build=build,
        objectives=ATTRIBUTES,
        hub_id=HUB_ID,
        revision=REVISION,
        description="HelpSteer2: one objective per rated attribute (multi-attribute interaction).",
    )
)
