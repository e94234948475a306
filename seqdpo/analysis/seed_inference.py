"""Inference across training seeds: what a sweep may claim about a method, not about one trained adapter.

A job's paired bootstrap (intervals.py) holds the eval pairs' sampling only. Seeds add training
randomness (LoRA init, data order, dropout), measured on the synthetic world at 1.75x the per-seed
bootstrap SE (docs/report.md, "How sure is a verdict?"). With k seeds each statistic has k per-seed
estimates, and their spread already contains each seed's eval noise, so:

    t-interval (T_METHOD)     mean +- t_{k-1} sd / sqrt(k) of the per-seed estimates. The verdicts and
                              contrasts use it: its coverage is 0.95 at 3 and 5 seeds when the per-seed
                              estimates are roughly normal (tests/test_seed_inference.py simulates it).
    two-level bootstrap       resample seeds, then one pair-bootstrap replicate within each drawn seed.
                              Shown beside, not used: at k = 3 it has 10 distinct seed sets and its
                              spread is biased low by (k-1)/k, so it undercovers (same test).
    pooled pair interval      the mean of the seeds' pair replicates: eval sampling alone, blind to the
                              seed spread; labelled so wherever it appears.

Contrasts between two settings: paired by seed (a t-test on the per-seed differences) when both ran
the same seeds on the same eval pairs, Welch's t otherwise. A permutation test over seed labels would
be exact but has 20 arrangements at 3 vs 3 seeds (smallest two-sided p 0.1) and a sign-flip test 8,
so p-values come from the t distributions. Multiplicity: Holm over a few planned contrasts
(family-wise error), Benjamini-Hochberg over screens of many cells (false discovery rate).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95
POWER = 0.8
T_METHOD = "t-interval across seeds"
PAIRED, WELCH = "paired by seed (t on per-seed differences)", "Welch t (seeds not shared)"
# Measured across seeds on the synthetic world (docs/report.md, "How sure is a verdict?"): what one seed's
# spread is likely to be, in units of its own pair-bootstrap SE, when no second seed says.
SEED_SD_PER_EVAL_SE = 1.75
MAX_SEEDS = 1000


def clip(interval, bounds: tuple[float, float] | None):
    """An interval cut to the statistic's possible range (None: unbounded)."""
    if interval is None or bounds is None:
        return interval
    return [min(max(x, bounds[0]), bounds[1]) for x in interval]


def t_summary(values, level: float = LEVEL, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """n, mean, sd, se, the t-interval (clipped to `bounds`) and the p-value of mean = 0, from per-seed values
    (None and NaN left out)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    out = {"n": n, "mean": float(v.mean()) if n else None, "sd": None, "se": None, "interval": None, "p": None}
    if n > 1:
        out["sd"] = float(v.std(ddof=1))
        out["se"] = out["sd"] / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * out["se"]
        out["interval"] = clip([out["mean"] - half, out["mean"] + half], bounds)
        out["p"] = _p(out["mean"], out["se"], n - 1)
    return out


def _p(diff: float, se: float, df: float) -> float:
    """Two-sided p of diff = 0 from its t statistic; 1 when there is no spread and no difference."""
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * stats.t.sf(abs(diff) / se, df))


def contrast(a, b, paired: bool, level: float = LEVEL, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Difference of means a - b with its t-interval and p-value: paired (a[i], b[i] from the same seed) or Welch."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired:
        s = t_summary(a - b, level, bounds)
        return {"diff": s["mean"], "interval": s["interval"], "p": s["p"], "df": s["n"] - 1, "method": PAIRED}
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else None
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "interval": None, "p": None, "df": None, "method": WELCH}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return {"diff": diff, "interval": clip([diff - half, diff + half], bounds), "p": _p(diff, se, df), "df": float(df),
            "method": WELCH}


def two_level_replicates(reps: np.ndarray, rng: np.random.Generator, n_out: int) -> np.ndarray:
    """[n_out, ...] two-level bootstrap replicates of the seed mean from each seed's pair-bootstrap
    replicates `reps` [k seeds, B, ...]: draw k seeds with replacement, then one replicate of each."""
    k, B = reps.shape[:2]
    seeds = rng.integers(0, k, size=(n_out, k))
    within = rng.integers(0, B, size=(n_out, k))
    return reps[seeds, within].mean(axis=1)


def percentile_interval(reps: np.ndarray, level: float = LEVEL, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """[..., 2] percentile bounds over the first axis, clipped to `bounds`."""
    out = np.moveaxis(np.nanpercentile(reps, 50.0 * np.array([1.0 - level, 1.0 + level]), axis=0), 0, -1)
    return out if bounds is None else np.clip(out, *bounds)


def holm(p) -> list[float | None]:
    """Holm-adjusted p-values (family-wise error), None kept in place."""
    idx = [i for i, x in enumerate(p) if x is not None and np.isfinite(x)]
    out: list[float | None] = [None] * len(p)
    m, running = len(idx), 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def bh(p) -> list[float | None]:
    """Benjamini-Hochberg-adjusted p-values (false discovery rate), None kept in place."""
    idx = [i for i, x in enumerate(p) if x is not None and np.isfinite(x)]
    out: list[float | None] = [None] * len(p)
    m, running = len(idx), 1.0
    for rank, i in reversed(list(enumerate(sorted(idx, key=lambda i: p[i]), start=1))):
        running = min(running, m * p[i] / rank)
        out[i] = running
    return out


def wilson(successes: float, n: int, level: float = LEVEL) -> list[float]:
    """Wilson score interval of a proportion: not degenerate at 0 or n successes, where a bootstrap is."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def min_detectable(sd: float | None, k: int, level: float = LEVEL, power: float = POWER) -> float | None:
    """The smallest true mean a two-sided t-test on k per-seed values finds with `power`, for seed sd `sd`."""
    if sd is None or k < 2 or not np.isfinite(sd):
        return None
    return float((stats.t.ppf(0.5 + level / 2, k - 1) + stats.t.ppf(power, k - 1)) * sd / math.sqrt(k))


def seeds_needed(sd: float | None, effect: float, level: float = LEVEL, power: float = POWER) -> int | None:
    """The fewest seeds whose t-test finds a true mean of `effect` with `power` at seed sd `sd` (None: over MAX_SEEDS)."""
    if sd is None or not np.isfinite(sd) or effect <= 0:
        return None
    k = np.arange(2, MAX_SEEDS + 1)
    mde = (stats.t.ppf(0.5 + level / 2, k - 1) + stats.t.ppf(power, k - 1)) * sd / np.sqrt(k)
    enough = np.flatnonzero(mde <= effect)
    return int(k[enough[0]]) if len(enough) else None
