"""Cross-objective evaluation: the per-pair table of one stage and the stage x objective matrix.

Every objective is scored after every stage against the same reference, the base model, so numbers
compare across stages whatever reference the training used (the paper's "fixed base-model reference").
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from seqdpo.logprobs import dataset_logps
from seqdpo.packing import DEFAULT_PACKING

# Matrix metric -> (per-pair column, statistic over an objective's pairs); also what intervals resample.
MATRIX_STATS = {
    "accuracy": ("accuracy", "mean"),
    "margin_mean": ("margin", "mean"),
    "margin_median": ("margin", "median"),
    "norm_margin_mean": ("norm_margin", "mean"),
    "policy_accuracy": ("policy_accuracy", "mean"),
}
MATRIX_METRICS = tuple(MATRIX_STATS)


def score(x: np.ndarray, tie_tolerance: float) -> np.ndarray:
    """1 where x > tol, 0.5 for a tie (|x| <= tol), 0 otherwise: at stage 0 every margin is 0, which is chance, not failure."""
    return np.where(np.abs(x) <= tie_tolerance, 0.5, (x > 0).astype(float))


def pair_table(
    logps: dict[str, np.ndarray],
    ref_chosen: np.ndarray,
    ref_rejected: np.ndarray,
    pair_ids: list[str],
    *,
    beta: float,
    tie_tolerance: float,
) -> pd.DataFrame:
    """Per-pair metrics from policy and reference sequence log-probs (sums over completion tokens)."""
    df = pd.DataFrame(
        {
            "pair_id": pair_ids,
            "policy_chosen_logps": logps["chosen_logps"],
            "policy_rejected_logps": logps["rejected_logps"],
            "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected,
            "chosen_len": logps["chosen_len"].astype(int),
            "rejected_len": logps["rejected_len"].astype(int),
        }
    )
    df["reward_chosen"] = beta * (df.policy_chosen_logps - df.ref_chosen_logps)
    df["reward_rejected"] = beta * (df.policy_rejected_logps - df.ref_rejected_logps)
    df["margin"] = df.reward_chosen - df.reward_rejected
    df["norm_margin"] = df.policy_chosen_logps / df.chosen_len - df.policy_rejected_logps / df.rejected_len
    df["accuracy"] = score(df.margin.to_numpy(), tie_tolerance)
    df["policy_accuracy"] = score(df.norm_margin.to_numpy(), tie_tolerance)
    return df


def evaluate_stage(
    model,
    eval_sets: dict,
    *,
    stage: int,
    stage_objective: str,
    beta: float,
    batch_size: int,
    tie_tolerance: float,
    packing: str = DEFAULT_PACKING,
) -> pd.DataFrame:
    """Scores every objective's eval split with `model` as it stands.

    `eval_sets` maps objective name -> tokenized eval Dataset with `ref_chosen_logps` and
    `ref_rejected_logps` columns (the base model's, from the reference cache). `packing` is the batch
    layout (`model.packing`).
    """

    def policy(name, ds):
        return dataset_logps(model, ds, batch_size, desc=f"eval stage {stage} on {name}", packing=packing)

    return _stage_table(eval_sets, policy, stage, stage_objective, beta=beta, tie_tolerance=tie_tolerance)


def evaluate_base(eval_sets: dict, *, beta: float, tie_tolerance: float) -> pd.DataFrame:
    """Stage 0, read from the reference columns instead of a forward pass.

    Before training the policy is the base model (LoRA's B starts at zero), so its log-probs are the
    reference's. The shared reference cache may hold values another job computed in another batch layout
    (`model.packing`, `eval.batch_size`), whose rounding (~1e-6) would turn some of stage 0's ties into wins
    and losses; reading the same numbers makes every base margin exactly 0, and saves a pass.
    """

    def policy(name, ds):
        return {
            "chosen_logps": np.asarray(ds["ref_chosen_logps"], dtype=float),
            "rejected_logps": np.asarray(ds["ref_rejected_logps"], dtype=float),
            "chosen_len": np.fromiter(map(len, ds["chosen_ids"]), dtype=np.int64, count=len(ds)),
            "rejected_len": np.fromiter(map(len, ds["rejected_ids"]), dtype=np.int64, count=len(ds)),
        }

    return _stage_table(eval_sets, policy, 0, "base", beta=beta, tie_tolerance=tie_tolerance)


def _stage_table(eval_sets: dict, policy, stage: int, stage_objective: str, *, beta: float, tie_tolerance: float):
    frames = []
    for name, ds in eval_sets.items():
        df = pair_table(
            policy(name, ds),
            np.asarray(ds["ref_chosen_logps"], dtype=float),
            np.asarray(ds["ref_rejected_logps"], dtype=float),
            list(ds["pair_id"]),
            beta=beta,
            tie_tolerance=tie_tolerance,
        )
        df.insert(0, "objective", name)
        df["content_hash"] = content_hashes(ds)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "stage_objective", stage_objective)
    out.insert(0, "stage", stage)
    return out


def content_hashes(ds) -> list[str]:
    """One hash per pair of its prompt, chosen and rejected token ids: what pools seeds pair by pair. Pair ids
    cannot: synthetic ids (`polite-eval-3`) repeat across seeds while the pairs behind them differ."""
    cols = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    return [hashlib.sha256(b"|".join(np.asarray(ids, dtype=np.int64).tobytes() for ids in row)).hexdigest()[:16]
            for row in zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])]


def summarize(pairs: pd.DataFrame, stage_names: list[str], objectives: list[str], beta: float) -> dict:
    """The stage x objective matrix of each metric (rows: stages, columns: objectives)."""
    g = pairs.groupby(["stage", "objective"])
    per = {key: getattr(g[col], stat)() for key, (col, stat) in MATRIX_STATS.items()}
    metrics = {
        key: [[float(series.get((s, o), np.nan)) for o in objectives] for s in range(len(stage_names))]
        for key, series in per.items()
    }
    return {"stages": stage_names, "objectives": objectives, "beta": beta, "metrics": metrics}
