"""A process-wide tally of work done against work served from a cache (`computed` / `cached`).

The reference cache counts pairs, the base-generation cache tables; jobs log and record both. Thread
safe: a sweep can run jobs in threads of one process.
"""

from __future__ import annotations

import threading


class CacheCounts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"computed": 0, "cached": 0}

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.update(computed=0, cached=0)
