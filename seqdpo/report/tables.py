"""The report's tables: one row per job x stage x objective, transfer, quartiles, diagnostics, and the
per-setting tables that put the orders side by side."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from seqdpo.analysis.gradient_probes import CLIPPED, UNRELIABLE
from seqdpo.analysis.intervals import verdicts
from seqdpo.analysis.pairs import decomposition_rows
from seqdpo.analysis.transfer import transfer_rows
from seqdpo.evaluation import MATRIX_METRICS
from seqdpo.report.jobs import Job

CORRECTED_NOTES = {UNRELIABLE: "unreliable at this probe size: raise diagnostics.probe_pairs",
                   CLIPPED: "clipped to +-1 (the reliabilities are noisy)"}
QUARTILE_STATS = ("frac_improved", "frac_stayed", "frac_degraded", "delta_mean")


def base_row(job: Job) -> dict:
    return {"job": job.rel, **job.factors, "status": job.state}


def interval(boot, key: tuple) -> tuple[Any, Any]:
    """(low, high) of a statistic's 95% interval, (None, None) when the job has no replicates of it."""
    if boot is None or key not in boot.reps:
        return None, None
    lo, hi = boot.interval(key)
    return float(lo), float(hi)


def bounds(lo, hi) -> str:
    """'[low, high]' (3 significant digits), '' without an interval."""
    return "" if lo is None else estimate(None, lo, hi).strip()


