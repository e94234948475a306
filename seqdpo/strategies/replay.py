"""Replay (rehearsal; e.g. Rolnick et al. 2019, "Experience Replay for Continual Learning"): from stage 2
on, each stage also trains on pairs of the earlier stages.

Stage k (k >= 2) with n_k pairs of its own draws round(ratio * n_k) pairs, without replacement and
uniformly, from the pool of the pairs that stages 1..k-1 trained on for their own objectives (an
(objective, pair_id) counts once). A pool smaller than the request caps the draw; the cap is counted
(`replay_capped`) and logged. The draws are made once per job, from the seed, and written to
<job dir>/replay.parquet (stage, objective, pair_id); a rerun or requeued job reads them back instead of
drawing again, so it trains on exactly the recorded pairs.

`match_steps` (default on) keeps the compute of sequential training: stage k takes as many optimizer
steps as the sequential stage on its own n_k pairs, so it sees n_k of its n_k + replayed pairs per epoch
(a shuffled share of each); off, it passes over all of them (more steps: more compute than sequential).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, concatenate_datasets

from seqdpo.stage_settings import StageSettings
from seqdpo.strategies.stage_plan import StagePlan, optimizer_steps

log = logging.getLogger("seqdpo")
RECORD = "replay.parquet"


def draw(ratio: float, seed: int, own: list[pd.DataFrame]) -> pd.DataFrame:
    """The replayed pairs of every stage: columns stage (1-based), objective, pair_id."""
    rows = []
    for k in range(1, len(own)):
        pool = pd.concat(own[:k], ignore_index=True).drop_duplicates(["objective", "pair_id"], ignore_index=True)
        n = min(int(round(ratio * len(own[k]))), len(pool))
        rng = np.random.default_rng([seed, k + 1])
        picked = pool.iloc[np.sort(rng.choice(len(pool), size=n, replace=False))]
        rows.append(picked.assign(stage=k + 1)[["stage", "objective", "pair_id"]])
    empty = pd.DataFrame({"stage": pd.Series(dtype=int), "objective": pd.Series(dtype=str), "pair_id": pd.Series(dtype=str)})
    return pd.concat([empty, *rows], ignore_index=True)


def recorded(ratio: float, seed: int, own: list[pd.DataFrame], out: Path, *, write: bool) -> pd.DataFrame:
    path = Path(out) / RECORD
    if path.exists():
        return pd.read_parquet(path)
    drawn = draw(ratio, seed, own)
    if write:
        tmp = path.with_suffix(".tmp")
        drawn.to_parquet(tmp, index=False)
        tmp.replace(path)
    return drawn


def replay_stages(stage_objs: list[str], stage_sets: list[Dataset], settings: list[StageSettings], own: list[pd.DataFrame],
                  out: Path, *, write: bool):
    job = settings[0]  # the draw is made once for the job, with its ratio and seed
    draws = recorded(job.strategy.ratio, job.seed, own, out, write=write)
    plans = [StagePlan(stage_objs[0], stage_sets[0], settings[0], own[0])]
    for k in range(1, len(stage_sets)):
        picked = draws[draws.stage == k + 1]
        rows = []  # (stage index, row) of each replayed pair: the first earlier stage that trained it
        for obj, pid in zip(picked.objective, picked.pair_id):
            rows.append(_locate(obj, pid, own[:k], k + 1))
        parts = [stage_sets[k]] + [stage_sets[j].select([r for jj, r in rows if jj == j]) for j in range(k) if any(jj == j for jj, _ in rows)]
        requested = int(round(job.strategy.ratio * len(stage_sets[k])))
        info = {"replayed": len(rows), "replay_requested": requested, "replay_capped": requested - len(rows)}
        if info["replay_capped"] > 0:
            log.warning("stage %d: replay asks for %d earlier pairs, the earlier stages have only %d: capped", k + 1, requested, len(rows))
        pairs = pd.concat([own[k], *[own[j].iloc[[r for jj, r in rows if jj == j]] for j in range(k)]], ignore_index=True)
        st = settings[k]
        steps = optimizer_steps(st.train, len(stage_sets[k])) if st.strategy.match_steps else None
        plans.append(StagePlan(stage_objs[k], concatenate_datasets(parts), st, pairs, max_steps=steps, info=info))
    return plans


def _locate(objective: str, pair_id: str, earlier: list[pd.DataFrame], stage: int) -> tuple[int, int]:
    for j, df in enumerate(earlier):
        hit = np.flatnonzero((df.objective.to_numpy() == objective) & (df.pair_id.to_numpy() == pair_id))
        if len(hit):
            return j, int(hit[0])
    raise ValueError(
        f"{RECORD} replays pair {pair_id!r} of objective {objective!r} in stage {stage}, but no earlier stage trains it: "
        "the data changed since the draw; delete the job directory to start over"
    )
