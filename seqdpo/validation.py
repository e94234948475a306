"""The checks of a RunConfig that need more than types: registries, enumerations, cross-field rules.

`validate()` runs once, in seqdpo.app, before the job loads its data and model; every error is a
`ConfigError` naming the key. The key helpers (`key_hint`, `is_schema_key`) serve the app's answer
to an override Hydra refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import asdict
from typing import Any

from seqdpo.behaviour.settings import check_behaviour_config
from seqdpo.config import (
    ANCHOR_PENALTIES,
    DTYPES,
    LOGGER_MODES,
    LOGGERS,
    MERGE_METHODS,
    MIN_EFFECT,
    PARTITIONS,
    PROBE_SOURCES,
    REFERENCES,
    STRATEGY_KEYS,
    ConfigError,
    ModelConfig,
    RunConfig,
    StrategyConfig,
    stage_objectives,
)
from seqdpo.data import DATASETS
from seqdpo.losses import check_loss_config
from seqdpo.packing import MASKED_ATTENTION, PACKINGS


def validate(cfg: RunConfig) -> None:
    """Checks that need more than types: registries, enumerations, cross-field constraints."""
    _check_known_keys(cfg)
    if cfg.dataset.name not in DATASETS:
        raise ConfigError("dataset.name", f"unknown dataset '{cfg.dataset.name}'; known: {sorted(DATASETS)}")
    if not cfg.dataset.objectives:
        raise ConfigError("dataset.objectives", "needs at least one objective name")
    if not cfg.order.stages:
        raise ConfigError("order.stages", f"order '{cfg.order.name}' has no stages")
    stage_objectives(cfg)
    _check_names(cfg)
    for key, value, rule, ok in _ranges(cfg):
        if not ok:
            raise ConfigError(key, f"must be {rule}, got {value!r}")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules", "is empty: name at least one module (e.g. q_proj, v_proj)")
    if "lm_head" in cfg.lora.target_modules:
        raise ConfigError("lora.target_modules", "lm_head cannot carry LoRA: log-probs are read from its weight")
    if len(set(cfg.dataset.objectives)) != len(cfg.dataset.objectives):
        raise ConfigError("dataset.objectives", f"names an objective twice: {list(cfg.dataset.objectives)}")
    shape = cfg.model.tiny
    if shape.hidden_size % shape.num_attention_heads or shape.num_attention_heads % shape.num_key_value_heads:
        raise ConfigError(
            "model.tiny", "hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads"
        )
    _check_packing(cfg.model)
    check_loss_config(cfg.loss, cfg.beta)
    if cfg.eval.generate or cfg.model.tiny.warm_start:
        check_behaviour_config(cfg)
    _validate_strategy(cfg)


# numpy's seeds are 32-bit and stage k trains with seed + k
MAX_SEED = 2**32 - 1 - 10_000


def _ranges(cfg: RunConfig) -> list[tuple[str, Any, str, bool]]:
    """(key, value, rule, holds) for every numeric key: a rule that fails is reported with its key."""
    t, e, d, m, lo, ds = cfg.train, cfg.eval, cfg.diagnostics, cfg.model, cfg.lora, cfg.dataset

    def pos(x):
        return x > 0 and math.isfinite(x)

    def nonneg(x):
        return x >= 0 and math.isfinite(x)

    return [
        ("beta", cfg.beta, "> 0", pos(cfg.beta)),
        ("lr", cfg.lr, "> 0", pos(cfg.lr)),
        ("seed", cfg.seed, f"between 0 and {MAX_SEED}", 0 <= cfg.seed <= MAX_SEED),
        ("eval.generation.seed", e.generation.seed, f"null (the run seed) or between 0 and {MAX_SEED}",
         e.generation.seed is None or 0 <= e.generation.seed <= MAX_SEED),
        ("model.max_length", m.max_length, ">= 2 (prompt and completion tokens)", m.max_length >= 2),
        *[(f"model.tiny.{k}", v, "> 0", v > 0) for k, v in asdict(m.tiny).items() if k not in ("init_seed", "warm_start")],
        ("lora.r", lo.r, "> 0", lo.r > 0),
        ("lora.alpha", lo.alpha, "> 0, or null for 2r", lo.alpha is None or lo.alpha > 0),
        ("lora.dropout", lo.dropout, "in [0, 1)", 0 <= lo.dropout < 1),
        ("train.epochs", t.epochs, "> 0", pos(t.epochs)),
        ("train.max_steps", t.max_steps, "> 0, or -1 to train train.epochs", t.max_steps == -1 or t.max_steps > 0),
        ("train.batch_size", t.batch_size, ">= 1", t.batch_size >= 1),
        ("train.grad_accum", t.grad_accum, ">= 1", t.grad_accum >= 1),
        # transformers 5 reads a warmup value >= 1 as a number of steps, so a ratio must stay below 1
        ("train.warmup_ratio", t.warmup_ratio, "in [0, 1)", 0 <= t.warmup_ratio < 1),
        ("train.weight_decay", t.weight_decay, ">= 0", nonneg(t.weight_decay)),
        ("train.logging_steps", t.logging_steps, ">= 1", t.logging_steps >= 1),
        ("train.save_steps", t.save_steps, ">= 1 (checkpoints are what an interrupted stage resumes from)",
         t.save_steps >= 1),
        ("eval.batch_size", e.batch_size, ">= 1", e.batch_size >= 1),
        ("eval.tie_tolerance", e.tie_tolerance, ">= 0", nonneg(e.tie_tolerance)),
        ("eval.bootstrap", e.bootstrap, ">= 0 (0 = no intervals)", e.bootstrap >= 0),
        ("eval.min_effect", sorted(e.min_effect), f"exactly the verdict columns {sorted(MIN_EFFECT)}",
         sorted(e.min_effect) == sorted(MIN_EFFECT)),
        *[(f"eval.min_effect.{k}", v, "> 0 (the smallest change worth a claim)", pos(v)) for k, v in e.min_effect.items()],
        *[(f"dataset.{k}", v, "a number of pairs >= 1, or null for all", v is None or (v >= 1 and v is not True))
          for k, v in (("n_train", ds.n_train), ("n_eval", ds.n_eval))],
        ("dataset.min_pairs", ds.min_pairs, ">= 1", ds.min_pairs >= 1),
        ("dataset.warn_fraction", ds.warn_fraction, "in [0, 1]", 0 <= ds.warn_fraction <= 1),
        ("dataset.max_overlap", ds.max_overlap, "in [0, 1] (1 = allow any overlap)", 0 <= ds.max_overlap <= 1),
        ("diagnostics.grad_cosine_points", d.grad_cosine_points, ">= 1 (1 = stage start only)", d.grad_cosine_points >= 1),
        ("diagnostics.probe_blocks", d.probe_blocks, ">= 2 (two halves give the split-half reliability)", d.probe_blocks >= 2),
        ("diagnostics.min_reliability", d.min_reliability, "in (0, 1] (a reliability is at most 1)", 0 < d.min_reliability <= 1),
        ("diagnostics.probe_pairs", d.probe_pairs, f">= diagnostics.probe_blocks ({d.probe_blocks})", d.probe_pairs >= d.probe_blocks),
        ("diagnostics.stay_threshold", d.stay_threshold, ">= 0", nonneg(d.stay_threshold)),
        ("diagnostics.redistribution_min_fraction", d.redistribution_min_fraction, "in [0, 0.5] (pairs moving each way)",
         0 <= d.redistribution_min_fraction <= 0.5),
    ]


def _check_names(cfg: RunConfig) -> None:
    """Keys whose values are names from a fixed list, TRL's and transformers' included."""
    # transformers' lists, imported here: seqdpo.app imports this module before it knows the config is valid
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.trainer_utils import SchedulerType

    if not cfg.model.name:
        raise ConfigError("model.name", "is empty: 'tiny', a hub id or a local directory")
    for key, value, allowed in (
        ("reference", cfg.reference, REFERENCES),
        ("order.partition", cfg.order.partition, PARTITIONS),
        ("model.dtype", cfg.model.dtype, DTYPES),
        ("logger.name", cfg.logger.name, LOGGERS),
        ("logger.mode", cfg.logger.mode, LOGGER_MODES),
        ("train.lr_scheduler", cfg.train.lr_scheduler, [s.value for s in SchedulerType]),
        ("diagnostics.probe_source", cfg.diagnostics.probe_source, PROBE_SOURCES),
    ):
        if value not in allowed:
            raise ConfigError(key, f"'{value}' is not one of {list(allowed)}")
    attn = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if cfg.model.attn_implementation not in attn and "/" not in cfg.model.attn_implementation:
        raise ConfigError(
            "model.attn_implementation",
            f"'{cfg.model.attn_implementation}' is not one of {attn} (or a hub kernel 'org/repo')",
        )


def _check_known_keys(cfg: RunConfig) -> None:
    """Refuses keys the schema does not have.

    Hydra applies `+key=value` and `++key=value` with the struct flag lifted, and OmegaConf.to_object
    then sets such a key as an extra attribute of the dataclass, so a typo added with `+` (which Hydra
    itself suggests after "Could not override") would otherwise be ignored without a word. Free-form
    dicts (`dataset.options`, validated by the dataset builders) are not schema and stay open.
    """
    for key in _extra_keys(cfg):
        raise ConfigError(key, f"unknown key (added with + or ++?): it would be ignored; {key_hint(key)}")


def key_hint(key: str) -> str:
    """'did you mean 'lr'?' for a key the schema does not have."""
    close = difflib.get_close_matches(key, [k for k, _ in _schema_types(RunConfig)], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else "the keys are listed in docs/configuration.md"


def is_schema_key(key: str) -> bool:
    """Whether `key` is a key of the schema, or one inside a free-form dict of it (dataset.options.*)."""
    types = dict(_schema_types(RunConfig))
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        t = types.get(".".join(parts[:n]))
        if t is None:
            return False
        if typing.get_origin(t) is dict or t is dict:
            return True
    return True


def _schema_types(cls, prefix: str = ""):
    """(dotted key, type) for every key of a schema dataclass, nested ones included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_types(hints[f.name], f"{prefix}{f.name}.")


