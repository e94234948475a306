"""A store of trained stages shared by the jobs of a sweep, keyed by stage signature (seqdpo/stage_signature.py).

After a job finishes stage k it publishes the stage's directory (adapter, evaluation, diagnostics,
training log, the pairs it trained on, and the process's RNG states at that point) under the stage's
signature; a job whose stage k has the same signature copies the entry into its own `stage_<k>/` instead
of training, and goes on from there as a job resumed after stage k would. Copies, not links: a job
directory stays self-contained (deleting the store loses nothing), and no file of the job is another
job's file.

Layout, beside the reference cache (`outputs/.stagestore` by default; `stage_store_dir`):

    <store>/<signature>/entry.json       what the entry holds: stage, row name, files and sizes, who trained it
    <store>/<signature>/stage/           the stage's files, as in the job directory that trained it
    <store>/<signature>/rng_state.npz    torch, numpy and Python RNG states after the stage
    <store>/<signature>.lock             held by the job that trains the stage (flock)

The reference cache's discipline: an entry is assembled in a temporary directory beside its final name,
its files fsynced, then renamed onto the name, so a reader sees no entry or a whole one; an entry whose
files do not match its entry.json is set aside with a warning and trained again. Files follow the umask
(safetensors writes 0600; `filemodes.follow_umask`), so a store shared by a group works when the umask
lets the group read and write. Concurrent jobs that want the same stage train it once: the first takes
the signature's lock (`claim`), trains and publishes; the others wait on the lock and then find the entry.
The lock is an OS lock, released however its holder ends, so a killed job never blocks a stage.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from pathlib import Path

import numpy as np

from seqdpo.filemodes import follow_umask
from seqdpo.refcache import DEFAULT_CACHE_DIR

log = logging.getLogger("seqdpo")
ENTRY = "entry.json"
RNG = "rng_state.npz"
# Only an interrupted stage needs its checkpoints; DONE has already removed them from a finished one.
NOT_PUBLISHED = ("checkpoints", "torn-checkpoint-*")


def default_store_dir(ref_cache_dir: str | None) -> Path:
    return Path(ref_cache_dir or DEFAULT_CACHE_DIR).parent / ".stagestore"


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rng_state() -> dict[str, np.ndarray]:
    """This process's torch (CPU and every CUDA device), numpy and Python RNG states, as arrays."""
    import torch

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state().numpy(), "numpy_keys": np.asarray(keys, dtype=np.uint32),
             "numpy_rest": np.asarray([pos, has_gauss, gauss], dtype=np.float64),
             "python": np.asarray(internal, dtype=np.int64),
             "python_rest": np.asarray([version, np.nan if py_gauss is None else py_gauss], dtype=np.float64)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s.numpy()
    return state


def set_rng_state(state: dict[str, np.ndarray]) -> None:
    import torch

    torch.set_rng_state(torch.from_numpy(state["torch"].copy()))
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"], int(pos), int(has_gauss), float(gauss)))
    version, py_gauss = state["python_rest"]
    random.setstate((int(version), tuple(int(x) for x in state["python"]), None if np.isnan(py_gauss) else float(py_gauss)))
    cuda = sorted((k for k in state if k.startswith("cuda_")), key=lambda k: int(k.split("_")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(state[k].copy()) for k in cuda])


class StageStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, sig: str) -> Path | None:
        """The complete entry of `sig`, or None (a damaged one is set aside, with a warning, and is a miss)."""
        folder = self.root / sig
        try:
            meta = json.loads((folder / ENTRY).read_text())
        except FileNotFoundError:
            if folder.exists():
                self._set_aside(folder, f"it has no {ENTRY}")
            return None
        except (OSError, ValueError) as e:
            self._set_aside(folder, f"{ENTRY} is unreadable ({type(e).__name__}: {e})")
            return None
        have = _files(folder / "stage")
        missing = {f: n for f, n in meta["files"].items() if have.get(f) != n}
        if missing or not (folder / RNG).is_file():
            self._set_aside(folder, f"{len(missing)} of its files are missing or of another size "
                                    f"(e.g. {next(iter(missing), RNG)})")
            return None
        return folder

    def _set_aside(self, folder: Path, problem: str) -> None:
        aside = self.root / f".damaged-{folder.name}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):  # another job set it aside first
            folder.rename(aside)
            log.warning("stage store entry %s is damaged (%s): set aside as %s; the stage trains again",
                        folder, problem, aside.name)

    @contextlib.contextmanager
    def claim(self, sig: str, what: str, job_dir: Path):
        """Holds the lock of `sig` while the block runs, waiting for another job that holds it; yields the
        entry when one was published meanwhile (take it), else None (train and publish)."""
        path = self.root / f"{sig}.lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
            except PermissionError:  # another user's lock file that the umask left read-only: flock needs no write
                fd, writable = os.open(path, os.O_RDONLY), False
        except OSError as e:  # a store that cannot be written must not stop a job that can train the stage itself
            log.warning("%s: the stage store %s cannot be used (%s: %s): training the stage here", what, self.root,
                        type(e).__name__, e)
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                log.info("%s: another job is training it (%s); waiting for it to publish", what, _holder(path))
                t0 = time.time()
                fcntl.flock(fd, fcntl.LOCK_EX)  # a signal handler that raises (SIGTERM) ends the wait
                log.info("%s: waited %.0f s", what, time.time() - t0)
            if writable:  # who holds it, for the log of a job that waits
                holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "job": str(job_dir)}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
            yield self.entry(sig)
        finally:
            os.close(fd)  # releases the flock

    def publish(self, sig: str, stage_dir: Path, meta: dict) -> Path:
        """Copies a finished stage's directory into the store under `sig` (no-op when it is there already)."""
        final = self.root / sig
        if self.entry(sig) is not None:
            return final
        tmp = self.root / f".{sig}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copytree(stage_dir, tmp / "stage", ignore=shutil.ignore_patterns(*NOT_PUBLISHED))
            np.savez(tmp / RNG, **rng_state())
            entry = {"signature": sig, **meta, "files": _files(tmp / "stage"), "published": time.time(),
                     "host": socket.gethostname(), "pid": os.getpid(), "job": str(stage_dir.parent)}
            (tmp / ENTRY).write_text(json.dumps(entry, indent=1, default=str))
            _fsync_tree(tmp)
            follow_umask(tmp)
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and self.entry(sig) is not None:
                return final  # published by another job meanwhile: the same content
            raise
        return final

    def run_or_take(self, sig: str, stage_dir: Path, what: str, run, meta: dict) -> bool:
        """True when the stage came from the store into `stage_dir`; otherwise `run()` trains, evaluates and
        finishes it there, under the signature's lock, and it is published. Jobs that want the same stage at
        once wait for the one that trains it."""
        entry = self.entry(sig)
        if entry is None:
            with self.claim(sig, what, stage_dir.parent) as entry:
                if entry is None:
                    run()
                    try:
                        self.publish(sig, stage_dir, meta)
                        log.info("%s published to the stage store as %s", what, sig)
                    except OSError as e:  # e.g. a full disk: the job has its stage; other jobs will train theirs
                        log.warning("%s could not be published to the stage store %s (%s: %s)", what, self.root,
                                    type(e).__name__, e)
                    return False
        self.take(entry, stage_dir)
        return True

    def take(self, entry: Path, stage_dir: Path) -> dict:
        """Copies `entry`'s stage into `stage_dir` (replacing what an interrupted run left there), records
        where it came from in its DONE, and restores the RNG states; returns the entry's entry.json."""
        meta = json.loads((entry / ENTRY).read_text())
        incoming = stage_dir.with_name(stage_dir.name + ".incoming")
        shutil.rmtree(incoming, ignore_errors=True)
        shutil.copytree(entry / "stage", incoming)
        done = json.loads((incoming / "DONE").read_text())
        done["stage_store"] = {"from": meta["signature"], "trained_by": meta["job"]}
        (incoming / "DONE").write_text(json.dumps(done, indent=1, default=float))
        follow_umask(incoming)
        shutil.rmtree(stage_dir, ignore_errors=True)
        os.rename(incoming, stage_dir)
        with np.load(entry / RNG) as z:
            set_rng_state({k: z[k] for k in z.files})
        return meta


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        return f"pid {data['pid']} on {data['host']}, job {data['job']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
