"""Reading job directories (layout in docs/DESIGN.md) into `Job`s, finished or not."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from seqdpo.analysis.diagnostics import job_analysis
from seqdpo.analysis.intervals import bootstrap, dropped_message
from seqdpo.config import setting
from seqdpo.evaluation import summarize
from seqdpo.job.status import lost_reason, observed_state
from seqdpo.strategies import label as strategy_label, row_names

# data_options: the dataset's builder options (e.g. the synthetic world's relation), so jobs that differ
# only there land in separate groups instead of overwriting each other in one table.
FACTORS = ("dataset", "data_options", "order", "beta", "lr", "lora_r", "loss", "reference", "strategy", "seed")
# Jobs of one setting differ only by order and seed: orders side by side, seeds aggregated.
SETTING = tuple(f for f in FACTORS if f not in ("dataset", "order", "seed"))
SKIP_DIRS = {".hydra", ".submitit", "wandb", "adapter", "adapter_init", "checkpoints", "report"}

@dataclass
class Job:
    path: Path
    rel: str
    status: dict
    config: dict
    factors: dict
    log: str | None = None
    matrix: dict | None = None
    pairs: pd.DataFrame | None = None
    analysis: dict | None = None
    boot: Any = None  # seqdpo.analysis.intervals.Bootstrap of its pairs (None: no pairs or eval.bootstrap=0)
    stage_diags: dict[int, dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        return observed_state(self.status)  # "lost" for a job that says it runs but is gone


def find_job_dirs(root: Path) -> list[Path]:
    out = []
    stack = [root]
    while stack:
        d = stack.pop()
        names = {p.name for p in d.iterdir()} if d.is_dir() else set()
        if names & {"config.yaml", "status.json"} or (".hydra" in names and d != root):
            out.append(d)
            continue  # a job's own subdirectories are stages, not jobs
        for p in sorted(d.iterdir()):
            if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith("stage_"):
                stack.append(p)
    return sorted(out)


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def stage_names(config: dict) -> list[str]:
    """["base", row of stage 1, ...] from a config dict: order letters resolved as config.stage_objectives,
    then the rows the strategy makes of them (seqdpo.strategies.row_names)."""
    objs = list((config.get("dataset") or {}).get("objectives") or [])
    names = ["base"]
    for entry in (config.get("order") or {}).get("stages") or []:
        entry = str(entry)
        if len(entry) == 1 and entry.isalpha() and entry.islower() and entry not in objs and ord(entry) - 97 < len(objs):
            names.append(objs[ord(entry) - 97])
        else:
            names.append(entry)
    return ["base", *row_names(setting(config, "strategy.name"), names[1:])]


def job_factors(config: dict) -> dict:
    loss = config.get("loss") or {}
    comps = loss.get("components")
    dataset = config.get("dataset") or {}
    options = dataset.get("options") or {}
    return {
        "dataset": dataset.get("name"),
        "data_options": ",".join(f"{k}={options[k]}" for k in sorted(options)) or None,
        "order": (config.get("order") or {}).get("name"),
        "beta": config.get("beta"),
        "lr": config.get("lr"),
        "lora_r": (config.get("lora") or {}).get("r"),
        "loss": "+".join(comps) if comps else loss.get("name"),
        "reference": config.get("reference"),
        "strategy": strategy_label(config.get("strategy")),
        "seed": config.get("seed"),
    }


def _find_log(job_dir: Path, root: Path) -> str | None:
    own = job_dir / "seqdpo.log"
    if own.exists():
        return str(own)
    hydra_log = sorted(job_dir.glob("*.log"))
    if hydra_log:
        return str(hydra_log[0])
    # submitit keeps its logs under <sweep>/.submitit/<job id>/; the job's log names its output directory.
    sub = root / ".submitit"
    if sub.is_dir():
        for f in sorted(sub.rglob("*_log.*")):
            try:
                if str(job_dir.name) in f.read_text(errors="replace")[:2_000_000]:
                    return str(f)
            except OSError:
                continue
        return str(sub)
    return None


def _matrix_from_pairs(pairs: pd.DataFrame, names: list[str], objectives: list[str], beta) -> dict:
    """The matrix of a job that has not finished: its finished stages only."""
    n = int(pairs["stage"].max()) + 1
    return {**summarize(pairs, names[:n], objectives, beta), "partial": True}


def load_job(job_dir: Path, root: Path) -> Job:
    status, config, problems = {}, {}, []
    try:
        status = json.loads((job_dir / "status.json").read_text())
    except FileNotFoundError:
        status = {"state": "not started" if not (job_dir / "stage_0").exists() else "unknown"}
    except (OSError, ValueError) as e:
        status = {"state": "unknown"}
        problems.append(f"status.json unreadable: {e}")
    lost = lost_reason(status)
    if lost:
        status = {**status, "error": lost}
    cfg_path = job_dir / "config.yaml"
    if not cfg_path.exists():
        cfg_path = job_dir / ".hydra" / "config.yaml"
    try:
        config = _read_yaml(cfg_path)
    except Exception as e:  # noqa: BLE001 - one broken job must not stop the report
        problems.append(f"config unreadable: {e}")
    job = Job(job_dir, str(job_dir.relative_to(root)) if job_dir != root else ".", status, config, job_factors(config))
    job.log = _find_log(job_dir, root)
    job.problems = problems
    names = stage_names(config)
    try:
        if (job_dir / "pairs.parquet").exists():
            job.pairs = pd.read_parquet(job_dir / "pairs.parquet")
        else:
            parts = [pd.read_parquet(p / "pairs.parquet") for p in sorted(job_dir.glob("stage_*"))
                     if (p / "DONE").exists() and (p / "pairs.parquet").exists()]
            if parts:
                job.pairs = pd.concat(parts, ignore_index=True)
        if (job_dir / "matrix.json").exists():
            job.matrix = json.loads((job_dir / "matrix.json").read_text())
        elif job.pairs is not None:
            objs = list((config.get("dataset") or {}).get("objectives") or pd.unique(job.pairs["objective"]))
            job.matrix = _matrix_from_pairs(job.pairs, names, objs, config.get("beta"))
    except Exception as e:  # noqa: BLE001
        job.problems.append(f"results unreadable: {type(e).__name__}: {e}")
    for p in job_dir.glob("stage_*/diagnostics.json"):
        try:
            job.stage_diags[int(p.parent.name.split("_")[1])] = json.loads(p.read_text())
        except (ValueError, OSError) as e:
            job.problems.append(f"{p.name}: {e}")
    if job.matrix is not None and job.pairs is not None:
        try:
            job.analysis = job_analysis(
                job.pairs,
                job.matrix,
                stay_threshold=float(setting(config, "diagnostics.stay_threshold")),
                min_fraction=float(setting(config, "diagnostics.redistribution_min_fraction")),
                tie_tolerance=float(setting(config, "eval.tie_tolerance")),
            )
        except Exception as e:  # noqa: BLE001
            job.problems.append(f"analysis failed: {type(e).__name__}: {e}")
        job.boot = job_bootstrap(job)
    return job


def job_bootstrap(job: Job, seed: int | None = None):
    """The job's paired bootstrap, as the runner made matrix.json's intervals (same replicates: the run's
    seed) unless `seed` is given; recomputed here for unfinished jobs, jobs that predate intervals, and
    the pooling of seeds."""
    cfg = job.config
    n_boot = int(setting(cfg, "eval.bootstrap"))
    if not n_boot:
        return None
    try:
        boot = bootstrap(job.pairs, job.matrix, n_boot=n_boot, seed=int(setting(cfg, "seed")) if seed is None else seed,
                         stay_threshold=float(setting(cfg, "diagnostics.stay_threshold")),
                         tie_tolerance=float(setting(cfg, "eval.tie_tolerance")))
    except Exception as e:  # noqa: BLE001 - one broken job must not stop the report
        job.problems.append(f"intervals failed: {type(e).__name__}: {e}")
        return None
    note = dropped_message(boot)
    if note and seed is None:
        job.problems.append(note)
    return boot


# ------------------------------------------------------------------------------------------- tables


def over_warn_fraction(table: dict, config: dict) -> list[str]:
    """The splits of a finished job's pair table (matrix.json "pairs", seqdpo.data.accounting) that lost more
    than the job's `dataset.warn_fraction` to `model.max_length`, in words: ['a/train 100% (16 of 16)']."""
    limit = setting(config, "dataset.warn_fraction")
    return [f"{objective}/{split} {100 * a['lost_fraction']:.0f}% "
            f"({round(a['lost_fraction'] * a['tokenized'])} of {a['tokenized']})"
            for objective, splits in (table or {}).items() for split, a in splits.items()
            if a.get("lost_fraction", 0) > limit]
