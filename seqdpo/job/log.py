"""What a job says while it runs: the console and `seqdpo.log` (Hydra's job log file).

Everything a job reports goes through the `seqdpo` logger, so the console and the log file hold the
same lines: the config summary, the pair accounting, each stage's start and end with its duration,
TRL's training metrics as compact lines, and the result matrices. The console differs in two ways:
log lines are written through tqdm (a progress bar is redrawn below them instead of being torn), and
tracebacks stay out of it (Hydra prints a failing job's traceback itself; the file keeps them all).

The console shows one progress bar per training stage (`seqdpo.job.progress`), labelled "stage 2/2:
factual" with its ETA; evaluation bars vanish once done; the datasets library's internal bars (Map,
Filter, Flattening the indices) are switched off and transformers' warnings go to the log instead of
a handler of its own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from dataclasses import asdict, fields, is_dataclass

from tqdm.auto import tqdm

from seqdpo.diskfull import disk_full

log = logging.getLogger("seqdpo")


class ConsoleHandler(logging.Handler):
    """Hydra's console handler (conf/config.yaml, hydra.job_logging), written through tqdm, without tracebacks."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stdout

    def emit(self, record: logging.LogRecord) -> None:
        try:
            bare = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
            tqdm.write(self.format(bare), file=self.stream)
        except Exception:
            self.handleError(record)


class LogFileHandler(logging.FileHandler):
    """Hydra's `seqdpo.log` handler; on a full disk it stops writing with one note on stderr, instead of
    logging's "--- Logging error ---" traceback for every line (the job's end is reported by seqdpo.app)."""

    disk_full = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.disk_full:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not disk_full(sys.exc_info()[1]):
            super().handleError(record)
            return
        self.disk_full = True  # the rest of this job's lines go to the console only
        print(f"seqdpo: the disk is full: {self.baseFilename} gets no more lines", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Library output a user cannot act on, off; library warnings into the job log."""
    import datasets
    import transformers
    import transformers.utils.logging

    datasets.disable_progress_bars()  # Map / Filter / Flattening bars of internal dataset operations
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets_logger = logging.getLogger("datasets")
    for handler in list(datasets_logger.handlers):
        datasets_logger.removeHandler(handler)
    datasets_logger.propagate = True
    logging.captureWarnings(True)  # Python warnings into the job log too, not only onto stderr
    # A resumed stage skips its first batches through accelerate's SkipDataLoader, which has no length,
    # so every gather_for_metrics of TRL's training metrics logs "The used dataset had no length, returning
    # gathered tensors. You should drop the remainder yourself." (six times a stage). Those are logging
    # means, not results (seqdpo evaluates on its own), so there is nothing for a user to drop.
    logging.getLogger("accelerate.accelerator").addFilter(NO_LENGTH_NOTICE)
    # transformers' W&B integration prints "[INFO] Running in WANDB offline mode" when it is first
    # imported (TRL imports it): import it here with that print swallowed.
    with contextlib.redirect_stdout(io.StringIO()):
        import transformers.integrations.integration_utils  # noqa: F401


class _NoLengthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "The used dataset had no length" not in record.getMessage()  # after accelerate's "[RANK 0] "


NO_LENGTH_NOTICE = _NoLengthNotice()  # one instance: addFilter skips it when a multirun's next job adds it again


def config_summary(cfg, signature: str, out_dir: str) -> str:
    """Every resolved key, one line per group (the full config is also in <out>/config.yaml)."""
    top, groups = [], []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            line = f"  {f.name}: " + " ".join(f"{k}={v}" for k, v in flat_items(asdict(value)))
            if f.name == "lora" and value.alpha is None:
                line = line.replace("alpha=None", f"alpha=None (2r = {value.effective_alpha()})")
            groups.append(line)
        else:
            top.append(f"{f.name}={value}")
    return "\n".join([f"job {out_dir} (config signature {signature})", "  " + " ".join(top), *groups])


def flat_items(d: dict, prefix: str = ""):
    """('group.key', value) for every leaf of a nested dict (an empty dict is a leaf)."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


class StageClock:
    """Start and end of each stage in the log, with durations: `stage 1/2: polite`."""

    def __init__(self, stage_names: list[str]):
        self.names = stage_names
        self.started: dict[int, float] = {}

    def label(self, k: int) -> str:
        return f"stage {k}/{len(self.names) - 1}: {self.names[k]}"

    def start(self, k: int, what: str) -> None:
        self.started[k] = time.time()
        log.info("%s started (%s)", self.label(k), what)

    def end(self, k: int, pairs) -> None:
        accuracy = ", ".join(f"{o} {a:.3f}" for o, a in pairs.groupby("objective").accuracy.mean().items())
        log.info("%s finished in %s: accuracy %s", self.label(k), _duration(time.time() - self.started[k]), accuracy)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def log_result(matrix: dict, out_dir: str, seconds: float) -> None:
    """The result matrices, last (a job calls it after closing W&B, whose footer would bury them)."""
    if "metrics" not in matrix:  # a DDP rank other than 0 has no results
        return
    text = "\n\n".join(format_matrix(matrix, m) for m in ("accuracy", "margin_mean"))
    log.info("seqdpo job finished in %s: %s\n%s", _duration(seconds), out_dir, text)


def format_matrix(matrix: dict, metric: str = "accuracy") -> str:
    """Plain-text table of one metric: a row per stage, a column per objective."""
    objs, rows = matrix["objectives"], matrix["metrics"][metric]
    width = max(12, *(len(o) + 2 for o in objs))
    head = f"{'stage':<18}" + "".join(f"{o:>{width}}" for o in objs)
    lines = [f"{metric} (rows: after stage, columns: evaluated objective)", head]
    for k, (stage, row) in enumerate(zip(matrix["stages"], rows)):
        label = f"{k}:{stage}"
        lines.append(f"{label:<18}" + "".join(f"{v:>{width}.4f}" for v in row))
    return "\n".join(lines)


def format_metrics(logs: dict) -> str:
    """TRL's log dict as one compact line: `loss 0.6919  grad_norm 1.88  rewards/margins 0.00247`."""
    parts = []
    for k, v in logs.items():
        if k == "total_flos":
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)
