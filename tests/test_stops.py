"""Every kind of stop, on one job directory, with real `python -m seqdpo` processes and real signals.

The same job is started six times, as a cluster's life would have it:
  1. SIGKILL while stage 1 trains        -> status stays `running` with pid, host and a fresh heartbeat;
                                            the report and seqdpo.sync read it as `lost`, sync uploads it
  2. rerun, SIGKILL once stage 1 trained -> (trained.json, no DONE) the next run does not retrain stage 1
     but before its DONE
  3. rerun, SIGTERM while stage 2 trains -> `interrupted` at stage 2, W&B run closed, exit code 143;
                                            then its newest checkpoint is torn by hand
  4. rerun to the end                    -> resumes from the newest intact checkpoint with a warning;
                                            train_loss covers the whole stage
  5. a rerun with another config         -> refused, the directory byte for byte as it was
  6. a rerun (as a sweep) that fails     -> `failed` at stage 2; the earlier run's matrix.json and
     in stage 2                             pairs.parquet are gone, the report shows stages 0-1 only,
                                            and the sweep ends with its one-line-per-job summary
"""

import json
import os
import signal
import socket
import stat
import subprocess
import time

import numpy as np
import pytest

from cluster_helpers import TINY, explain, job_env, run, seqdpo_cmd, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the module fixture runs six jobs and stops

STAGES = [
    "dataset.n_train=16",
    "dataset.n_eval=96",       # evaluation long enough to be killed in (between trained.json and DONE)
    "eval.batch_size=1",
    "train.max_steps=100",
    "train.batch_size=2",
    "train.save_steps=5",
    "train.logging_steps=5",
    "lr=5e-3",
    "diagnostics.grad_cosine=false",
    "diagnostics.adapter_movement=false",
    "diagnostics.likelihood=false",
]


def _status(job):
    return json.loads((job / "status.json").read_text())


def _checkpoints(job, k):
    """Complete-looking checkpoints of stage k, oldest first."""
    ckpts = [p for p in (job / f"stage_{k}" / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))


def _start(cmd, cwd, env, name):
    # Output into a file, not a pipe: nobody reads a pipe while waiting, and a full one blocks the job.
    log = cwd / f"{name}.out"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _wait(proc, predicate, what):
    """wait_for, failing at once with the job's output if the job ended first."""
    def check():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{proc.log.read_text()[-5000:]}")
        return predicate()

    return wait_for(check, timeout=900, what=what)


