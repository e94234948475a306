"""Continual-learning metrics from the stage x objective matrix (matrix.json).

R[t][j] is a metric of objective j after stage t (t = 0 is the base model). Stage t >= 1 trained
objective `stages[t]`. An objective may be trained in several stages (sDPO partitions) or in none
(evaluated only). For an objective j:

    first_j / last_j   first and last stage that trained j
    learning_j         R[last_j][j] - R[last_j - 1][j]        (what its own stage taught)
    forgetting_j       R[last_j][j] - R[T][j]                 (positive = lost after its stage)
    forgetting_max_j   max_{l in [last_j, T-1]} R[l][j] - R[T][j]   (Chaudhry et al. 2018)
    forward_j          R[first_j - 1][j] - R[0][j]            (transfer before j was trained)

Aggregates over the objectives whose training ended before the final stage (BWT, forgetting) or
started after stage 1 (FWT), as in GEM (Lopez-Paz & Ranzato 2017):

    BWT = mean_j (R[T][j] - R[last_j][j])
    FWT = mean_j (R[first_j - 1][j] - R[0][j])
    ACC = mean over trained objectives of R[T][j]

With two stages A -> B these reduce to BWT = R[2,A] - R[1,A], FWT = R[1,B] - R[0,B].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DEFAULT_METRICS = ("accuracy", "margin_mean")
JOB_METRICS = ("accuracy", "margin_mean", "policy_accuracy", "norm_margin_mean")  # what a job's analysis covers


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def training_stages(stages: list[str], objectives: list[str]) -> dict[str, list[int]]:
    """Objective -> the stage indices (1-based, 0 = base) that trained it; [] for evaluation-only ones."""
    out = {o: [] for o in objectives}
    for t, name in enumerate(stages):
        if t == 0:
            continue
        out.setdefault(name, []).append(t)
    return out


def as_value(x) -> float | np.ndarray:
    """A float for one matrix; an array over the leading axes for a stack of bootstrap replicates."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def transfer_metrics(R: np.ndarray, stages: list[str], objectives: list[str]) -> dict[str, Any]:
    """All transfer metrics of one metric's matrix R (shape [T+1, M]).

    R may carry leading axes ([..., T+1, M], e.g. bootstrap replicates): every number is then an array
    over them, so intervals use these very formulas.
    """
    R = np.asarray(R, dtype=float)
    T = R.shape[-2] - 1
    if R.shape[-2:] != (len(stages), len(objectives)):
        raise ValueError(f"matrix shape {R.shape} does not match {len(stages)} stages x {len(objectives)} objectives")
    trained = training_stages(stages, objectives)
    per: dict[str, dict[str, Any]] = {}
    bwt, fwt, forget, forget_max, final = [], [], [], [], []
    for j, obj in enumerate(objectives):
        ts = trained.get(obj, [])
        r = R[..., j]
        row: dict[str, Any] = {"trained_in": ts, "base": as_value(r[..., 0]), "final": as_value(r[..., T])}
        # Change from the base at every stage: the trajectory the per-stage tables show.
        row["delta_from_base"] = [as_value(r[..., t] - r[..., 0]) for t in range(T + 1)]
        if ts:
            first, last = ts[0], ts[-1]
            row["after_training"] = as_value(r[..., last])
            row["learning"] = as_value(r[..., last] - r[..., last - 1])
            row["forward"] = as_value(r[..., first - 1] - r[..., 0]) if first > 1 else None
            if last < T:
                row["forgetting"] = as_value(r[..., last] - r[..., T])
                row["forgetting_max"] = as_value(np.max(r[..., last:T], axis=-1) - r[..., T])
                row["backward"] = as_value(r[..., T] - r[..., last])
                bwt.append(row["backward"])
                forget.append(row["forgetting"])
                forget_max.append(row["forgetting_max"])
            else:
                row["forgetting"] = row["forgetting_max"] = row["backward"] = None
            if first > 1:
                fwt.append(row["forward"])
            final.append(row["final"])
        else:
            # Never trained: everything it shows is transfer from the other objectives.
            row.update(after_training=None, learning=None, forgetting=None, forgetting_max=None, backward=None)
            row["forward"] = as_value(r[..., T] - r[..., 0])
        per[obj] = row
    mean = lambda xs: as_value(np.mean(np.stack(xs), axis=0)) if xs else None  # noqa: E731
    return {
        "per_objective": per,
        "BWT": mean(bwt),
        "FWT": mean(fwt),
        "forgetting": mean(forget),
        "forgetting_max": mean(forget_max),
        "ACC": mean(final),
    }


def matrix_transfer(matrix: dict, metrics: tuple[str, ...] | list[str] | None = None) -> dict[str, Any]:
    """transfer_metrics for each metric of a matrix.json dict (default: accuracy and mean margin)."""
    stages, objectives = list(matrix["stages"]), list(matrix["objectives"])
    names = [m for m in (metrics or DEFAULT_METRICS) if m in matrix["metrics"]]
    if not names:
        raise ValueError(f"matrix has none of the metrics {list(metrics or DEFAULT_METRICS)}; it has {sorted(matrix['metrics'])}")
    return {m: transfer_metrics(np.asarray(matrix["metrics"][m], dtype=float), stages, objectives) for m in names}


AGGREGATES = ("BWT", "FWT", "forgetting", "forgetting_max", "ACC")
PER_OBJECTIVE = ("learning", "forgetting", "forgetting_max", "forward", "backward", "final")


def transfer_quantities(transfer: dict[str, Any]):
    """(metric, objective, quantity, value) of a matrix_transfer() result; objective "_all" for the aggregates."""
    for metric, t in transfer.items():
        for key in AGGREGATES:
            yield metric, "_all", key, t[key]
        for obj, per in t["per_objective"].items():
            for key in PER_OBJECTIVE:
                yield metric, obj, key, per.get(key)


def transfer_rows(transfer: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (metric, objective, quantity, value) of a matrix_transfer() result, for CSV and W&B tables."""
    return [{"metric": m, "objective": o, "quantity": q, "value": _nan_to_none(v)} for m, o, q, v in transfer_quantities(transfer)]
