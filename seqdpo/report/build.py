"""The sweep report (`build_report`) and the per-job plots W&B shows (`job_plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seqdpo.analysis.intervals import VERDICT_COLUMNS
from seqdpo.report.behaviour import behaviour_seeds_section, behaviour_section, plot_disagreement
from seqdpo.report.contrasts import answers, contrast_rows
from seqdpo.report.doc import Doc
from seqdpo.report.grouping import duplicates, setting_label, slug
from seqdpo.report.jobs import FACTORS, SETTING, Job, find_job_dirs, load_job, over_warn_fraction
from seqdpo.report.grad_trace import plot_grad_cosine_trace
from seqdpo.report.mitigations import add_section as add_mitigations
from seqdpo.report.plots import plot_forgetting_by_order, plot_grad_cosine, plot_heatmaps, plot_quartiles, plot_scatter
from seqdpo.report.seeds import (
    csv_frame,
    matrix_across_seeds,
    seed_rows,
    several_seeds,
    sweep_verdicts,
    transfer_across_seeds,
    verdicts_across_seeds,
)
from seqdpo.report.tables import (
    analysis_rows,
    base_row,
    diagnostics_table,
    likelihood_side_by_side,
    matrix_side_by_side,
    metrics_table,
    pairs_table,
    quartile_side_by_side,
    transfer_side_by_side,
    verdicts_side_by_side,
    verdicts_table,
)


def build_report(root: Path, out: Path, html_too: bool = False) -> dict[str, Any]:
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [load_job(d, root) for d in find_job_dirs(root) if out not in d.parents and d != out]
    written: dict[str, Any] = {"jobs": len(jobs), "plots": []}
    repeats = duplicates(jobs)
    distinct = [j for j in jobs if j.rel not in repeats]

    jobs_df = pd.DataFrame([{**base_row(j), "stage": j.status.get("stage"), "error": j.status.get("error"),
                             "log": j.log, "problems": "; ".join(j.problems), "duplicate_of": repeats.get(j.rel)} for j in jobs])
    tables = {
        "jobs": jobs_df,
        "metrics": metrics_table(distinct),
        "transfer": analysis_rows(distinct, "transfer"),
        "quartiles": analysis_rows(distinct, "quartiles"),
        "likelihood": analysis_rows(distinct, "likelihood"),
        "diagnostics": diagnostics_table(distinct),
        "verdicts": verdicts_table(distinct),
        "pairs": pairs_table(distinct),
    }
    with_results = [j for j in distinct if j.matrix]
    datasets: dict[str, list[tuple[str, list[Job]]]] = {}
    for dataset in sorted({str(j.factors["dataset"]) for j in with_results}):
        mine = [j for j in with_results if str(j.factors["dataset"]) == dataset]
        groups: dict[tuple, list[Job]] = {}
        for j in mine:
            groups.setdefault(tuple(j.factors[k] for k in SETTING), []).append(j)
        datasets[dataset] = [(setting_label(key, mine), group) for key, group in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    verdict_rows = sweep_verdicts([(f"{d}: {label}", g) for d, settings in datasets.items() for label, g in settings])
    contrasts = contrast_rows(with_results)
    tables["sweep_verdicts"] = pd.DataFrame(verdict_rows)
    tables["contrasts"] = pd.DataFrame(contrasts)
    for name, df in tables.items():
        p = out / f"{name}.csv"
        df.to_csv(p, index=False)
        written[f"{name}_csv"] = str(p)

    doc = Doc()
    doc.h(1, f"seqdpo sweep report: {root}")
    counts = jobs_df["status"].value_counts().to_dict() if len(jobs_df) else {}
    doc.p(f"{len(jobs)} job(s): " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none found")
          + ". Metric definitions: docs/metrics.md. CSV files next to this summary hold every number.")
    if repeats:
        doc.p(f"{len(repeats)} duplicate job(s) (same config signature, same seed) counted once: "
              + ", ".join(f"{d} repeats {k}" for d, k in sorted(repeats.items())) + ".")
    _answer_section(doc, contrasts)
    not_done = [j for j in jobs if j.state != "done"]
    if not_done:
        doc.h(2, "Jobs not finished")
        doc.table(pd.DataFrame([{"job": j.rel, "status": j.state, "stage": j.status.get("stage"),
                                 "error": (j.status.get("error") or "")[:200], "log": j.log or "",
                                 "problems": "; ".join(j.problems)} for j in not_done]))
    doc.h(2, "All jobs")
    doc.table(jobs_df[["job", *FACTORS, "status"]] if len(jobs_df) else jobs_df)
    losses = {j.rel: over_warn_fraction((j.matrix or {}).get("pairs"), j.config) for j in jobs}
    if any(losses.values()):
        doc.h(2, "Jobs that lost pairs to model.max_length")
        doc.p("More than the job's dataset.warn_fraction of a split's pairs dropped or truncated: its numbers describe "
              "cut pairs (raise model.max_length).")
        doc.table(pd.DataFrame([{"job": rel, "splits": ", ".join(v)} for rel, v in losses.items() if v]))
    _pairs_section(doc, tables["pairs"])

    seed_frames = []
    for dataset, settings in datasets.items():
        doc.h(2, f"Dataset {dataset}")
        rows = [seed_rows(group) for _, group in settings]
        seed_frames += [csv_frame(r, label, dataset) for (label, _), r in zip(settings, rows)]
        figure = plot_forgetting_by_order([(label if len(settings) > 1 else "", r) for (label, _), r in zip(settings, rows)],
                                          f"{dataset}: forgetting by order", out / f"forgetting_by_order_{slug(dataset)}.png")
        if figure is not None:
            doc.h(3, "Which order forgets which objective more")
            doc.p(FORGETTING_HELP)
            doc.img(figure, out)
        for (label, group), r in zip(settings, rows):
            doc.h(3, label)
            if several_seeds(group):
                _seeds_section(doc, group, r, verdict_rows, f"{dataset}: {label}")
            else:
                _one_seed_note(doc, [v for v in verdict_rows if v["setting"] == f"{dataset}: {label}"])
            for seed in sorted({j.factors["seed"] for j in group}, key=str):
                sub = sorted((j for j in group if j.factors["seed"] == seed), key=lambda j: str(j.factors["order"]))
                doc.h(4, f"seed {seed}")
                _jobs_section(doc, sub, f"{dataset}\n{label}, seed {seed}", slug(f"{dataset}_{label}_seed={seed}"), out)
    seeds_df = pd.concat([f for f in seed_frames if len(f)], ignore_index=True) if any(len(f) for f in seed_frames) else pd.DataFrame()
    seeds_df.to_csv(out / "seeds.csv", index=False)
    written["seeds_csv"] = str(out / "seeds.csv")
    written.update(add_mitigations(doc, jobs, out))
    written["plots"] = doc.images
    (out / "summary.md").write_text(doc.markdown())
    written["summary"] = str(out / "summary.md")
    if html_too:
        (out / "summary.html").write_text(doc.html(f"seqdpo report {root}"))
        written["html"] = str(out / "summary.html")
    return written


FORGETTING_HELP = (
    "Per objective trained before the last stage: its forgetting, value after its own stage minus final value "
    "(> 0 = lost). Dots: seeds; marker: their mean; thin bar: 95% t-interval across seeds (run-to-run spread, "
    "what the verdicts use); thick bar: 95% pooled pair-level interval (eval sampling alone). Whether two orders "
    "differ is the contrast in the first section, not whether their bars overlap."
)


def _answer_section(doc: Doc, contrasts: list[dict]) -> None:
    """The report's first section: which setting forgets more, one sentence per contrast (contrasts.csv has all)."""
    sentences = answers(contrasts)
    if not sentences:
        return
    doc.h(2, "The answer: which setting forgets more")
    doc.p("Overall forgetting (mean over the objectives trained before the last stage of value after their stage "
          "minus final value; > 0 = lost), seed mean [95% t-interval across seeds]; differences paired by seed where "
          "both settings ran the same seeds on the same eval pairs (else Welch), Holm-adjusted over the planned "
          "contrasts (docs/report.md, \"How sure is a verdict?\"). Every figure's contrast: contrasts.csv.")
    for sentence in sentences:
        doc.p("- " + sentence)


