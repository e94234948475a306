"""What the submitting process of a submitit sweep says while it waits (seqdpo/submitter.py), with real
submitit jobs on this machine: a state line on change only, and one short paragraph for a job killed
before it returned (submitit's own error holds the job's whole error stream)."""

import time

import pytest

from seqdpo.submitter import JobEndedWithoutResult, collect, state_line, thread_allotment, watch


def test_state_line_counts_running_first_and_ended_last():
    assert state_line(["pending (Resources)", "running", "ended", "pending (Resources)"]) == (
        "4 jobs: 1 running, 2 pending (Resources), 1 ended")
    assert state_line(["ended", "ended"]) == "2 jobs: 2 ended"
    assert state_line(["pending"]) == "1 job: 1 pending"


def _executor(tmp_path):
    import submitit

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    ex.update_parameters(timeout_min=5)
    return ex


@pytest.mark.timeout(300)
def test_watch_says_a_line_per_change_and_returns_when_all_ended(tmp_path):
    jobs = _executor(tmp_path).map_array(time.sleep, [0, 3])
    said = []
    watch(jobs, on_slurm=False, say=said.append, poll_s=0.2)
    assert all(job.done() for job in jobs)
    assert said[-1] == "2 jobs: 2 ended"
    assert said[0] in ("2 jobs: 2 running", "2 jobs: 1 running, 1 ended"), said
    assert len(said) == len(set(said)) <= 3  # on change only, never one per poll


@pytest.mark.timeout(300)
def test_a_job_killed_before_it_returned_is_one_short_paragraph(tmp_path):
    job = _executor(tmp_path).submit(time.sleep, 120)
    while not job.paths.stdout.exists():
        time.sleep(0.2)
    job.cancel()
    ret = collect(job, ["order=ab", "seed=1"])
    assert ret.status.name == "FAILED"
    with pytest.raises(JobEndedWithoutResult) as e:
        ret.return_value
    msg = str(e.value)
    assert msg.startswith(f"job {job.job_id} (order=ab seed=1) ended without a result") and "\n" not in msg
    assert str(job.paths.stderr) in msg


def test_thread_allotment(monkeypatch):
    import os

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert thread_allotment(8, 1) == 3  # SLURM's allotment wins
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    cores = len(os.sched_getaffinity(0))
    assert thread_allotment(None, 1) == cores
    assert thread_allotment(1, 1) == 1
    assert thread_allotment(cores, 2 * cores) == 1  # never 0
    assert thread_allotment(64, 2) == max(1, cores // 2)
