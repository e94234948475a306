"""Gradient cosine over training: one panel per job, the cosine of each objective pair against
`progress` (stage - 1 + step / steps: one axis for every order) with its 95% interval as a band and
each objective's probe reliability (split-half, Spearman-Brown) as a dashed line. Panels share their axes."""

from __future__ import annotations

from pathlib import Path

from seqdpo.report.grouping import job_label
from seqdpo.report.jobs import Job
from seqdpo.report.plots import _plt, _save


def trace_series(job: Job) -> tuple[dict[str, list[tuple]], dict[str, list[tuple]]]:
    """({pair (objectives sorted): [(progress, cos, lo, hi)]}, {objective: [(progress, reliability)]})."""
    pairs: dict[str, list[tuple]] = {}
    reliabilities: dict[str, list[tuple]] = {}
    for k in sorted(job.stage_diags):
        for point in job.stage_diags[k].get("grad_cosine_trace") or []:
            x = point.get("progress")
            if x is None:
                continue
            for pair, res in point["grad_cosine"].items():
                key = " vs ".join(sorted(pair.split("__", 1)))
                pairs.setdefault(key, []).append((x, res.get("total"), res.get("ci_low"), res.get("ci_high")))
                for obj, r in (res.get("reliability") or {}).items():
                    reliabilities.setdefault(obj, []).append((x, r))
    return pairs, {o: sorted(set(v)) for o, v in reliabilities.items()}


def plot_grad_cosine_trace(jobs: list[Job], title: str, path: Path) -> Path | None:
    sel = [(job, *trace_series(job)) for job in jobs]
    sel = [s for s in sel if s[1]]
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sel), figsize=(max(6.5, 4.8 * len(sel)), 4.2), squeeze=False, sharex=True, sharey=True)
    for ax, (job, pairs, reliabilities) in zip(axes[0], sel):
        for i, (pair, pts) in enumerate(sorted(pairs.items())):
            pts = sorted(p for p in pts if p[1] is not None)
            color = f"C{i}"
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], "o-", color=color, label=pair)
            band = [p for p in pts if p[2] is not None and p[3] is not None]
            if band:
                ax.fill_between([p[0] for p in band], [p[2] for p in band], [p[3] for p in band], color=color, alpha=0.2)
        for j, (obj, pts) in enumerate(sorted(reliabilities.items())):
            pts = [p for p in pts if p[1] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", lw=1, color=f"C{len(pairs) + j}",
                    label=f"reliability {obj}")
        stages = sorted(job.stage_diags)
        for k in stages[:-1]:
            ax.axvline(k, color="grey", lw=0.6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("stage progress (k - 1 + step / steps)")
        ax.set_ylabel("gradient cosine (band: 95% interval)")
        ax.set_title(job_label(job, jobs), fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, title, path)
