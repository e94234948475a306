"""Behaviour metrics of one stage against the base model, with 95% bootstrap intervals over prompts.

Per objective, a prompt's value is the mean over its samples; then

    score_mean   mean score of the stage's generations
    score_delta  mean over prompts of (stage - base), paired by prompt
    win_rate     fraction of prompts where the stage beats the base (ties count 1/2)
    length       mean generated tokens (length drift is a known DPO side effect)

Each comes with the 2.5% and 97.5% percentiles of `n_boot` (eval.bootstrap) resamples of the prompts,
seeded by the run's seed (NaN when eval.bootstrap = 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METRICS = ("score_mean", "score_delta", "win_rate", "length")


def bootstrap_interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) == 0 or n_boot == 0:  # eval.bootstrap=0: no intervals
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def per_prompt(scored: pd.DataFrame) -> pd.DataFrame:
    """Mean score and length per (objective, prompt) over its samples."""
    return scored.groupby(["objective", "prompt_id"]).agg(score=("score", "mean"), length=("n_tokens", "mean"))


def stage_metrics(stage: pd.DataFrame, base: pd.DataFrame, *, n_boot: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """objective -> metric -> [value, low, high] for one stage's scored generations against the base's."""
    s, b = per_prompt(stage), per_prompt(base)
    out = {}
    for objective in s.index.get_level_values(0).unique():
        so = s.loc[objective]
        bo = b.loc[objective].reindex(so.index) if objective in b.index.get_level_values(0) else so * np.nan
        diff = (so.score - bo.score).to_numpy()
        per = {
            "score_mean": so.score.to_numpy(),
            "score_delta": diff,
            "win_rate": np.where(np.abs(diff) <= 1e-9, 0.5, (diff > 0).astype(float)),
            "length": so.length.to_numpy(),
        }
        out[objective] = {m: [float(np.mean(v)), *bootstrap_interval(v, n_boot, seed)] for m, v in per.items()}
    return out
