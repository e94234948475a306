"""Paired bootstrap intervals and verdicts for one job's evaluation (docs/metrics.md, "Intervals and verdicts").

The same eval pairs are scored after every stage, so one replicate draws each objective's pairs once
(n draws with replacement from its n pairs) and applies that draw to every stage, every matrix metric,
every transfer figure and every quartile fraction. A change between stages is thereby resampled as
a per-pair difference: its interval holds what the eval pairs' sampling leaves uncertain, without the
between-pair spread that is common to both stages. Intervals are percentile intervals (LEVEL) over
`n_boot` replicates drawn from numpy's PCG64 seeded with `seed`.

Verdict of objective j after stage t >= 1, per column c in VERDICT_COLUMNS, against the baseline
stage b (`baseline_stage`): t - 1 when stage t trains j ("learning": what stage t taught, apart from
the transfer before it), else the last stage before t that trained j ("retention"), else 0, the base
model ("transfer"); m = the column's `eval.min_effect` (the smallest change worth a claim, declared
before looking):

    degraded       the interval of mean_i (c_i^t - c_i^b) lies below 0
    improved       it lies above 0
    redistributed  it contains 0, one quartile's interval of mean change lies above 0 while another's
                   lies below 0 (quartiles by margin after b, as in pairs.py), and the move is beyond
                   what regression to the mean gives: see `redistribution` (only for b >= 1, since after
                   the base every margin is 0)
    equivalent     it lies inside [-m, m]: any change is smaller than the study cares about
    inconclusive   otherwise: the interval holds 0 and changes of at least m (more pairs or seeds needed)

A job's verdicts are conditional on its one training run; the report's verdicts across seeds use
the seeds' t-interval (seed_inference.py).

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
from scipy import stats

from seqdpo.analysis import pairs as P
from seqdpo.analysis import seed_inference as S
from seqdpo.analysis import transfer as T
from seqdpo.config import MIN_EFFECT, DiagnosticsConfig, EvalConfig
from seqdpo.evaluation import MATRIX_STATS

LEVEL = 0.95
METHOD = ("paired percentile bootstrap over pair_id; Wilson score interval for an accuracy cell with fewer than 5 "
          "pairs on one side")
VERDICT_COLUMNS = {"accuracy": "accuracy", "margin": "margin_mean"}  # per-pair column -> its matrix metric
QUARTILE_STATS = ("frac_improved", "frac_stayed", "frac_degraded", "delta_mean")
VERDICTS = ("degraded", "improved", "redistributed", "equivalent", "inconclusive")
REDISTRIBUTION_EVIDENCE = ("by_start", "by_end", "crossing")
PROPORTIONS = ("accuracy", "policy_accuracy")  # matrix metrics that are fractions of pairs


@dataclass
class Bootstrap:
    """Point values and replicates of every statistic of one job (or the mean of several, see `pool`).

    Keys: ("matrix", metric) -> [stages, objectives] (replicates [n_boot, stages, objectives]);
    ("transfer", metric, objective or "_all", quantity); ("quartiles", objective, column, from, to,
    quartile or "all", stat); ("change", objective, stage, column, "all" or quartile): the verdict's mean
    change against its baseline stage (overall and per quartile of the margin at the baseline stage);
    ("redistribution", objective, stage, column, "by_start" | "by_end" | "crossing"): the contrasts
    `redistribution` reads. Replicates have the point's shape with n_boot in front.
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
    pair_content: dict[str, np.ndarray] = field(default_factory=dict)  # their content hashes (or None: unknown)

    def interval(self, key: tuple, level: float = LEVEL) -> np.ndarray:
        """[..., 2]: lower and upper percentile bounds of the key's replicates. A proportion cell with fewer
        than 5 pairs on one side gets the Wilson interval instead: its bootstrap collapses to [1, 1] at 64 of 64."""
        q = 50.0 * np.array([1.0 - level, 1.0 + level])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (objective missing at a stage)
            out = np.moveaxis(np.nanpercentile(self.reps[key], q, axis=0), 0, -1)
        if key[0] == "matrix" and key[1] in PROPORTIONS:
            for (t, j), p in np.ndenumerate(np.asarray(self.point[key], dtype=float)):
                n = self.n_pairs.get(self.objectives[j], 0)
                if n and np.isfinite(p) and min(p, 1 - p) * n < 5:
                    out[t, j] = S.wilson(p * n, n, level)
        return out


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
            by_start, by_end = (_quartile_changes(values["margin"][at], ids, values[col][b], values[col][t], draws[obj], 0.0,
                                                  tie_tolerance) for at in (b, t))
            for q, summary in by_start.items():
                if "delta_mean" in summary:  # not for an empty quartile
                    out[("change", obj, t, col, q)] = summary["delta_mean"]
            if len(ids) >= len(P.QUARTILES):
                for e, value in _redistribution_evidence(by_start, by_end).items():
                    out[("redistribution", obj, t, col, e)] = value
    return out


