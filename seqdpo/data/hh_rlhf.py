"""Anthropic HH-RLHF: helpful vs harmless, a distributional conflict.

Hub id `Anthropic/hh-rlhf`, pinned revision 09be8c5bbc57cb3887f3a9732ad6aa7ec602a1fa.

Objectives: `helpful` (data_dir `helpful-base`) and `harmless` (`harmless-base`); the hub's `train`
split is the objective's train split and `test` its eval split. Each row holds two whole dialogues,
`chosen` and `rejected`, as `"\\n\\nHuman: ...\\n\\nAssistant: ..."` strings that differ in the final
assistant turn. Construction:

- the prompt is the longest common prefix of `chosen` and `rejected` that ends at an
  `"\\n\\nAssistant:"` marker; what follows in each dialogue is its response (stripped). A response
  may itself contain `"\\n\\nAssistant:"` or `"Human:"` text (about 0.2% of the rows: the model wrote
  the marker); cutting at the last marker of each dialogue would make the two prompts differ and
  lose the pair. Rows whose response holds a marker are counted (`marker_in_response`);
- the prompt is converted turn by turn into user and assistant messages (contents stripped). An
  assistant marker right after an assistant turn is text of that turn, kept as written
  (`marker_in_prompt_turn` counts such rows);
- pairs with no common prefix ending at an assistant marker (`prefix_mismatch`), whose prompt does
  not alternate from a human turn to a human turn or whose dialogue ends with a human turn
  (`malformed`), or whose responses are empty or identical are dropped and counted in
  `Objective.stats` (dropped_prefix_mismatch, dropped_malformed, dropped_empty_response,
  dropped_identical);
- pair_id = `<hub split>-<row index>`, stable for a given revision.

The options are empty; the data are the card's preference subsets, unfiltered beyond the above.
"""

from __future__ import annotations

import os
import re

from seqdpo.data.registry import DatasetSpec, Objective, register
from seqdpo.data._loading import (
    Layout,
    PairSet,
    column,
    is_alternating,
    is_str,
    make_objective,
    parse_options,
    read_split,
    resolve_revision,
    to_messages,
)

HUB_ID = "Anthropic/hh-rlhf"
REVISION = "09be8c5bbc57cb3887f3a9732ad6aa7ec602a1fa"
DATA_DIRS = {"helpful": "helpful-base", "harmless": "harmless-base"}
SPLITS = {"train": "train", "eval": "test"}  # objective split -> hub split
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_MARKER_TEXT = ("Human:", "Assistant:")


def layout(objective: str) -> Layout:
    data_dir = DATA_DIRS[objective]
    return Layout(HUB_ID, {s: (f"{s}.jsonl.gz",) for s in SPLITS.values()}, data_dir=data_dir)


def split_pair(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt text, chosen response, rejected response), cut at the end of the longest common prefix of
    the two dialogues that ends with an assistant marker; None when the common prefix holds no marker.

    The prompt text excludes that marker; the responses are stripped.
    """
    common = len(os.path.commonprefix([chosen, rejected]))
    k = chosen.rfind(ASSISTANT, 0, common)
    if k < 0:
        return None
    start = k + len(ASSISTANT)
    return chosen[:k], chosen[start:].strip(), rejected[start:].strip()


def ends_with_human(dialogue: str) -> bool:
    """True when the dialogue's last turn is the human's (or it has no assistant turn at all)."""
    k = dialogue.rfind(ASSISTANT)
    return k < 0 or HUMAN in dialogue[k:]


def parse_turns(prefix: str) -> list[tuple[str, str]] | None:
    """The prefix's turns as (role, content), or None unless they alternate from a user turn to a user turn.

    An assistant marker that directly follows an assistant turn belongs to that turn's text (the model
    wrote it), so the two are one message with the marker kept.
    """
    parts = _TURN.split(prefix)
    if parts[0].strip():
        return None  # text before the first speaker marker
    raw: list[list[str]] = []
    for i in range(1, len(parts), 2):
        role, text = _ROLES[parts[i]], parts[i + 1]
        if raw and role == "assistant" and raw[-1][0] == "assistant":
            raw[-1][1] += ASSISTANT + text
        else:
            raw.append([role, text])
    turns = [(role, text.strip()) for role, text in raw]
    return turns if is_alternating(turns) else None


def _build_split(path: str | None, revision: str | None, objective: str, hub_split: str) -> PairSet:
    pairs = PairSet()
    for ref, row in read_split(path, revision, layout(objective), hub_split):
        chosen = column(row, ref, "chosen", is_str, "a dialogue string")
        rejected = column(row, ref, "rejected", is_str, "a dialogue string")
        pairs.stats["rows"] += 1
        split = split_pair(chosen, rejected)
        if ends_with_human(chosen) or ends_with_human(rejected):
            pairs.drop("malformed")
        elif split is None:
            pairs.drop("prefix_mismatch")
        elif (turns := parse_turns(split[0])) is None:
            pairs.drop("malformed")
        else:
            prompt, chosen_response, rejected_response = split
            if pairs.add(f"{hub_split}-{ref.index}", to_messages(turns), chosen_response, rejected_response):
                responses = chosen_response + rejected_response
                pairs.stats["marker_in_response"] += any(m in responses for m in _MARKER_TEXT)
                pairs.stats["marker_in_prompt_turn"] += prompt.count(ASSISTANT) > sum(r == "assistant" for r, _ in turns)
    return pairs


def build(cfg, seed: int) -> dict[str, Objective]:
    """Builds the requested HH objectives (seed unused: the construction is deterministic)."""
    parse_options("hh_rlhf", cfg.options, {})
    revision = resolve_revision(cfg.path, cfg.revision, REVISION, "hh_rlhf")
    out = {}
    for name in cfg.objectives:
        splits = {s: _build_split(cfg.path, revision, name, hub) for s, hub in SPLITS.items()}
        desc = f"HH-RLHF {DATA_DIRS[name]}: the human-preferred final assistant turn"
        out[name] = make_objective(name, desc, splits["train"], splits["eval"])
    return out


register(
    DatasetSpec(
        name="hh_rlhf",
        build=build,
        objectives=tuple(DATA_DIRS),
        hub_id=HUB_ID,
        revision=REVISION,
        description="Anthropic HH-RLHF: helpful-base vs harmless-base (distributional conflict).",
    )
)
