"""Pair-level decomposition of what a later stage does to an earlier objective.

For an objective j trained last in stage s and every later stage u > s, per eval pair i:

    v_i^s, v_i^u   the pair's value (default: `margin`, the implicit reward margin vs the base) after s and u
    delta_i        v_i^u - v_i^s
    quartile       Q1..Q4 of v^s (Q4 = the pairs the stage taught most confidently); ties in v^s are
                   broken by pair_id so the bins are reproducible, and bins differ in size by at most 1
    improved       delta_i >  tau        stayed |delta_i| <= tau        degraded delta_i < -tau
    tau            stay_threshold * sd(v^s)  (population sd; at least tie_tolerance)
    flips          correct->wrong: v^s > tol >= v^u ;  wrong->correct: v^s <= tol < v^u  (tol = tie tolerance)

`redistribution` flags an aggregate that is flat (|mean delta| <= tau) while at least
`min_fraction` of the pairs improved and at least `min_fraction` degraded: the later stage moved
pairs both ways and the matrix hides it. `q4_down_q1_up` is the paper's specific signature
(mean delta of Q4 < -tau and of Q1 > tau). Note that binning by v^s alone makes Q4 regress towards
the mean under pure noise; compare with the quartiles of a run with a shuffled stage order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from seqdpo.analysis.transfer import as_value
from seqdpo.config import DiagnosticsConfig, EvalConfig

QUARTILES = ("Q1", "Q2", "Q3", "Q4")
DECOMPOSED_COLUMNS = ("margin", "norm_margin")  # the per-pair values job analysis decomposes


def assign_quartiles(values: pd.Series) -> pd.Series:
    """Q1..Q4 by value, index preserved; equal values keep their index order."""
    order = values.sort_index(kind="stable").sort_values(kind="stable")
    n = len(order)
    q = (np.arange(n) * 4) // max(n, 1)
    return pd.Series(np.array(QUARTILES)[q], index=order.index).reindex(values.index)


def summarize_change(before: np.ndarray, after: np.ndarray, tau: float, tol: float) -> dict[str, Any]:
    """Statistics of the pairs' change over the last axis; leading axes (bootstrap replicates) give arrays."""
    delta = after - before
    n = delta.shape[-1]
    if n == 0:
        return {"n": 0}
    return {
        "n": int(n),
        "before_mean": as_value(before.mean(-1)),
        "after_mean": as_value(after.mean(-1)),
        "delta_mean": as_value(delta.mean(-1)),
        "delta_median": as_value(np.median(delta, -1)),
        "frac_improved": as_value(np.mean(delta > tau, -1)),
        "frac_stayed": as_value(np.mean(np.abs(delta) <= tau, -1)),
        "frac_degraded": as_value(np.mean(delta < -tau, -1)),
        "flips_correct_to_wrong": _count(np.sum((before > tol) & (after <= tol), -1)),
        "flips_wrong_to_correct": _count(np.sum((before <= tol) & (after > tol), -1)),
    }


def _count(x):
    return int(x) if np.ndim(x) == 0 else x


def quartile_decomposition(
    before: pd.Series,
    after: pd.Series,
    threshold: float,
    tie_tolerance: float = EvalConfig.tie_tolerance,
    min_fraction: float = DiagnosticsConfig.redistribution_min_fraction,
) -> dict[str, Any]:
    """Quartile table for one (objective, trained stage, later stage); series are indexed by pair_id.

    `threshold` is the absolute tau. Pairs missing on either side are dropped (and counted).
    """
    joined = pd.concat({"before": before, "after": after}, axis=1, join="inner")
    q = assign_quartiles(joined["before"])
    rows = []
    for name in QUARTILES:
        sel = joined[q == name]
        rows.append({"quartile": name, **summarize_change(sel["before"].to_numpy(float), sel["after"].to_numpy(float), threshold, tie_tolerance)})
    total = summarize_change(joined["before"].to_numpy(float), joined["after"].to_numpy(float), threshold, tie_tolerance)
    flat = total.get("n", 0) > 0 and abs(total["delta_mean"]) <= threshold
    both_ways = total.get("n", 0) > 0 and total["frac_improved"] >= min_fraction and total["frac_degraded"] >= min_fraction
    q1, q4 = rows[0], rows[-1]
    return {
        "threshold": float(threshold),
        "n_dropped": int(max(len(before), len(after)) - len(joined)),
        "quartiles": rows,
        "all": total,
        "redistribution": bool(flat and both_ways),
        "q4_down_q1_up": bool(
            q1.get("n", 0) > 0 and q4.get("n", 0) > 0 and q4["delta_mean"] < -threshold and q1["delta_mean"] > threshold
        ),
    }


def stage_values(pairs: pd.DataFrame, objective: str, stage: int, column: str) -> pd.Series:
    sel = pairs[(pairs["objective"] == objective) & (pairs["stage"] == stage)]
    return sel.set_index("pair_id")[column].astype(float)


def pair_decomposition(
    pairs: pd.DataFrame,
    stages: list[str],
    column: str = "margin",
    stay_threshold: float = DiagnosticsConfig.stay_threshold,
    min_fraction: float = DiagnosticsConfig.redistribution_min_fraction,
    tie_tolerance: float = EvalConfig.tie_tolerance,
) -> list[dict[str, Any]]:
    """quartile_decomposition for every objective trained before the last stage and every later stage.

    `stages` is matrix.json's list ("base", objective of stage 1, ...); an objective trained in several
    stages is binned after its last one.
    """
    out = []
    present = set(pairs["stage"].unique())
    for obj in pd.unique(pairs["objective"]):
        trained = [t for t, name in enumerate(stages) if t > 0 and name == obj]
        if not trained or trained[-1] not in present:
            continue
        s = trained[-1]
        before = stage_values(pairs, obj, s, column)
        tau = max(stay_threshold * float(before.std(ddof=0)) if len(before) else 0.0, tie_tolerance)
        for u in range(s + 1, len(stages)):
            if u not in present:
                continue
            after = stage_values(pairs, obj, u, column)
            res = quartile_decomposition(before, after, tau, tie_tolerance, min_fraction)
            out.append({"objective": obj, "column": column, "from_stage": s, "to_stage": u,
                        "to_stage_objective": stages[u], **res})
    return out


def decomposition_rows(decomp: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (one per decomposition x quartile, plus 'all') for CSV and W&B tables."""
    rows = []
    for d in decomp:
        key = {k: d[k] for k in ("objective", "column", "from_stage", "to_stage", "to_stage_objective")}
        for q in d["quartiles"] + [{"quartile": "all", **d["all"]}]:
            rows.append({**key, **q, "threshold": d["threshold"], "redistribution": d["redistribution"]})
    return rows
