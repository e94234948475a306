"""Degeneration guards: per generation, what a rising score could be hiding.

    table = guard_table(ctx, gens, prompts)    # objective, prompt_id, sample, then the GUARDS columns

nll_base     negative log-likelihood per token of the response under the base model (adapter off; the
             end token included): fluency as the model before any stage reads it. Junk and loops raise it
distinct_1   distinct words over words of the response, distinct_2 the same for word bigrams (NaN below
             1 or 2 words): repetition lowers them
well_formed  synthetic world only: 1 when the response has the world's form (`synthetic.well_formed`), else
             0. The oracle scores well-formed responses only, so this is the fraction it speaks for

The generation length is the `length` metric (tokens before the end token, from generations.parquet).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from seqdpo.behaviour.scorers import base_response_logps
from seqdpo.data.synthetic import well_formed

GUARDS = ("nll_base", "distinct_1", "distinct_2", "well_formed")
KEYS = ["objective", "prompt_id", "sample"]


def distinct_n(text: str, n: int) -> float:
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def guard_table(ctx, gens: pd.DataFrame, prompts: dict) -> pd.DataFrame:
    """The guards of every generation of `gens` (a stage's table); `prompts`: objective -> {prompt_id: messages}."""
    frames = []
    for objective, g in gens.groupby("objective", sort=False):
        texts = list(g.text)
        ds, base = base_response_logps(ctx, objective, [prompts[objective][p] for p in g.prompt_id], texts,
                                       ctx.settings.batch_size)
        nll = np.full(len(texts), np.nan)  # NaN: model.max_length left nothing of the response to read
        kept = [int(pid[1:]) for pid in ds["pair_id"]]
        nll[kept] = -base["chosen_logps"] / np.maximum(base["chosen_len"], 1)
        columns = {"nll_base": nll, "distinct_1": [distinct_n(t, 1) for t in texts],
                   "distinct_2": [distinct_n(t, 2) for t in texts]}
        if ctx.settings.dataset.name == "synthetic":
            columns["well_formed"] = [float(well_formed(t)) for t in texts]
        frames.append(g[KEYS].assign(**columns))
    return pd.concat(frames, ignore_index=True)
