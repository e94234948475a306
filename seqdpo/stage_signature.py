"""Stage signatures: the identity of a job's state after stage k, so that jobs sharing a prefix share its stages.

`stage_signatures(cfg, env)` gives one signature per matrix row after `base` (the strategy's rows,
seqdpo/strategies), or None for a row that trains nothing (merge's `merged`). Two jobs whose stage-k
signatures are equal hold the same adapter, the same evaluation and the same diagnostics after stage k,
whatever their later stages: `order=a` is the first stage of `order=ab`, and sequential, replay, anchor
and merge all train the same stage 1.

What goes in (and why):
- the model, the data (every dataset key, the dataset's objectives included: every stage evaluates them
  all), LoRA, the seed, `reference`, the evaluation settings a stage's rows depend on (the job's `beta`,
  which is the unit of evaluation margins, the batch and tie settings, generation and scorer when
  `eval.generate`), and the diagnostics the stage records (its probes run in the stage's training);
- the stages 1..k: each one's objective and its settings (seqdpo/stage_settings.py: lr, beta, loss,
  train), plus what the strategy does in it: replay's ratio and match_steps and anchor's penalty from
  stage 2 on, merge's fresh start from stage 2 on; `joint` is one stage of its own;
- with `order.partition` other than none, the whole order: an objective's chunks depend on how many
  stages it appears in;
- the environment (`StageEnvironment`): device type and number of processes (a DDP job splits batches
  differently) and the code (a hash of seqdpo's sources and the versions of the libraries that
  compute), so a store never serves a stage that other code would have trained differently.

Left out, as in the job signature: the logger, cache and store locations; and what only the job's end
reads (bootstrap, min_effect, the pair-level thresholds of diagnostics).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from seqdpo.config import RunConfig, stage_objectives
from seqdpo.stage_settings import StageSettings, stage_settings

FORMAT_VERSION = 1  # bump when what a stage's signature covers changes
# Read only when the job's matrix and diagnostics are assembled, after every stage
JOB_LEVEL_DIAGNOSTICS = ("stay_threshold", "redistribution_min_fraction")


@dataclass(frozen=True)
class StageEnvironment:
    device_type: str
    world_size: int
    code: str


@functools.cache
def code_fingerprint() -> str:
    """seqdpo's Python sources and the versions of the libraries that train and evaluate, hashed."""
    import importlib.metadata as md

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for lib in ("torch", "transformers", "trl", "peft", "datasets", "numpy"):
        h.update(f"{lib}={md.version(lib)}".encode())
    return h.hexdigest()[:16]


def current_environment() -> StageEnvironment:
    import os

    import torch

    return StageEnvironment("cuda" if torch.cuda.is_available() else "cpu", int(os.environ.get("WORLD_SIZE", "1")),
                            code_fingerprint())


def _stage_entry(cfg: RunConfig, objective: str, k: int, settings: StageSettings) -> dict:
    entry = {"objective": objective, "lr": settings.lr, "beta": settings.beta, "loss": asdict(settings.loss),
             "train": asdict(settings.train)}
    s = settings.strategy
    if k > 1 and s.name == "replay":
        entry["replay"] = {"ratio": s.ratio, "match_steps": s.match_steps}
    if k > 1 and s.name == "anchor" and s.strength > 0:
        entry["anchor"] = {"penalty": s.penalty, "strength": s.strength, "decay": s.decay,
                           **({"fisher_pairs": s.fisher_pairs} if s.penalty == "ewc" else {})}
    if k > 1 and s.name == "merge":
        entry["fresh"] = True  # trains from the initial adapter, not stage k-1's
    return entry


def _common(cfg: RunConfig, env: StageEnvironment) -> dict:
    e = cfg.eval
    evaluation = {"beta": cfg.beta, "batch_size": e.batch_size, "tie_tolerance": e.tie_tolerance, "generate": e.generate}
    if e.generate:
        evaluation["generation"] = asdict(e.generation)
        evaluation["scorer"] = asdict(cfg.scorer)
    diagnostics = {k: v for k, v in asdict(cfg.diagnostics).items() if k not in JOB_LEVEL_DIAGNOSTICS}
    common = {"format": FORMAT_VERSION, "env": asdict(env), "model": asdict(cfg.model), "dataset": asdict(cfg.dataset),
              "lora": asdict(cfg.lora), "seed": cfg.seed, "reference": cfg.reference, "eval": evaluation,
              "diagnostics": diagnostics, "partition": cfg.order.partition}
    if cfg.order.partition != "none":
        common["order"] = stage_objectives(cfg)
    return common


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stage_signatures(cfg: RunConfig, env: StageEnvironment) -> list[str | None]:
    """One signature per matrix row after `base` (None: a row that trains nothing, merge's `merged`)."""
    common = _common(cfg, env)
    objectives = stage_objectives(cfg)
    settings = stage_settings(cfg)
    if cfg.strategy.name == "joint":
        return [_digest({**common, "joint": [_stage_entry(cfg, o, 1, s) for o, s in zip(objectives, settings)]})]
    prefix, out = [], []
    for k, (objective, s) in enumerate(zip(objectives, settings), start=1):
        prefix.append(_stage_entry(cfg, objective, k, s))
        out.append(_digest({**common, "stages": prefix}))
    if cfg.strategy.name == "merge":
        out.append(None)
    return out


def describe(cfg: RunConfig) -> dict:
    """What a store entry says it holds, for a person reading the store (not part of any key)."""
    return {"model": cfg.model.name, "dataset": cfg.dataset.name, "order": list(cfg.order.stages),
            "strategy": cfg.strategy.name, "seed": cfg.seed,
            "overrides": {k: v for k, v in (cfg.order.stage_overrides or {}).items()}}

