"""A job stopped mid-stage and run again resumes from its last mid-stage checkpoint, skips finished
stages and ends with the same per-pair table as an uninterrupted run, in the same output directory and
the same W&B run.

- test_killed_job_resumes: the process gets SIGTERM (what `scancel` and a preempting SLURM send) while
  stage 2 trains, and the identical command is run again (what a requeued job does); no SLURM needed.
- test_slurm_preemption_requeue: a job of a real SLURM sweep gets SIGTERM then SIGUSR2 (submitit's
  preemption protocol, as `job._interrupt()` sends it); submitit checkpoints the launcher and runs
  `scontrol requeue`, SLURM restarts the job, and the blocked submitting process returns its result.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from cluster_helpers import (
    SLURM_TEST, assert_same_pairs, explain, job_env, offline_run_ids, run, seqdpo_cmd, wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a reference job, then a killed and a requeued one

# Long enough stages (400 steps of 2 pairs, ~10-20 s) to be interrupted midway; a checkpoint every 5 steps.
LONG = [
    "dataset.n_train=16",
    "dataset.n_eval=8",
    "train.max_steps=400",
    "train.batch_size=2",
    "train.save_steps=5",
    "train.logging_steps=50",
    "lr=5e-3",
    "diagnostics.grad_cosine=false",
    "diagnostics.adapter_movement=false",
    "diagnostics.likelihood=false",
]


def _checkpoint_of_stage(job_dir, k):
    ckpts = [p for p in (job_dir / f"stage_{k}" / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return ckpts[0] if ckpts else None


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same job, uninterrupted (logger=none: the logger is not part of the job's identity)."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = run(seqdpo_cmd(*LONG, "logger=none", f"hydra.run.dir={cwd / 'job'}"), cwd=cwd, timeout=900)
    assert proc.returncode == 0, explain(proc)
    return cwd / "job"


def _check_resumed(job_dir, reference_dir, stage1_done_before):
    status = json.loads((job_dir / "status.json").read_text())
    assert status["state"] == "done", status
    # stage 1 was finished before the interruption: skipped, not redone
    assert (job_dir / "stage_1" / "DONE").read_text() == stage1_done_before
    # stage 2 resumed from a mid-stage checkpoint and then ran to its end
    done2 = json.loads((job_dir / "stage_2" / "DONE").read_text())
    assert done2["resumed_from"] and "/stage_2/checkpoints/checkpoint-" in done2["resumed_from"], done2
    assert done2["train_steps"] == 400
    assert not (job_dir / "stage_2" / "checkpoints").exists()  # cleaned up once the stage finished
    assert_same_pairs(job_dir / "pairs.parquet", reference_dir / "pairs.parquet")
    ids = offline_run_ids(job_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, f"expected one W&B run resumed once, got {ids}"
    assert ids[0] == (job_dir / "wandb_run_id.txt").read_text().strip()
    assert ids[0].startswith("seqdpo-" + (job_dir / "signature.txt").read_text().strip() + "-")


def test_killed_job_resumes(reference_run, tmp_path):
    # No hydra.run.dir: the output directory follows from the overrides, so the rerun finds it.
    cmd = seqdpo_cmd(*LONG, "logger=wandb")
    env = job_env()
    # Output into a file: nothing reads a pipe while the job runs, and a full pipe would block the job.
    console = tmp_path / "first.log"
    with open(console, "w") as f:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        job_dir = wait_for(lambda: next((p.parent for p in (tmp_path / "outputs" / "runs").glob("*/signature.txt")), None),
                           timeout=300, what="the job directory")
        ckpt = wait_for(lambda: _checkpoint_of_stage(job_dir, 2), timeout=600, what="a stage-2 checkpoint")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0, console.read_text()[-3000:]
    assert not (job_dir / "stage_2" / "DONE").exists(), "the job finished before it was interrupted; make stages longer"
    assert (job_dir / "stage_1" / "DONE").exists()
    stage1_done = (job_dir / "stage_1" / "DONE").read_text()

    second = run(cmd, cwd=tmp_path, timeout=900)
    assert second.returncode == 0, explain(second)
    assert "stage 2 resumes from " in (job_dir / "seqdpo.log").read_text()
    assert [p.parent for p in (tmp_path / "outputs" / "runs").glob("*/signature.txt")] == [job_dir], "a second job dir appeared"
    assert ckpt.name.startswith("checkpoint-")
    _check_resumed(job_dir, reference_run, stage1_done)


@pytest.mark.slurm
def test_slurm_preemption_requeue(slurm_cluster, reference_run, tmp_path):
    # Unique on the machine: the job is found (squeue -n) and signalled by name, and another pytest session
    # running this test at the same time has the same tmp_path name (stress check, 2026-12-03: a job
    # requeued twice, once by the other session's signals).
    name = f"seqdpo-requeue-{os.getpid()}"
    # Default sweep dir (outputs/multirun/${now:...}): the requeued job must land in the same one.
    cmd = seqdpo_cmd(*SLURM_TEST, "hydra.launcher.max_num_timeout=2", f"hydra.launcher.name={name}",
                     *LONG, "logger=wandb", multirun=True)
    submitter = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        job_dir = wait_for(lambda: next((tmp_path / "outputs" / "multirun").glob("*/*/signature.txt"), None),
                           timeout=300, what="the job directory").parent
        wait_for(lambda: _checkpoint_of_stage(job_dir, 2), timeout=600, what="a stage-2 checkpoint")
        job_id = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()[0]
        # what submitit's SlurmJob._interrupt() does for a preemption: SIGTERM (ignored by submitit's
        # handler), then its preemption signal USR2 -> checkpoint() + `scontrol requeue` + exit
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        # As in a real preemption, the TERM lands everywhere before the requeue signal: it stops W&B's service
        # process while the job (submitit ignores TERM) trains on, and a TERM still on its way when USR2's
        # handler has spawned `scontrol requeue` would kill that child. The job must ride out both.
        time.sleep(2)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        assert not (job_dir / "stage_2" / "DONE").exists(), "the job finished before it was interrupted"
        stage1_done = (job_dir / "stage_1" / "DONE").read_text()
        out, _ = submitter.communicate(timeout=900)  # the submitter returns once the requeued job is done
    finally:
        if submitter.poll() is None:
            submitter.kill()
            subprocess.run(["scancel", "-n", name])
    assert submitter.returncode == 0, out[-5000:]
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, f"the requeued job re-resolved the sweep dir: {sweeps}"
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in show, show
    # accounting keeps both runs: the first ended REQUEUED (submitit's `scontrol requeue`), the second
    # COMPLETED (the task logs in .submitit/ are truncated by the second run, so they cannot show this)
    def history():
        out = subprocess.run(["sacct", "-n", "-D", "-X", "-P", "-o", "JobID,State", "-j", job_id],
                             capture_output=True, text=True).stdout
        return [line.split("|")[1] for line in out.split()]

    wait_for(lambda: history() == ["REQUEUED", "COMPLETED"], timeout=60, interval=1,
             what=f"sacct to show job {job_id} REQUEUED then COMPLETED (it shows {history()})")
    _check_resumed(job_dir, reference_run, stage1_done)
