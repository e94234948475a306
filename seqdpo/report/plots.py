"""The report's figures (matplotlib, Agg); each returns the PNG's path, or None when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqdpo.analysis.pairs import assign_quartiles, stage_values
from seqdpo.report.grouping import job_label
from seqdpo.report.jobs import Job
from seqdpo.report.seeds import METRICS
from seqdpo.report.tables import first_decomposition, interval


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_heatmaps(jobs: list[Job], title: str, path: Path) -> Path | None:
    group = jobs
    # A job with only the base row says nothing a heatmap can show.
    jobs = [j for j in jobs if j.matrix and len(j.matrix["metrics"].get("accuracy", [])) > 1]
    if not jobs:
        return None
    plt = _plt()
    metrics = [("accuracy", "preference accuracy", "RdYlGn", (0.0, 1.0)), ("margin_mean", "mean margin", "coolwarm", None)]
    n = len(jobs)
    fig, axes = plt.subplots(2, n, figsize=(1.2 + 2.6 * max(len(j.matrix["objectives"]) for j in jobs) * n / 1.5, 7.4), squeeze=False)
    for c, job in enumerate(jobs):
        m = job.matrix
        for r, (key, label, cmap, lim) in enumerate(metrics):
            ax = axes[r][c]
            R = np.asarray(m["metrics"].get(key, []), dtype=float)
            if R.size == 0:
                ax.set_axis_off()
                continue
            if lim is None:
                # One symmetric scale for all orders, so equal colours mean equal margins across panels.
                allv = np.concatenate([np.asarray(j.matrix["metrics"].get(key, []), dtype=float).ravel() for j in jobs])
                v = float(np.nanmax(np.abs(allv))) if np.isfinite(allv).any() else 1.0
                lim = (-(v or 1.0), v or 1.0)
            im = ax.imshow(R, cmap=cmap, vmin=lim[0], vmax=lim[1], aspect="auto")
            for (i, k), val in np.ndenumerate(R):
                dark = np.isfinite(val) and not 0.2 < im.norm(val) < 0.8
                ax.text(k, i, "nan" if not np.isfinite(val) else f"{val:.3g}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
            ax.set_xticks(range(len(m["objectives"])), m["objectives"], rotation=20, ha="right")
            ax.set_yticks(range(R.shape[0]), [f"{t}: {s}" for t, s in enumerate(m["stages"][: R.shape[0]])])
            ax.set_xlabel("evaluated objective")
            if c == 0:
                ax.set_ylabel("after stage (trained objective)")
            ax.set_title(f"{job_label(job, group)}: {label}", fontsize=10)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, title, path)


def plot_quartiles(jobs: list[Job], title: str, path: Path) -> Path | None:
    sel = [(j, first_decomposition(j)) for j in jobs]
    sel = [(j, d) for j, d in sel if d]
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sel), figsize=(max(6.5, 5.6 * len(sel)), 5.0), squeeze=False)
    # One scale for the mean delta (right axis) of every panel, intervals included, so panels compare.
    spans = [_quartile_values(j, d, "delta_mean") for j, d in sel]
    lim = float(np.nanmax([np.nanmax(np.abs(np.r_[v.ravel(), e.ravel()])) for v, e in spans])) if spans else 1.0
    lim = lim if np.isfinite(lim) and lim > 0 else 1.0
    twins = []
    for ax, (job, d) in zip(axes[0], sel):
        qs = d["quartiles"]
        x = np.arange(len(qs))
        w = 0.27
        for i, (key, label, color) in enumerate((("frac_improved", "improved", "tab:green"), ("frac_stayed", "stayed", "tab:gray"),
                                                 ("frac_degraded", "degraded", "tab:red"))):
            v, e = _quartile_values(job, d, key)
            ax.bar(x + (i - 1) * w, v, w, label=label, color=color, yerr=_yerr(v, e), error_kw={"lw": 0.8, "capsize": 2})
        ax.set_xticks(x, [q["quartile"] for q in qs])
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("fraction of pairs (95% interval)")
        ax.set_xlabel(f"quartile of margin after stage {d['from_stage']} (Q4 = most confident)")
        ax2 = ax.twinx()
        twins.append(ax2)
        v, e = _quartile_values(job, d, "delta_mean")
        ax2.errorbar(x, v, yerr=_yerr(v, e), fmt="k-o", capsize=3, label="mean delta (right axis)")
        ax2.axhline(0, color="k", lw=0.5, ls=":")
        ax2.set_ylim(-1.1 * lim, 1.1 * lim)
        ax2.set_ylabel("mean margin delta")
        flag = " [redistribution]" if d["redistribution"] else ""
        ax.set_title(f"{job_label(job, jobs)}: {d['objective']}, stage {d['from_stage']} -> {d['to_stage']}{flag}", fontsize=10)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=4, frameon=False)
    return _save(fig, title, path)


def _quartile_values(job: Job, d: dict, stat: str) -> tuple[np.ndarray, np.ndarray]:
    """A decomposition's per-quartile values of `stat` and their intervals [quartile, 2] (NaN without replicates)."""
    head = ("quartiles", d["objective"], d["column"], d["from_stage"], d["to_stage"])
    v = np.array([q.get(stat, np.nan) for q in d["quartiles"]], dtype=float)
    e = np.array([interval(job.boot, (*head, q["quartile"], stat)) for q in d["quartiles"]], dtype=float)
    return v, e


