"""A real 2-order x 3-seed sweep of the tiny model (Hydra's basic launcher, one process) read by the
report: intervals in matrix.json, seeds aggregated, the forgetting-by-order figure."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, SMALL_JOB
from seqdpo import report

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a six-job sweep, allowed 900 s, then the report


def test_two_orders_three_seeds_report(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "seqdpo", "-m", "order=ab,ba", "seed=0,1,2", *SMALL_JOB, "logger=none",
           "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false", "diagnostics.likelihood=false",
           "eval.bootstrap=200", f"ref_cache_dir={tmp_path / 'refcache'}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    matrices = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/matrix.json"))]
    assert len(matrices) == 6
    for m in matrices:
        iv = m["intervals"]
        assert iv["n_boot"] == 200 and set(iv["n_pairs"].values()) == {16}
        acc, lo_hi = np.array(m["metrics"]["accuracy"]), np.array(iv["metrics"]["accuracy"])
        assert ((lo_hi[..., 0] <= acc + 1e-12) & (acc <= lo_hi[..., 1] + 1e-12)).all()
        assert len(m["verdicts"]) == 2 * 2 * 2  # objectives x stages 1..2 x (accuracy, margin)

    out = tmp_path / "report"
    w = report.build_report(sweep, out)
    assert w["jobs"] == 6
    seeds = pd.read_csv(out / "seeds.csv")
    bwt = seeds[(seeds.kind == "transfer") & (seeds.objective == "_all") & (seeds.quantity == "BWT")]
    assert sorted(bwt.order) == ["ab", "ab", "ba", "ba"] and set(bwt.n_seeds) == {3}
    assert (bwt.t_lo <= bwt["mean"]).all() and (bwt["mean"] <= bwt.t_hi).all()
    assert (bwt.pooled_lo <= bwt["mean"] + 1e-12).all() and (bwt["mean"] <= bwt.pooled_hi + 1e-12).all()
    s = (out / "summary.md").read_text()
    assert "#### Across seeds (0, 1, 2)" in s and "| ab: across seeds |" in s
    assert (out / "forgetting_by_order_synthetic.png").stat().st_size > 10_000
    # Each seed's world has its own eval pairs under the same ids; orders ab and ba of one seed share them:
    # pooling pairs by content keeps seeds apart, and the order contrast is paired by seed.
    jobs = {(c["order"]["name"], c["seed"]): pd.read_parquet(p.parent / "pairs.parquet")
            for p in sweep.glob("*/config.yaml") for c in [yaml.safe_load(p.read_text())]}
    ab0, ab1, ba0 = jobs[("ab", 0)], jobs[("ab", 1)], jobs[("ba", 0)]
    assert list(ab0.pair_id) == list(ab1.pair_id) and not set(ab0.content_hash) & set(ab1.content_hash)
    assert set(ab0.content_hash) == set(ba0.content_hash)
    c = pd.read_csv(out / "contrasts.csv")
    assert set(c.method) == {"paired by seed (t on per-seed differences)"} and set(c.factor) == {"order"}
    assert "## The answer: which setting forgets more" in s and s.index("The answer") < s.index("## All jobs")
    v = pd.read_csv(out / "sweep_verdicts.csv")
    claims = v[v.verdict.isin(["improved", "degraded"])]
    assert ((claims.lo > 0) | (claims.hi < 0)).all()
