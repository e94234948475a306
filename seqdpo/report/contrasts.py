"""Contrasts: for every two settings of a sweep that differ in one factor (order first, then any other), the
difference of each transfer and forgetting figure across seeds, with its t-interval and p-value
(analysis/seed_inference.contrast: paired by seed where both ran the same seeds on the same eval pairs,
Welch otherwise). Multiplicity: the planned family (forgetting per objective and overall, FWT) is
Holm-adjusted, a handful of questions asked in advance; every other figure is a screen, BH-adjusted.
Raw and adjusted p-values are both kept (contrasts.csv)."""

from __future__ import annotations

from typing import Any

import numpy as np

from seqdpo.analysis import intervals as I
from seqdpo.analysis import seed_inference as S
from seqdpo.report.grouping import varying_label
from seqdpo.report.jobs import FACTORS, Job
from seqdpo.report.seeds import METRICS, min_effect_of, stat_bounds
from seqdpo.report.tables import estimate

PLANNED = ("forgetting", "FWT")  # the study's questions: what each order forgets, and what it transfers forward
CELL = tuple(f for f in FACTORS if f != "seed")


def _cells(jobs: list[Job]) -> dict[tuple, dict[Any, Job]]:
    """Setting (every factor but seed) -> seed -> its finished job with replicates."""
    out: dict[tuple, dict[Any, Job]] = {}
    for job in sorted(jobs, key=lambda j: j.rel):
        if job.state == "done" and job.boot is not None:
            out.setdefault(tuple(job.factors[f] for f in CELL), {}).setdefault(job.factors["seed"], job)
    return out


def _shares_data(a: dict[Any, Job], b: dict[Any, Job]) -> bool:
    """Both settings ran the same seeds (at least 2), and each seed scored the same eval pairs in both (by content)."""
    return a.keys() == b.keys() and len(a) > 1 and all(I.same_pairs([a[s].boot, b[s].boot]) for s in a)


def _eval_se(jobs, key) -> float:
    return float(np.mean([np.nanstd(j.boot.reps[key], ddof=1) for j in jobs]))


def contrast_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    cells = _cells(jobs)
    seen = {f: {k[i] for k in cells} for i, f in enumerate(CELL)}
    pairs = [(a, b, [f for f, x, y in zip(CELL, a, b) if x != y]) for i, a in enumerate(sorted(cells, key=str))
             for b in sorted(cells, key=str)[i + 1:]]
    pairs = sorted(((a, b, d[0]) for a, b, d in pairs if len(d) == 1), key=lambda p: (p[2] != "order", CELL.index(p[2]), str(p)))
    rows = []
    for a, b, factor in pairs:
        A, B = cells[a], cells[b]
        context = varying_label({f: v for f, v in zip(CELL, a) if f != factor}, {f: v for f, v in seen.items() if f != factor})
        paired = _shares_data(A, B)
        ja, jb = list(A.values()), list(B.values())
        keys = sorted(set.intersection(*(set(j.boot.reps) for j in ja + jb)), key=str)
        for key in keys:
            if key[0] != "transfer" or key[1] not in METRICS:
                continue
            _, metric, obj, quantity = key
            va = [float(A[s].boot.point[key]) for s in A]
            vb = [float(B[s].boot.point[key]) for s in (A if paired else B)]
            limits = stat_bounds("transfer", metric, quantity)
            wide = None if limits is None else (limits[0] - limits[1], limits[1] - limits[0])
            c = S.contrast(va, vb, paired, bounds=wide)
            sa, sb = S.t_summary(va, bounds=limits), S.t_summary(vb, bounds=limits)
            if paired:
                sd = float(np.std(np.subtract(va, vb), ddof=1))
            elif sa["sd"] is not None and sb["sd"] is not None:
                sd = float(np.hypot(sa["sd"], sb["sd"]))
            else:  # one seed a side: the run-to-run spread measured on the synthetic world stands in
                sd = S.SEED_SD_PER_EVAL_SE * float(np.hypot(_eval_se(ja, key), _eval_se(jb, key)))
            effect = min_effect_of(ja, metric)
            rows.append({"factor": factor, "context": context, "a": f"{factor}={a[CELL.index(factor)]}",
                         "b": f"{factor}={b[CELL.index(factor)]}", "dataset": a[0], "metric": metric, "objective": obj,
                         "quantity": quantity, "family": "planned" if quantity in PLANNED else "screen",
                         "n_a": sa["n"], "mean_a": sa["mean"], "lo_a": (sa["interval"] or [None])[0],
                         "hi_a": (sa["interval"] or [None, None])[1], "n_b": sb["n"], "mean_b": sb["mean"],
                         "lo_b": (sb["interval"] or [None])[0], "hi_b": (sb["interval"] or [None, None])[1],
                         "diff": c["diff"], "lo": (c["interval"] or [None])[0], "hi": (c["interval"] or [None, None])[1],
                         "p": c["p"], "df": c["df"], "method": c["method"], "min_effect": effect,
                         "seeds_to_resolve_min_effect": S.seeds_needed(sd, effect),
                         "forgotten": ",".join(o for o in ja[0].boot.objectives
                                               if ("transfer", metric, o, "forgetting") in ja[0].boot.reps),
                         "forgotten_b": ",".join(o for o in jb[0].boot.objectives
                                                 if ("transfer", metric, o, "forgetting") in jb[0].boot.reps)})
    for family, adjust, name in (("planned", S.holm, "Holm"), ("screen", S.bh, "BH")):
        mine = [r for r in rows if r["family"] == family]
        for r, p in zip(mine, adjust([r["p"] for r in mine])):
            r["p_adjusted"], r["adjustment"] = p, name
    return rows


