"""A job's `status.json`: what it is doing, and how a reader tells a live job from a dead one.

    state    running | done | failed | interrupted (as the job last wrote it); a reader adds `lost`
    stage    the stage it was at (0 = base evaluation), also when it failed or was interrupted
    pid, host, started, heartbeat, heartbeat_every_s

A job refreshes `heartbeat` every `SEQDPO_HEARTBEAT_S` seconds (default 30) from a light thread, so
a job that died without a word (SIGKILL, out-of-memory killer, node failure) can be told apart from
one that runs: `observed_state()` reads such a job as `lost` when its heartbeat is stale, or at once
when it ran on this host and its process is gone. SIGTERM (`scancel`, a SLURM time limit, `kill`) is
turned into an orderly stop: `stop_on_sigterm()` raises `Terminated`, the runner records
`interrupted` with the stage, closes the W&B run and the process exits with 128 + 15.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = float(os.environ.get("SEQDPO_HEARTBEAT_S", "30"))
# A heartbeat this many intervals old (and at least STALE_MIN_S) means the job is gone: a shared file
# system may show a write late, and clocks of two hosts differ by a few seconds.
STALE_BEATS, STALE_MIN_S = 10, 120.0
# Disk space a running job keeps for its status writes: freed when a write finds the disk full, so that
# the job's end (`failed`, with its traceback) is recorded even then. Tracebacks are capped to fit.
RESERVE_FILE, RESERVE_BYTES, TRACE_CHARS = ".status-reserve", 64 * 1024, 16 * 1024


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM; its exit code is the shell's for a signal death (128 + n)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises `Terminated` in the main thread while the block runs.

    Only where nobody else handles SIGTERM: under submitit (SLURM or local) its own handler stays, since
    submitit's requeue protocol relies on it (it ignores TERM and requeues on USR2, seqdpo/cluster.py).
    A second SIGTERM during the orderly stop kills the process as usual.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class JobStatus:
    """Writes `<out>/status.json` (atomically) and keeps its heartbeat fresh while the job runs."""

    def __init__(self, out: Path, *, enabled: bool = True, every: float = HEARTBEAT_S):
        self.path = Path(out) / "status.json"
        self.reserve = Path(out) / RESERVE_FILE
        self.enabled, self.every = enabled, every
        now = time.time()
        self.data: dict = {"state": "running", "stage": None, "error": None, "pid": os.getpid(),
                           "host": socket.gethostname(), "started": now, "updated": now, "heartbeat": now,
                           "heartbeat_every_s": every}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stage(self):
        return self.data["stage"]

    def set(self, state: str, *, stage=..., error: str | None = None, trace: str | None = None) -> None:
        """New state; `stage` stays what it was unless given."""
        with self._lock:
            self.data.update(state=state, error=error, updated=time.time())
            if stage is not ...:
                self.data["stage"] = stage
            self.data.pop("traceback", None)
            if trace:
                self.data["traceback"] = trace if len(trace) <= TRACE_CHARS else "...\n" + trace[-TRACE_CHARS:]
            self._write()

    def start_heartbeat(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, name="seqdpo-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                self.data["heartbeat"] = time.time()
                try:
                    self._write(use_reserve=False)  # the reserve is for the job's end, not a heartbeat
                except OSError:  # a full or flaky disk must not kill the job; the next beat retries
                    pass

    def reserve_space(self) -> None:
        """Sets disk space aside for the status writes to come (see `_write`)."""
        if not self.enabled:
            return
        with contextlib.suppress(OSError):  # a disk already full: _write still tries
            with open(self.reserve, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
                f.flush()
                os.fsync(f.fileno())  # allocated now, not when the page cache is written back

    def release_space(self) -> None:
        if self.enabled:  # a DDP rank other than 0 must not take rank 0's reserve
            self.reserve.unlink(missing_ok=True)

    def _write(self, use_reserve: bool = True) -> None:
        """Atomic (a reader sees the old file or the new one). On a full disk the reserve file goes and
        the write is retried, so the job's last state is recorded whatever filled the disk."""
        if not self.enabled:
            return
        self.data["heartbeat"] = max(self.data["heartbeat"], self.data["updated"])
        text = json.dumps(self.data, indent=1)
        tmp = self.path.with_name(f"status.json.{os.getpid()}.tmp")
        try:
            _replace(tmp, self.path, text)
        except OSError as e:
            if e.errno != errno.ENOSPC or not use_reserve or not self.reserve.exists():
                raise
            self.release_space()
            _replace(tmp, self.path, text)


def _replace(tmp: Path, path: Path, text: str) -> None:
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a write that failed leaves no temp file


def read_status(job_dir: Path) -> dict | None:
    try:
        return json.loads((Path(job_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    try:  # a killed child its parent has not reaped yet is a zombie: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def lost_reason(status: dict, *, now: float | None = None) -> str | None:
    """Why a job whose status says `running` is not running any more, or None when it may well be."""
    if status.get("state") != "running":
        return None
    pid, host = status.get("pid"), status.get("host")
    if pid and host == socket.gethostname() and _process_gone(int(pid)):
        return f"process {pid} on {host} is gone"
    beat = status.get("heartbeat")
    if beat is None:
        return None  # written by a seqdpo without heartbeats: nothing to judge by
    every = float(status.get("heartbeat_every_s") or HEARTBEAT_S)
    age = (time.time() if now is None else now) - float(beat)
    if age > max(STALE_BEATS * every, STALE_MIN_S):
        return f"no heartbeat for {age:.0f} s (host {host}, pid {pid})"
    return None


def observed_state(status: dict, *, now: float | None = None) -> str:
    """The state as a reader should take it: `lost` for a running job that is no longer there."""
    state = str(status.get("state", "unknown"))
    return "lost" if lost_reason(status, now=now) else state


def where(stage, at: str = "") -> str:
    """'stage 2' ('at stage 2' with at="at "), or 'before stage 0' for a job stopped while it loaded the
    model and data (stage None)."""
    return "before stage 0" if stage is None else f"{at}stage {stage}"


def last_line(text: str) -> str:
    """The last non-empty line, stripped (an error's message after its traceback)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
