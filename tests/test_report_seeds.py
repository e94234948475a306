"""The report on a hand-made 2-order x 3-seed sweep: intervals in every table, seeds grouped (mean, sd,
t-interval, pooled pair-level interval), the forgetting-by-order figure, panels on shared axes."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from seqdpo import report
from seqdpo.report import plots
from seqdpo.report.jobs import load_job
from seqdpo.report.tables import diagnostics_table
from test_report import OBJS, STAGE2_DIAG, _write_job

N = 24


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
    """order ab forgets its first objective by about 1.5 margin units, order ba by about 0.3."""
    root = tmp_path_factory.mktemp("seeds") / "multirun"
    rng = np.random.default_rng(0)
    # ba's stage-2 cosines three times ab's, so panels on their own axes would differ
    steep = {**STAGE2_DIAG, "grad_cosine": {"harmless__helpful": {**STAGE2_DIAG["grad_cosine"]["harmless__helpful"],
                                                                  "per_layer": {"0": -0.6, "1": 0.3}}}}
    for order, letters, drop in (("ab", ["a", "b"], 1.5), ("ba", ["b", "a"], 0.3)):
        first, second = (OBJS[ord(x) - 97] for x in letters)
        for seed in range(3):
            s1 = {first: rng.normal(2, 1, N), second: rng.normal(0.2, 1, N)}
            s2 = {first: s1[first] - drop + rng.normal(0, 0.2, N), second: rng.normal(2, 1, N)}
            d = root / f"order={order},seed={seed}"
            _write_job(d, order, letters, "done", 3, [{o: [0.0] * N for o in OBJS}, {k: list(v) for k, v in s1.items()},
                                                     {k: list(v) for k, v in s2.items()}], diag={2: STAGE2_DIAG if order == "ab" else steep})
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            cfg["seed"], cfg["eval"]["bootstrap"] = seed, 300
            (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = root.parent / "report"
    return root, out, report.build_report(root, out, html_too=True)


def test_seeds_are_grouped_with_t_and_pooled_intervals(seed_sweep):
    root, out, w = seed_sweep
    assert w["jobs"] == 6
    tr = pd.read_csv(out / "transfer.csv")
    seeds = pd.read_csv(out / "seeds.csv")
    for order in ("ab", "ba"):
        per_job = tr[(tr.order == order) & (tr.metric == "margin_mean") & (tr.objective == "_all") & (tr.quantity == "BWT")]
        per_job = per_job.sort_values("seed").value.to_numpy()
        row = seeds[(seeds.order == order) & (seeds.kind == "transfer") & (seeds.metric == "margin_mean")
                    & (seeds.objective == "_all") & (seeds.quantity == "BWT")].iloc[0]
        assert row.n_seeds == 3 and row.seeds == "0,1,2"
        assert row["mean"] == pytest.approx(per_job.mean()) and row.sd == pytest.approx(per_job.std(ddof=1))
        half = 4.3027 * per_job.std(ddof=1) / math.sqrt(3)
        assert (row.t_lo, row.t_hi) == pytest.approx((per_job.mean() - half, per_job.mean() + half), abs=1e-3)
        assert row.pooled_lo < row["mean"] < row.pooled_hi
    bwt = seeds[(seeds.kind == "transfer") & (seeds.metric == "margin_mean") & (seeds.quantity == "BWT")].set_index("order")
    assert bwt.loc["ab", "t_hi"] < bwt.loc["ba", "t_lo"]  # ab forgets more, beyond the seeds' spread
    cells = seeds[(seeds.kind == "matrix") & (seeds.metric == "accuracy")]
    assert len(cells) == 2 * 3 * 2 and set(cells.n_seeds) == {3}
    # Each number labelled with its method; every interval clipped to what the statistic can take.
    assert set(seeds.method) == {"t-interval across seeds"}
    assert (cells.t_lo >= 0).all() and (cells.t_hi <= 1).all() and (cells.two_level_hi <= 1).all()
    fractions = seeds[(seeds.kind == "quartiles") & seeds.quantity.str.startswith("frac_")]
    assert len(fractions) and (fractions.t_lo >= 0).all() and (fractions.t_hi <= 1).all()

    s = (out / "summary.md").read_text()
    assert "#### Across seeds (0, 1, 2)" in s and s.count("#### seed ") == 3
    assert "![forgetting_by_order_synthetic.png](forgetting_by_order_synthetic.png)" in s
    assert (out / "forgetting_by_order_synthetic.png").stat().st_size > 10_000
    assert "ab: across seeds" in s and "degraded 3" in s  # ab's first objective, margin, after stage 2, every seed


def test_every_table_carries_intervals(seed_sweep):
    _, out, _ = seed_sweep
    m = pd.read_csv(out / "metrics.csv")
    for metric in ("accuracy", "margin_mean", "margin_median"):
        assert ((m[f"{metric}_lo"] <= m[metric] + 1e-12) & (m[metric] <= m[f"{metric}_hi"] + 1e-12)).all()
    tr = pd.read_csv(out / "transfer.csv").dropna(subset=["value"])
    assert tr.lo.notna().all() and ((tr.lo <= tr.value + 1e-9) & (tr.value <= tr.hi + 1e-9)).all()
    q = pd.read_csv(out / "quartiles.csv")
    assert q.frac_degraded_lo.notna().all() and (q.frac_degraded_lo <= q.frac_degraded + 1e-12).all()
    v = pd.read_csv(out / "verdicts.csv")
    assert set(v.verdict) <= {"degraded", "improved", "redistributed", "equivalent", "inconclusive"} and len(v) == 6 * 2 * 2 * 2
    first = v[(v.order == "ab") & (v.objective == "helpful") & (v.stage == 2) & (v.column == "margin")]
    assert set(first.verdict) == {"degraded"} and set(first.baseline_stage) == {1}
    assert "helpful | 2 | degraded: -1.5" in (out / "summary.md").read_text().replace("-1.4", "-1.5")


def test_stage_objective_gets_no_cross_cosine_row(seed_sweep):
    root, _, _ = seed_sweep
    job = load_job(root / "order=ab,seed=0", root)
    own = {**STAGE2_DIAG, "update_alignment": {**STAGE2_DIAG["update_alignment"],
                                               "harmless": {"cos_update_neg_grad": 0.7, "first_order_loss_change": -0.2}}}
    job.stage_diags = {2: own}
    d = diagnostics_table([job])
    assert list(d.other_objective) == ["helpful"] and d.grad_cosine.notna().all()
    assert d.own_update_cos_neg_grad.iloc[0] == pytest.approx(0.7)


def test_panels_compared_side_by_side_share_axes(seed_sweep, monkeypatch, tmp_path):
    root, _, _ = seed_sweep
    figures = {}
    real_save = plots._save

    def keep(fig, title, path):
        figures[path.stem] = [(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes]
        return real_save(fig, title, path)

    monkeypatch.setattr(plots, "_save", keep)
    jobs = [load_job(root / f"order={o},seed=0", root) for o in ("ab", "ba")]
    plots.plot_quartiles(jobs, "t", tmp_path / "quartiles.png")
    plots.plot_scatter(jobs, "t", tmp_path / "scatter.png")
    plots.plot_grad_cosine(jobs, "t", tmp_path / "gradcos.png")
    # quartiles: 2 panels, each a fraction axis and a mean-delta twin
    fractions, deltas = figures["quartiles"][:2], figures["quartiles"][2:]
    assert len(deltas) == 2 and deltas[0][1] == deltas[1][1] and fractions[0][1] == fractions[1][1]
    assert len({lim for lim in figures["scatter"]}) == 1
    assert figures["gradcos"][0][1] == figures["gradcos"][1][1]


def test_the_answer_comes_first_with_the_order_contrast(seed_sweep):
    """ab forgets ~1.5 margin units, ba ~0.3: the first section says so with the contrast, not overlapping bars."""
    _, out, _ = seed_sweep
    s = (out / "summary.md").read_text()
    assert s.split("\n## ")[1].startswith("The answer")
    (margin,) = [line for line in s.splitlines() if line.startswith("- margin_mean: earlier objectives are forgotten")]
    assert "order=ab forgets more" in margin and "(Holm, Welch t" in margin
    c = pd.read_csv(out / "contrasts.csv")
    row = c[(c.metric == "margin_mean") & (c.objective == "_all") & (c.quantity == "forgetting")].iloc[0]
    assert (row.factor, row.a, row.b, row.family, row.adjustment) == ("order", "order=ab", "order=ba", "planned", "Holm")
    assert row["diff"] == pytest.approx(row.mean_a - row.mean_b) and row.lo > 0.9 and row.p <= row.p_adjusted < 0.05
    # the fixture's pairs carry no content hash: its seeds cannot be shown to share eval pairs, so Welch
    assert set(c.method) == {"Welch t (seeds not shared)"}
    assert set(c[c.family == "screen"].adjustment) == {"BH"}


def test_sweep_verdicts_never_claim_a_change_their_seed_interval_holds_0(seed_sweep):
    _, out, _ = seed_sweep
    v = pd.read_csv(out / "sweep_verdicts.csv")
    assert len(v) == 2 * 2 * 2 * 2 and set(v.method) == {"t-interval across seeds"}
    claims = v[v.verdict.isin(["improved", "degraded"])]
    assert len(claims) and ((claims.hi < 0) | (claims.lo > 0)).all() and (claims.p_bh < 0.05).all()
    assert set(v.verdict) <= {"degraded", "improved", "redistributed", "equivalent", "inconclusive"}
    equivalent = v[v.verdict == "equivalent"]
    assert ((equivalent.lo >= -equivalent.min_effect) & (equivalent.hi <= equivalent.min_effect)).all()
    assert v.min_detectable.notna().all()


def test_contrasts_pair_by_seed_only_when_each_seed_scored_the_same_pairs():
    """Order ab and ba at seed s train on seed s's world: same eval pairs, so paired. Another seed's world
    reuses the pair ids with other pairs: the ids alone must not pair them."""
    from types import SimpleNamespace

    from seqdpo.analysis import intervals as I
    from seqdpo.report.contrasts import _shares_data
    from test_intervals import _job

    def job(world):
        pairs, matrix = _job({"a": [np.zeros(16), np.ones(16)]}, ["base", "a"], world=world)
        return SimpleNamespace(boot=I.bootstrap(pairs, matrix, n_boot=5, seed=0))

    ab = {s: job(f"seed{s}") for s in range(3)}
    ba = {s: job(f"seed{s}") for s in range(3)}
    assert _shares_data(ab, ba)
    assert not _shares_data(ab, {s: job(f"seed{s + 1}") for s in range(3)})  # same ids, other pairs
    assert not _shares_data(ab, {s: ba[s] for s in range(2)})  # not the same seeds


def test_behaviour_scores_are_aggregated_across_seeds(seed_sweep):
    from seqdpo.report.seeds import seed_rows

    root, _, _ = seed_sweep
    jobs = [load_job(root / f"order=ab,seed={s}", root) for s in range(3)]
    for s, job in enumerate(jobs):
        job.matrix["behaviour"] = {"stages": ["base", "helpful"], "objectives": ["helpful"],
                                   "metrics": {"win_rate": [[0.5], [0.9 + 0.04 * s]], "score_mean": [[0.1], [0.2 * s]]}}
    rows = {(r["metric"], r["stage"]): r for r in seed_rows(jobs) if r["kind"] == "behaviour"}
    win = rows[("win_rate", 1)]
    assert win["values"] == pytest.approx([0.9, 0.94, 0.98]) and win["mean"] == pytest.approx(0.94)
    assert win["t_hi"] == 1.0 and win["t_lo"] == pytest.approx(0.94 - 4.3027 * 0.04 / math.sqrt(3), abs=1e-3)
    assert rows[("score_mean", 1)]["sd"] == pytest.approx(0.2) and rows[("score_mean", 0)]["sd"] == pytest.approx(0)