def baseline_stage(stages: list[str], objective: str, t: int) -> int:
    """The stage a verdict of `objective` after stage t is measured against (`reading` says what it measures).

    A stage that trains the objective is measured against the stage just before it: what that stage
    taught, kept apart from the transfer that reached the objective earlier (the verdict at t - 1,
    against the base, holds that). Otherwise the last stage before t that trained it (what is left of
    its training), or 0, the base model, when none has yet (transfer).
    """
    if stages[t] == objective:
        return t - 1
    return max([k for k in range(1, t) if stages[k] == objective], default=0)


def reading(stages: list[str], objective: str, t: int) -> str:
    """What the verdict of `objective` after stage t measures: "learning" (stage t trained it, against
    t - 1), "retention" (against its last training stage), or "transfer" (against the base, not yet trained)."""
    if stages[t] == objective:
        return "learning"
    return "retention" if baseline_stage(stages, objective, t) else "transfer"


def bootstrap(pairs: pd.DataFrame, matrix: dict, *, n_boot: int, seed: int,
              stay_threshold: float = DiagnosticsConfig.stay_threshold,
              tie_tolerance: float = EvalConfig.tie_tolerance) -> Bootstrap:
    """Point values and `n_boot` paired replicates of every statistic of a job's pairs and matrix."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    stages, objectives = list(matrix["stages"]), list(matrix["objectives"])
    boot = Bootstrap(stages, objectives, int(n_boot), seed)
    columns = [c for c in dict.fromkeys(col for col, _ in MATRIX_STATS.values()) if c in pairs.columns]
    data = _wide(pairs, objectives, columns, len(stages))
    content = pairs.drop_duplicates(["objective", "pair_id"]).set_index(["objective", "pair_id"])["content_hash"] \
        if "content_hash" in pairs.columns else None
    for obj, (ids, _, dropped) in data.items():
        boot.n_pairs[obj], boot.n_dropped[obj], boot.pair_ids[obj] = len(ids), dropped, ids
        boot.pair_content[obj] = None if content is None else content.loc[obj].reindex(ids).to_numpy()
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
    """Whether every job scored the same eval pairs, by content (prompt, chosen and rejected token ids),
    in the same draw order: then a pooled bootstrap must draw them once for all. Never by pair id: synthetic
    ids repeat across seeds while the pairs behind them differ. Jobs without content hashes (pairs.parquet
    from before they were stored) count as different pairs."""
    first = boots[0].pair_content
    return all(b.pair_content.keys() == first.keys()
               and all(first[o] is not None and b.pair_content[o] is not None and np.array_equal(b.pair_content[o], first[o])
                       for o in first)
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


def _moved(quartiles: dict[str, tuple[float, float]]) -> tuple[list[str], list[str]]:
    """(quartiles whose interval of mean change lies above 0, those below 0), in quartile order."""
    return [q for q, (a, _) in quartiles.items() if a > 0], [q for q, (_, b) in quartiles.items() if b < 0]


def _redistribution_evidence(by_start: dict[str, dict], by_end: dict[str, dict]) -> dict[str, Any]:
    """The three contrasts `redistribution` reads, from pairs.summarize_change per quartile of the margin
    at the baseline stage (`by_start`) and at the stage judged (`by_end`)."""
    return {"by_start": by_start["Q1"]["delta_mean"] - by_start["Q4"]["delta_mean"],
            "by_end": by_end["Q1"]["delta_mean"] - by_end["Q4"]["delta_mean"],
            "crossing": by_start["Q1"]["after_mean"] - by_start["Q4"]["after_mean"]}


def redistribution(evidence: dict[str, tuple[float, float]]) -> list[str]:
    """How the pairs moved by confidence beyond regression to the mean ([] = not beyond it).

    `evidence`: intervals of the change b -> t of Q1 minus that of Q4, with quartiles of the margin at b
    (`by_start`) and at t (`by_end`), and of the value at t of Q1 minus Q4 of the margin at b (`crossing`).
    Any part of a pair's margin at b that later stages do not keep (evaluation and training noise alike)
    pushes `by_start` up (Q1 rises, Q4 falls: regression to the mean, with no redistribution at all),
    pushes `by_end` down (the pairs that end highest are those that rose), and cannot make Q1 of b end
    above Q4 of b. Against pure noise, whatever its size at b and at t, a change is therefore beyond
    regression to the mean only as
        compression  by_start > 0 and by_end > 0: the spread of the margins shrank by more than the noise
                     at t can explain (the paper's "Q4 down, Q1 up")
        expansion    by_start < 0 and by_end < 0: the confident pairs gained against the noise
        crossing     crossing > 0: the pairs least confident after b now beat the most confident
    each read off its interval. Pure noise fires none of them beyond the interval's error rate. The price:
    a compression smaller than the noise at t is not called (two stages' margins cannot tell it from
    regression to the mean). Quartiles cross-fitted on random halves of the pairs would not help: each
    pair's quartile and its change would still share that pair's own noise at b.
    """
    if not evidence:
        return []
    (start_lo, start_hi), (end_lo, end_hi) = evidence["by_start"], evidence["by_end"]
    fired = {"compression": start_lo > 0 and end_lo > 0, "expansion": start_hi < 0 and end_hi < 0,
             "crossing": evidence["crossing"][0] > 0}
    return [name for name, hit in fired.items() if hit]


def decide(change: tuple[float, float], quartiles: dict[str, tuple[float, float]], min_effect: float,
           evidence: dict[str, tuple[float, float]] | None = None) -> tuple[str, list[str], list[str]]:
    """(verdict, quartiles whose change is above 0, quartiles below 0) from intervals (module docstring)."""
    lo, hi = change
    up, down = _moved(quartiles)
    if hi < 0:
        return "degraded", up, down
    if lo > 0:
        return "improved", up, down
    if up and down and redistribution(evidence or {}):
        return "redistributed", up, down
    return ("equivalent" if -min_effect <= lo and hi <= min_effect else "inconclusive"), up, down


def min_detectable(reps: np.ndarray, level: float = LEVEL, power: float = S.POWER) -> float | None:
    """The change a two-sided test at `level` finds with `power`, from its bootstrap SE (normal approximation)."""
    se = float(np.nanstd(reps, ddof=1))
    return _num((stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(power)) * se) if len(reps) > 1 else None


def verdicts(boot: Bootstrap, min_effect: dict[str, float] | None = None, level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per (objective, stage >= 1, column): the change against its baseline stage, its interval, the verdict,
    the margin it was judged against and the smallest change this job's pairs detect (80% power)."""
    margins = {**MIN_EFFECT, **(min_effect or {})}
    rows = []
    for (obj, t), b in sorted(boot.baselines.items(), key=lambda kv: (boot.objectives.index(kv[0][0]), kv[0][1])):
        for col in VERDICT_COLUMNS:
            key = ("change", obj, t, col, "all")
            if key not in boot.reps:
                continue
            iv = boot.interval(key, level)
            quart = {q: tuple(boot.interval(("change", obj, t, col, q), level)) for q in P.QUARTILES
                     if ("change", obj, t, col, q) in boot.reps}
            evidence = {e: tuple(boot.interval(("redistribution", obj, t, col, e), level)) for e in REDISTRIBUTION_EVIDENCE
                        if ("redistribution", obj, t, col, e) in boot.reps}
            verdict, up, down = decide(tuple(iv), quart, margins[col], evidence)
            rows.append({"objective": obj, "stage": t, "stage_objective": boot.stages[t], "baseline_stage": b,
                         "reading": reading(boot.stages, obj, t),
                         "column": col, "change": _num(boot.point[key]), "interval": _pair(iv), "verdict": verdict,
                         "min_effect": margins[col], "min_detectable": min_detectable(boot.reps[key], level),
                         "quartiles_up": up, "quartiles_down": down,
                         "redistribution": redistribution(evidence) if verdict == "redistributed" else []})
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


def job_intervals(pairs: pd.DataFrame, matrix: dict, *, n_boot: int, seed: int,
                  stay_threshold: float = DiagnosticsConfig.stay_threshold, tie_tolerance: float = EvalConfig.tie_tolerance,
                  min_effect: dict[str, float] | None = None) -> dict[str, Any]:
    """{"intervals": ..., "verdicts": ...} for matrix.json (empty when n_boot is 0: intervals switched off)."""
    if not n_boot:
        return {}
    boot = bootstrap(pairs, matrix, n_boot=n_boot, seed=seed, stay_threshold=stay_threshold, tie_tolerance=tie_tolerance)
    if dropped_message(boot):
        logging.getLogger("seqdpo").warning(dropped_message(boot))
    return {"intervals": to_json(boot), "verdicts": verdicts(boot, min_effect)}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy's; this used to integrate the density by hand, from before scipy was a dependency)."""
    return float(stats.t.ppf(p, df))


def seed_interval(values, level: float = LEVEL, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean, sd and t-interval (clipped to `bounds`) across seeds (independent runs) of one statistic; NaN
    values left out and counted."""
    out = S.t_summary(values, level, bounds)
    return {k: out[k] for k in ("n", "mean", "sd", "interval")}