def _stop(proc, sig):
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.log.read_text()


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stops(tmp_path_factory):
    """Runs the six starts; returns what each left behind for the tests below."""
    from seqdpo.job.status import observed_state
    from seqdpo.report.jobs import load_job
    from seqdpo.sync import find_offline_runs

    root = tmp_path_factory.mktemp("stops")
    job = root / "job"
    args = [*STAGES, f"ref_cache_dir={root / 'refcache'}"]
    # W&B only where a test reads it (the logger is not part of a job's identity; starting it costs time)
    cmd = seqdpo_cmd(*args, "logger=none", f"hydra.run.dir={job}")
    cmd_wandb = seqdpo_cmd(*args, "logger=wandb", f"hydra.run.dir={job}")
    env = job_env(SEQDPO_HEARTBEAT_S="0.2")
    seen = {}

    # 1. SIGKILL mid-stage 1
    first = _start(cmd_wandb, root, env, "run1")
    try:
        _wait(first, lambda: _checkpoints(job, 1), "a stage-1 checkpoint")
        beat = _status(job)["heartbeat"]
        _wait(first, lambda: _status(job)["heartbeat"] > beat, "a heartbeat")
        seen["kill1_status"] = _status(job)
        _stop(first, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
    assert not (job / "stage_1" / "trained.json").exists(), "stage 1 ended before the kill; make stages longer"
    seen["kill1_pid"] = first.pid
    seen["kill1_after"] = _status(job)
    seen["kill1_observed"] = observed_state(seen["kill1_after"])
    seen["kill1_report"] = load_job(job, root)
    seen["kill1_sync"] = find_offline_runs([job])

    # 2. rerun; SIGKILL after stage 1's training, before its DONE
    second = _start(cmd, root, env, "run2")
    try:
        wait_for(lambda: (job / "stage_1" / "trained.json").exists() or second.poll() is not None, timeout=900,
                 interval=0.01, what="stage 1 trained.json")
        _stop(second, signal.SIGKILL)
    finally:
        if second.poll() is None:
            second.kill()
    assert not (job / "stage_1" / "DONE").exists(), "stage 1 was evaluated before the kill; make evaluation longer"
    seen["trained1"] = {f: (job / "stage_1" / f).read_bytes() for f in ("trained.json", "train_log.jsonl")}
    seen["kill2_log"] = (job / "seqdpo.log").read_text()

    # 3. rerun; SIGTERM while stage 2 trains, once it has two checkpoints
    third = _start(cmd_wandb, root, env, "run3")
    try:
        _wait(third, lambda: len(_checkpoints(job, 2)) >= 2, "two stage-2 checkpoints")
        seen["term_out"] = _stop(third, signal.SIGTERM)
    finally:
        if third.poll() is None:
            third.kill()
    assert not (job / "stage_2" / "trained.json").exists(), "stage 2 ended before SIGTERM; make stages longer"
    seen["term_rc"] = third.returncode
    seen["term_status"] = _status(job)
    seen["term_wandb"] = sorted((job / "wandb").glob("offline-run-*/run-*.wandb"))
    seen["term_log"] = (job / "seqdpo.log").read_text()
    ckpts = sorted((job / "stage_2" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest, seen["intact"] = ckpts[-1], ckpts[-2]
    (newest / "trainer_state.json").write_text('{"best_global_step": null, "glo')  # torn mid-write
    seen["torn"] = newest.name

    # 4. rerun to the end
    fourth = run(cmd, cwd=root, env=env, timeout=600)
    assert fourth.returncode == 0, explain(fourth)
    seen["done_log"] = (job / "seqdpo.log").read_text()
    seen["done_status"] = _status(job)
    seen["done2"] = json.loads((job / "stage_2" / "DONE").read_text())
    seen["train_log2"] = [json.loads(line) for line in (job / "stage_2" / "train_log.jsonl").read_text().splitlines()]

    # 5. another config in the same directory: refused, nothing touched
    before = _snapshot(job)
    fifth = run(seqdpo_cmd(*args, "logger=none", "beta=0.1", f"hydra.run.dir={job}"), cwd=root, env=env, timeout=600)
    seen["refused"] = fifth
    seen["refused_same"] = _snapshot(job) == before
    seen["done_matrix"] = json.loads((job / "matrix.json").read_text())

    # 6. stage 2 is to be redone (its directory removed) and the rerun, as a one-job sweep, fails in it:
    # a file stands where the stage's checkpoint folder goes. Without the stage store: run 4 published stage 2
    # there, and the rerun would copy it instead of training into the blocked folder.
    import shutil

    shutil.rmtree(job / "stage_2")
    (job / "stage_2").mkdir()
    (job / "stage_2" / "checkpoints").write_text("not a folder")
    sweep = seqdpo_cmd(*args, "logger=none", "stage_store=false", f"hydra.sweep.dir={root}", f"hydra.sweep.subdir={job.name}",
                       multirun=True)
    seen["failed"] = run(sweep, cwd=root, env=env, timeout=600)
    seen["failed_report"] = load_job(job, root)
    return root, job, seen


def test_sigkill_leaves_a_lost_job_that_report_and_sync_recognise(stops):
    root, job, seen = stops
    during = seen["kill1_status"]
    assert during["state"] == "running" and during["stage"] == 1
    assert during["pid"] == seen["kill1_pid"] and during["host"] == socket.gethostname()
    assert during["heartbeat"] > during["started"]
    assert seen["kill1_after"]["state"] == "running"  # nobody could write otherwise
    assert seen["kill1_observed"] == "lost"
    report_job = seen["kill1_report"]
    assert report_job.state == "lost" and f"process {seen['kill1_pid']}" in report_job.status["error"]
    (run_1,) = seen["kill1_sync"]
    assert run_1.job_state == "lost" and not run_1.synced  # uploaded by sync (see test_sync for the command)


def test_a_stage_trained_before_a_kill_is_not_retrained(stops):
    root, job, seen = stops
    assert "stage 1 resumes from" in seen["kill2_log"]  # run 2 resumed the mid-stage checkpoint of run 1
    assert "stage 1 (" in seen["term_log"] and "was trained earlier" in seen["term_log"]
    for f, content in seen["trained1"].items():
        assert (job / "stage_1" / f).read_bytes() == content, f
    done1 = json.loads((job / "stage_1" / "DONE").read_text())
    assert done1["train_steps"] == 100 and "/stage_1/checkpoints/checkpoint-" in done1["resumed_from"]
    assert not (job / "stage_1" / "checkpoints").exists()  # removed once DONE


def test_sigterm_marks_interrupted_closes_wandb_and_exits_143(stops):
    from wandb_offline import read_run

    root, job, seen = stops
    assert seen["term_rc"] == 128 + signal.SIGTERM, seen["term_out"][-3000:]
    status = seen["term_status"]
    assert status["state"] == "interrupted" and status["stage"] == 2, status
    assert "SIGTERM" in status["error"]
    runs = [read_run(f) for f in seen["term_wandb"]]
    # run 1 was SIGKILLed: its W&B file ends without an exit record; run 3 closed its run
    assert [r["exit_code"] is not None for r in runs] == [False, True], [r["exit_code"] for r in runs]
    assert runs[0]["run_id"] is None or runs[0]["run_id"] == runs[1]["run_id"]  # run 1's may end before its run record
    assert runs[1]["run_id"] == (job / "wandb_run_id.txt").read_text().strip()


def test_rerun_resumes_from_the_newest_intact_checkpoint(stops):
    root, job, seen = stops
    assert seen["done_status"]["state"] == "done"
    done2 = seen["done2"]
    assert done2["resumed_from"].endswith("/stage_2/checkpoints/" + seen["intact"].name), done2
    assert len(done2["torn_checkpoints"]) == 1 and done2["torn_checkpoints"][0].startswith(seen["torn"] + ": ")
    assert f"checkpoint {job / 'stage_2' / 'checkpoints' / seen['torn']} is torn" in seen["done_log"]
    # accelerate's notice for a resumed dataloader without a length (printed six times a stage) is filtered
    assert "stage 2 resumes from" in seen["done_log"] and "The used dataset had no length" not in seen["done_log"]
    assert done2["train_steps"] == 100


def test_train_loss_covers_the_whole_stage_after_a_resume(stops):
    root, job, seen = stops
    done2 = seen["done2"]
    logged = [r for r in seen["train_log2"] if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 101, 5))  # every 5 steps, before and after the resume
    assert done2["train_loss_steps"] == 100
    assert done2["train_loss"] == pytest.approx(np.mean([r["loss"] for r in logged]), rel=1e-6)


def test_refused_rerun_leaves_the_directory_byte_identical(stops):
    root, job, seen = stops
    assert seen["refused"].returncode != 0
    assert "different config" in seen["refused"].stderr + seen["refused"].stdout
    # which keys differ, not only that the signatures do
    assert "differing keys: beta 0.3 (there) vs 0.1 (this job)" in seen["refused"].stderr, explain(seen["refused"])
    assert seen["refused_same"]


def test_failed_rerun_records_its_stage_and_hides_the_earlier_results(stops):
    root, job, seen = stops
    proc = seen["failed"]
    assert proc.returncode != 0, explain(proc)
    status = _status(job)
    assert status["state"] == "failed" and status["stage"] == 2, status
    assert status["traceback"]
    for name in ("matrix.json", "pairs.parquet", "diagnostics.json", "plots"):
        assert not (job / name).exists(), name  # the finished run's, which held a stage-2 row
    report_job = seen["failed_report"]
    assert report_job.state == "failed"
    assert report_job.matrix["stages"] == seen["done_matrix"]["stages"][:2]
    assert set(report_job.pairs["stage"]) == {0, 1}
    # the sweep ends with its summary, although its job failed
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"seqdpo sweep {root}: 1 job(s): 1 failed"))
    assert lines[head + 1].split()[0] == "failed" and lines[head + 1].split()[2] == job.name
    assert "(stage 2: " in lines[head + 1]
    assert lines[head + 2] == f"next: python -m seqdpo.report {root}"


