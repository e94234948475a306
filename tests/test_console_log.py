"""What `python -m seqdpo` prints and what `seqdpo.log` keeps, seen as a user sees them (a real process)."""

import re
import subprocess

import pytest

from cluster_helpers import PY, REPO, job_env
from conftest import SMALL_JOB

pytestmark = pytest.mark.slow


def _seqdpo(tmp_path, *overrides, multirun=False):
    """Console (stdout and stderr interleaved as on a terminal) and exit code of one command."""
    cmd = [PY, "-m", "seqdpo", *(["-m"] if multirun else []), *overrides]
    # HYDRA_FULL_ERROR off: the console a user gets by default
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(HYDRA_FULL_ERROR="0"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    return proc.returncode, proc.stdout.replace("\r", "\n")


def test_job_console_and_log(tmp_path):
    out = tmp_path / "job"
    code, console = _seqdpo(tmp_path, *SMALL_JOB, "logger=wandb", f"ref_cache_dir={tmp_path / 'refcache'}",
                            f"hydra.run.dir={out}")
    assert code == 0, console[-4000:]
    # One labelled bar per training stage; no internal bars of the datasets library
    assert re.search(r"^stage 1/2: polite: +100%\|", console, re.M), console[-4000:]
    assert re.search(r"^stage 2/2: factual: +100%\|", console, re.M), console[-4000:]
    for internal in ("Filter:", "Flattening the indices", "Map:", "Tokenizing pairs", "Running in WANDB offline mode"):
        assert internal not in console, internal
    # TRL's metrics as compact lines, not dicts of quoted strings
    assert re.search(r"stage 1/2: polite step 1/4: loss \d\.\d+  grad_norm", console)
    assert "{'loss'" not in console
    # The result matrix is the last thing printed, after W&B's footer
    lines = [line for line in console.splitlines() if line.strip()]
    finished = max(i for i, line in enumerate(lines) if "seqdpo job finished in" in line)
    assert max(i for i, line in enumerate(lines) if line.startswith("wandb:")) < finished
    assert lines[-5].startswith("margin_mean (rows: after stage") and lines[-1].startswith("2:factual")

    log = (out / "seqdpo.log").read_text()
    assert "config signature" in log and "  train: epochs=1.0 max_steps=4 batch_size=4" in log
    assert "  lora: r=32 alpha=None (2r = 64)" in log
    for k, name in enumerate(["base", "polite", "factual"]):
        assert re.search(rf"stage {k}/2: {name} started .*\n", log)
        assert re.search(rf"stage {k}/2: {name} finished in \d+\.\d s: accuracy ", log)
    assert "stage 2/2: factual step 4/4: train_runtime" in log
    assert "accuracy (rows: after stage, columns: evaluated objective)" in log
    assert "margin_mean (rows: after stage, columns: evaluated objective)" in log


def test_model_not_found_is_one_paragraph_and_the_log_keeps_the_traceback(tmp_path):
    out = tmp_path / "job"
    code, console = _seqdpo(tmp_path, "model.name=does/not-exist", "logger=none", f"hydra.run.dir={out}")
    assert code == 1
    errors = [line for line in console.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, console
    assert "config key 'model.name'" in errors[0] and "'does/not-exist'" in errors[0]
    assert "HF_HUB_OFFLINE" in errors[0] and "model.name=<local dir>" in errors[0]
    assert "Traceback" not in console and "During handling" not in console, console
    log = (out / "seqdpo.log").read_text()
    assert "config key 'model.name'" in log and "Traceback (most recent call last)" in log
    assert "seqdpo.config.ConfigError" in log


def test_a_failing_job_logs_its_traceback_and_the_console_shows_it_once(tmp_path):
    out = tmp_path / "job"
    code, console = _seqdpo(tmp_path, *SMALL_JOB, "logger=none", "ref_cache_dir=/dev/null/refcache", f"hydra.run.dir={out}")
    assert code == 1
    assert "job failed: NotADirectoryError" in console and console.count("Traceback (most recent call last)") == 1
    log = (out / "seqdpo.log").read_text()
    assert "config signature" in log
    assert "job failed: NotADirectoryError" in log and "Traceback (most recent call last)" in log
    assert "refcache.py" in log  # the whole traceback, down to the failing frame


def test_experiment_with_sweep_axes_needs_multirun(tmp_path):
    code, console = _seqdpo(tmp_path, "experiment=paper_orders", f"hydra.run.dir={tmp_path / 'job'}")
    assert code == 1
    assert "config key 'experiment': 'paper_orders' defines sweep axes (dataset=" in console, console
    assert "python -m seqdpo -m experiment=paper_orders" in console
    assert not (tmp_path / "job" / "status.json").exists()  # refused before any work