def _pairs_section(doc: Doc, pairs: pd.DataFrame) -> None:
    """Pair accounting: one line when nothing was dropped or truncated, else the table."""
    if not len(pairs):
        return
    lost = [c for c in pairs.columns if c.startswith("dropped_") or c in ("truncated", "lost_fraction")]
    if not pairs[lost].fillna(0).to_numpy(dtype=float).any():
        doc.p(f"Pairs: every job kept every pair it read ({int(pairs['kept'].sum())} pairs over {pairs['job'].nunique()} "
              "job(s), none dropped or truncated; pairs.csv).")
        return
    doc.h(2, "Pairs kept and dropped")
    doc.p("Per job, objective and split (docs/datasets.md, \"What gets dropped, and why\"); every count is in pairs.csv.")
    doc.table(pairs[["job", "objective", "split", "rows", "kept", "truncated", "lost_fraction"]])


def _one_seed_note(doc: Doc, verdicts: list[dict]) -> None:
    needed = [v["seeds_for_min_effect"] for v in verdicts if v["seeds_for_min_effect"] is not None]
    if verdicts:
        doc.p("One seed per order: every verdict below is conditional on one training run (its interval holds eval "
              "sampling alone). At the run-to-run spread measured on the synthetic world (seed sd 1.75 x the eval SE; "
              f"docs/report.md, \"How sure is a verdict?\"), resolving eval.min_effect would take about {int(np.median(needed))} "
              "seeds (median over these verdicts; sweep_verdicts.csv has each)." if needed else
              "One seed per order: every verdict below is conditional on one training run.")