def _tiny_job(root, job, *extra):
    return seqdpo_cmd(*TINY, f"ref_cache_dir={root / 'refcache'}", f"hydra.run.dir={job}", *extra)


def test_a_second_job_on_a_live_directory_is_refused_and_the_first_finishes(tmp_path):
    job = tmp_path / "job"
    cmd = _tiny_job(tmp_path, job, "logger=wandb")
    env = job_env()
    first = _start(cmd, tmp_path, env, "first")
    try:
        _wait(first, lambda: (job / "status.json").exists() and _status(job)["stage"] is not None, "the first job's stage 0")
        first.send_signal(signal.SIGSTOP)  # alive, holding the directory, however long the second takes to start
        second = run(cmd, cwd=tmp_path, env=env, timeout=600)
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1, explain(second)
    assert f"{job} is in use by another job (pid {first.pid} on {socket.gethostname()} since " in second.stderr
    assert first.returncode == 0, first.log.read_text()[-5000:]
    assert _status(job)["state"] == "done" and _status(job)["pid"] == first.pid
    assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # the refused job opened no W&B run
    log = (job / "seqdpo.log").read_text()
    assert log.count("config signature") == 1 and "in use by another job" not in log  # nothing of the second job
    # the lock died with the first job: the same job runs again (as a requeue or a rerun after a kill would)
    third = run(cmd, cwd=tmp_path, env=env, timeout=600)
    assert third.returncode == 0, explain(third)


