"""Which process of a DDP job this is: rank 0 writes the job's files, the other ranks only read."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
