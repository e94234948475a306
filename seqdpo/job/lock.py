"""One live job per output directory: an OS lock on `<out>/job.lock`, held while the job runs.

`fcntl.flock` is released by the kernel when the process ends, however it ends (SIGKILL, the
out-of-memory killer, a requeue), so a lock left by a dead job is simply taken over and a rerun or a
requeued job always gets it; only a live job holds it. The file also says who holds it (pid, host,
start time), which is what a refused second job prints. Only DDP rank 0 takes it: the other ranks of
the same job write nothing and must not be refused by their own rank 0.

On a network file system flock is as good as the file system's locking (Linux emulates it with
fcntl byte-range locks on NFS); a file system without locks refuses every job with a message that says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

LOCK_FILE = "job.lock"
# Directories whose lock this process holds: a second flock on a new descriptor of the same file would
# conflict with our own (the entry point locks, then run_job, which tests and sweeps also call directly).
_HELD: dict[Path, "JobLock"] = {}


class OutputDirBusy(RuntimeError):
    """Another live job holds the output directory."""


class JobLock:
    """`with JobLock(out):` holds the directory's lock; `OutputDirBusy` names the holder when it is taken."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None
        self.recorded = False

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputDirBusy(f"cannot lock {self.path} ({e}): the file system of {self.path.parent} "
                                    "offers no locks; choose an output directory on one that does") from e
            raise OutputDirBusy(f"{self.path.parent} is in use by another job ({holder(self.path)}): one live "
                                "job per directory. Wait for it, stop it, or choose another output directory "
                                "(hydra.run.dir=...)") from None
        self.fd = fd

    def record_holder(self) -> None:
        """Who holds the lock, for a job that is refused: written once the directory is this job's."""
        if self.recorded:
            return
        self.recorded = True
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data + b"\n", 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


@contextlib.contextmanager
def job_lock(out: Path):
    """Holds the directory's lock while the block runs (at once if this process already holds it)."""
    key = Path(out).resolve()
    if key in _HELD:
        yield _HELD[key]
        return
    lock = JobLock(key)
    with lock:
        _HELD[key] = lock
        try:
            yield lock
        finally:
            del _HELD[key]


def holder(path: Path) -> str:
    """'pid 123 on node7 since 2026-12-03 09:41:07' from a lock file, or what is known of it."""
    try:
        data = json.loads(Path(path).read_text())
        since = datetime.fromtimestamp(float(data["started"])).strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {data['pid']} on {data['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its pid yet"
