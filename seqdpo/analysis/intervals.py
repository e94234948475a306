"""Paired bootstrap intervals and verdicts for one job's evaluation (docs/metrics.md, "Intervals and verdicts").

The same eval pairs are scored after every stage, so one replicate draws each objective's pairs once
(n draws with replacement from its n pairs) and applies that draw to every stage, every matrix metric,
every transfer figure and every quartile fraction. A change between stages is thereby resampled as
a per-pair difference: its interval holds what the eval pairs' sampling leaves uncertain, without the
between-pair spread that is common to both stages. Intervals are percentile intervals (LEVEL) over
`n_boot` replicates drawn from numpy's PCG64 seeded with `seed`.

Verdict of objective j after stage t >= 1, per column c in VERDICT_COLUMNS, against the baseline
stage b = the last stage before t that trained j (0, the base model, if none did):

    degraded       the interval of mean_i (c_i^t - c_i^b) lies below 0
    improved       it lies above 0
    redistributed  it contains 0, and one quartile's interval of mean change lies above 0 while another's
                   lies below 0 (quartiles by margin after b, as in pairs.py; only for b >= 1, since
                   after the base every margin is 0)
    stable         otherwise: no change this many pairs can detect

Pairs missing at some stage are left out of the resampling of their objective and counted (`n_dropped`).
Transfer figures are the formulas of transfer.py applied to every replicate's matrix; quartile
fractions those of pairs.py (thresholds tau held at their point values) on every replicate's pairs.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from seqdpo.analysis import pairs as P
from seqdpo.analysis import transfer as T
from seqdpo.evaluation import MATRIX_STATS

LEVEL = 0.95
METHOD = "paired percentile bootstrap over pair_id"
VERDICT_COLUMNS = {"accuracy": "accuracy", "margin": "margin_mean"}  # per-pair column -> its matrix metric
QUARTILE_STATS = ("frac_improved", "frac_stayed", "frac_degraded", "delta_mean")
VERDICTS = ("degraded", "stable", "improved", "redistributed")


@dataclass
class Bootstrap:
    """Point values and replicates of every statistic of one job (or the mean of several, see `pool`).

    Keys: ("matrix", metric) -> [stages, objectives] (replicates [n_boot, stages, objectives]);
    ("transfer", metric, objective or "_all", quantity); ("quartiles", objective, column, from, to,
    quartile or "all", stat); ("change", objective, stage, column, "all" or quartile): the verdict's mean
    change against its baseline stage. Replicates have the point's shape with n_boot in front.
    """

    stages: list[str]
    objectives: list[str]
    n_boot: int
    seed: int | None
    point: dict[tuple, Any] = field(default_factory=dict)
    reps: dict[tuple, np.ndarray] = field(default_factory=dict)
    baselines: dict[tuple[str, int], int] = field(default_factory=dict)
    n_pairs: dict[str, int] = field(default_factory=dict)
    n_dropped: dict[str, int] = field(default_factory=dict)
    pair_ids: dict[str, np.ndarray] = field(default_factory=dict)  # the pairs resampled, in draw order

    def interval(self, key: tuple, level: float = LEVEL) -> np.ndarray:
        """[..., 2]: lower and upper percentile bounds of the key's replicates."""
        q = 50.0 * np.array([1.0 - level, 1.0 + level])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (objective missing at a stage)
            return np.moveaxis(np.nanpercentile(self.reps[key], q, axis=0), 0, -1)


def _wide(pairs: pd.DataFrame, objectives: list[str], columns: list[str], n_stages: int) -> dict[str, tuple]:
    """Objective -> (pair_ids, {column: values [stage, pair]}, pairs dropped) over the pairs scored at every stage."""
    wide = pairs[pairs["objective"].isin(objectives)].pivot(index=["objective", "pair_id"], columns="stage", values=columns)
    scored = wide.groupby(level=0).size()
    complete = wide.dropna(how="any")
    owner = complete.index.get_level_values(0).to_numpy()
    ids = complete.index.get_level_values(1).to_numpy()
    values = {c: np.stack([complete[(c, t)].to_numpy(float) if (c, t) in complete.columns else np.full(len(ids), np.nan)
                           for t in range(n_stages)]) for c in columns}
    out = {}
    for obj in objectives:
        mine = owner == obj
        if obj in scored.index:
            out[obj] = (ids[mine], {c: v[:, mine] for c, v in values.items()}, int(scored[obj] - mine.sum()))
    return out


