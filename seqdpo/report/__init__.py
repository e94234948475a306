"""Sweep report: `python -m seqdpo.report <multirun dir> [--out DIR] [--html]` (also `seqdpo-report`).

Reads every job directory below the given directory (a directory holding `config.yaml`, `status.json`
or Hydra's `.hydra/`; layout in docs/DESIGN.md) and writes to `--out` (default `<dir>/report`):

    metrics.csv      one row per job x stage x objective: the job's factors (dataset, order, beta, lr,
                     lora_r, loss, reference, seed), status, and every metric of matrix.json
    transfer.csv     BWT / FWT / forgetting / learning per job, metric and objective
    quartiles.csv    the quartile decomposition of every earlier objective after every later stage
    likelihood.csv   3D-properties rows (chosen / rejected likelihood shifts vs the base)
    diagnostics.csv  per job and stage: gradient cosines, update alignment, adapter movement, dispersion
    verdicts.csv     per job, objective, stage and column: the change against its baseline stage and its verdict
                     (conditional on that one training run)
    seeds.csv        per setting and order, every statistic across seeds: mean, sd, t-interval (the method verdicts
                     use), two-level bootstrap, pooled pair-level interval (eval sampling alone), detectable effect
    sweep_verdicts.csv  per setting, order, objective, stage and column: the verdict across seeds (t-interval,
                     BH-adjusted p), its minimum detectable effect and the split of the seeds' own verdicts
    contrasts.csv    per two settings differing in one factor: the difference of every transfer figure, its
                     interval and p-value (paired by seed or Welch), raw and adjusted (Holm planned, BH screen)
    jobs.csv         every job with its status, log file and `duplicate_of` (same signature: counted once)
    pairs.csv        per job, objective and split: rows read, pairs built, kept, dropped by reason, truncated
    summary.md       first the answer (one sentence per contrast of overall forgetting), then per dataset: the
                     forgetting-by-order figure; per setting (jobs differing only by order
                     and seed) the seeds aggregated, then per seed the orders side by side (+ summary.html
                     with --html, self-contained: its images are embedded)
    *.png            forgetting by order, heatmaps, quartile bars, margin scatter, gradient cosine per layer

Every number carries its 95% paired bootstrap interval (seqdpo/analysis/intervals.py, recomputed from
the pairs with the job's eval.bootstrap and seed, so unfinished and older jobs get them too).

Unfinished jobs are read as far as they got (stage_k/pairs.parquet of finished stages); failed and
running jobs are listed with their status and log path, never fatal.

Modules: jobs (reading job directories), tables, seeds (aggregation across seeds), contrasts (settings
compared), grouping (labels of settings and jobs, duplicates), plots, doc (markdown / HTML rendering), build (the report and per-job plots), cli.
"""

from seqdpo.report.build import build_report, job_plots
from seqdpo.report.cli import main

__all__ = ["build_report", "job_plots", "main"]