def _yerr(v: np.ndarray, e: np.ndarray):
    """matplotlib's yerr (distances below and above) from [n, 2] bounds; None when there are none."""
    if not np.isfinite(e).any():
        return None
    return np.clip(np.nan_to_num(np.stack([v - e[:, 0], e[:, 1] - v])), 0, None)


def plot_scatter(jobs: list[Job], title: str, path: Path) -> Path | None:
    sel = [(j, first_decomposition(j)) for j in jobs]
    sel = [(j, d) for j, d in sel if d and j.pairs is not None]
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sel), figsize=(max(6.0, 4.8 * len(sel)), 4.8), squeeze=False, sharex=True, sharey=True)
    colors = {"Q1": "tab:blue", "Q2": "tab:cyan", "Q3": "tab:orange", "Q4": "tab:red"}
    data = []
    for job, d in sel:
        before = stage_values(job.pairs, d["objective"], d["from_stage"], "margin")
        data.append((before, stage_values(job.pairs, d["objective"], d["to_stage"], "margin").reindex(before.index)))
    lo = float(np.nanmin([min(b.min(), a.min()) for b, a in data]))
    hi = float(np.nanmax([max(b.max(), a.max()) for b, a in data]))
    pad = 0.05 * (hi - lo or 1.0)
    for ax, (job, d), (before, after) in zip(axes[0], sel, data):
        q = assign_quartiles(before)
        for name, color in colors.items():
            ax.scatter(before[q == name], after[q == name], s=12, alpha=0.7, color=color, label=name)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="no change")
        ax.axhline(0, color="gray", lw=0.5)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_xlabel(f"margin after stage {d['from_stage']} ({d['objective']} trained)")
        ax.set_ylabel(f"margin after stage {d['to_stage']}")
        ax.set_title(f"{job_label(job, jobs)}: {d['objective']} pairs", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, title, path)


def plot_grad_cosine(jobs: list[Job], title: str, path: Path) -> Path | None:
    """Per job, the per-layer gradient cosine at the start of its last stage between the stage's
    objective and each earlier one (bars), with the per-module-type values as a second panel row."""
    sel = []
    for job in jobs:
        for k in sorted(job.stage_diags, reverse=True):
            gc = {p: v for p, v in (job.stage_diags[k].get("grad_cosine") or {}).items() if v.get("earlier")}
            if gc:
                sel.append((job, k, gc))
                break
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(sel), figsize=(max(6.5, 5.2 * len(sel)), 7.0), squeeze=False)
    for c, (job, k, gc) in enumerate(sel):
        for r, (grp, xlabel) in enumerate((("per_layer", "layer"), ("per_module", "module type"))):
            ax = axes[r][c]
            pairs = list(gc)
            labels = list(dict.fromkeys(x for v in gc.values() for x in (v.get(grp) or {})))
            x = np.arange(len(labels))
            w = 0.8 / max(len(pairs), 1)
            for i, p in enumerate(pairs):
                vals = [(gc[p].get(grp) or {}).get(lab) for lab in labels]
                vals = [np.nan if v is None else v for v in vals]
                ax.bar(x + (i - (len(pairs) - 1) / 2) * w, vals, w,
                       label=f"{p.replace('__', ' vs ')} (total {gc[p].get('total') if gc[p].get('total') is None else round(gc[p]['total'], 3)})")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(x, labels)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("gradient cosine")
            # One scale per row across jobs, so bars compare between panels.
            lim = max(0.05, float(np.nanmax(np.abs([v for _, _, g in sel for p in g for v in (g[p].get(grp) or {}).values()
                                                    if v is not None] or [0.05]))))
            ax.set_ylim(-1.25 * lim, 1.6 * lim)
            ax.set_title(f"{job_label(job, jobs)}, start of stage {k}", fontsize=10)
            ax.legend(fontsize=8, loc="upper left")
    return _save(fig, title, path)