def _schema_keys(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _schema_keys(value, f"{prefix}{f.name}.")


def _extra_keys(obj, prefix: str = ""):
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in vars(obj).items():
        if name not in names:
            yield prefix + name
        elif dataclasses.is_dataclass(value):
            yield from _extra_keys(value, f"{prefix}{name}.")


def _validate_strategy(cfg: RunConfig) -> None:
    s = cfg.strategy
    if s.name not in STRATEGY_KEYS:
        raise ConfigError("strategy.name", f"'{s.name}' is not one of {list(STRATEGY_KEYS)}")
    default = StrategyConfig()
    for key in sorted(set().union(*STRATEGY_KEYS.values()) - set(STRATEGY_KEYS[s.name])):
        if getattr(s, key) != getattr(default, key):
            owners = [n for n, keys in STRATEGY_KEYS.items() if key in keys]
            raise ConfigError(f"strategy.{key}", f"applies to strategy {owners}, not '{s.name}'; it would be ignored")
    if not s.ratio > 0:
        raise ConfigError("strategy.ratio", f"must be > 0, got {s.ratio}")
    if s.method not in MERGE_METHODS:
        raise ConfigError("strategy.method", f"'{s.method}' is not one of {list(MERGE_METHODS)}")
    n_stages = len(cfg.order.stages)
    if s.weights is not None and len(s.weights) != n_stages:
        raise ConfigError("strategy.weights", f"needs one weight per stage ({n_stages}), got {list(s.weights)}")
    if not 0 < s.density <= 1:
        raise ConfigError("strategy.density", f"must be in (0, 1], got {s.density}")
    if s.penalty not in ANCHOR_PENALTIES:
        raise ConfigError("strategy.penalty", f"'{s.penalty}' is not one of {list(ANCHOR_PENALTIES)}")
    if not s.strength >= 0:
        raise ConfigError("strategy.strength", f"must be >= 0, got {s.strength}")
    if s.fisher_pairs < 1:
        raise ConfigError("strategy.fisher_pairs", f"must be >= 1, got {s.fisher_pairs}")
    if not 0 < s.decay <= 1:
        raise ConfigError("strategy.decay", f"must be in (0, 1], got {s.decay}")


def _check_packing(model: ModelConfig) -> None:
    if model.packing not in PACKINGS:
        raise ConfigError("model.packing", f"'{model.packing}' is not one of {list(PACKINGS)}")
    if model.packing == "shared_prompt" and model.attn_implementation not in MASKED_ATTENTION:
        raise ConfigError(
            "model.packing",
            f"shared_prompt needs a custom attention mask, which model.attn_implementation "
            f"'{model.attn_implementation}' does not take (one of {list(MASKED_ATTENTION)} does); use pair",
        )
