"""Metrics of a job: a local `metrics.jsonl` always, and one W&B run per job unless `logger=none`.

W&B runs offline by default (compute nodes rarely reach the internet); `python -m seqdpo.sync`
uploads a sweep's offline runs later. The run id belongs to the job directory: `seqdpo-<signature>-<random>`,
drawn once and kept in `wandb_run_id.txt`, so two directories never share a run (not even with one config)
and a requeued or rerun job continues its own run (`resume="allow"`). A rerun of a finished job opens no
W&B run at all: its run already holds everything, and a second offline directory would log it twice.
Training curves are logged per stage under `stage<k>/...` with their own step axis, because each
stage's Trainer restarts its global step at 0; the key layout is in `seqdpo/wandb_keys.py`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from seqdpo.config import LoggerConfig
from seqdpo.filemodes import follow_umask
from seqdpo.wandb_keys import interval_summary, matrix_summary

log = logging.getLogger("seqdpo")
RUN_ID_FILE = "wandb_run_id.txt"


def job_run_id(out_dir: Path, signature: str) -> tuple[str, bool]:
    """(the W&B run id of the job directory, whether it was drawn just now)."""
    path = Path(out_dir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip(), False
    run_id = f"seqdpo-{signature}-{secrets.token_hex(4)}"
    path.write_text(run_id + "\n")
    return run_id, True


@dataclass(frozen=True)
class RunLabels:
    """How W&B shows a job's run (seqdpo.job_settings.run_labels): its name, job type, tags, and the config
    it stores (the flat keys of seqdpo.wandb_keys and the full resolved config under `cfg`)."""

    name: str
    job_type: str
    tags: list[str]
    config: dict[str, Any]


class Tracker:
    def __init__(self, logger: LoggerConfig, labels: RunLabels, out_dir: Path, *, signature: str, group: str | None,
                 finished: bool = False):
        """`finished`: the job was done before this process started (a rerun of a finished job)."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self.run = None
        if logger.name == "none":
            return
        run_id, new = job_run_id(out_dir, signature)
        if finished and not new:
            log.info("W&B run %s already holds this finished job: this rerun logs to %s only", run_id, self.path)
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", logger.mode)
        self.own_data_dir = "WANDB_DATA_DIR" not in os.environ  # one the user chose is left alone
        if self.own_data_dir:
            # W&B stages the files of logged tables and images (read-only copies, ~9 a job) under its data
            # directory, by default in the home directory, and never removes those an offline run made: they
            # stay with the job instead, where `wandb sync` of this run reads them and deleting the job
            # removes them. W&B reads the variable whenever it stages a file; finish() unsets it again.
            os.environ["WANDB_DATA_DIR"] = str(Path(out_dir).resolve() / "wandb" / "data")
        self.run = wandb.init(
            project=logger.project,
            entity=logger.entity,
            id=run_id,
            resume="allow",
            dir=str(out_dir),
            group=logger.group or group or "single",
            job_type=labels.job_type,
            name=labels.name,
            tags=[*labels.tags, *logger.tags],
            config=labels.config,
            reinit="create_new",  # one run per job even when a multirun runs several jobs in one process
        )

    def log(self, data: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **data}, default=float) + "\n")
        if self.run is not None:
            self._to_wandb(self.run.log, data)

    def summary(self, data: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), "summary": data}, default=float) + "\n")
        if self.run is not None:
            self._to_wandb(self.run.summary.update, data)

    def _to_wandb(self, send, data: dict) -> None:
        """A SLURM preemption's SIGTERM reaches W&B's service process too, while the job itself (submitit
        ignores TERM) trains on until its requeue signal: a lost service must not fail the job, whose
        metrics.jsonl keeps everything."""
        try:
            send(data)
        except (ConnectionError, OSError) as e:
            log.warning("W&B stopped answering (%r): this job logs to %s only from here", e, self.path)
            self.run = None

    def series(self, prefix: str, axis: str, rows: list[dict]) -> None:
        """Rows of a W&B series: every `prefix/...` key is plotted against `prefix/axis` instead of W&B's
        global step, which counts differently in every run, so runs overlay on a shared axis."""
        if self.run is not None:
            self.run.define_metric(f"{prefix}/{axis}")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/{axis}")
        for row in rows:
            self.log({f"{prefix}/{k}": v for k, v in row.items()})

    def log_matrix(self, matrix: dict) -> None:
        """Each metric of the stage x objective matrix as summary keys (with intervals and verdicts when
        matrix.json has them) and as one W&B table."""
        rows = [
            [metric, k, stage, obj, v]
            for metric, values in matrix["metrics"].items()
            for k, (stage, row) in enumerate(zip(matrix["stages"], values))
            for obj, v in zip(matrix["objectives"], row)
        ]
        self.summary({**matrix_summary(matrix), **interval_summary(matrix)})
        if self.run is not None:
            import wandb

            self.run.log({"matrix/table": wandb.Table(columns=["metric", "stage", "stage_objective", "objective", "value"], data=rows)})

    def log_tables(self, tables: dict) -> None:
        """DataFrames as W&B tables (the job's analysis: transfer, quartiles, likelihood, ...)."""
        if self.run is None:
            return
        import wandb

        self.run.log({f"analysis/{name}": wandb.Table(dataframe=df) for name, df in tables.items() if len(df)})

    def log_images(self, images: dict) -> None:
        if self.run is None or not images:
            return
        import wandb

        self.run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in images.items()})

    def stage_callback(self, stage: int) -> TrainerCallback:
        if self.run is not None:
            self.run.define_metric(f"stage{stage}/train/step")
            self.run.define_metric(f"stage{stage}/train/*", step_metric=f"stage{stage}/train/step")
        return _StageLogCallback(self, stage)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            if self.own_data_dir:
                os.environ.pop("WANDB_DATA_DIR", None)
            follow_umask(self.path.parent / "wandb")  # its staged files are read-only to their owner alone


class _StageLogCallback(TrainerCallback):
    def __init__(self, tracker: Tracker, stage: int):
        self.tracker, self.stage = tracker, stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            prefix = f"stage{self.stage}/train"
            self.tracker.log({f"{prefix}/step": state.global_step, **{f"{prefix}/{k}": v for k, v in logs.items()}})