def estimate(value, lo, hi) -> str:
    """'value [low, high]' for the summary's tables (3 significant digits)."""
    def f(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    return f(value) if lo is None else f"{f(value)} [{f(lo)}, {f(hi)}]"


def metrics_table(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        m = job.matrix
        if not m:
            continue
        cells = {k: job.boot.interval(("matrix", k)) for k in MATRIX_METRICS if job.boot is not None and ("matrix", k) in job.boot.reps}
        for t, stage_obj in enumerate(m["stages"]):
            for j, obj in enumerate(m["objectives"]):
                row = {**base_row(job), "stage": t, "stage_objective": stage_obj, "objective": obj,
                       "trained_here": bool(t > 0 and stage_obj == obj)}
                for k in MATRIX_METRICS:
                    if k in m["metrics"] and t < len(m["metrics"][k]):
                        row[k] = m["metrics"][k][t][j]
                        if job.boot is not None and ("matrix", k) in job.boot.reps:
                            row[f"{k}_lo"], row[f"{k}_hi"] = cells[k][t][j]
                rows.append(row)
    return pd.DataFrame(rows)


def pairs_table(jobs: list[Job]) -> pd.DataFrame:
    """The pair accounting of every finished job: one row per job x objective x split, drops by reason."""
    rows = []
    for job in jobs:
        for objective, splits in ((job.matrix or {}).get("pairs") or {}).items():
            for split, a in splits.items():
                counts = {k: v for k, v in a.items() if k not in ("dropped", "builder_counts")}
                drops = {f"dropped_{reason}": n for reason, n in a.get("dropped", {}).items()}
                rows.append({**base_row(job), "objective": objective, "split": split, **counts, **drops})
    return pd.DataFrame(rows)


def analysis_rows(jobs: list[Job], key: str) -> pd.DataFrame:
    rows = []
    for job in jobs:
        a = job.analysis or {}
        if key == "transfer" and "transfer" in a:
            for r in transfer_rows(a["transfer"]):
                lo, hi = interval(job.boot, ("transfer", r["metric"], r["objective"], r["quantity"]))
                rows.append({**base_row(job), **r, "lo": lo, "hi": hi})
        elif key == "quartiles" and a.get("quartiles"):
            for r in decomposition_rows(a["quartiles"]):
                head = ("quartiles", r["objective"], r["column"], r["from_stage"], r["to_stage"], r["quartile"])
                ivs = {f"{s}_{end}": v for s in QUARTILE_STATS for end, v in zip(("lo", "hi"), interval(job.boot, (*head, s)))}
                rows.append({**base_row(job), **r, **ivs})
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
            own = d.get("objective")
            ua_own = (d.get("update_alignment") or {}).get(own) or {}
            base.update({"own_update_cos_neg_grad": ua_own.get("cos_update_neg_grad"),
                         "own_first_order_loss_change": ua_own.get("first_order_loss_change")})
            others = set((d.get("grad_cosine") or {}).keys())
            # One row per other objective: a cosine of the stage's objective with itself is no cross-objective number.
            objs = ({p.split("__", 1)[1] for p in others} | set((d.get("update_alignment") or {}).keys())) - {own}
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
                    rel = gc.get("reliability") or {}
                    row.update({"grad_cosine_low": gc.get("ci_low"), "grad_cosine_high": gc.get("ci_high"),
                                "grad_cosine_corrected": gc.get("corrected"),
                                "grad_cosine_corrected_note": CORRECTED_NOTES.get(gc.get("corrected_status"), ""),
                                "reliability_own": rel.get(own), "reliability_other": rel.get(other)})
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
            ivs = job.boot.interval(("matrix", metric)) if job.boot is not None and ("matrix", metric) in job.boot.reps else None
            for j, obj in enumerate(m["objectives"]):
                vals = m["metrics"].get(metric) or []
                if t >= len(vals):
                    row[f"{o}: {obj}"] = None
                else:
                    row[f"{o}: {obj}"] = vals[t][j] if ivs is None else estimate(vals[t][j], *ivs[t][j])
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
            iv = lambda v, *key: estimate(v, *interval(job.boot, ("transfer", metric, *key))) if v is not None else None  # noqa: E731
            row = {"order": job.factors["order"], "metric": metric,
                   **{q: iv(t[q], "_all", q) for q in ("BWT", "FWT", "ACC")}}
            for obj, per in t["per_objective"].items():
                # learning and the forward transfer before it apart: a stage that only undoes what the
                # earlier stages did to its objective reads flat against the base
                row[f"learning {obj} (its stage vs the one before)"] = iv(per.get("learning"), obj, "learning")
                row[f"forward {obj} (before its stage vs base)"] = iv(per.get("forward"), obj, "forward")
                row[f"forgetting {obj}"] = iv(per.get("forgetting"), obj, "forgetting")
            rows.append(row)
    return pd.DataFrame(rows)


def quartile_side_by_side(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        d = first_decomposition(job)
        if not d:
            continue
        for q in d["quartiles"] + [{"quartile": "all", **d["all"]}]:
            head = ("quartiles", d["objective"], d["column"], d["from_stage"], d["to_stage"], q["quartile"])
            iv = {s: estimate(q.get(s), *interval(job.boot, (*head, s))) for s in QUARTILE_STATS}
            rows.append({"order": job.factors["order"], "objective": d["objective"], "stages": f"{d['from_stage']}->{d['to_stage']}",
                         "quartile": q["quartile"], "n": q.get("n"), "improved": iv["frac_improved"],
                         "stayed": iv["frac_stayed"], "degraded": iv["frac_degraded"],
                         "mean delta": iv["delta_mean"], "correct->wrong": q.get("flips_correct_to_wrong"),
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


def verdicts_table(jobs: list[Job]) -> pd.DataFrame:
    """Every job's verdicts (analysis/intervals.py): one row per objective x stage x column."""
    rows = []
    for job in jobs:
        min_effect = (job.config.get("eval") or {}).get("min_effect")
        for v in verdicts(job.boot, min_effect) if job.boot is not None else []:
            rows.append({**base_row(job), **{k: v[k] for k in ("objective", "stage", "stage_objective", "baseline_stage", "reading", "column",
                                                                  "change", "verdict", "min_effect", "min_detectable")},
                         "lo": v["interval"][0], "hi": v["interval"][1], "quartiles_up": ",".join(v["quartiles_up"]),
                         "quartiles_down": ",".join(v["quartiles_down"]), "redistribution": ",".join(v["redistribution"])})
    return pd.DataFrame(rows)


def verdicts_side_by_side(jobs: list[Job], column: str) -> pd.DataFrame:
    """Rows objective x stage, a column per order: 'verdict: change [interval]'."""
    table = verdicts_table(jobs)
    if not len(table):
        return table
    table = table[table["column"] == column]
    rows = {}
    for r in table.itertuples(index=False):
        row = rows.setdefault((r.objective, r.stage), {"objective": r.objective, "after stage": r.stage})
        moved = f" ({r.redistribution}: up {r.quartiles_up}; down {r.quartiles_down})" if r.verdict == "redistributed" else ""
        row[f"{r.order}: vs stage"] = f"{r.baseline_stage} ({r.reading})"
        row[f"{r.order}"] = f"{r.verdict}: {estimate(r.change, r.lo, r.hi)}{moved}"
        row[f"{r.order}: detectable"] = None if pd.isna(r.min_detectable) else f"{r.min_detectable:.2g}"
    return pd.DataFrame(list(rows.values()))