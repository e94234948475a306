"""The mitigations view: what each forgetting mitigation (`strategy=`) keeps of every objective.

Per finished job and objective j trained in it:

    final_j       accuracy of j after the job's last row (sequential, replay, anchor: the last stage;
                  merge: the `merged` row; joint: its one stage)
    learned_j     accuracy of j after the last stage that trained it alone. A joint job has no such
                  stage: it takes the value of the sequential job with the same factors (the report
                  aligns joint with the final stage of the sequential runs); left empty without one
    forgetting_j  learned_j - final_j (positive = lost)

and the job's compute, summed over its trained stages (matrix.json "strategy"): optimizer `steps`,
`pairs_seen`, `tokens_seen` (prompt + chosen + rejected); for merge, the merged adapter's `rank` and
`reconstruction_error` (seqdpo/strategies/merge.py). Empty for jobs written before they were recorded.

Intervals: the job's paired bootstrap interval (matrix.json "intervals") where one seed is in the
group, else the t-interval across seeds (seqdpo.analysis.intervals.seed_interval). The trade-off plot
puts, per dataset setting, the final accuracy of objective A (the order's first) against objective B
(its second), one point per strategy setting (mean across seeds, bars = interval).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from seqdpo.analysis.intervals import seed_interval
from seqdpo.analysis.transfer import training_stages
from seqdpo.report.grouping import slug, varying_label
from seqdpo.report.jobs import FACTORS, Job, stage_names
from seqdpo.report.plots import _plt, _save

ALIGN = tuple(f for f in FACTORS if f != "strategy")  # a joint job's sequential partner matches on these
SETTING = tuple(f for f in FACTORS if f not in ("strategy", "seed"))  # one table / plot per value of these


def _interval(job: Job, *path) -> list | None:
    node = (job.matrix or {}).get("intervals")
    for key in path:
        if node is None:
            return None
        node = node[key] if isinstance(node, list) else node.get(key)
    return node


def _trained(job: Job) -> list[str]:
    """The objectives the job's order trains, in order (A, B, ...), whatever rows the strategy writes."""
    return list(dict.fromkeys(stage_names({**job.config, "strategy": None})[1:]))


COMPUTE = ("steps", "pairs_seen", "tokens_seen", "rank", "reconstruction_error")


def _compute(job: Job) -> dict:
    stages = ((job.matrix or {}).get("strategy") or {}).get("stages") or []
    trained = [s for s in stages if "train_steps" in s]

    def total(key):
        values = [s.get(key) for s in trained]
        return sum(values) if values and None not in values else None

    merged = next((s for s in stages if "rank" in s), {})
    return {"steps": total("train_steps"), "pairs_seen": total("pairs_seen"), "tokens_seen": total("tokens_seen"),
            "rank": merged.get("rank"), "reconstruction_error": merged.get("reconstruction_error")}


