"""A job's diagnostics as data: what follows from the per-pair table and the matrix (`job_analysis`),
and the shapes W&B and the report read (`wandb_payload`, `grad_cosine_rows`, `report_tables`).

No model and no trainer here: the training-time hooks that measure gradients and adapters are
`seqdpo.analysis.recorder`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from seqdpo.analysis import gradient_probes as GP
from seqdpo.analysis import likelihood as L
from seqdpo.analysis import pairs as P
from seqdpo.analysis import transfer as T
from seqdpo.config import DiagnosticsConfig, EvalConfig


def pair_key(a: str, b: str) -> str:
    return f"{a}__{b}"


def job_analysis(
    pairs: pd.DataFrame,
    matrix: dict,
    stay_threshold: float = DiagnosticsConfig.stay_threshold,
    min_fraction: float = DiagnosticsConfig.redistribution_min_fraction,
    tie_tolerance: float = EvalConfig.tie_tolerance,
) -> dict[str, Any]:
    """Everything that follows from the per-pair table and the matrix alone (no model needed)."""
    stages = list(matrix["stages"])
    out: dict[str, Any] = {"transfer": T.matrix_transfer(matrix, [m for m in T.JOB_METRICS if m in matrix["metrics"]])}
    out["quartiles"] = [
        d
        for col in P.DECOMPOSED_COLUMNS
        if col in pairs.columns
        for d in P.pair_decomposition(pairs, stages, col, stay_threshold, min_fraction, tie_tolerance)
    ]
    needed = {"policy_chosen_logps", "ref_chosen_logps", "policy_rejected_logps", "ref_rejected_logps", "chosen_len", "rejected_len"}
    if needed <= set(pairs.columns):
        shifts = L.likelihood_shifts(pairs, stages)
        out["likelihood"] = shifts
        out["dispersion_untrained"] = {str(k): v for k, v in L.untrained_dispersion(shifts).items()}
    return out


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def compact_stage(d: dict[str, Any]) -> dict[str, Any]:
    """A stage's diagnostics without the per-module entries (kept in stage_k/diagnostics.json)."""
    drop = {"raw_per_module", "effective_per_module"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in drop}
        return x

    return strip(d)


def _flatten(prefix: str, x: Any, out: dict[str, float]) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(x, bool):
        out[prefix] = int(x)
    elif isinstance(x, (int, float)) and x is not None:
        out[prefix] = float(x)


def wandb_payload(stage_diag: dict[str, Any]) -> dict[str, float]:
    """Flat scalar keys of a stage's diagnostics for wandb.log, e.g. `diag/grad_cosine/<a>__<b>/total`,
    `diag/movement/effective_norm`, `diag/update_alignment/<obj>/cos_update_neg_grad`.

    Per-module entries and the step trace are left out (last trace point kept as `diag/grad_cosine_last/...`).
    """
    out: dict[str, float] = {}
    d = compact_stage(stage_diag)
    for key in ("grad_cosine", "grad_norm", "movement", "movement_cosine", "update_alignment", "dispersion_offprompt"):
        if key in d:
            _flatten(f"diag/{key}", d[key], out)
    trace = stage_diag.get("grad_cosine_trace") or []
    if trace:
        for pair, v in trace[-1]["grad_cosine"].items():
            out[f"diag/grad_cosine_last/{pair}"] = float(v["total"]) if v.get("total") is not None else float("nan")
    return out


def grad_cosine_rows(stage_diag: dict[str, Any]) -> list[dict[str, float]]:
    """One row per trace point for a W&B series over `progress` (stage - 1 + step / steps of the stage).

    Pairs are keyed with their objectives sorted (`factual__polite` in every stage and order), so the
    series of one pair runs through all stages and overlays across orders.
    """
    rows = []
    for point in stage_diag.get("grad_cosine_trace") or []:
        row: dict[str, float] = {"progress": float(point["progress"]), "stage": float(stage_diag["stage"])}
        for pair, res in point["grad_cosine"].items():
            key = pair_key(*sorted(pair.split("__", 1)))
            for field in ("total", "ci_low", "ci_high", "corrected"):
                if res.get(field) is not None:
                    row[f"{key}/{field}"] = float(res[field])
            if res.get("corrected") is not None:
                row[f"{key}/corrected_clipped"] = float(res.get("corrected_status") == GP.CLIPPED)
            for obj, r in (res.get("reliability") or {}).items():
                if r is not None:
                    row[f"reliability/{obj}"] = float(r)
        rows.append(row)
    return rows


def report_tables(job_diag: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """DataFrames of finalize()'s output for wandb.Table(dataframe=...): transfer, quartiles, likelihood, grad_cosine."""
    tables: dict[str, pd.DataFrame] = {}
    if "transfer" in job_diag:
        tables["transfer"] = pd.DataFrame(T.transfer_rows(job_diag["transfer"]))
    if job_diag.get("quartiles"):
        tables["quartiles"] = pd.DataFrame(P.decomposition_rows(job_diag["quartiles"]))
    if job_diag.get("likelihood"):
        tables["likelihood"] = pd.DataFrame(job_diag["likelihood"])
    rows = []
    for k, st in (job_diag.get("stages") or {}).items():
        for pair, res in (st.get("grad_cosine") or {}).items():
            rows.append({"stage": int(k), "pair": pair, "group": "total", "cosine": res.get("total")})
            for grp in ("per_layer", "per_module"):
                for name, c in (res.get(grp) or {}).items():
                    rows.append({"stage": int(k), "pair": pair, "group": f"{grp[4:]}:{name}", "cosine": c})
    if rows:
        tables["grad_cosine"] = pd.DataFrame(rows)
    return tables
