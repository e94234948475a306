"""One job on 2 DDP processes (gloo backend on CPU): `torchrun --nproc_per_node 2 -m seqdpo ...` trains
with the batch sharded across ranks, finishes on both ranks, and writes its outputs once (rank 0).
The SLURM path (hydra/launcher=slurm_ddp, tasks_per_node=2) reaches the same code through
seqdpo.cluster.export_ddp_env; test_slurm_ddp runs it on the live test cluster."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cluster_helpers import PY, SLURM_TEST, TINY, explain, offline_run_ids, run, seqdpo_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a 2-rank job or SLURM job, allowed 900 s

N_EVAL, N_TRAIN, BATCH, STEPS = 8, 16, 4, 4


def _check_ddp_job(job: Path, world_size: int) -> None:
    assert json.loads((job / "status.json").read_text())["state"] == "done"
    pairs = pd.read_parquet(job / "pairs.parquet")
    # written once: one row per stage x objective x pair, no duplicates from the second rank
    assert len(pairs) == 3 * 2 * N_EVAL
    assert not pairs.duplicated(["stage", "objective", "pair_id"]).any()
    # the batch really was sharded: each optimizer step consumed world_size x batch_size pairs, so the
    # epoch counter after STEPS steps is STEPS * world_size * BATCH / N_TRAIN (2.0 on one process)
    last = [json.loads(line) for line in (job / "stage_1" / "train_log.jsonl").read_text().splitlines()][-1]
    assert last["step"] == STEPS and last["epoch"] == pytest.approx(STEPS * world_size * BATCH / N_TRAIN)
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    stage_rows = [r for r in rows if r.get("eval/stage") == 1]
    assert len(stage_rows) == 1, "stage metrics logged more than once"
    ids = offline_run_ids(job)
    assert len(ids) == 1, f"one W&B run expected, got {ids}"


def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(PY).parent))
    assert torchrun, "torchrun is installed with torch next to this python"
    job = tmp_path / "job"
    overrides = [o for o in TINY if not o.startswith(("dataset.n_", "train.batch_size", "train.max_steps"))]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "seqdpo", *overrides,
           f"dataset.n_train={N_TRAIN}", f"dataset.n_eval={N_EVAL}", f"train.batch_size={BATCH}",
           f"train.max_steps={STEPS}", "logger=wandb", f"hydra.run.dir={job}"]
    proc = run(cmd, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, explain(proc)
    _check_ddp_job(job, world_size=2)


@pytest.mark.slurm
def test_slurm_ddp_two_tasks(slurm_cluster, tmp_path):
    # hydra/launcher=slurm_ddp with 2 tasks of 1 CPU on the GPU-less test node: srun starts 2 processes,
    # each one DDP rank (RANK/WORLD_SIZE/MASTER_* exported from SLURM's environment).
    overrides = [o.replace("hydra/launcher=slurm", "hydra/launcher=slurm_ddp") for o in SLURM_TEST]
    tiny = [o for o in TINY if not o.startswith(("dataset.n_", "train.batch_size", "train.max_steps"))]
    cmd = seqdpo_cmd(*overrides, "hydra.launcher.tasks_per_node=2", *tiny, f"dataset.n_train={N_TRAIN}",
                     f"dataset.n_eval={N_EVAL}", f"train.batch_size={BATCH}", f"train.max_steps={STEPS}",
                     "logger=wandb", f"hydra.sweep.dir={tmp_path / 'sweep'}", multirun=True)
    proc = run(cmd, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, explain(proc)
    (job,) = [p.parent for p in (tmp_path / "sweep").glob("*/matrix.json")]
    _check_ddp_job(job, world_size=2)


def test_gradients_are_synchronised_across_ranks(tmp_path):
    """The hot path bypasses the LM's own forward; under DDP it must still run inside DDP's forward,
    or each rank would train on its own gradients."""
    torchrun = shutil.which("torchrun", path=str(Path(PY).parent))
    script = str(Path(__file__).with_name("ddp_grad_sync.py"))
    proc = run([torchrun, "--standalone", "--nproc_per_node", "2", script], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, explain(proc)
