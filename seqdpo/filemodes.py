"""Files a job writes are readable as the umask allows, adapters included.

safetensors creates its files with mode 0600 whatever the umask (so `adapter_model.safetensors`, from
PEFT's save_pretrained, and the anchor strategy's Fisher file would be private on a shared file
system, while every other file of the job follows the umask). `follow_umask` gives such files the
mode the umask gives a new file; it only adds permissions, never removes one someone set.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    # /proc reads it without os.umask's set-and-restore, during which another thread's new file would
    # get the temporary mask.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Every regular file at or under `path` gets at least the permissions a new file would."""
    path = Path(path)
    wanted = 0o666 & ~current_umask()
    files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for f in files:
        try:
            mode = stat.S_IMODE(f.stat().st_mode)
            if mode | wanted != mode:
                f.chmod(mode | wanted)
        except OSError:  # a file removed meanwhile, or someone else's: nothing to do
            pass