def answer(r: dict[str, Any]) -> str:
    """One sentence: both settings' overall forgetting with their seed intervals, the difference, its adjusted
    p-value and what it lets one say."""
    def side(name, mean, lo, hi, forgotten):
        what = f" ({forgotten})" if forgotten else ""
        return f"{estimate(mean, lo, hi)} after {name}{what}"

    head = f"{r['context']}: " if r["context"] != "all jobs" else ""
    n = min(r["n_a"], r["n_b"])
    text = (f"{head}{r['metric']}: earlier objectives are forgotten by {side(r['a'], r['mean_a'], r['lo_a'], r['hi_a'], r['forgotten'])} "
            f"and by {side(r['b'], r['mean_b'], r['lo_b'], r['hi_b'], r['forgotten_b'])}")
    if r["lo"] is None:
        return (text + f"; one seed a side, so no seed-level difference (conditional on one training run); about "
                f"{r['seeds_to_resolve_min_effect'] or 'over 1000'} seeds per setting would resolve {r['min_effect']:g}.")
    text += f"; difference {estimate(r['diff'], r['lo'], r['hi'])}, p = {r['p_adjusted']:.2g} ({r['adjustment']}, {r['method']})"
    if r["p_adjusted"] < 1 - I.LEVEL:
        verdict = f"{r['a'] if r['diff'] > 0 else r['b']} forgets more"
    elif -r["min_effect"] <= r["lo"] and r["hi"] <= r["min_effect"]:
        verdict = f"equivalent within +-{r['min_effect']:g}"
    elif r["p"] < 1 - I.LEVEL:
        verdict = f"not distinguishable with {n} seeds once the planned contrasts are counted (raw p = {r['p']:.2g})"
    else:
        verdict = f"not distinguishable with {n} seeds"
    need = r["seeds_to_resolve_min_effect"]
    return f"{text}: {verdict}; about {need or 'over 1000'} seeds per setting would resolve {r['min_effect']:g}."


def answers(rows: list[dict[str, Any]]) -> list[str]:
    """The report's first section: one sentence per contrast of overall forgetting."""
    return [answer(r) for r in rows if r["quantity"] == "forgetting" and r["objective"] == "_all"]
