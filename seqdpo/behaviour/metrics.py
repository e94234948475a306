"""Behaviour metrics of one stage against the base model, with 95% intervals over prompts.

Per objective, a prompt's value is the mean over its samples (NaN scores, e.g. the oracle's on a malformed
generation, left out; a prompt none of whose samples is scored is left out); then

    score_mean   mean score of the stage's generations
    score_delta  mean over prompts of (stage - base), paired by prompt (prompts scored in both)
    win_rate     fraction of prompts where the stage beats the base (ties count 1/2); not for an
                 objective-blind scorer (`implicit`), whose number is no score of the objective
    length       mean generated tokens (length drift is a known DPO side effect)

and the degeneration guards of `guards.py` (nll_base, distinct_1, distinct_2, well_formed), means over
prompts like `length`. Intervals: win_rate the Wilson score interval over prompts (wins counted with ties
as 1/2), which stays wide at 0 and 1 where a bootstrap of 16 wins in 16 collapses to [1, 1]; every other
metric the 2.5% and 97.5% percentiles of `n_boot` (eval.bootstrap) resamples of the prompts, seeded by the
run's seed (NaN when eval.bootstrap = 0). These cover prompts of one run; across training seeds the report
gives t-intervals (`seqdpo.analysis.intervals.seed_interval`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from seqdpo.analysis import seed_inference as S
from seqdpo.behaviour.guards import GUARDS

SCORE_METRICS = ("score_mean", "score_delta", "win_rate")
METRICS = (*SCORE_METRICS, "length", *GUARDS)


def bootstrap_interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) == 0 or n_boot == 0:  # eval.bootstrap=0: no intervals
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def wilson_interval(wins: float, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion of `wins` in `n` (wins may hold halves, for ties); NaN for no prompts."""
    return (float("nan"), float("nan")) if n == 0 else tuple(S.wilson(wins, n))


def per_prompt(scored: pd.DataFrame) -> pd.DataFrame:
    """Mean score, length and guards per (objective, prompt) over its samples."""
    columns = {"score": ("score", "mean"), "length": ("n_tokens", "mean")}
    columns.update({g: (g, "mean") for g in GUARDS if g in scored})
    return scored.groupby(["objective", "prompt_id"]).agg(**columns)


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def stage_metrics(stage: pd.DataFrame, base: pd.DataFrame, *, n_boot: int, seed: int,
                  win_rate: bool = True) -> dict[str, dict[str, list[float]]]:
    """objective -> metric -> [value, low, high] for one stage's scored generations against the base's.
    Guards absent from `stage` (well_formed off the synthetic world) are absent from the result."""
    s, b = per_prompt(stage), per_prompt(base)
    out = {}
    for objective in s.index.get_level_values(0).unique():
        so = s.loc[objective]
        bo = b.loc[objective].reindex(so.index) if objective in b.index.get_level_values(0) else so * np.nan
        diff = (so.score - bo.score).dropna().to_numpy()
        per = {"score_mean": so.score.dropna().to_numpy(), "score_delta": diff, "length": so.length.to_numpy()}
        per.update({g: so[g].dropna().to_numpy() for g in GUARDS if g in so})
        out[objective] = {m: [_mean(v), *bootstrap_interval(v, n_boot, seed)] for m, v in per.items()}
        if win_rate:
            wins = np.where(np.abs(diff) <= 1e-9, 0.5, (diff > 0).astype(float))
            out[objective]["win_rate"] = [_mean(wins), *wilson_interval(float(wins.sum()), len(wins))]
    return out
