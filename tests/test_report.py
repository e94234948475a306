"""seqdpo.report on job directories built by hand in the documented layout (docs/DESIGN.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from seqdpo import report

BETA = 0.5
OBJS = ["helpful", "harmless"]
N = 8


def _pairs(stage: int, stage_obj: str, margins: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for obj, ms in margins.items():
        for i, m in enumerate(ms):
            ref_c, ref_r = -20.0 - i, -25.0
            pol_c, pol_r = ref_c + m / BETA, ref_r  # margin = beta * (pol_c - ref_c) since rejected unchanged
            rows.append({"stage": stage, "stage_objective": stage_obj, "objective": obj, "pair_id": f"{obj}-{i}",
                         "policy_chosen_logps": pol_c, "policy_rejected_logps": pol_r, "ref_chosen_logps": ref_c,
                         "ref_rejected_logps": ref_r, "chosen_len": 10, "rejected_len": 10,
                         "reward_chosen": BETA * (pol_c - ref_c), "reward_rejected": 0.0, "margin": m,
                         "norm_margin": pol_c / 10 - pol_r / 10, "accuracy": 1.0 if m > 1e-6 else (0.5 if abs(m) <= 1e-6 else 0.0),
                         "policy_accuracy": float(pol_c / 10 > pol_r / 10)})
    return pd.DataFrame(rows)


def _matrix(stages, tables):
    metrics = {"accuracy": [], "margin_mean": [], "margin_median": [], "norm_margin_mean": [], "policy_accuracy": []}
    for df in tables:
        g = df.groupby("objective")
        metrics["accuracy"].append([float(g.accuracy.mean()[o]) for o in OBJS])
        metrics["margin_mean"].append([float(g.margin.mean()[o]) for o in OBJS])
        metrics["margin_median"].append([float(g.margin.median()[o]) for o in OBJS])
        metrics["norm_margin_mean"].append([float(g.norm_margin.mean()[o]) for o in OBJS])
        metrics["policy_accuracy"].append([float(g.policy_accuracy.mean()[o]) for o in OBJS])
    return {"stages": stages, "objectives": OBJS, "beta": BETA, "metrics": metrics}


def _config(order: str, stages: list[str], seed: int) -> dict:
    return {"model": {"name": "tiny"}, "dataset": {"name": "synthetic", "objectives": OBJS},
            "order": {"name": order, "stages": stages}, "lora": {"r": 8, "alpha": 16},
            "loss": {"name": "dpo", "components": None}, "beta": BETA, "lr": 5e-5, "seed": seed, "reference": "base",
            "eval": {"tie_tolerance": 1e-6}, "diagnostics": {"stay_threshold": 0.1, "redistribution_min_fraction": 0.2}}


# helpful learnt in stage 1 (margins 1..8), stage 2 moves Q1 up and Q4 down: flat aggregate
A_AFTER_1 = [float(i + 1) for i in range(N)]
A_AFTER_2 = [a + d for a, d in zip(A_AFTER_1, [2, 2, 0, 0, 0, 0, -2, -2])]


def _write_job(d: Path, order: str, letters: list[str], state: str, n_stages_done: int, margins_by_stage, diag=None):
    d.mkdir(parents=True)
    names = ["base"] + [OBJS[ord(x) - 97] for x in letters]
    (d / "config.yaml").write_text(yaml.safe_dump(_config(order, letters, 1 if "seed=1" in d.name else 0)))
    (d / "status.json").write_text(json.dumps({"state": state, "stage": n_stages_done - 1,
                                               "error": "RuntimeError: CUDA out of memory" if state == "failed" else None}))
    (d / "seqdpo.log").write_text("log\n")
    tables = []
    for k in range(n_stages_done):
        sd = d / f"stage_{k}"
        sd.mkdir()
        t = _pairs(k, names[k], margins_by_stage[k])
        t.to_parquet(sd / "pairs.parquet", index=False)
        (sd / "DONE").write_text("{}")
        tables.append(t)
        if diag and k in diag:
            (sd / "diagnostics.json").write_text(json.dumps(diag[k]))
    if state == "done":
        pd.concat(tables).to_parquet(d / "pairs.parquet", index=False)
        (d / "matrix.json").write_text(json.dumps(_matrix(names, tables)))


STAGE2_DIAG = {"stage": 2, "objective": "harmless",
               "grad_cosine": {"harmless__helpful": {"total": -0.05, "earlier": True, "per_layer": {"0": -0.2, "1": 0.1},
                                                     "per_module": {"q": -0.3, "v": 0.2, "down": 0.0}}},
               "movement": {"raw_norm": 1.5, "effective_norm": 0.25, "effective_norm_sum": 0.3},
               "movement_cosine": {"stage_1": {"raw_cosine": 0.1, "effective_cosine": -0.4}},
               "update_alignment": {"helpful": {"cos_update_neg_grad": -0.02, "first_order_loss_change": 0.01}}}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    zeros = {o: [0.0] * N for o in OBJS}
    _write_job(root / "order=ab", "ab", ["a", "b"], "done", 3,
               [zeros, {"helpful": A_AFTER_1, "harmless": [0.5] * N}, {"helpful": A_AFTER_2, "harmless": [3.0] * N}],
               diag={2: STAGE2_DIAG})
    _write_job(root / "order=ba", "ba", ["b", "a"], "done", 3,
               [zeros, {"helpful": [-1.0] * N, "harmless": [2.0] * N}, {"helpful": [4.0] * N, "harmless": [1.0] * N}])
    _write_job(root / "order=ab,seed=1", "ab", ["a", "b"], "running", 2,
               [zeros, {"helpful": A_AFTER_1, "harmless": [0.5] * N}])
    failed = root / "order=ba,seed=1"
    _write_job(failed, "ba", ["b", "a"], "failed", 1, [zeros])
    return root


def test_report_on_hand_made_sweep(sweep, tmp_path):
    out = tmp_path / "rep"
    w = report.build_report(sweep, out, html_too=True)
    assert w["jobs"] == 4

    m = pd.read_csv(out / "metrics.csv")
    # 3 stages x 2 objectives for each finished job, 2 x 2 for the running one, 1 x 2 for the failed one
    assert len(m) == 6 + 6 + 4 + 2
    ab = m[(m.job == "order=ab") & (m.objective == "helpful")].sort_values("stage")
    assert list(ab.margin_mean) == pytest.approx([0.0, 4.5, 4.5])
    assert list(ab.accuracy) == pytest.approx([0.5, 1.0, 1.0])
    assert list(ab.trained_here) == [False, True, False]
    assert set(m.columns) >= {"dataset", "order", "beta", "lr", "lora_r", "loss", "reference", "seed", "status"}
    assert set(m[m.job == "order=ab,seed=1"].status) == {"running"}

    tr = pd.read_csv(out / "transfer.csv")
    ba_bwt = tr[(tr.job == "order=ba") & (tr.metric == "margin_mean") & (tr.quantity == "BWT")].value.item()
    assert ba_bwt == pytest.approx(1.0 - 2.0)
    ba_fwt = tr[(tr.job == "order=ba") & (tr.metric == "accuracy") & (tr.quantity == "FWT")].value.item()
    assert ba_fwt == pytest.approx(0.0 - 0.5)

    q = pd.read_csv(out / "quartiles.csv")
    qa = q[(q.job == "order=ab") & (q.column == "margin")].set_index("quartile")
    assert qa.loc["Q1", "frac_improved"] == 1.0 and qa.loc["Q4", "frac_degraded"] == 1.0
    assert qa.loc["all", "delta_mean"] == pytest.approx(0.0) and bool(qa.loc["all", "redistribution"])

    diag = pd.read_csv(out / "diagnostics.csv")
    row = diag[(diag.job == "order=ab") & (diag.stage == 2)].iloc[0]
    assert row.grad_cosine == pytest.approx(-0.05) and row.movement_cos_stage_1_effective == pytest.approx(-0.4)

    jobs = pd.read_csv(out / "jobs.csv").set_index("job")
    assert jobs.loc["order=ba,seed=1", "status"] == "failed"
    assert jobs.loc["order=ba,seed=1", "log"].endswith("order=ba,seed=1/seqdpo.log")

    s = (out / "summary.md").read_text()
    assert "## Jobs not finished" in s and "CUDA out of memory" in s and "order=ba,seed=1/seqdpo.log" in s
    assert "## Dataset synthetic" in s and "Unfinished (partial results): order=ab,seed=1, order=ba,seed=1" in s
    # orders side by side: one accuracy table with both orders' columns
    assert "| stage | ab: trained | ab: helpful | ab: harmless | ba: trained | ba: helpful | ba: harmless |" in s
    assert "redistribution" in s
    # one finished seed per order: verdicts and the answer say they rest on one training run, and how many would do
    assert s.split("\n## ")[1].startswith("The answer") and "one seed a side, so no seed-level difference" in s
    assert "One seed per order: every verdict below is conditional on one training run" in s
    assert "resolving eval.min_effect would take about" in s
    v = pd.read_csv(out / "sweep_verdicts.csv")
    assert set(v.method) == {"conditional on one training run"} and v.seeds_for_min_effect.notna().any()
    page = (out / "summary.html").read_text()
    assert "<table" in page
    # self-contained: every figure embedded, no reference to a file next to it
    assert page.count("src='data:image/png;base64,") == page.count("src=") == len(w["plots"]) > 0

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(p.startswith("heatmap_") for p in pngs) and any(p.startswith("quartiles_") for p in pngs)
    assert any(p.startswith("scatter_") for p in pngs) and any(p.startswith("gradcos_") for p in pngs)
    for p in out.glob("*.png"):
        assert p.stat().st_size > 10_000
        assert f"({p.name})" in s  # embedded in the summary


def test_report_cli_empty_and_broken_jobs(tmp_path):
    root = tmp_path / "mr"
    bad = root / "order=ab"
    bad.mkdir(parents=True)
    (bad / "status.json").write_text("{not json")
    (root / "job2" / ".hydra").mkdir(parents=True)  # Hydra composed it, the job wrote nothing
    sub = root / ".submitit" / "123_1"
    sub.mkdir(parents=True)
    (sub / "123_1_0_log.err").write_text("Traceback ... job2 ... Killed\n")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-m", "seqdpo.report", str(root)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    jobs = pd.read_csv(root / "report" / "jobs.csv").set_index("job")
    assert jobs.loc["order=ab", "status"] == "unknown" and "status.json unreadable" in jobs.loc["order=ab", "problems"]
    assert jobs.loc["job2", "status"] == "not started"
    assert jobs.loc["job2", "log"].endswith("123_1_0_log.err")
    assert "2 job(s)" in (root / "report" / "summary.md").read_text()
    r = subprocess.run([sys.executable, "-m", "seqdpo.report", str(tmp_path / "missing")], capture_output=True, text=True, env=env)
    assert r.returncode == 2


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a real sweep, allowed 1500 s, then the report
def test_report_on_real_tiny_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "seqdpo", "-m", "order=ab,ba", "train.max_steps=4", "logger=none",
         f"hydra.sweep.dir={sweep}", f"ref_cache_dir={tmp_path / 'refcache'}"],
        capture_output=True, text=True, env=env, timeout=1500, cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "report"
    w = report.build_report(sweep, out)
    assert w["jobs"] == 2
    m = pd.read_csv(out / "metrics.csv")
    assert sorted(m.order.unique()) == ["ab", "ba"] and set(m.status) == {"done"}
    assert len(m) == 2 * 3 * m.objective.nunique()
    assert np.allclose(m[m.stage == 0].margin_mean, 0.0)  # the base model is its own reference
    diag = pd.read_csv(out / "diagnostics.csv")
    stage2 = diag[(diag.stage == 2) & (diag.other_trained_before == True)]  # noqa: E712
    assert len(stage2) == 2 and stage2.grad_cosine.between(-1, 1).all()
    # each cosine with its interval and both objectives' probe reliabilities (split-half, Spearman-Brown)
    assert (stage2.grad_cosine_low <= stage2.grad_cosine).all() and (stage2.grad_cosine <= stage2.grad_cosine_high).all()
    assert (stage2.reliability_own <= 1).all() and (stage2.reliability_other <= 1).all()
    # the disattenuated cosine: in [-1, 1], or absent and said to be unreliable at this probe size
    unreliable = diag.grad_cosine_corrected_note == "unreliable at this probe size: raise diagnostics.probe_pairs"
    assert diag[~unreliable].grad_cosine_corrected.dropna().between(-1, 1).all()
    assert diag[unreliable].grad_cosine_corrected.isna().all()
    assert not unreliable.any() or "unreliable at this probe size: raise diagnostics.probe_pairs" in (out / "summary.md").read_text()
    assert (diag.movement_effective_norm > 0).all()
    s = (out / "summary.md").read_text()
    assert "| stage | ab: trained |" in s
    for prefix in ("heatmap_", "quartiles_", "scatter_", "gradcos_", "gradcos_trace_"):
        assert any(p.name.startswith(prefix) and p.stat().st_size > 10_000 for p in out.glob("*.png")), prefix


def test_a_duplicate_config_counts_once(sweep, tmp_path):
    """The same config twice (same signature, same seed): one result, flagged, not two seeds with sd 0."""
    import shutil

    root = sweep
    shutil.copytree(root / "order=ba", root / "order=ba,again")
    out = tmp_path / "dup_report"
    report.build_report(root, out)
    jobs = pd.read_csv(out / "jobs.csv").set_index("job")
    assert jobs.loc["order=ba,again", "duplicate_of"] == "order=ba" and jobs.duplicate_of.notna().sum() == 1
    s = (out / "summary.md").read_text()
    assert "1 duplicate job(s) (same config signature, same seed) counted once: order=ba,again repeats order=ba" in s
    assert "#### Across seeds" not in s and "order=ba,again" not in pd.read_csv(out / "verdicts.csv").job.tolist()


def test_pair_accounting_is_one_line_when_nothing_was_dropped():
    from seqdpo.report.build import _pairs_section
    from seqdpo.report.doc import Doc

    clean = pd.DataFrame({"job": ["a", "b"], "objective": ["x", "x"], "split": ["eval", "eval"], "rows": [64, 64],
                          "kept": [64, 64], "truncated": [0, 0], "lost_fraction": [0.0, 0.0], "dropped_empty": [0, 0]})
    doc = Doc()
    _pairs_section(doc, clean)
    assert doc.markdown().strip() == ("Pairs: every job kept every pair it read (128 pairs over 2 job(s), none dropped or "
                                      "truncated; pairs.csv).")
    doc = Doc()
    _pairs_section(doc, clean.assign(dropped_empty=[0, 3]))
    assert "## Pairs kept and dropped" in doc.markdown() and "| b | x | eval |" in doc.markdown()
