"""Hydra multirun of the tiny model: the basic launcher and local_submitit, as a user types it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_JOB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # four-job sweeps, each allowed 900 s


def _sweep(tmp_path, *extra, logger="none"):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "seqdpo", "-m", "order=ab,ba", "seed=0,1", *SMALL_JOB, f"logger={logger}",
           "diagnostics.grad_cosine=false", f"ref_cache_dir={tmp_path / 'refcache'}", f"hydra.sweep.dir={sweep}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_summary(proc.stdout, sweep, wandb=logger == "wandb")
    return sweep


def _check_summary(stdout, sweep, wandb):
    """The submitting process ends with one line per job (state, duration, directory) and what to run next."""
    lines = stdout.rstrip().splitlines()
    jobs = sorted(p.parent.name for p in sweep.glob("*/status.json"))
    tail = lines[-(len(jobs) + 2 + wandb):]
    assert tail[0] == f"seqdpo sweep {sweep}: 4 job(s): 4 done", tail
    assert [line.split()[0] for line in tail[1:5]] == ["done"] * 4
    assert sorted(line.split()[2] for line in tail[1:5]) == jobs
    assert all(line.split()[1].count(":") == 2 for line in tail[1:5])  # h:mm:ss
    assert tail[5] == f"next: python -m seqdpo.report {sweep}"
    if wandb:
        assert tail[6].split() == ["python", "-m", "seqdpo.sync", str(sweep), "(upload", "the", "offline", "W&B", "runs)"]


def _check_jobs(sweep):
    jobs = sorted(p.parent for p in sweep.glob("*/matrix.json"))
    # Directory names come from the overrides: each job's order and seed can be read off its name.
    combos = {(o, s) for job in jobs for o in ("ab", "ba") for s in (0, 1) if f"order={o}," in job.name and f"seed={s}" in job.name}
    assert combos == {(o, s) for o in ("ab", "ba") for s in (0, 1)}, [j.name for j in jobs]
    for job in jobs:
        assert json.loads((job / "status.json").read_text())["state"] == "done"
        m = json.loads((job / "matrix.json").read_text())
        order = "ab" if "order=ab," in job.name else "ba"
        trained_first = m["stages"][1]
        assert trained_first == m["objectives"][0 if order == "ab" else 1]
    return jobs


def test_multirun_basic_launcher(tmp_path):
    from wandb_offline import read_run

    sweep = _sweep(tmp_path, logger="wandb")
    jobs = _check_jobs(sweep)
    # The basic launcher runs the four jobs in one process: still one W&B run per job, one group per sweep.
    runs = [read_run(next((j / "wandb").glob("offline-run-*/run-*.wandb"))) for j in jobs]
    assert len({r["run_id"] for r in runs}) == 4
    assert {r["group"] for r in runs} == {sweep.name}
    # Jobs with the same seed score the same pairs: the first computes the base reference, the
    # second is served from the shared cache (the basic launcher runs ab before ba).
    for job in jobs:
        counts = json.loads((job / "matrix.json").read_text())["reference_forwards"]
        if "order=ab," in job.name:
            assert counts["computed"] > 0
        else:
            assert counts["computed"] == 0 and counts["cached"] > 0


def test_multirun_local_submitit(tmp_path):
    sweep = _sweep(tmp_path, "hydra/launcher=local_submitit", "hydra.launcher.timeout_min=15")
    jobs = _check_jobs(sweep)
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))
    # the four jobs run at once on this machine: each gets its share of the cores as torch threads
    share = max(1, min(2, len(os.sched_getaffinity(0)) // 4))
    for job in jobs:
        assert f"torch threads: {share}" in (job / "seqdpo.log").read_text()


def test_a_failed_submitit_sweep_still_ends_with_its_summary(tmp_path):
    """The submitting process re-raises the job's error and prints the summary at exit; it used to die there
    importing pandas ("can't register atexit after shutdown"), as no job had run in that process. The failed
    job's line carries where it stopped and its error (a data error used to read "stage None"); a job whose
    pairs model.max_length cut ends `done` but flagged, and the submitter said how the jobs stood meanwhile."""
    sweep = tmp_path / "sweep"
    # max_length 8: every prompt too long (a data error before stage 0); 16: every pair truncated
    cmd = [sys.executable, "-m", "seqdpo", "-m", "hydra/launcher=local_submitit", "hydra.launcher.timeout_min=5",
           "model.max_length=8,16", "logger=none", *SMALL_JOB, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "can't register atexit" not in out, out[-3000:]
    assert f"seqdpo sweep {sweep}: 2 job(s): 1 done, 1 failed; 1 lost more than dataset.warn_fraction" in proc.stdout, out[-3000:]
    lines = {line.split()[2].split("model.max_length=")[1].split(",")[0]: line
             for line in proc.stdout.splitlines() if line.startswith(("  done", "  failed"))}
    error = json.loads(next(sweep.glob("*max_length=8*/status.json")).read_text())["error"]
    assert lines["8"].split()[0] == "failed"
    assert lines["8"].endswith(f"(before stage 0: {error.strip().splitlines()[-1].strip()})"), lines["8"]
    assert "0 pairs left" in lines["8"]
    assert "job failed before stage 0 (status.json)" in next(sweep.glob("*max_length=8*/seqdpo.log")).read_text()
    assert lines["16"].split()[0] == "done" and "pairs lost to model.max_length: " in lines["16"], lines["16"]
    assert "/train 100% (32 of 32)" in lines["16"], lines["16"]
    assert "2 jobs: 2 running" in proc.stderr and "2 jobs: 2 ended" in proc.stderr, proc.stderr[-3000:]
    from seqdpo.report.build import build_report

    build_report(sweep, tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Jobs that lost pairs to model.max_length" in summary and "polite/train 100% (32 of 32)" in summary
