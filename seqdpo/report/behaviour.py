"""The behaviour part of the report: what the jobs generated (matrix.json's `behaviour` block), as a
second matrix beside preference accuracy with the degeneration guards beside the scores, a scatter of
preference-accuracy change against behavioural change per objective and stage (where the two
disagree), sample generations, and across seeds the seed mean of every behaviour metric with its
t-interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seqdpo.behaviour.guards import GUARDS
from seqdpo.report.doc import Doc
from seqdpo.report.grouping import job_label
from seqdpo.report.jobs import Job
from seqdpo.report.plots import _plt, _save
from seqdpo.report.seeds import behaviour_rows
from seqdpo.report.tables import estimate

SAMPLES_SHOWN = 2  # generations per stage and objective in the summary


def with_behaviour(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if j.matrix and j.matrix.get("behaviour")]


def behaviour_side_by_side(jobs: list[Job], metric: str) -> pd.DataFrame:
    """Rows: after stage; columns: order: objective; cells 'value [low, high]'."""
    rows = []
    for t in range(max(len(j.matrix["behaviour"]["stages"]) for j in jobs)):
        row: dict[str, Any] = {"stage": t}
        for job in jobs:
            b, o = job.matrix["behaviour"], job.factors["order"]
            row[f"{o}: trained"] = b["stages"][t] if t < len(b["stages"]) else ""
            for k, obj in enumerate(b["objectives"]):
                ok = t < len(b["metrics"].get(metric, []))
                row[f"{o}: {obj}"] = estimate(b["metrics"][metric][t][k], *b["intervals"][metric][t][k]) if ok else None
        rows.append(row)
    return pd.DataFrame(rows)


def disagreement_points(job: Job) -> list[dict]:
    """Per stage >= 1 and scored objective: preference-accuracy change and score change, both against the base."""
    b, m = job.matrix["behaviour"], job.matrix
    acc = np.asarray(m["metrics"]["accuracy"], dtype=float)
    out = []
    for k, obj in enumerate(b["objectives"]):
        j = m["objectives"].index(obj)
        for t in range(1, len(b["metrics"]["score_delta"])):
            lo, hi = b["intervals"]["score_delta"][t][k]
            out.append({"stage": t, "stage_objective": b["stages"][t], "objective": obj,
                        "accuracy_change": float(acc[t][j] - acc[0][j]), "behaviour_change": b["metrics"]["score_delta"][t][k],
                        "behaviour_lo": lo, "behaviour_hi": hi})
    return out


def plot_disagreement(jobs: list[Job], title: str, path: Path) -> Path | None:
    """x: preference accuracy after the stage minus the base's; y: mean score change against the base's
    generations (95% interval). Points off the diagonal's quadrants are where the two disagree."""
    jobs = with_behaviour(jobs)
    if not jobs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = "osD^v<>P*X"
    objectives = sorted({o for j in jobs for o in j.matrix["behaviour"]["objectives"]})
    colors = {o: plt.cm.tab10(i) for i, o in enumerate(objectives)}
    for n, job in enumerate(jobs):
        for p in disagreement_points(job):
            y, lo, hi = p["behaviour_change"], p["behaviour_lo"], p["behaviour_hi"]
            err = None if lo is None or np.isnan(lo) else [[y - lo], [hi - y]]
            ax.errorbar(p["accuracy_change"], y, yerr=err, fmt=markers[n % len(markers)], color=colors[p["objective"]],
                        capsize=2, alpha=0.85)
            ax.annotate(f"{p['stage']}", (p["accuracy_change"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    for o in objectives:
        ax.plot([], [], "o", color=colors[o], label=f"objective {o}")
    for n, job in enumerate(jobs):
        ax.plot([], [], markers[n % len(markers)], color="black", label=job_label(job, jobs))
    ax.legend(fontsize=7, loc="best")
    scorer = ", ".join(sorted({j.matrix["behaviour"]["scorer"] for j in jobs}))
    ax.set_xlabel("preference accuracy change vs base")
    ax.set_ylabel(f"generation score change vs base ({scorer}, 95% interval)")
    return _save(fig, title, path)


def sample_generations(job: Job, per_cell: int = SAMPLES_SHOWN) -> pd.DataFrame:
    """The first `per_cell` prompts' first response per stage and objective, with their scores."""
    rows = []
    for sd in sorted(job.path.glob("stage_*"), key=lambda p: int(p.name.split("_")[1])):
        if not ((sd / "generations.parquet").exists() and (sd / "scores.parquet").exists()):
            continue
        g = pd.read_parquet(sd / "generations.parquet").merge(pd.read_parquet(sd / "scores.parquet"),
                                                               on=["objective", "prompt_id", "sample"])
        g = g.sort_values(["objective", "prompt_id", "sample"]).drop_duplicates(["objective", "prompt_id"])
        for _, part in g.groupby("objective", sort=False):
            rows.append(part.head(per_cell).assign(stage=int(sd.name.split("_")[1])))
    if not rows:
        return pd.DataFrame()
    return pd.concat(rows)[["stage", "objective", "prompt_id", "text", "n_tokens", "score"]]


def _present(jobs: list[Job], metric: str) -> bool:
    return any(metric in j.matrix["behaviour"]["metrics"] for j in jobs)


def prompt_check_table(jobs: list[Job]) -> pd.DataFrame:
    """Per order and objective: distinct eval prompts, those also among training prompts (left out), prompts used."""
    return pd.DataFrame([{"order": j.factors["order"], "objective": o, **c}
                         for j in jobs for o, c in j.matrix["behaviour"].get("prompt_check", {}).items()])


def scorer_accuracy_table(jobs: list[Job]) -> pd.DataFrame:
    """trained_rm: pairwise accuracy of each objective's reward model on every objective's train and eval pairs."""
    return pd.DataFrame([{"order": j.factors["order"], "reward model": rm, "pairs of": o,
                          **{f"{split} ({a['pairs']} pairs)": a["accuracy"] for split, a in splits.items()}}
                         for j in jobs for rm, per in j.matrix["behaviour"].get("scorer_accuracy", {}).items()
                         for o, splits in per.items()])


def behaviour_section(doc: Doc, group: list[Job], title: str, name: str, out: Path) -> None:
    """Beside the preference matrices of one setting and seed: the behaviour matrices, guards, scatter and samples."""
    jobs = with_behaviour(group)
    if not jobs:
        return
    scorer = ", ".join(sorted({j.matrix["behaviour"]["scorer"] for j in jobs}))
    measures = "; ".join(sorted({j.matrix["behaviour"].get("scorer_measures", "") for j in jobs} - {""}))
    doc.h(5, f"Behaviour ({scorer}): mean score of the generations [95% interval over prompts]")
    if measures:
        doc.p(f"Scorer {scorer}: {measures}.")
    doc.table(prompt_check_table(jobs))
    doc.table(behaviour_side_by_side(jobs, "score_mean"))
    doc.h(5, "Behaviour: score change against the base's generations, paired by prompt [95% interval]")
    doc.table(behaviour_side_by_side(jobs, "score_delta"))
    if _present(jobs, "win_rate"):
        doc.h(5, "Behaviour: win rate against the base [95% Wilson interval over prompts]")
        doc.table(behaviour_side_by_side(jobs, "win_rate"))
    doc.h(5, "Degeneration guards beside the scores: generation length (tokens), then "
             + ", ".join(g for g in GUARDS if _present(jobs, g)) + " [95% interval over prompts]")
    for metric in ("length", *GUARDS):
        if _present(jobs, metric):
            doc.table(behaviour_side_by_side(jobs, metric).assign(metric=metric))
    accuracy = scorer_accuracy_table(jobs)
    if len(accuracy):
        doc.h(5, "Scorer: pairwise accuracy of each reward model on the job's pairs")
        doc.table(accuracy)
    doc.img(plot_disagreement(jobs, title, out / f"behaviour_{name}.png"), out)
    for job in jobs:
        samples = sample_generations(job)
        if len(samples):
            doc.h(5, f"Sample generations, {job_label(job, group)}")
            doc.table(samples)


def behaviour_across_seeds(group: list[Job]) -> pd.DataFrame:
    """Per order, stage and objective: each behaviour metric's seed mean [95% t-interval across seeds], read off
    the same rows seeds.csv holds (seeds.behaviour_rows)."""
    by_order: dict[str, list[Job]] = {}
    for job in sorted(with_behaviour(group), key=lambda j: str(j.factors["seed"])):
        if job.state == "done":  # a partial job has fewer stages
            by_order.setdefault(str(job.factors["order"]), []).append(job)
    out: dict[tuple, dict] = {}
    for order, jobs in sorted(by_order.items()):
        if len(jobs) < 2:
            continue
        for r in behaviour_rows(order, jobs):
            row = out.setdefault((order, r["stage"], r["objective"]), {"order": order, "stage": r["stage"], "trained": r["quantity"],
                                                                        "objective": r["objective"], "seeds": r["n_seeds"]})
            row[r["metric"]] = estimate(r["mean"], r["t_lo"], r["t_hi"])
    return pd.DataFrame([out[k] for k in sorted(out, key=lambda k: (k[0], k[1]))])


def behaviour_seeds_section(doc: Doc, group: list[Job]) -> None:
    table = behaviour_across_seeds(group)
    if len(table):
        doc.h(5, "Behaviour, seed mean [95% t-interval across seeds]")
        doc.table(table)
