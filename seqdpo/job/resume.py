"""What a rerun of a stage resumes from, and what it must not redo.

- `stage_<k>/trained.json` (the training info; written after the adapter, the training log and the
  stage diagnostics) says the stage's training ended: a job stopped between it and `DONE` (in
  evaluation or generation) only evaluates again.
- `latest_intact_checkpoint()`: the newest Trainer checkpoint that is complete. A checkpoint torn by a
  kill while it was written (truncated `trainer_state.json`, missing weights or optimizer state) is
  set aside as `torn-checkpoint-<step>` with a warning, and the next older one is used.
- `stage_train_loss()`: the Trainer's `training_loss` averages only the steps run by its own process;
  after a resume the stage's loss also needs the steps logged before the checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("seqdpo")

TRAINED = "trained.json"
# What Trainer._save_checkpoint writes for a PEFT model; resuming needs every one of them.
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def write_trained(sd: Path, info: dict) -> None:
    (sd / TRAINED).write_text(json.dumps(info, indent=1, default=float))


def read_trained(sd: Path) -> dict | None:
    """The training info of a stage whose training ended, or None (also for a marker torn by a kill)."""
    try:
        return json.loads((sd / TRAINED).read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_problem(ckpt: Path) -> str | None:
    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
    if missing:
        return "missing " + ", ".join(missing)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    return None


def latest_intact_checkpoint(folder: Path, *, set_aside: bool = True) -> tuple[str | None, list[str]]:
    """(newest complete checkpoint or None, the torn ones passed over, newest first).

    `set_aside=False` (DDP ranks other than 0) only reads: one process renames.
    """
    if not folder.is_dir():
        return None, []
    ckpts = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    torn = []
    for ckpt in sorted(ckpts, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = _checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt), torn
        # Renamed, not deleted (someone may want to look), and out of the Trainer's `checkpoint-*`
        # rotation, which would otherwise count it and save the same step into it again.
        aside = ckpt.with_name("torn-" + ckpt.name)
        if set_aside:
            ckpt.rename(aside)
            log.warning("checkpoint %s is torn (%s): set aside as %s; resuming from an older one", ckpt, problem, aside.name)
        torn.append(f"{ckpt.name}: {problem}")
    return None, torn


def stage_train_loss(log_history: list[dict], resumed_step: int, run_loss: float, run_steps: int) -> tuple[float, int]:
    """(mean training loss of the stage, number of steps it covers), across a resume.

    `run_loss` / `run_steps` are this process's Trainer result (steps after `resumed_step`). Before
    the resume, each logged `loss` is the mean over the steps since the previous log. Steps between
    the last log and the checkpoint were never logged and cannot be counted: none are lost when
    `train.logging_steps` divides `train.save_steps` (the defaults: 5 and 50).
    """
    total, steps, prev = run_loss * run_steps, run_steps, 0
    for row in sorted((r for r in log_history if "loss" in r and "step" in r), key=lambda r: r["step"]):
        if row["step"] > resumed_step:
            break
        total += float(row["loss"]) * (row["step"] - prev)
        steps += row["step"] - prev
        prev = row["step"]
    return (total / steps if steps else run_loss), steps


def trainer_state_step(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
