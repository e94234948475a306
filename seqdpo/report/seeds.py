"""Jobs that differ only by seed: per order, every matrix cell, transfer figure, quartile fraction and
verdict change across seeds (analysis/seed_inference.py): the mean, sd and t-interval (what the sweep
verdicts use), the two-level bootstrap beside it, and the pooled pair-level interval (the bootstrap of
the seed mean, analysis/intervals.pool: eval sampling alone). Only finished jobs count: a partial job
has fewer stages; a duplicate (same config signature, seed included) counts once."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from seqdpo.analysis import intervals as I
from seqdpo.analysis import seed_inference as S
from seqdpo.analysis.pairs import QUARTILES
from seqdpo.config import MIN_EFFECT
from seqdpo.report.jobs import Job, job_bootstrap
from seqdpo.report.tables import bounds, estimate, verdicts_table

METRICS = ("accuracy", "margin_mean")
ALPHA = 1 - I.LEVEL
ONE_RUN = "conditional on one training run"


def by_order(group: list[Job]) -> dict[str, list[Job]]:
    """Order -> its finished jobs with replicates, by seed (duplicates already set aside: build.split_duplicates)."""
    out: dict[str, list[Job]] = {}
    for job in sorted(group, key=lambda j: (str(j.factors["order"]), str(j.factors["seed"]))):
        if job.state == "done" and job.boot is not None:
            out.setdefault(str(job.factors["order"]), []).append(job)
    return out


def stat_bounds(kind: str, metric: str, quantity: str) -> tuple[float, float] | None:
    """The possible range of a statistic: proportions in [0, 1], their differences in [-1, 1]; margins unbounded."""
    if kind == "quartiles":
        return (0.0, 1.0) if "frac_" in quantity else None
    if metric not in I.PROPORTIONS:
        return None
    level = kind == "matrix" or quantity in ("ACC", "final", "after_training", "base")
    return (0.0, 1.0) if level else (-1.0, 1.0)


def min_effect_of(jobs: list[Job], metric: str) -> float:
    """The jobs' eval.min_effect for a matrix metric's verdict column (the default when their configs predate it)."""
    column = next((c for c, m in I.VERDICT_COLUMNS.items() if m == metric), metric)
    for job in jobs:
        value = ((job.config.get("eval") or {}).get("min_effect") or {}).get(column)
        if value is not None:
            return float(value)
    return MIN_EFFECT.get(column, MIN_EFFECT["margin"])


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
        elif key[0] == "quartiles":
            yield key, "quartiles", key[2], key[1], key[4], f"{key[6]} {key[5]} (stages {key[3]}->{key[4]})", ()


def pooled(jobs: list[Job]) -> I.Bootstrap | None:
    """The pooled bootstrap of the seeds' mean. Seeds that scored the same eval pairs (a real dataset without
    n_eval) share one draw of them: each job is resampled again with one common bootstrap seed."""
    boots = [j.boot for j in jobs]
    if len(boots) > 1 and I.same_pairs(boots):
        boots = [job_bootstrap(j, seed=0) for j in jobs]
    return I.pool(boots)


def seed_rows(group: list[Job]) -> list[dict[str, Any]]:
    """One row per order x statistic: seeds, per-seed values, mean, sd, t-interval (the method verdicts use),
    two-level bootstrap interval, pooled pair-level interval (eval sampling alone), the minimum detectable
    effect at this many seeds and the seeds that would detect eval.min_effect."""
    rows = []
    rng = np.random.default_rng(0)
    for order, jobs in by_order(group).items():
        pool = pooled(jobs)
        if pool is None:
            continue
        n_boot = min(j.boot.n_boot for j in jobs)
        for key, kind, metric, obj, stage, quantity, at in _keys(pool):
            if not all(key in j.boot.reps for j in jobs):
                continue
            limits = stat_bounds(kind, metric, quantity)
            values = [float(j.boot.point[key][at]) for j in jobs]
            s = S.t_summary(values, bounds=limits)
            lo, hi = np.clip(pool.interval(key)[at], *limits) if limits else pool.interval(key)[at]
            reps = np.stack([np.asarray(j.boot.reps[key])[(slice(0, n_boot), *at)] for j in jobs])
            two = S.percentile_interval(S.two_level_replicates(reps, rng, n_boot), bounds=limits)
            eval_se = float(np.mean(np.nanstd(reps, axis=1, ddof=1)))  # each seed's own pair-bootstrap SE
            sd = s["sd"] if s["sd"] is not None else S.SEED_SD_PER_EVAL_SE * eval_se
            rows.append({**_row(order, kind, metric, obj, stage, quantity, jobs, values, s),
                         "two_level_lo": float(two[0]), "two_level_hi": float(two[1]),
                         "pooled_lo": float(lo), "pooled_hi": float(hi), "eval_se": eval_se,
                         "sd_over_eval_se": s["sd"] / eval_se if s["sd"] is not None and eval_se > 0 else None,
                         "seeds_for_min_effect": S.seeds_needed(sd, min_effect_of(jobs, metric))})
        rows += behaviour_rows(order, jobs)
    return rows


def _row(order, kind, metric, obj, stage, quantity, jobs, values, s) -> dict[str, Any]:
    return {"order": order, "kind": kind, "metric": metric, "objective": obj, "stage": stage, "quantity": quantity,
            "seeds": [j.factors["seed"] for j in jobs], "values": values, "n_seeds": s["n"], "mean": s["mean"],
            "sd": s["sd"], "t_lo": (s["interval"] or [None, None])[0], "t_hi": (s["interval"] or [None, None])[1],
            "p": s["p"], "method": S.T_METHOD if s["n"] > 1 else ONE_RUN, "min_detectable": S.min_detectable(s["sd"], s["n"])}


def behaviour_rows(order: str, jobs: list[Job]) -> list[dict[str, Any]]:
    """The behaviour scores of matrix.json's `behaviour` block across seeds: mean, sd, t-interval. Jobs keep no
    replicates of them, so there is no pooled or two-level interval; win_rate is a proportion, clipped to [0, 1]."""
    blocks = [(j.matrix or {}).get("behaviour") for j in jobs]
    if not blocks or not all(blocks):
        return []
    rows = []
    for metric, cells in blocks[0]["metrics"].items():
        for t, row in enumerate(cells):
            for k, obj in enumerate(blocks[0]["objectives"]):
                values = [float(b["metrics"][metric][t][k]) for b in blocks
                          if t < len(b["metrics"][metric]) and b["metrics"][metric][t][k] is not None]
                if len(values) < len(jobs):
                    continue
                s = S.t_summary(values, bounds=(0.0, 1.0) if metric == "win_rate" else None)
                rows.append(_row(order, "behaviour", metric, obj, t, blocks[0]["stages"][t], jobs, values, s))
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
                          "mean": r["mean"], "sd": r["sd"], "t 95% (verdicts)": bounds(r["t_lo"], r["t_hi"]),
                          "two-level bootstrap 95%": bounds(r["two_level_lo"], r["two_level_hi"]),
                          "eval sampling alone 95%": bounds(r["pooled_lo"], r["pooled_hi"]),
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


def sweep_verdicts(settings: list[tuple[str, list[Job]]]) -> list[dict[str, Any]]:
    """The verdict across seeds of every objective, stage and column, per setting and order: decided (intervals.decide)
    on the seeds' t-interval of the change, with improved/degraded kept only where the Benjamini-Hochberg-adjusted
    p-value over all of them (a screen of many cells) stays below 0.05. One seed: that job's pair interval,
    conditional on one training run. Also how the seeds' own verdicts split."""
    rows = []
    for label, group in settings:
        for order, jobs in by_order(group).items():
            own = verdicts_table(jobs)
            for (obj, t), b in sorted(jobs[0].boot.baselines.items(), key=lambda kv: (jobs[0].boot.objectives.index(kv[0][0]), kv[0][1])):
                for col, metric in I.VERDICT_COLUMNS.items():
                    key = ("change", obj, t, col, "all")
                    if not all(key in j.boot.point for j in jobs):
                        continue
                    margin = min_effect_of(jobs, metric)
                    s = S.t_summary([j.boot.point[key] for j in jobs], bounds=stat_bounds("change", metric, ""))
                    quartiles = [q for q in QUARTILES if all(("change", obj, t, col, q) in j.boot.point for j in jobs)]
                    evidence_keys = {e: ("redistribution", obj, t, col, e) for e in I.REDISTRIBUTION_EVIDENCE
                                     if all(("redistribution", obj, t, col, e) in j.boot.point for j in jobs)}
                    if s["n"] > 1:
                        interval, method, mde = s["interval"], S.T_METHOD, S.min_detectable(s["sd"], s["n"])
                        quart = {q: tuple(S.t_summary([j.boot.point[("change", obj, t, col, q)] for j in jobs])["interval"])
                                 for q in quartiles}
                        evidence = {e: tuple(S.t_summary([j.boot.point[k] for j in jobs])["interval"]) for e, k in evidence_keys.items()}
                    else:
                        boot = jobs[0].boot
                        interval, method, mde = list(boot.interval(key)), ONE_RUN, I.min_detectable(boot.reps[key])
                        quart = {q: tuple(boot.interval(("change", obj, t, col, q))) for q in quartiles}
                        evidence = {e: tuple(boot.interval(k)) for e, k in evidence_keys.items()}
                    verdict, up, down = I.decide(tuple(interval), quart, margin, evidence)
                    sd = s["sd"] if s["sd"] is not None else S.SEED_SD_PER_EVAL_SE * float(np.nanstd(jobs[0].boot.reps[key], ddof=1))
                    mine = own[(own["objective"] == obj) & (own["stage"] == t) & (own["column"] == col)] if len(own) else own
                    rows.append({"setting": label, "order": order, "objective": obj, "stage": t, "stage_objective": jobs[0].boot.stages[t],
                                 "baseline_stage": b, "column": col, "n_seeds": s["n"], "change": s["mean"],
                                 "lo": interval[0], "hi": interval[1], "method": method, "p": s["p"], "verdict": verdict,
                                 "min_effect": margin, "min_detectable": mde, "seeds_for_min_effect": S.seeds_needed(sd, margin),
                                 "quartiles_up": ",".join(up),
                                 "quartiles_down": ",".join(down),
                                 "seeds_split": ", ".join(f"{k} {n}" for k, n in sorted(Counter(mine["verdict"]).items())) if len(mine) else ""})
    for r, adjusted in zip(rows, S.bh([r["p"] for r in rows])):
        r["p_bh"], r["note"] = adjusted, ""
        if r["verdict"] in ("degraded", "improved") and adjusted is not None and adjusted >= ALPHA:
            r["verdict"] = "inconclusive"  # the interval excludes 0, but not once the screen's many cells are counted
            r["note"] = f"interval excludes 0, BH-adjusted p = {adjusted:.2g}"
    return rows


