"""What a sweep's submitting process says last: one line per job (state, duration, directory) and the
commands to run next.

`conf/config.yaml` registers `SweepSummary` under `hydra.callbacks`, so every multirun (basic launcher,
submitit local or SLURM) ends with it, read from the jobs' `status.json` files. A sweep in which a job
failed ends with an exception inside Hydra, before its `on_multirun_end`; the summary is then printed
at interpreter exit, so a failed sweep, where it matters most, is summarised too.
"""

from __future__ import annotations

import atexit
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seqdpo.jobstatus import observed_state, read_status


def _duration(status: dict) -> str:
    start = status.get("started")
    if start is None:
        return "-"
    state = observed_state(status)
    end = time.time() if state == "running" else status.get("heartbeat" if state == "lost" else "updated", start)
    s = max(0, int(end - start))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def sweep_summary(sweep: Path) -> str:
    from seqdpo.report.jobs import find_job_dirs

    jobs = find_job_dirs(sweep) if sweep.is_dir() else []
    counts: dict[str, int] = {}
    lines = []
    for job in jobs:
        status = read_status(job) or {"state": "not started"}
        state = observed_state(status)
        counts[state] = counts.get(state, 0) + 1
        rel = job.relative_to(sweep) if job != sweep else Path(".")
        line = f"  {state:<12} {_duration(status):>8}  {rel}"
        if state != "done" and status.get("stage") is not None:
            line += f"  (stage {status['stage']}"
            line += f": {status['error']})" if status.get("error") else ")"
        lines.append(line)
    head = f"seqdpo sweep {sweep}: {len(jobs)} job(s)" + (
        ": " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else "")
    tail = [f"next: python -m seqdpo.report {sweep}"]
    if any((job / "wandb").is_dir() for job in jobs):
        tail.append(f"      python -m seqdpo.sync {sweep}   (upload the offline W&B runs)")
    return "\n".join([head, *lines, *tail])


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.sweep: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep = Path(str(config.hydra.sweep.dir)).absolute()
        # Imported now, not in the exit hook: at interpreter exit pandas (under seqdpo.report) can no longer
        # register its own atexit hooks, and a failed sweep's summary died with that import.
        import seqdpo.report.jobs  # noqa: F401

        atexit.register(self._print)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print()

    def _print(self) -> None:
        if self.sweep is None:
            return
        sweep, self.sweep = self.sweep, None  # once, whichever of the two hooks comes first
        print("\n" + sweep_summary(sweep), flush=True)
