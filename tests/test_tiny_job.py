"""One job end to end in the fast tier: the runner, its status file and a rerun's resume.

Every other test that runs a job is `slow`; this one is small enough for each commit (two stages of one
step on a few pairs, no W&B, no diagnostics, no intervals), so a change that breaks the stage loop, the
bookkeeping of finished stages or status.json fails here without the slow tier.
"""

import json

import numpy as np

from conftest import run_config
from seqdpo.runner import run_job

# no warmup: one step of warmup would train at lr 0 and leave the adapter where it started
TINY_JOB = ["dataset.n_train=8", "dataset.n_eval=4", "train.batch_size=4", "train.max_steps=1", "train.warmup_ratio=0", "lr=5e-3",
            "logger=none", "eval.bootstrap=0", "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false",
            "diagnostics.likelihood=false"]


def _done_times(out):
    return {k: (out / f"stage_{k}" / "DONE").stat().st_mtime_ns for k in range(3)}


def test_tiny_job_runs_reports_done_and_resumes(tmp_path):
    cfg = run_config([*TINY_JOB, f"ref_cache_dir={tmp_path / 'refcache'}"])
    out = tmp_path / "run"
    matrix = run_job(cfg, str(out))

    objectives = list(cfg.dataset.objectives)
    assert matrix["stages"] == ["base", *objectives] and matrix["objectives"] == objectives
    assert json.loads((out / "matrix.json").read_text())["metrics"] == matrix["metrics"]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and status["stage"] == 2, status
    for k in (1, 2):
        assert json.loads((out / f"stage_{k}" / "DONE").read_text())["train_steps"] == 1
    margins = matrix["metrics"]["margin_mean"]
    assert margins[0] == [0.0, 0.0]  # the base model is its own reference
    # Stage 1 trained (which way one step moves held-out margins is the slow tier's question: test_runner.py)
    assert margins[1] != margins[0]

    # A rerun of the finished job loads every stage and trains nothing.
    before = _done_times(out)
    assert run_job(cfg, str(out))["metrics"] == matrix["metrics"]
    assert _done_times(out) == before
    assert json.loads((out / "status.json").read_text())["state"] == "done"

    # A job that stopped after stage 1 resumes at stage 2: stages 0 and 1 are reloaded, stage 2 is redone,
    # here by a copy from the stage store, which the first run published it to.
    (out / "stage_2" / "DONE").unlink()
    again = run_job(cfg, str(out))
    assert [row["source"] for row in again["stage_store"]["stages"]] == ["trained", "store"]
    after = _done_times(out)
    assert (after[0], after[1]) == (before[0], before[1]) and after[2] != before[2]
    np.testing.assert_allclose(again["metrics"]["margin_mean"], margins, atol=1e-5)
    assert json.loads((out / "status.json").read_text())["state"] == "done"
