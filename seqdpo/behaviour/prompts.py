"""Generation prompts held out from training: eval pairs whose prompt occurs in no training pair of any objective.

    prompts, check = generation_prompts(train_splits, eval_splits, k, seed)

A prompt is compared by its text: the roles and contents of its messages. A generation from a prompt the
model was trained on measures recall as much as behaviour, so every eval prompt that also occurs among
the job's training pairs (of any objective) is left out, counted in `check` and warned about: a user whose
eval split shares prompts with the training split (a test file copied into train) is told. From the
rest, each distinct prompt text once, K are drawn per objective (a seeded choice without replacement).
"""

from __future__ import annotations

import logging
import random

from seqdpo.data import DataError

log = logging.getLogger("seqdpo")


def prompt_key(messages: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def choose_prompts(eval_split, k: int, seed: int, exclude=frozenset()) -> list[tuple[str, list[dict]]]:
    """`k` (prompt_id, prompt messages) of an eval split, distinct prompt texts none of which is in
    `exclude` (each text stands for its first pair), a seeded choice without replacement."""
    ids, prompts = list(eval_split["pair_id"]), list(eval_split["prompt"])
    first: dict[tuple, int] = {}
    for i, p in enumerate(prompts):
        key = prompt_key(p)
        if key not in exclude:
            first.setdefault(key, i)
    candidates = sorted(first.values())
    idx = sorted(random.Random(f"prompts-{seed}").sample(candidates, min(k, len(candidates))))
    return [(ids[i], prompts[i]) for i in idx]


def generation_prompts(train_splits: dict, eval_splits: dict, k: int, seed: int) -> tuple[dict, dict]:
    """(objective -> chosen prompts, objective -> counts) for every objective of `eval_splits`.

    Counts: `eval_prompts` distinct prompt texts of the eval split, `in_training` those of them that occur
    among the training prompts of any objective in `train_splits` (left out), `used` the prompts drawn.

    Raises:
        DataError: every eval prompt of an objective occurs among the training prompts.
    """
    training = {prompt_key(p) for ds in train_splits.values() for p in ds["prompt"]}
    chosen, check = {}, {}
    for name, ds in eval_splits.items():
        keys = {prompt_key(p) for p in ds["prompt"]}
        overlap = keys & training
        if overlap:
            example = next(iter(sorted(overlap)))[-1][1]
            log.warning("behaviour: %d of the %d distinct eval prompts of %s also occur among the training prompts "
                        "(e.g. %r); they are left out of generation", len(overlap), len(keys), name, example[:80])
        if overlap == keys:
            raise DataError(f"behaviour: every one of the {len(keys)} distinct eval prompts of objective '{name}' "
                            "occurs among the training prompts; generation needs prompts held out from training")
        chosen[name] = choose_prompts(ds, k, seed, exclude=training)
        check[name] = {"eval_prompts": len(keys), "in_training": len(overlap), "used": len(chosen[name])}
    return chosen, check