def _seeds_section(doc: Doc, group: list[Job], rows: list[dict], verdict_rows: list[dict], setting: str) -> None:
    seeds = sorted({str(s) for r in rows for s in r["seeds"]})
    doc.h(4, f"Across seeds ({', '.join(seeds)}): mean, sd, 95% t-interval, two-level bootstrap, eval sampling alone")
    doc.p("t-interval across seeds: what the verdicts and contrasts use (95% coverage at 3 and 5 seeds in simulation; "
          "the two-level bootstrap, seeds then pairs, undercovers there and stands beside it). Eval sampling alone: the "
          "pooled pair bootstrap of the seed mean, blind to the run-to-run spread. Finished jobs only; seeds.csv "
          "has every statistic.")
    doc.table(transfer_across_seeds(rows))
    doc.h(5, "Preference accuracy, seed mean [95% t-interval]")
    doc.table(matrix_across_seeds(rows, "accuracy"))
    doc.h(5, "Mean margin, seed mean [95% t-interval]")
    doc.table(matrix_across_seeds(rows, "margin_mean"))
    behaviour_seeds_section(doc, group)
    for column in VERDICT_COLUMNS:
        doc.h(5, f"Verdicts on {column} across seeds (t-interval; improved/degraded only if BH-adjusted p < 0.05), "
                 "the smallest change detectable at this many seeds (80% power), and the split of the seeds' own verdicts")
        doc.table(verdicts_across_seeds(verdict_rows, setting, column))


def _jobs_section(doc: Doc, group: list[Job], title: str, name: str, out: Path) -> None:
    """The jobs of one setting and seed, orders side by side."""
    partial = [j.rel for j in group if j.state != "done"]
    if partial:
        doc.p("Unfinished (partial results): " + ", ".join(partial))
    doc.h(5, "Preference accuracy [95% interval] (rows: after stage; columns: order: evaluated objective)")
    doc.table(matrix_side_by_side(group, "accuracy"))
    doc.h(5, "Mean margin [95% interval]")
    doc.table(matrix_side_by_side(group, "margin_mean"))
    doc.img(plot_heatmaps(group, title, out / f"heatmap_{name}.png"), out)
    behaviour_section(doc, group, title, name, out)
    doc.h(5, "Transfer and forgetting [95% interval] (BWT < 0 = forgetting; FWT = change before training)")
    doc.table(transfer_side_by_side(group))
    for column in VERDICT_COLUMNS:
        doc.h(5, f"Verdicts on {column} of this run (conditional on one training run): change against the baseline "
                 "stage [95% interval, eval sampling alone]")
        doc.table(verdicts_side_by_side(group, column))
    doc.h(5, "Quartile decomposition of the first objective's pairs, by margin after its stage [95% intervals]")
    doc.table(quartile_side_by_side(group))
    doc.img(plot_quartiles(group, title, out / f"quartiles_{name}.png"), out)
    doc.img(plot_scatter(group, title, out / f"scatter_{name}.png"), out)
    diag = diagnostics_table(group)
    if len(diag):
        doc.h(5, "Gradient cosine, update alignment and adapter movement per stage")
        keep = [c for c in ("order", "stage", "stage_objective", "other_objective", "other_trained_before", "grad_cosine",
                            "grad_cosine_low", "grad_cosine_high", "reliability_own", "reliability_other",
                            "grad_cosine_corrected", "grad_cosine_corrected_note", "grad_cosine_last_step", "update_cos_neg_grad", "own_update_cos_neg_grad", "movement_raw_norm",
                            "movement_effective_norm", "movement_cos_stage_1_effective", "offprompt_d_logp_tok_other")
                if c in diag.columns]
        doc.table(diag[keep])
        doc.img(plot_grad_cosine(group, title, out / f"gradcos_{name}.png"), out)
        doc.img(plot_grad_cosine_trace(group, title, out / f"gradcos_trace_{name}.png"), out)
    doc.h(5, "3D-properties: log-likelihood change vs the base (per token)")
    doc.table(likelihood_side_by_side(group))


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
        "behaviour": plot_disagreement([job], title, out / "behaviour.png"),
        "grad_cosine_trace": plot_grad_cosine_trace([job], title, out / "grad_cosine_trace.png"),
    }
    return {name: path for name, path in made.items() if path is not None}