@pytest.fixture
def tiny_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_job_whose_disk_fills_ends_failed_without_temp_files(tmp_path, tiny_disk):
    job = tiny_disk / "job"
    proc = _start(_tiny_job(tmp_path, job, "train.max_steps=40", "logger=none"), tmp_path,
                  job_env(SEQDPO_HEARTBEAT_S="0.2"), "full")
    try:
        _wait(proc, lambda: (job / "status.json").exists() and _status(job)["stage"] == 1, "stage 1")
        # Everything left on the disk taken while stage 1 trains: the job's next write fails, and so
        # would a status write without the space the job set aside for it.
        with open(tiny_disk / "filler", "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.log.read_text()
    assert proc.returncode == 1, out[-5000:]
    status = _status(job)
    assert status["state"] == "failed" and status["stage"] == 1, status
    assert "No space left on device" in status["error"]
    assert not [p for p in job.rglob("*") if p.name.endswith(".tmp")]
    assert f"the disk holding {job} is full (" in out and " free of 2 MiB)" in out, out[-3000:]
    assert "Traceback" not in out and "Logging error" not in out, out[-5000:]


def test_every_file_of_a_job_follows_the_umask_adapters_included(tmp_path):
    job = tmp_path / "job"
    # checkpoints every 2 steps: their adapters too, while the stage runs (they are gone once it is done)
    cmd = _tiny_job(tmp_path, job, "logger=wandb", "train.save_steps=2", "strategy=anchor", "strategy.penalty=ewc",
                    "strategy.fisher_pairs=4")
    modes = {}

    def checkpoint_modes():
        for f in job.glob("stage_*/checkpoints/checkpoint-*/adapter_model.safetensors"):
            try:
                modes[f] = stat.S_IMODE(f.stat().st_mode)
            except FileNotFoundError:  # removed once its stage was done
                pass

    with open(tmp_path / "job.out", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=log, stderr=subprocess.STDOUT, umask=0o002)
    while proc.poll() is None:
        checkpoint_modes()
        time.sleep(0.05)
    out = (tmp_path / "job.out").read_text()
    assert proc.returncode == 0, out[-5000:]
    assert modes and all(m & stat.S_IRGRP for m in modes.values()), modes
    files = [p for p in job.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    assert any(p.name == "anchor_fisher.safetensors" for p in files)
    private = [f"{p.relative_to(job)} {stat.S_IMODE(p.stat().st_mode):o}" for p in files
               if not p.stat().st_mode & stat.S_IRGRP]
    assert not private
