"""The training bar of a stage: "stage 1/2: polite" with its ETA, and TRL's metrics as compact log lines.

It replaces the Trainer's own ProgressCallback (an unlabelled bar that prints each log as a dict of
quoted strings) and PrinterCallback.
"""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback

from seqdpo.job.log import format_metrics, log


class StageProgress(TrainerCallback):
    """The Trainer's progress bar and log printer, replaced: a labelled bar and compact metric lines."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log.info("%s step %d/%d: %s", self.label, state.global_step, state.max_steps, format_metrics(logs))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