def verdicts_across_seeds(rows: list[dict], setting: str, column: str) -> pd.DataFrame:
    """Rows objective x stage, per order: 'verdict: change [interval]' across seeds, its minimum detectable effect,
    and how the seeds' own verdicts split."""
    out: dict[tuple, dict] = {}
    for v in rows:
        if v["setting"] != setting or v["column"] != column:
            continue
        row = out.setdefault((v["objective"], v["stage"]), {"objective": v["objective"], "after stage": v["stage"]})
        tag = f" ({ONE_RUN})" if v["method"] == ONE_RUN else f" ({v['note']})" if v["note"] else ""
        row[f"{v['order']}: across seeds"] = f"{v['verdict']}: {estimate(v['change'], v['lo'], v['hi'])}{tag}"
        row[f"{v['order']}: detectable"] = None if v["min_detectable"] is None else f"{v['min_detectable']:.2g}"
        row[f"{v['order']}: seeds"] = v["seeds_split"]
    return pd.DataFrame(list(out.values()))


def csv_frame(rows: list[dict], setting: str, dataset: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if len(df):
        df.insert(0, "setting", setting)
        df.insert(0, "dataset", dataset)
        df["seeds"] = df["seeds"].map(lambda s: ",".join(map(str, s)))
        df["values"] = df["values"].map(lambda s: ",".join(f"{v:.6g}" for v in s))
    return df
