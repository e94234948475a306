"""Jobs that differ only by seed: per order, the mean, sd and t-interval across seeds of every matrix
cell, transfer figure and verdict change, next to the pooled pair-level interval (the bootstrap of the
seed mean, analysis/intervals.pool). Only finished jobs count: a partial job has fewer stages."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd

from seqdpo.analysis import intervals as I
from seqdpo.report.jobs import Job, job_bootstrap
from seqdpo.report.tables import bounds, estimate, verdicts_table

METRICS = ("accuracy", "margin_mean")


def by_order(group: list[Job]) -> dict[str, list[Job]]:
    """Order -> its finished jobs with replicates, by seed."""
    out: dict[str, list[Job]] = {}
    for job in sorted(group, key=lambda j: (str(j.factors["order"]), str(j.factors["seed"]))):
        if job.state == "done" and job.boot is not None:
            out.setdefault(str(job.factors["order"]), []).append(job)
    return out


def _keys(boot: I.Bootstrap):
    """(key, kind, metric, objective, stage, quantity, index into the point) of the statistics aggregated across seeds."""
    for metric in METRICS:
        if ("matrix", metric) in boot.reps:
            for t, stage in enumerate(boot.stages):
                for j, obj in enumerate(boot.objectives):
                    yield ("matrix", metric), "matrix", metric, obj, t, stage, (t, j)
    for key in boot.reps:
        if key[0] == "transfer" and key[1] in METRICS:
            yield key, "transfer", key[1], key[2], None, key[3], ()
        elif key[0] == "change" and key[4] == "all":
            yield key, "change", key[3], key[1], key[2], "change vs baseline", ()


def pooled(jobs: list[Job]) -> I.Bootstrap | None:
    """The pooled bootstrap of the seeds' mean. Seeds that scored the same eval pairs (a real dataset without
    n_eval) share one draw of them: each job is resampled again with one common bootstrap seed."""
    boots = [j.boot for j in jobs]
    if len(boots) > 1 and I.same_pairs(boots):
        boots = [job_bootstrap(j, seed=0) for j in jobs]
    return I.pool(boots)


def seed_rows(group: list[Job]) -> list[dict[str, Any]]:
    """One row per order x statistic: seeds, per-seed values, mean, sd, t-interval, pooled pair-level interval."""
    rows = []
    for order, jobs in by_order(group).items():
        pool = pooled(jobs)
        if pool is None:
            continue
        for key, kind, metric, obj, stage, quantity, at in _keys(pool):
            values = [float(j.boot.point[key][at]) for j in jobs]
            s = I.seed_interval(values)
            lo, hi = pool.interval(key)[at]
            rows.append({"order": order, "kind": kind, "metric": metric, "objective": obj, "stage": stage, "quantity": quantity,
                         "seeds": [j.factors["seed"] for j in jobs], "values": values, "n_seeds": s["n"], "mean": s["mean"],
                         "sd": s["sd"], "t_lo": (s["interval"] or [None, None])[0], "t_hi": (s["interval"] or [None, None])[1],
                         "pooled_lo": float(lo), "pooled_hi": float(hi)})
    return rows


def several_seeds(group: list[Job]) -> bool:
    return any(len(jobs) > 1 for jobs in by_order(group).values())


def transfer_across_seeds(rows: list[dict]) -> pd.DataFrame:
    """BWT and per-objective forgetting and learning across seeds, for the summary."""
    rank = {"BWT": 0, "forgetting": 1, "learning": 2}
    keep = sorted((r for r in rows if r["kind"] == "transfer" and (r["quantity"] == "BWT" if r["objective"] == "_all"
                                                                    else r["quantity"] in ("forgetting", "learning"))),
                  key=lambda r: (r["metric"] != "accuracy", r["metric"], rank[r["quantity"]], r["objective"], r["order"]))
    return pd.DataFrame([{"order": r["order"], "metric": r["metric"], "quantity": r["quantity"],
                          "objective": "all" if r["objective"] == "_all" else r["objective"], "seeds": r["n_seeds"],
                          "mean": r["mean"], "sd": r["sd"], "t 95%": bounds(r["t_lo"], r["t_hi"]),
                          "pooled pair-level 95%": bounds(r["pooled_lo"], r["pooled_hi"]),
                          "per seed": ", ".join(f"{v:.3g}" for v in r["values"])} for r in keep])


def matrix_across_seeds(rows: list[dict], metric: str) -> pd.DataFrame:
    """Rows: after stage; a column per order and objective: 'seed mean [t-interval]'."""
    out: dict[int, dict] = {}
    for r in rows:
        if r["kind"] == "matrix" and r["metric"] == metric:
            row = out.setdefault(r["stage"], {"stage": r["stage"]})
            row[f"{r['order']}: trained"] = r["quantity"]
            row[f"{r['order']}: {r['objective']}"] = estimate(r["mean"], r["t_lo"], r["t_hi"])
    return pd.DataFrame([out[k] for k in sorted(out)])


def verdicts_across_seeds(group: list[Job], column: str) -> pd.DataFrame:
    """The verdict on the seed mean (pooled replicates) and how the seeds' own verdicts split."""
    out: dict[tuple, dict] = {}
    for order, jobs in by_order(group).items():
        pool = pooled(jobs)
        if pool is None:
            continue
        per_seed = verdicts_table(jobs)
        per_seed = per_seed[per_seed["column"] == column] if len(per_seed) else per_seed
        for v in I.verdicts(pool):
            if v["column"] != column:
                continue
            row = out.setdefault((v["objective"], v["stage"]), {"objective": v["objective"], "after stage": v["stage"]})
            mine = per_seed[(per_seed["objective"] == v["objective"]) & (per_seed["stage"] == v["stage"])] if len(per_seed) else per_seed
            split = Counter(mine["verdict"]) if len(mine) else Counter()
            row[f"{order}: seed mean"] = f"{v['verdict']}: {estimate(v['change'], *v['interval'])}"
            row[f"{order}: seeds"] = ", ".join(f"{k} {n}" for k, n in sorted(split.items()))
    return pd.DataFrame(list(out.values()))


def csv_frame(rows: list[dict], setting: str, dataset: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if len(df):
        df.insert(0, "setting", setting)
        df.insert(0, "dataset", dataset)
        df["seeds"] = df["seeds"].map(lambda s: ",".join(map(str, s)))
        df["values"] = df["values"].map(lambda s: ",".join(f"{v:.6g}" for v in s))
    return df
