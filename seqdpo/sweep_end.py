"""What a sweep's submitting process says last: one line per job (state, duration, directory; where it
stopped and the error's last line; the pairs `model.max_length` cost a finished job) and the commands to
run next.

`conf/config.yaml` registers `SweepSummary` under `hydra.callbacks`, so every multirun (basic launcher,
submitit local or SLURM) ends with it, read from the jobs' `status.json` files. A sweep in which a job
failed ends with an exception inside Hydra, before its `on_multirun_end`; the summary is then printed
at interpreter exit, so a failed sweep, where it matters most, is summarised too.
"""

from __future__ import annotations

import atexit
import json
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seqdpo.job.status import last_line, observed_state, read_status, where
from seqdpo.report.jobs import find_job_dirs, over_warn_fraction


def _duration(job: Path, status: dict, state: str) -> str:
    start = status.get("started")
    if start is None:
        return "-"
    if state == "running":
        end = time.time()
    elif state == "lost":
        # its last sign of life: the heartbeat comes every 30 s, its log more often (a job killed 8 s in
        # used to read 0:00:00)
        log = job / "seqdpo.log"
        end = max(status.get("heartbeat", start), status.get("updated", start), log.stat().st_mtime if log.exists() else 0)
    else:
        end = status.get("updated", start)
    s = max(0, int(end - start))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _pair_losses(job: Path) -> list[str]:
    try:
        table = json.loads((job / "matrix.json").read_text()).get("pairs")
        config = yaml.safe_load((job / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return []
    return over_warn_fraction(table, config)


def sweep_summary(sweep: Path) -> str:
    jobs = find_job_dirs(sweep) if sweep.is_dir() else []
    counts: dict[str, int] = {}
    lines = []
    flagged = 0
    for job in jobs:
        status = read_status(job) or {"state": "not started"}
        state = observed_state(status)
        counts[state] = counts.get(state, 0) + 1
        rel = job.relative_to(sweep) if job != sweep else Path(".")
        line = f"  {state:<12} {_duration(job, status, state):>8}  {rel}"
        if state not in ("done", "not started"):
            line += f"  ({where(status.get('stage'))}"
            line += f": {last_line(status['error'])})" if status.get("error") else ")"
        losses = _pair_losses(job) if state == "done" else []
        if losses:
            flagged += 1
            line += f"  (pairs lost to model.max_length: {', '.join(losses)})"
        lines.append(line)
    head = f"seqdpo sweep {sweep}: {len(jobs)} job(s)" + (
        ": " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else "")
    if flagged:
        head += f"; {flagged} lost more than dataset.warn_fraction of a split's pairs to model.max_length"
    tail = [f"next: python -m seqdpo.report {sweep}"]
    if any((job / "wandb").is_dir() for job in jobs):
        tail.append(f"      python -m seqdpo.sync {sweep}   (upload the offline W&B runs)")
    return "\n".join([head, *lines, *tail])


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.sweep: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep = Path(str(config.hydra.sweep.dir)).absolute()
        atexit.register(self._print)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print()

    def _print(self) -> None:
        if self.sweep is None:
            return
        sweep, self.sweep = self.sweep, None  # once, whichever of the two hooks comes first
        print("\n" + sweep_summary(sweep), flush=True)
