"""A job that stopped because its disk is full: how to tell, and what to tell the user.

Libraries report it in their own words (`OSError` errno 28, pyarrow's `OSError`, safetensors'
`SafetensorError: ... No space left on device (os error 28)`), so the exception and its causes are
read for either the errno or the operating system's message.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


def disk_full(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or ENOSPC_TEXT in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(out: Path, error: BaseException) -> str:
    try:
        usage = shutil.disk_usage(out)
        space = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError as e:
        space = f"free space unknown: {e}"
    return (
        f"the disk holding {out} is full ({space}): the job stopped ({type(error).__name__}: {error}). "
        f"{out / 'status.json'} records where (state failed, with the traceback). Free space there, or choose "
        "another output directory, and rerun the same command: finished stages are kept."
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
