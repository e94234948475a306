"""Forgetting mitigations as one config axis (`strategy=`): how a job's stages combine into a model.

`plan_stages()` turns the objectives of `order.stages`, their training sets and their settings
(`seqdpo.stage_settings`, which hold the strategy's knobs) into a list of `StagePlan`s. The runner runs them one after the other as it always did (stage_<k>/, DONE,
checkpoints, evaluation of every objective after every stage); what differs is which pairs a stage
trains on, where its adapter starts, and whether it trains at all.

| strategy | stages (rows of the matrix after `base`) | what a stage does |
|---|---|---|
| sequential | one per entry of order.stages, named after its objective | continues the adapter (the paper) |
| replay | the same rows | from stage 2 on, also trains on `ratio` x its own pair count pairs drawn from the earlier stages' sets (`replay.py`); with `match_steps`, in as many optimizer steps as sequential's stage |
| anchor | the same rows | from stage 2 on, adds `strength` x a pull toward the adapter after every earlier stage (`anchor.py`) |
| joint | one row, `joint` | one stage on the union of the ordered objectives' pairs, as many optimizer steps as all sequential stages together; counts and warns about the contradictory pairs of the union (`contradictions.py`) |
| merge | one row per entry of order.stages (each a single adapter trained from the base), then `merged` | the last row trains nothing: the single adapters' weight changes are merged (`merge.py`) |

Every trained stage records the pairs it trained on in stage_<k>/train_pairs.parquet
(objective, pair_id), and its optimizer steps, pairs and tokens seen in DONE and matrix.json "strategy"
(`summary`), so strategies are compared at a known compute.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from seqdpo.config import STRATEGY_KEYS, default
from seqdpo.stage_settings import StageSettings
from seqdpo.strategies.contradictions import contradictory_pairs
from seqdpo.strategies.merge import merge_weights
from seqdpo.strategies.stage_plan import StagePlan, optimizer_steps

if TYPE_CHECKING:  # the report imports this module for its names; datasets is heavy
    from datasets import Dataset

log = logging.getLogger("seqdpo")
JOINT = "joint"
MERGED = "merged"


def row_names(strategy: str, stage_objs: list[str]) -> list[str]:
    """The matrix rows after `base` that a strategy produces (module docstring)."""
    if strategy == JOINT:
        return [JOINT]
    if strategy == "merge":
        return [*stage_objs, MERGED]
    return list(stage_objs)


def label(strategy: dict | None) -> str:
    """A strategy setting as the report names it: its name and the keys it reads, e.g. `replay ratio=0.5`."""
    strategy = strategy or {}
    name = strategy.get("name", default("strategy.name"))
    unread = {"fisher_pairs"} if strategy.get("penalty") != "ewc" else set()
    unread |= {"density"} if strategy.get("method") == "linear" else set()
    keys = [k for k in STRATEGY_KEYS.get(name, ()) if k not in unread]
    shown = {k: ("equal" if k == "weights" and strategy[k] is None else strategy[k]) for k in keys if k in strategy}
    return " ".join([name, *(f"{k}={v}" for k, v in shown.items())])


def _pairs(objective: str, ds: Dataset) -> pd.DataFrame:
    return pd.DataFrame({"objective": objective, "pair_id": list(ds["pair_id"])})


def plan_stages(stage_objs: list[str], stage_sets: list[Dataset], settings: list[StageSettings], out: Path, *,
                dataset: str, write: bool) -> list[StagePlan]:
    """The stages a job runs (module docstring): one entry of `settings` per entry of order.stages; `dataset`
    names the builder (its contradictions); `write`: this process records replay draws (DDP rank 0)."""
    from datasets import concatenate_datasets  # here: the report imports this package for its names

    if len(settings) != len(stage_objs):
        raise ValueError(f"{len(settings)} stage settings for the {len(stage_objs)} stages {stage_objs}")
    s = settings[0].strategy  # the strategy itself is the job's
    own = [_pairs(o, ds) for o, ds in zip(stage_objs, stage_sets)]
    if s.name == JOINT:
        union = concatenate_datasets(stage_sets)
        pairs = pd.concat(own, ignore_index=True)
        keep = ~pairs.duplicated(["objective", "pair_id"]).to_numpy()  # an objective in several stages counts once
        if not keep.all():
            union, pairs = union.select(keep.nonzero()[0]), pairs[keep].reset_index(drop=True)
        steps = sum(optimizer_steps(st.train, len(ds)) for st, ds in zip(settings, stage_sets))
        info = {"objectives": list(dict.fromkeys(stage_objs)), "repeated_pairs_dropped": int((~keep).sum()),
                "contradictory_pairs": contradictory_pairs(union, dataset)}
        if info["repeated_pairs_dropped"]:
            log.info("joint: %d pairs of objectives ordered in several stages train once", info["repeated_pairs_dropped"])
        if info["contradictory_pairs"]:
            log.warning("joint: %d of the %d pairs in the union have a twin that prefers their rejected response "
                        "(seqdpo/strategies/contradictions.py): joint trains on contradictory labels there",
                        info["contradictory_pairs"], len(union))
        return [StagePlan(JOINT, union, settings[0], pairs, max_steps=steps, info=info)]
    if s.name == "replay":
        from seqdpo.strategies.replay import replay_stages  # imports datasets: see concatenate_datasets above

        return replay_stages(stage_objs, stage_sets, settings, own, out, write=write)
    plans = [StagePlan(o, ds, st, p) for o, ds, st, p in zip(stage_objs, stage_sets, settings, own)]
    if s.name == "anchor" and s.strength > 0:
        for k in range(1, len(plans)):
            plans[k].anchor_sets = stage_sets[:k]
            plans[k].info = {"anchor": s.penalty, "strength": s.strength, "anchored_stages": k}
    if s.name == "merge":
        for p in plans[1:]:
            p.fresh = True
        info = {"method": s.method, "weights": merge_weights(s, len(plans)), **({"density": s.density} if s.method != "linear" else {})}
        plans.append(StagePlan(MERGED, None, settings[-1], merge=tuple(range(1, len(plans) + 1)), info=info))
    return plans


RECORDED = ("train_steps", "pairs_seen", "tokens_seen", "rank", "reconstruction_error", "fisher_mean")  # from DONE


def summary(plans: list[StagePlan], done: list[dict]) -> list[dict]:
    """What each stage trained on, for matrix.json: the strategy's counts next to the numbers they produced.
    `done`: each stage's DONE record (its optimizer steps, pairs and tokens seen; the merged row's rank)."""
    rows = []
    for k, (p, d) in enumerate(zip(plans, done), start=1):
        row = {"stage": k, "name": p.name, "pairs": 0 if p.train is None else len(p.train), **p.info,
               **{key: d[key] for key in RECORDED if key in d}}
        if p.pairs is not None:
            row["pairs_per_objective"] = {str(o): int(n) for o, n in p.pairs.objective.value_counts(sort=False).items()}
        rows.append(row)
    return rows