def job_rows(jobs: list[Job]) -> pd.DataFrame:
    """One row per finished job x trained objective: final, learned, forgetting, and the job's own intervals."""
    done = [j for j in jobs if j.matrix and not j.matrix.get("partial") and "accuracy" in j.matrix["metrics"]]
    learned_by: dict[tuple, float] = {}
    for job in done:
        m = job.matrix
        R = np.asarray(m["metrics"]["accuracy"], dtype=float)
        for obj, stages in training_stages(m["stages"], m["objectives"]).items():
            if stages and obj in m["objectives"]:
                learned_by[(job.rel, obj)] = float(R[stages[-1], m["objectives"].index(obj)])
    sequential = {tuple(str(j.factors[f]) for f in ALIGN): j for j in done if j.factors["strategy"] == "sequential"}
    rows = []
    for job in done:
        m = job.matrix
        T = len(m["stages"]) - 1
        R = np.asarray(m["metrics"]["accuracy"], dtype=float)
        for rank, obj in enumerate(_trained(job)):
            if obj not in m["objectives"]:
                continue
            j = m["objectives"].index(obj)
            source = job
            if (job.rel, obj) not in learned_by:
                source = sequential.get(tuple(str(job.factors[f]) for f in ALIGN))
            learned = learned_by.get((source.rel, obj)) if source is not None else None
            row = {"job": job.rel, **job.factors, "objective": obj, "role": chr(ord("A") + rank), "final": float(R[T, j]),
                   "learned": learned, "forgetting": None if learned is None else learned - float(R[T, j]),
                   "learned_from": None if source is None else source.rel, **_compute(job)}
            row["final_interval"] = _interval(job, "metrics", "accuracy", T, j)
            row["forgetting_interval"] = _interval(job, "transfer", "accuracy", obj, "forgetting") if source is job else None
            rows.append(row)
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per setting, strategy and objective: final accuracy and forgetting, mean and interval over seeds."""
    if rows.empty:
        return rows
    out = []
    for key, g in rows.groupby([*SETTING, "strategy", "objective", "role"], dropna=False, sort=True):
        row = dict(zip([*SETTING, "strategy", "objective", "role"], key))
        row["seeds"] = len(g)
        for col in ("final", "forgetting"):
            s = seed_interval(g[col].tolist())
            iv = s["interval"]
            if len(g) == 1 and g[f"{col}_interval"].iloc[0] is not None:
                iv = g[f"{col}_interval"].iloc[0]  # one seed: the paired bootstrap over its eval pairs
            row[col] = s["mean"]
            row[f"{col}_low"], row[f"{col}_high"] = (iv if iv is not None else (None, None))
        for col in COMPUTE:
            values = g[col].dropna()
            row[col] = float(values.mean()) if len(values) else None
        out.append(row)
    return pd.DataFrame(out)


def plot_tradeoff(table: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Final accuracy of A (x) against B (y), one point per strategy setting, bars = intervals."""
    wide = table.pivot_table(index="strategy", columns="role", values=["final", "final_low", "final_high"], aggfunc="first")
    if "A" not in wide["final"] or "B" not in wide["final"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    for i, (strategy, r) in enumerate(wide.iterrows()):
        x, y = r[("final", "A")], r[("final", "B")]
        err = [[x - r.get(("final_low", "A"), x)], [r.get(("final_high", "A"), x) - x]]
        yerr = [[y - r.get(("final_low", "B"), y)], [r.get(("final_high", "B"), y) - y]]
        ax.errorbar(x, y, xerr=np.nan_to_num(err), yerr=np.nan_to_num(yerr), fmt="o", capsize=3,
                    color=f"C{i}", label=strategy, markersize=8 if strategy == "sequential" else 6)
    names = table.drop_duplicates("role").set_index("role").objective
    ax.set_xlabel(f"A = {names['A']}: accuracy after the last stage")
    ax.set_ylabel(f"B = {names['B']}: accuracy after the last stage")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.axvline(0.5, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, title, path)


def add_section(doc, jobs: list[Job], out: Path) -> dict:
    """The report's "Mitigations" section and files, when the sweep holds any strategy but sequential."""
    rows = job_rows(jobs)
    if rows.empty or set(rows.strategy) == {"sequential"}:
        return {}
    table = summary(rows)
    rows.to_csv(out / "mitigations_jobs.csv", index=False)
    table.to_csv(out / "mitigations.csv", index=False)
    doc.h(2, "Mitigations")
    doc.p("Accuracy of each trained objective after the last stage (final) and what it lost since its own stage "
          "(forgetting = learned - final; joint is aligned with the sequential job of the same factors). "
          "Intervals: the paired bootstrap of one job, or across seeds. Compute per job (mean over seeds): optimizer "
          "steps, pairs and tokens seen in training; merge: the merged adapter's rank and reconstruction error. "
          "Definitions: seqdpo/report/mitigations.py.")
    for key, g in table.groupby(list(SETTING), dropna=False, sort=True):
        # the dataset is in the heading already
        setting = varying_label({k: v for k, v in zip(SETTING, key) if k != "dataset"},
                                {k: set(table[k].unique()) for k in SETTING})
        doc.h(3, f"{key[0]}: {setting}")
        cols = ["strategy", "objective", "role", "seeds", "final", "final_low", "final_high", "forgetting", "forgetting_low",
                "forgetting_high", *COMPUTE]
        doc.table(g[cols].sort_values(["role", "strategy"]))
        doc.img(plot_tradeoff(g, f"{key[0]}: {setting}", out / f"tradeoff_{slug(f'{key[0]}_{setting}')}.png"), out)
    return {"mitigations_csv": str(out / "mitigations.csv")}