# ------------------------------------------------------------------------------------------- summary


def plot_forgetting_by_order(panels: list[tuple[str, list[dict]]], title: str, path: Path) -> Path | None:
    """Which order forgets which objective more, and by how much: per setting (row) and metric (column),
    each objective's forgetting (value after its stage minus final value; > 0 = lost) per order: the
    seeds (dots), their mean with its t-interval across seeds (thin bar) and the pooled pair-level
    interval (thick bar: eval sampling alone). Panels of one column share the y axis. Whether orders differ
    is a contrast (report/contrasts.py), not a matter of overlapping bars."""
    def rows_of(rows, metric):
        # Per objective, then the mean over objectives (= -BWT), where every order has a value side by side.
        sel = [r for r in rows if r["kind"] == "transfer" and r["metric"] == metric and r["quantity"] == "forgetting"
               and r["mean"] is not None]
        return [r for r in sel if r["objective"] != "_all"] + [{**r, "objective": "mean (-BWT)"} for r in sel if r["objective"] == "_all"]

    panels = [(label, rows) for label, rows in panels if any(rows_of(rows, m) for m in METRICS)]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(panels), len(METRICS), figsize=(5.6 * len(METRICS), 3.9 * len(panels) + 0.6),
                             squeeze=False, sharey="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (label, rows) in enumerate(panels):
        orders = sorted({x["order"] for x in rows})
        for c, metric in enumerate(METRICS):
            ax, sel = axes[r][c], rows_of(rows, metric)
            objs = list(dict.fromkeys(x["objective"] for x in sel))
            w = 0.8 / max(len(orders), 1)
            for i, order in enumerate(orders):
                color, named = colors[i % len(colors)], False
                for k, obj in enumerate(objs):
                    hit = [x for x in sel if x["order"] == order and x["objective"] == obj]
                    if not hit:
                        continue
                    x0, h = k + (i - (len(orders) - 1) / 2) * w, hit[0]
                    ax.scatter([x0 - w * 0.25] * len(h["values"]), h["values"], s=14, color=color, alpha=0.45, lw=0)
                    ax.vlines(x0, h["pooled_lo"], h["pooled_hi"], color=color, lw=5, alpha=0.35)
                    if h["t_lo"] is not None:
                        ax.errorbar(x0, h["mean"], yerr=[[h["mean"] - h["t_lo"]], [h["t_hi"] - h["mean"]]], fmt="none",
                                    ecolor=color, capsize=4, lw=1.2)
                    ax.plot(x0, h["mean"], "o", color=color, ms=7, label=None if named else f"order {order}")
                    named = True
                    ax.annotate(f"{h['mean']:.2g}", (x0, h["mean"]), xytext=(6, 0), textcoords="offset points", fontsize=8,
                                va="center")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(range(len(objs)), objs)
            ax.set_xlim(-0.6, len(objs) - 0.4)
            ax.set_xlabel("objective (trained before the last stage)")
            if len(objs) > 1:
                ax.axvline(len(objs) - 1.5, color="gray", lw=0.5, ls=":")
            ax.set_ylabel(f"forgetting of {metric} (> 0 = lost)")
            n = max((len(x["values"]) for x in sel), default=0)
            ax.set_title(f"{label}: {metric}, {n} seed(s)" if label else f"{metric}, {n} seed(s)", fontsize=10)
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=8, loc="best")
    fig.text(0.5, 0.005, "dots: seeds; marker: seed mean; thin bar: 95% t-interval across seeds; "
             "thick bar: 95% pooled pair-level interval (eval sampling alone)", ha="center", fontsize=8)
    return _save(fig, title, path)