def _quartile_changes(bins, ids, before, after, draws, tau: float, tol: float) -> dict[str, dict[str, Any]]:
    """pairs.summarize_change per quartile of `bins` (ties by pair_id) and overall, for each row of `draws`."""
    rank = np.empty(len(ids), dtype=int)
    rank[np.lexsort((ids, bins))] = np.arange(len(ids))
    order = np.take_along_axis(draws, np.argsort(rank[draws], axis=1, kind="stable"), axis=1)
    b, a = before[order], after[order]
    n = order.shape[1]
    # pairs.assign_quartiles puts sorted position p in quartile (4 p) // n: contiguous blocks.
    starts = [-(-k * n // 4) for k in range(5)]
    out = {q: P.summarize_change(b[:, starts[k]:starts[k + 1]], a[:, starts[k]:starts[k + 1]], tau, tol)
           for k, q in enumerate(P.QUARTILES)}
    out["all"] = P.summarize_change(b, a, tau, tol)
    return out


def _statistics(boot: Bootstrap, data: dict, draws: dict[str, np.ndarray], decomps: list[dict], tie_tolerance: float) -> dict[tuple, Any]:
    """Every statistic for each row of `draws` (objective -> [rows, n] pair indices), arrays over rows."""
    stages, objectives = boot.stages, boot.objectives
    S, rows = len(stages), next(iter(draws.values())).shape[0]
    out: dict[tuple, Any] = {}
    for metric, (col, stat) in MATRIX_STATS.items():
        cells = np.full((rows, S, len(objectives)), np.nan)
        reduce = np.median if stat == "median" else np.mean
        for j, obj in enumerate(objectives):
            if obj in data and col in data[obj][1]:
                v = data[obj][1][col]
                for t in range(S):
                    cells[:, t, j] = reduce(v[t][draws[obj]], axis=-1)
        out[("matrix", metric)] = cells
    tr = {m: T.transfer_metrics(out[("matrix", m)], stages, objectives) for m in T.JOB_METRICS}
    for metric, obj, q, value in T.transfer_quantities(tr):
        if value is not None:
            out[("transfer", metric, obj, q)] = value
    for d in decomps:
        ids, values, _ = data[d["objective"]]
        v = values[d["column"]]
        res = _quartile_changes(v[d["from_stage"]], ids, v[d["from_stage"]], v[d["to_stage"]], draws[d["objective"]],
                                d["threshold"], tie_tolerance)
        for q, summary in res.items():
            for s in QUARTILE_STATS:
                if s in summary:  # an objective with fewer than 4 eval pairs has empty quartiles ({"n": 0})
                    out[("quartiles", d["objective"], d["column"], d["from_stage"], d["to_stage"], q, s)] = summary[s]
    for (obj, t), b in boot.baselines.items():
        ids, values, _ = data[obj]
        for col in VERDICT_COLUMNS:
            if b == 0:
                out[("change", obj, t, col, "all")] = values[col][t][draws[obj]].mean(-1) - values[col][0][draws[obj]].mean(-1)
                continue
            res = _quartile_changes(values["margin"][b], ids, values[col][b], values[col][t], draws[obj], 0.0, tie_tolerance)
            for q, summary in res.items():
                if "delta_mean" in summary:  # not for an empty quartile
                    out[("change", obj, t, col, q)] = summary["delta_mean"]
    return out


def baseline_stage(stages: list[str], objective: str, t: int) -> int:
    """The last stage before t that trained `objective`, or 0 (the base model)."""
    return max([k for k in range(1, t) if stages[k] == objective], default=0)


def bootstrap(pairs: pd.DataFrame, matrix: dict, *, n_boot: int, seed: int, stay_threshold: float = 0.1,
              tie_tolerance: float = 0.0) -> Bootstrap:
    """Point values and `n_boot` paired replicates of every statistic of a job's pairs and matrix."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    stages, objectives = list(matrix["stages"]), list(matrix["objectives"])
    boot = Bootstrap(stages, objectives, int(n_boot), seed)
    columns = [c for c in dict.fromkeys(col for col, _ in MATRIX_STATS.values()) if c in pairs.columns]
    data = _wide(pairs, objectives, columns, len(stages))
    for obj, (ids, _, dropped) in data.items():
        boot.n_pairs[obj], boot.n_dropped[obj], boot.pair_ids[obj] = len(ids), dropped, ids
    data = {o: d for o, d in data.items() if len(d[0])}
    boot.baselines = {(o, t): baseline_stage(stages, o, t) for o in data for t in range(1, len(stages))}
    decomps = [d for col in P.DECOMPOSED_COLUMNS if col in pairs.columns
               for d in P.pair_decomposition(pairs, stages, col, stay_threshold, tie_tolerance=tie_tolerance)
               if d["objective"] in data]
    identity = {o: np.arange(len(d[0]))[None, :] for o, d in data.items()}
    boot.point = {k: np.asarray(v)[0] for k, v in _statistics(boot, data, identity, decomps, tie_tolerance).items()}
    rng = np.random.default_rng(seed)
    draws = {o: rng.integers(0, len(d[0]), size=(n_boot, len(d[0]))) for o, d in data.items()}
    boot.reps = _statistics(boot, data, draws, decomps, tie_tolerance)
    return boot


def same_pairs(boots: list[Bootstrap]) -> bool:
    """Whether every job scored the same eval pairs (then a pooled bootstrap must draw them once for all)."""
    first = boots[0].pair_ids
    return all(b.pair_ids.keys() == first.keys() and all(np.array_equal(b.pair_ids[o], first[o]) for o in first)
               for b in boots[1:])


def pool(boots: list[Bootstrap]) -> Bootstrap | None:
    """The mean over jobs (e.g. seeds) of every statistic they share, replicate by replicate: the
    pair-level interval of a seed mean. The jobs' draws must be independent (different pairs, different
    seeds) or, when they scored the same pairs, identical (same bootstrap seed): see `same_pairs`."""
    boots = [b for b in boots if b is not None]
    if not boots or len({(tuple(b.stages), tuple(b.objectives), b.n_boot) for b in boots}) != 1:
        return None
    first = boots[0]
    out = Bootstrap(first.stages, first.objectives, first.n_boot, None, baselines=dict(first.baselines))
    for key in set.intersection(*(set(b.reps) for b in boots)):
        out.point[key] = np.mean([b.point[key] for b in boots], axis=0)
        out.reps[key] = np.mean([b.reps[key] for b in boots], axis=0)
    out.n_pairs = {o: sum(b.n_pairs.get(o, 0) for b in boots) for o in first.n_pairs}
    out.n_dropped = {o: sum(b.n_dropped.get(o, 0) for b in boots) for o in first.n_dropped}
    return out


def decide(change: tuple[float, float], quartiles: dict[str, tuple[float, float]]) -> tuple[str, list[str], list[str]]:
    """(verdict, quartiles whose change is above 0, quartiles below 0) from intervals (module docstring)."""
    lo, hi = change
    up = [q for q, (a, _) in quartiles.items() if a > 0]
    down = [q for q, (_, b) in quartiles.items() if b < 0]
    if hi < 0:
        return "degraded", up, down
    if lo > 0:
        return "improved", up, down
    return ("redistributed" if up and down else "stable"), up, down


def verdicts(boot: Bootstrap, level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per (objective, stage >= 1, column): the change against its baseline stage, its interval, the verdict."""
    rows = []
    for (obj, t), b in sorted(boot.baselines.items(), key=lambda kv: (boot.objectives.index(kv[0][0]), kv[0][1])):
        for col in VERDICT_COLUMNS:
            key = ("change", obj, t, col, "all")
            if key not in boot.reps:
                continue
            iv = boot.interval(key, level)
            quart = {q: tuple(boot.interval(("change", obj, t, col, q), level)) for q in P.QUARTILES
                     if ("change", obj, t, col, q) in boot.reps}
            verdict, up, down = decide(tuple(iv), quart)
            rows.append({"objective": obj, "stage": t, "stage_objective": boot.stages[t], "baseline_stage": b,
                         "column": col, "change": _num(boot.point[key]), "interval": _pair(iv), "verdict": verdict,
                         "quartiles_up": up, "quartiles_down": down})
    return rows


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _pair(iv) -> list[float | None]:
    return [_num(iv[0]), _num(iv[1])]


def to_json(boot: Bootstrap, level: float = LEVEL) -> dict[str, Any]:
    """matrix.json's "intervals": every statistic's [low, high] under documented keys (docs/metrics.md)."""
    out: dict[str, Any] = {"level": level, "n_boot": boot.n_boot, "seed": boot.seed, "method": METHOD,
                           "n_pairs": boot.n_pairs, "n_dropped": boot.n_dropped, "metrics": {}, "transfer": {}, "quartiles": []}
    decomps: dict[tuple, dict] = {}
    for key in sorted(boot.reps, key=str):
        iv = boot.interval(key, level)
        if key[0] == "matrix":
            out["metrics"][key[1]] = [[_pair(c) for c in row] for row in iv]
        elif key[0] == "transfer":
            out["transfer"].setdefault(key[1], {}).setdefault(key[2], {})[key[3]] = _pair(iv)
        elif key[0] == "quartiles":
            head = key[1:5]
            d = decomps.setdefault(head, {"objective": head[0], "column": head[1], "from_stage": head[2], "to_stage": head[3],
                                          "quartiles": {}})
            d["quartiles"].setdefault(key[5], {})[key[6]] = _pair(iv)
    out["quartiles"] = list(decomps.values())
    return out


def dropped_message(boot: Bootstrap) -> str | None:
    """What the resampling left out (pairs not scored at every stage), or None."""
    parts = [f"{n} pair(s) of {obj}" for obj, n in boot.n_dropped.items() if n]
    return "intervals leave out " + ", ".join(parts) + " missing at some stage" if parts else None


def job_intervals(pairs: pd.DataFrame, matrix: dict, *, n_boot: int, seed: int, stay_threshold: float = 0.1,
                  tie_tolerance: float = 0.0) -> dict[str, Any]:
    """{"intervals": ..., "verdicts": ...} for matrix.json (empty when n_boot is 0: intervals switched off)."""
    if not n_boot:
        return {}
    boot = bootstrap(pairs, matrix, n_boot=n_boot, seed=seed, stay_threshold=stay_threshold, tie_tolerance=tie_tolerance)
    if dropped_message(boot):
        logging.getLogger("seqdpo").warning(dropped_message(boot))
    return {"intervals": to_json(boot), "verdicts": verdicts(boot)}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for p in (0.5, 1): the CDF integrated numerically (no scipy in the dependencies)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        xs = np.linspace(0.0, x, 20001)
        return 0.5 + float(np.trapezoid(c * (1 + xs**2 / df) ** (-(df + 1) / 2), xs))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values, level: float = LEVEL) -> dict[str, Any]:
    """Mean, sd and t-interval across seeds (independent runs) of one statistic; NaN values left out and counted."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    out = {"n": n, "mean": float(v.mean()) if n else None, "sd": float(v.std(ddof=1)) if n > 1 else None, "interval": None}
    if n > 1:
        half = t_quantile(0.5 + level / 2, n - 1) * out["sd"] / math.sqrt(n)
        out["interval"] = [out["mean"] - half, out["mean"] + half]
    return out
