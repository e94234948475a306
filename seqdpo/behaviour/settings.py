"""Checks of the behaviour options (`eval.generate`, `eval.generation.*`, `scorer.*`, `model.tiny.warm_start*`)."""

from __future__ import annotations

from seqdpo.behaviour.generate import vllm_available
from seqdpo.behaviour.scorers import SCORERS
from seqdpo.config import ConfigError, RunConfig

BACKENDS = ("auto", "transformers", "vllm")


def check_behaviour_config(cfg: RunConfig) -> None:
    t = cfg.model.tiny
    if t.warm_start and cfg.model.name != "tiny":  # steps and lr > 0: validation._ranges
        raise ConfigError("model.tiny.warm_start", f"warms up the embedded tiny model only, not '{cfg.model.name}'")
    if not cfg.eval.generate:
        return
    g = cfg.eval.generation
    for key in ("prompts", "samples", "max_new_tokens", "batch_size"):
        if getattr(g, key) < (0 if key == "samples" else 1):
            raise ConfigError(f"eval.generation.{key}", f"must be >= {0 if key == 'samples' else 1}, got {getattr(g, key)}")
    if g.samples == 0 and not g.greedy:
        raise ConfigError("eval.generation.samples", "0 samples and greedy=false generate nothing")
    if not g.temperature > 0:
        raise ConfigError("eval.generation.temperature", f"must be > 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError("eval.generation.top_p", f"must be in (0, 1], got {g.top_p}")
    if not 0 <= g.min_p < 1:
        raise ConfigError("eval.generation.min_p", f"must be in [0, 1), got {g.min_p}")
    if g.backend not in BACKENDS:
        raise ConfigError("eval.generation.backend", f"'{g.backend}' is not one of {list(BACKENDS)}")
    if g.backend == "vllm" and not vllm_available():
        raise ConfigError("eval.generation.backend", "vllm is not installed (pip install vllm; it is optional)")
    if g.backend == "vllm" and cfg.model.name == "tiny":
        raise ConfigError("eval.generation.backend", "vllm loads a model by name; the embedded tiny model has none")
    s = cfg.scorer
    if s.name not in SCORERS:
        raise ConfigError("scorer.name", f"unknown scorer '{s.name}'; known: {sorted(SCORERS)}")
    if SCORERS[s.name].synthetic_only and cfg.dataset.name != "synthetic":
        raise ConfigError("scorer.name", f"'{s.name}' reads the synthetic world's attributes; dataset is '{cfg.dataset.name}'")
    if s.name == "reward_model":
        missing = [o for o in cfg.dataset.objectives if o not in s.models]
        unknown = [o for o in s.models if o not in cfg.dataset.objectives]
        if missing or unknown:
            raise ConfigError("scorer.models", f"needs one model per objective {list(cfg.dataset.objectives)}; "
                              f"missing {missing}, unknown {unknown}")
    for key in ("batch_size", "max_length", "train_batch_size"):
        if getattr(s, key) < 1:
            raise ConfigError(f"scorer.{key}", f"must be >= 1, got {getattr(s, key)}")
    for key in ("epochs", "lr"):
        if not getattr(s, key) > 0:
            raise ConfigError(f"scorer.{key}", f"must be > 0 (trained_rm), got {getattr(s, key)}")
