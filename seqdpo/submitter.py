"""The submitting process of a submitit sweep (hydra/launcher=slurm, slurm_cpu, local_submitit) while its
jobs run: one state line whenever the jobs' states change, a short error for a job that ended without a
result, and the CPU threads each job may use.

hydra-submitit-launcher waits on each job in turn (`job.results()`) without a word, and a job that ended
without a result (`scancel`, out-of-memory kill) raises submitit's `UncompletedJobError`, whose message
holds the job's whole error stream (hundreds of lines after an `scancel`). The launchers in
`hydra_plugins/seqdpo_launcher.py` call `watch()` and `collect()` instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from typing import Callable, Sequence

from seqdpo.job.status import last_line

SQUEUE_EVERY_S = 10.0  # a shared controller should not be asked more often by one waiting user


class JobEndedWithoutResult(RuntimeError):
    """A job stopped before it returned (cancelled, killed, node failure); its own files say how far it got."""


def _squeue(job_ids: Sequence[str]) -> dict[str, str]:
    """{array task id: 'running' | 'pending (Resources)' | ...} for the jobs SLURM still lists."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            jid, state, reason = parts
            out[jid] = state.lower() + (f" ({reason})" if state == "PENDING" and reason not in ("None", "") else "")
    return out


def state_line(states: Sequence[str]) -> str:
    """'4 jobs: 1 running, 3 pending (Resources)' (running first, ended last)."""
    counts = Counter(states)
    order = sorted(counts, key=lambda s: (s != "running", s == "ended", s))
    return f"{len(states)} job{'' if len(states) == 1 else 's'}: " + ", ".join(f"{counts[s]} {s}" for s in order)


def watch(jobs: Sequence, on_slurm: bool, say: Callable[[str], None] | None = None, poll_s: float = 1.0) -> None:
    """Blocks until every job has ended; says a state line whenever the states change."""
    say = say or (lambda line: print(f"[seqdpo {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True))
    last, queue, asked = None, {}, 0.0
    while True:
        ended = [job.done() for job in jobs]
        if on_slurm and time.time() - asked >= SQUEUE_EVERY_S:
            queue, asked = _squeue([job.job_id for job in jobs]), time.time()
        states = ["ended" if e else queue.get(job.job_id, "running") for job, e in zip(jobs, ended)]
        line = state_line(states)
        if line != last:
            say(line)
            last = line
        if all(ended):
            return
        time.sleep(poll_s)


def collect(job, overrides: Sequence[str]):
    """The job's Hydra JobReturn; a job that ended without one gets a FAILED return whose error is one
    paragraph (state, the last line of its error stream, where its logs are) instead of the whole stream."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    try:
        return job.results()[0]
    except UncompletedJobError as e:
        err = job.paths.stderr
        last = last_line(err.read_text(errors="replace") if err.exists() else "") or last_line(str(e))
        error = JobEndedWithoutResult(
            f"job {job.job_id} ({' '.join(overrides)}) ended without a result (state: {job.state}); last line of its "
            f"error stream: {last}; logs: {err} and {job.paths.stdout}")
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)


def thread_allotment(cpus_per_task: int | None, jobs_at_once: int) -> int:
    """CPU threads of one job: SLURM's allotment (SLURM_CPUS_PER_TASK) on a cluster; on this machine
    (local submitit, every job of the batch at once) its share of the cores, at most cpus_per_task."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus_per_task or cores, cores // max(1, jobs_at_once)))


def use_threads(n: int) -> None:
    """torch's and OpenMP's threads (and of the libraries' subprocesses) to `n`, before the job runs."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
