"""The sweep report (`build_report`) and the per-job plots W&B shows (`job_plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from seqdpo.report.doc import Doc
from seqdpo.report.grouping import setting_label, slug
from seqdpo.report.jobs import FACTORS, SETTING, Job, find_job_dirs, load_job
from seqdpo.report.plots import plot_grad_cosine, plot_heatmaps, plot_quartiles, plot_scatter
from seqdpo.report.tables import (
    analysis_rows,
    base_row,
    likelihood_side_by_side,
    matrix_side_by_side,
    quartile_side_by_side,
    transfer_side_by_side,
    diagnostics_table,
    metrics_table,
)


def build_report(root: Path, out: Path, html_too: bool = False) -> dict[str, Any]:
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [load_job(d, root) for d in find_job_dirs(root) if out not in d.parents and d != out]
    written: dict[str, Any] = {"jobs": len(jobs), "plots": []}

    jobs_df = pd.DataFrame([{**base_row(j), "stage": j.status.get("stage"), "error": j.status.get("error"),
                             "log": j.log, "problems": "; ".join(j.problems)} for j in jobs])
    tables = {
        "jobs": jobs_df,
        "metrics": metrics_table(jobs),
        "transfer": analysis_rows(jobs, "transfer"),
        "quartiles": analysis_rows(jobs, "quartiles"),
        "likelihood": analysis_rows(jobs, "likelihood"),
        "diagnostics": diagnostics_table(jobs),
    }
    for name, df in tables.items():
        p = out / f"{name}.csv"
        df.to_csv(p, index=False)
        written[f"{name}_csv"] = str(p)

    doc = Doc()
    doc.h(1, f"seqdpo sweep report: {root}")
    counts = jobs_df["status"].value_counts().to_dict() if len(jobs_df) else {}
    doc.p(f"{len(jobs)} job(s): " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none found")
          + ". Metric definitions: docs/metrics.md. CSV files next to this summary hold every number.")
    not_done = [j for j in jobs if j.state != "done"]
    if not_done:
        doc.h(2, "Jobs not finished")
        doc.table(pd.DataFrame([{"job": j.rel, "status": j.state, "stage": j.status.get("stage"),
                                 "error": (j.status.get("error") or "")[:200], "log": j.log or "",
                                 "problems": "; ".join(j.problems)} for j in not_done]))
    doc.h(2, "All jobs")
    doc.table(jobs_df[["job", *FACTORS, "status"]] if len(jobs_df) else jobs_df)

    with_results = [j for j in jobs if j.matrix]
    for dataset in sorted({str(j.factors["dataset"]) for j in with_results}):
        doc.h(2, f"Dataset {dataset}")
        groups: dict[tuple, list[Job]] = {}
        for j in with_results:
            if str(j.factors["dataset"]) == dataset:
                groups.setdefault(tuple(j.factors[k] for k in SETTING), []).append(j)
        for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
            group.sort(key=lambda j: str(j.factors["order"]))
            setting = setting_label(key, [j for j in with_results if str(j.factors["dataset"]) == dataset])
            doc.h(3, setting)
            name = slug(f"{dataset}_{setting}")
            title = f"{dataset}\n{setting}"
            partial = [j.rel for j in group if j.state != "done"]
            if partial:
                doc.p("Unfinished (partial results): " + ", ".join(partial))
            doc.h(4, "Preference accuracy (rows: after stage; columns: order: evaluated objective)")
            doc.table(matrix_side_by_side(group, "accuracy"))
            doc.h(4, "Mean margin")
            doc.table(matrix_side_by_side(group, "margin_mean"))
            doc.img(plot_heatmaps(group, title, out / f"heatmap_{name}.png"), out)
            doc.h(4, "Transfer and forgetting (BWT < 0 = forgetting; FWT = change before training)")
            doc.table(transfer_side_by_side(group))
            doc.h(4, "Quartile decomposition of the first objective's pairs, by margin after its stage")
            doc.table(quartile_side_by_side(group))
            doc.img(plot_quartiles(group, title, out / f"quartiles_{name}.png"), out)
            doc.img(plot_scatter(group, title, out / f"scatter_{name}.png"), out)
            diag = diagnostics_table(group)
            if len(diag):
                doc.h(4, "Gradient cosine, update alignment and adapter movement per stage")
                keep = [c for c in ("order", "stage", "stage_objective", "other_objective", "other_trained_before", "grad_cosine",
                                    "grad_cosine_last_step", "update_cos_neg_grad", "movement_raw_norm",
                                    "movement_effective_norm", "movement_cos_stage_1_effective", "offprompt_d_logp_tok_other")
                        if c in diag.columns]
                doc.table(diag[keep])
                doc.img(plot_grad_cosine(group, title, out / f"gradcos_{name}.png"), out)
            doc.h(4, "3D-properties: log-likelihood change vs the base (per token)")
            doc.table(likelihood_side_by_side(group))
    written["plots"] = doc.images
    (out / "summary.md").write_text(doc.markdown())
    written["summary"] = str(out / "summary.md")
    if html_too:
        (out / "summary.html").write_text(doc.html(f"seqdpo report {root}"))
        written["html"] = str(out / "summary.html")
    return written


def job_plots(job_dir: Path) -> dict[str, Path]:
    """The report's plots for one finished job, written to `<job>/plots/` (what W&B shows per run)."""
    job_dir = Path(job_dir)
    job = load_job(job_dir, job_dir.parent)
    out = job_dir / "plots"
    out.mkdir(exist_ok=True)
    title = job.rel
    made = {
        "heatmap": plot_heatmaps([job], title, out / "heatmap.png"),
        "quartiles": plot_quartiles([job], title, out / "quartiles.png"),
        "margin_scatter": plot_scatter([job], title, out / "margin_scatter.png"),
        "grad_cosine": plot_grad_cosine([job], title, out / "grad_cosine.png"),
    }
    return {name: path for name, path in made.items() if path is not None}
