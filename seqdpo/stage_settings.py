"""What each stage trains with (`StageSettings`): the job's settings, with `order.stage_overrides.<k>` applied
to stage k. Everything that trains a stage reads them from there, never from the job's config: the Trainer's
arguments (`seqdpo.trainer.make_dpo_config`), the loss, the anchor penalty, the steps a strategy plans.

    python -m seqdpo order=ab +order.stage_overrides.2.beta=0.1            # stage 2 at beta 0.1, stage 1 as before
    python -m seqdpo -m order=ab +order.stage_overrides.2.beta=0.1,0.3 strategy=sequential,replay

A stage position k counts the entries of `order.stages` from 1. The keys a stage may override are the
global keys of the settings a stage trains with, under the same names:

- `lr`, `beta` (the training loss's beta; evaluation keeps the job's `beta`, so the margins of every
  stage stay in one unit),
- `loss.<key>` (any key of the loss: `loss.name`, `loss.label_smoothing`, ...),
- `train.<key>` for the keys in `TRAIN_KEYS` (steps or epochs, batch, schedule),
- `strategy.<key>` for the knobs that act on one stage (`STRATEGY_STAGE_KEYS`), from stage 2 on, where
  replay and anchor act.

A YAML file writes a position as a quoted key (`"2": {beta: 0.1}`): the schema's keys are strings and
an unquoted 2 is refused by OmegaConf. Without overrides every stage trains with the global settings,
exactly as before, and the job's signature is unchanged (`config.signature`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any

from seqdpo.config import ConfigError, LossConfig, RunConfig, StrategyConfig, TrainConfig

TRAIN_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "lr_scheduler", "weight_decay")
# Knobs that change what one stage does; the others act on the whole job (merge's combination, anchor's
# penalty kind and Fisher sample, which every later stage reads back) and stay global.
STRATEGY_STAGE_KEYS = {"replay": ("ratio", "match_steps"), "anchor": ("strength", "decay")}
PREFIX = "order.stage_overrides"


@dataclass(frozen=True)
class StageSettings:
    """The settings one stage trains with (the global ones unless `order.stage_overrides` says otherwise)."""

    lr: float
    beta: float
    loss: LossConfig
    train: TrainConfig
    strategy: StrategyConfig  # its knobs (replay ratio, anchor strength, ...); the strategy's name is the job's
    seed: int  # the run seed: stage k's Trainer seeds with seed + k, its draws (the EWC Fisher's pairs) with seed
    overridden: tuple[str, ...] = ()  # the keys set for this stage, e.g. ('beta', 'loss.name')


def overridable_keys(strategy: str) -> list[str]:
    return ["lr", "beta", *(f"loss.{f.name}" for f in dataclasses.fields(LossConfig)),
            *(f"train.{k}" for k in TRAIN_KEYS), *(f"strategy.{k}" for k in STRATEGY_STAGE_KEYS.get(strategy, ()))]


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _typed(where: str, value: Any, default: Any, optional: bool) -> Any:
    """`value` as the type of the global setting it replaces (Hydra parses 1 as an int where 1.0 is meant)."""
    if value is None or default is None:
        if value is None and not optional:
            raise ConfigError(where, f"cannot be null (the global setting is {default!r})")
        return value  # an optional loss key: the loss's own checks judge it
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(where, f"must be a {type(default).__name__}, like the global setting, got {value!r}")
    return value


def _optional(cls, name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def _not_per_stage(key: str, strategy: str, known: list[str]) -> str:
    if key.startswith("strategy."):
        knobs = STRATEGY_STAGE_KEYS.get(strategy, ())
        return f"'{key}' is not a per-stage knob of strategy '{strategy}' (those are: {list(knobs) or 'none'})"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"'{key}' cannot be set per stage; {hint}per-stage keys: {known}"


def stage_settings(cfg: RunConfig) -> list[StageSettings]:
    """One StageSettings per entry of `order.stages`; raises ConfigError on an unknown position or key."""
    n = len(cfg.order.stages)
    overrides = cfg.order.stage_overrides or {}
    known = overridable_keys(cfg.strategy.name)
    for position, keys in overrides.items():
        where = f"{PREFIX}.{position}"
        if not (str(position).isdigit() and 1 <= int(position) <= n):
            raise ConfigError(where, f"'{position}' is not a stage position of order '{cfg.order.name}' "
                                     f"(1 to {n}: one per entry of {list(cfg.order.stages)})")
        if not isinstance(keys, dict) or not keys:
            raise ConfigError(where, f"must map setting keys to values, e.g. {where}.lr=1e-5; got {keys!r}")
        if cfg.strategy.name == "joint":
            raise ConfigError(where, "strategy joint trains one stage on the union of the ordered objectives: "
                                     "set the global keys instead")
    out = []
    for k in range(1, n + 1):
        given = _flat(overrides.get(str(k)) or {})
        values = {"lr": cfg.lr, "beta": cfg.beta}
        parts = {"loss": dataclasses.asdict(cfg.loss), "train": dataclasses.asdict(cfg.train),
                 "strategy": dataclasses.asdict(cfg.strategy)}
        for key, value in given:
            where = f"{PREFIX}.{k}.{key}"
            if key not in known:
                raise ConfigError(where, _not_per_stage(key, cfg.strategy.name, known))
            if key.startswith("strategy.") and k == 1:
                raise ConfigError(where, f"strategy '{cfg.strategy.name}' acts from stage 2 on; stage 1 trains "
                                         "as in sequential")
            if "." in key:
                part, name = key.split(".", 1)
                cls = {"loss": LossConfig, "train": TrainConfig, "strategy": StrategyConfig}[part]
                parts[part][name] = _typed(where, value, parts[part][name], _optional(cls, name))
            else:
                values[key] = _typed(where, value, values[key], optional=False)
        out.append(StageSettings(
            lr=values["lr"], beta=values["beta"], loss=LossConfig(**parts["loss"]), train=TrainConfig(**parts["train"]),
            strategy=StrategyConfig(**parts["strategy"]), seed=cfg.seed, overridden=tuple(key for key, _ in given),
        ))
    return out
