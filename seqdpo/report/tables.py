"""The report's tables: one row per job x stage x objective, transfer, quartiles, diagnostics, and the
per-setting tables that put the orders side by side."""

from __future__ import annotations

from typing import Any

import pandas as pd

from seqdpo.evaluation import MATRIX_METRICS
from seqdpo.report.jobs import Job


def base_row(job: Job) -> dict:
    return {"job": job.rel, **job.factors, "status": job.state}


def metrics_table(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        m = job.matrix
        if not m:
            continue
        for t, stage_obj in enumerate(m["stages"]):
            for j, obj in enumerate(m["objectives"]):
                row = {**base_row(job), "stage": t, "stage_objective": stage_obj, "objective": obj,
                       "trained_here": bool(t > 0 and stage_obj == obj)}
                for k in MATRIX_METRICS:
                    if k in m["metrics"] and t < len(m["metrics"][k]):
                        row[k] = m["metrics"][k][t][j]
                rows.append(row)
    return pd.DataFrame(rows)


def analysis_rows(jobs: list[Job], key: str) -> pd.DataFrame:
    from seqdpo.analysis.pairs import decomposition_rows
    from seqdpo.analysis.transfer import transfer_rows

    rows = []
    for job in jobs:
        a = job.analysis or {}
        if key == "transfer" and "transfer" in a:
            rows += [{**base_row(job), **r} for r in transfer_rows(a["transfer"])]
        elif key == "quartiles" and a.get("quartiles"):
            rows += [{**base_row(job), **r} for r in decomposition_rows(a["quartiles"])]
        elif key == "likelihood" and a.get("likelihood"):
            rows += [{**base_row(job), **r} for r in a["likelihood"]]
    return pd.DataFrame(rows)


def diagnostics_table(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        for k, d in sorted(job.stage_diags.items()):
            base = {**base_row(job), "stage": k, "stage_objective": d.get("objective")}
            mv = d.get("movement") or {}
            base.update({f"movement_{x}": mv.get(x) for x in ("raw_norm", "effective_norm", "effective_norm_sum")})
            for prev, c in (d.get("movement_cosine") or {}).items():
                base[f"movement_cos_{prev}_raw"] = c.get("raw_cosine")
                base[f"movement_cos_{prev}_effective"] = c.get("effective_cosine")
            others = set((d.get("grad_cosine") or {}).keys())
            objs = {p.split("__", 1)[1] for p in others} | set((d.get("update_alignment") or {}).keys())
            for other in sorted(objs) or [None]:
                row = dict(base)
                if other is not None:
                    gc = (d.get("grad_cosine") or {}).get(f"{d.get('objective')}__{other}") or {}
                    ua = (d.get("update_alignment") or {}).get(other) or {}
                    disp = (d.get("dispersion_offprompt") or {}).get(other) or {}
                    row.update({"other_objective": other, "other_trained_before": gc.get("earlier"),
                                "grad_cosine": gc.get("total"), "update_cos_neg_grad": ua.get("cos_update_neg_grad"),
                                "update_first_order_loss_change": ua.get("first_order_loss_change"),
                                "offprompt_d_logp_tok_other": disp.get("d_logp_tok")})
                    trace = d.get("grad_cosine_trace") or []
                    if trace:
                        last = trace[-1]["grad_cosine"].get(f"{d.get('objective')}__{other}") or {}
                        row["grad_cosine_last_step"] = last.get("total")
                rows.append(row)
    return pd.DataFrame(rows)


def first_decomposition(job: Job, column: str = "margin") -> dict | None:
    """The decomposition of the first-trained objective from its stage to the last stage."""
    ds = [d for d in (job.analysis or {}).get("quartiles", []) if d["column"] == column]
    if not ds:
        return None
    last = max(d["to_stage"] for d in ds)
    cands = [d for d in ds if d["to_stage"] == last]
    return min(cands, key=lambda d: d["from_stage"])

def matrix_side_by_side(jobs: list[Job], metric: str) -> pd.DataFrame:
    n = max(len(j.matrix["stages"]) for j in jobs)
    rows = []
    for t in range(n):
        row: dict[str, Any] = {"stage": t}
        for job in jobs:
            m = job.matrix
            o = job.factors["order"]
            row[f"{o}: trained"] = m["stages"][t] if t < len(m["stages"]) else ""
            for j, obj in enumerate(m["objectives"]):
                vals = m["metrics"].get(metric) or []
                row[f"{o}: {obj}"] = vals[t][j] if t < len(vals) else None
        rows.append(row)
    return pd.DataFrame(rows)


def transfer_side_by_side(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        tr = (job.analysis or {}).get("transfer") or {}
        for metric in ("accuracy", "margin_mean"):
            t = tr.get(metric)
            if not t:
                continue
            row = {"order": job.factors["order"], "metric": metric, "BWT": t["BWT"], "FWT": t["FWT"], "ACC": t["ACC"]}
            for obj, per in t["per_objective"].items():
                row[f"learning {obj}"] = per.get("learning")
                row[f"forgetting {obj}"] = per.get("forgetting")
            rows.append(row)
    return pd.DataFrame(rows)


def quartile_side_by_side(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        d = first_decomposition(job)
        if not d:
            continue
        for q in d["quartiles"] + [{"quartile": "all", **d["all"]}]:
            rows.append({"order": job.factors["order"], "objective": d["objective"], "stages": f"{d['from_stage']}->{d['to_stage']}",
                         "quartile": q["quartile"], "n": q.get("n"), "improved": q.get("frac_improved"),
                         "stayed": q.get("frac_stayed"), "degraded": q.get("frac_degraded"),
                         "mean delta": q.get("delta_mean"), "correct->wrong": q.get("flips_correct_to_wrong"),
                         "wrong->correct": q.get("flips_wrong_to_correct"),
                         "redistribution": d["redistribution"] if q["quartile"] == "all" else None})
    return pd.DataFrame(rows)


def likelihood_side_by_side(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        for r in (job.analysis or {}).get("likelihood") or []:
            rows.append({"order": job.factors["order"], "stage": r["stage"], "objective": r["objective"],
                         "trained": r["trained"], "d chosen/tok": r["d_chosen_tok"], "d rejected/tok": r["d_rejected_tok"],
                         "chosen down": r["frac_chosen_down"], "regime": r["regime"], "drastic drop": r["drastic_drop"]})
    return pd.DataFrame(rows)
