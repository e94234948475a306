"""The W&B keys a job writes, laid out so runs compare in W&B's UI without hand work.

- config: flat keys `dataset`, `order`, `loss`, `lora_r`, `beta`, `lr`, `seed`, `reference` (group and
  filter by any of them), the full resolved config under `cfg` (seqdpo.job_settings.run_labels).
- eval series: `eval/<objective>/<metric>` against `eval/stage` (the stage index, 0 = base), one row per
  stage, so a line plot overlays orders.
- matrix summary: `matrix/<metric>/stage<k>/<objective>`: the same key in every order.
- transfer summary: `transfer/<metric>/{BWT,FWT,forgetting,forgetting_max,ACC}` and
  `transfer/<metric>/<objective>/{learning,forgetting,forward,backward}`.
- intervals (matrix.json's `intervals`, when present): `<matrix or transfer key>_low` / `_high` beside each
  value above.
- verdicts (matrix.json's `verdicts`): `verdict/<column>/stage<k>/<objective>` = degraded | improved |
  redistributed | equivalent | inconclusive, with `change/<column>/stage<k>/<objective>`, its `_low` /
  `_high`, `min_detectable/<column>/stage<k>/<objective>` (the change this job's pairs detect), and
  `reading/<column>/stage<k>/<objective>` = learning (stage k trained it: against stage k - 1) |
  retention (against its last training stage) | transfer (against the base).
"""

from __future__ import annotations

import math
from typing import Any

PER_OBJECTIVE = ("learning", "forgetting", "forward", "backward")
AGGREGATES = ("BWT", "FWT", "forgetting", "forgetting_max", "ACC")


def eval_row(stage: int, summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """One row of the eval series: {"stage": k, "<objective>/<metric>": value} from {metric: {objective: value}}."""
    row: dict[str, float] = {"stage": stage}
    for metric, per_objective in summary.items():
        row.update({f"{obj}/{metric}": float(v) for obj, v in per_objective.items()})
    return row


def matrix_summary(matrix: dict) -> dict[str, float]:
    return {
        f"matrix/{metric}/stage{k}/{obj}": v
        for metric, values in matrix["metrics"].items()
        for k, row in enumerate(values)
        for obj, v in zip(matrix["objectives"], row)
    }


def transfer_summary(transfer: dict[str, Any]) -> dict[str, float]:
    """BWT, FWT, forgetting, ... of diagnostics.json's `transfer` as scalars (None and NaN left out)."""
    out: dict[str, float] = {}
    for metric, t in transfer.items():
        for key in AGGREGATES:
            _put(out, f"transfer/{metric}/{key}", t.get(key))
        for obj, per in (t.get("per_objective") or {}).items():
            for key in PER_OBJECTIVE:
                _put(out, f"transfer/{metric}/{obj}/{key}", per.get(key))
    return out


def interval_summary(matrix: dict) -> dict[str, Any]:
    """The intervals and verdicts of matrix.json (written by analysis/intervals.py) as summary keys."""
    out: dict[str, Any] = {}
    iv = matrix.get("intervals") or {}
    for metric, values in (iv.get("metrics") or {}).items():
        for k, row in enumerate(values):
            for obj, cell in zip(matrix["objectives"], row):
                _put_interval(out, f"matrix/{metric}/stage{k}/{obj}", cell)
    for metric, per in (iv.get("transfer") or {}).items():
        for obj, quantities in per.items():
            base = f"transfer/{metric}" if obj == "_all" else f"transfer/{metric}/{obj}"
            for quantity, cell in quantities.items():
                _put_interval(out, f"{base}/{quantity}", cell)
    for v in matrix.get("verdicts") or []:
        key = f"{v['column']}/stage{v['stage']}/{v['objective']}"
        out[f"verdict/{key}"] = str(v["verdict"])
        if "reading" in v:  # matrix.json written before verdicts said what they measure
            out[f"reading/{key}"] = str(v["reading"])
        _put(out, f"change/{key}", v.get("change"))
        _put_interval(out, f"change/{key}", v.get("interval"))
        _put(out, f"min_detectable/{key}", v.get("min_detectable"))
    return out


def _put_interval(out: dict, key: str, cell: Any) -> None:
    if isinstance(cell, (list, tuple)) and len(cell) == 2:
        _put(out, f"{key}_low", cell[0])
        _put(out, f"{key}_high", cell[1])


def _put(out: dict, key: str, value: Any) -> None:
    if isinstance(value, bool):
        out[key] = int(value)
    elif isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        out[key] = float(value)
