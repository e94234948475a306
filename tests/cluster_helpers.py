"""Helpers shared by the cluster tests (test_slurm, test_requeue, test_ddp, test_cluster_preflight).

Jobs run as real `python -m seqdpo` processes (or SLURM jobs), in a temporary working directory, with
this interpreter: submitit submits `sys.executable` of the submitting process, so SLURM jobs run the
same venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SETUP_SLURM = REPO / "launchers" / "slurm" / "setup_slurm.sh"

# Small enough for 2 shared CPU cores; diagnostics are off (they have their own tests) to keep jobs short.
TINY = [
    "dataset.n_train=16",
    "dataset.n_eval=8",
    "train.max_steps=4",
    "train.batch_size=4",
    "lr=5e-3",
    "diagnostics.grad_cosine=false",
    "diagnostics.adapter_movement=false",
    "diagnostics.likelihood=false",
]

# SLURM resources that fit the single-node test cluster (2 CPUs, no GPU).
SLURM_TEST = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=15",
]


def job_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1",
    )
    # `python -m seqdpo` from a temporary directory must import this checkout, whatever is installed
    # An in-process W&B run earlier in this pytest process exports WANDB_SERVICE; a child that inherits it
    # attaches to that process's W&B service, which refuses a run id it saw before ("run ID is in use").
    env.pop("WANDB_SERVICE", None)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def seqdpo_cmd(*overrides: str, multirun: bool = False) -> list[str]:
    return [PY, "-m", "seqdpo", *(["-m"] if multirun else []), *overrides]


def run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _controller_up() -> bool:
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "UP" in r.stdout


def _accounting_up() -> bool:
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "error" not in r.stderr.lower()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A live SLURM controller with partition `debug`.

    Skips only when the SLURM client is not installed at all (`sinfo` absent), unless
    SEQDPO_REQUIRE_SLURM=1 (set by .ci/run after setup_slurm.sh), where that is a failure: CI must not
    pass by skipping. When the client is installed but the daemons are down (a fresh shell after a
    reboot), it starts them with setup_slurm.sh if we are root.
    """
    if shutil.which("sinfo") is None:
        msg = ("`sinfo` is not on PATH: no SLURM client here. Start the single-node test cluster with "
               "`sudo bash launchers/slurm/setup_slurm.sh` (Debian/Ubuntu, root) to run this test.")
        if os.environ.get("SEQDPO_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    # Accounting too: with the database down, submitit cannot see a job end and waits forever.
    if not (_controller_up() and _accounting_up()) and os.geteuid() == 0:
        r = subprocess.run(["bash", str(SETUP_SLURM)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"setup_slurm.sh failed:\n{r.stdout}\n{r.stderr}"
    assert _controller_up(), "slurmctld does not answer `scontrol ping`; see /var/log/slurm/slurmctld.log"
    assert _accounting_up(), "`sacct` fails: slurmdbd or MariaDB is down; see /var/log/slurm/slurmdbd.log"
    part = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a %T"], capture_output=True, text=True)
    assert part.stdout.strip(), "the test cluster has no partition `debug` (launchers/slurm/setup_slurm.sh makes it)"
    return "debug"


def sacct_states(job_id: str) -> dict[str, str]:
    """{job step id: state} for a job or job array, from the accounting database."""
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-o", "JobID,State", "-j", job_id],
                       capture_output=True, text=True, timeout=60)
    out = {}
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            out.setdefault(jid, []).append(state)
    return {k: ",".join(v) for k, v in out.items()}


def read_pairs(path: Path):
    import pandas as pd

    df = pd.read_parquet(path)
    return df.sort_values(["stage", "objective", "pair_id"]).reset_index(drop=True)


def assert_same_pairs(a: Path, b: Path) -> None:
    """The per-pair tables of two runs agree: same rows, same numbers (CPU float32, so to 1e-5)."""
    import numpy as np

    x, y = read_pairs(a), read_pairs(b)
    assert list(x.columns) == list(y.columns)
    assert len(x) == len(y) and len(x) > 0
    for col in x.columns:
        if x[col].dtype.kind in "fc":
            np.testing.assert_allclose(x[col].to_numpy(), y[col].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=col)
        else:
            assert (x[col].to_numpy() == y[col].to_numpy()).all(), col


def offline_run_ids(job_dir: Path) -> list[str]:
    """Run id of every offline W&B run of a job, from its run-<id>.wandb file (a second run directory
    started in the same second is named offline-run-<time>-<id>-1, so the directory name is not the id)."""
    return [f.name[len("run-"):-len(".wandb")] for f in sorted((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))]
