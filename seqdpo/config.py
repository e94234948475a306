"""Typed configuration of one seqdpo job.

Hydra composes `conf/` against these dataclasses (the `run_schema` entry of the defaults list), so a
wrong type fails at compose time; `validate()` then does the checks that need the registries
(dataset names, loss names, order letters). Only `seqdpo.app` touches Hydra: everything else takes
a `RunConfig`, which a notebook can build by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and what was expected."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass
class TinyModelShape:
    """Shape of the embedded random Llama (used when model.name == 'tiny')."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 1024  # BPE vocabulary trained locally on the embedded corpus
    init_seed: int = 0  # fixed apart from the run seed: the base model is an artifact, like a hub checkpoint
    # SFT warm start on responses of the synthetic world's format (seqdpo/behaviour/warmstart.py), so the
    # random model generates well-formed responses; conf/model/tiny.yaml turns it on with eval.generate.
    warm_start: bool = False
    warm_start_steps: int = 300
    warm_start_lr: float = 3e-3


@dataclass
class ModelConfig:
    name: str = MISSING  # 'tiny' (embedded, no download), a hub id, or a local directory
    revision: Optional[str] = None  # hub revision (commit sha or tag); None = the hub's default branch
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    max_length: int = 512  # prompt + completion tokens; longer pairs are truncated (TRL keep_start)
    # batch layout of every forward (training, reference, evaluation): shared_prompt (each pair's prompt
    # computed once) | pair (prompt+chosen, prompt+rejected, packed) | padded (TRL's); same log-probs
    packing: str = "shared_prompt"
    tiny: TinyModelShape = field(default_factory=TinyModelShape)


@dataclass
class DatasetConfig:
    name: str = MISSING  # key of seqdpo.data.DATASETS
    objectives: list[str] = MISSING  # objective names in order; order letters a, b, ... index this list
    path: Optional[str] = None  # local file or directory in the hub schema; None = load from the hub
    revision: Optional[str] = None  # None = the revision pinned in the dataset registry
    n_train: Optional[int] = None  # pairs per objective for training, after every drop (None = all)
    n_eval: Optional[int] = None  # pairs per objective for evaluation, after every drop (None = all)
    options: dict[str, Any] = field(default_factory=dict)  # builder-specific, validated by the builder
    # Pair accounting (seqdpo/data/accounting.py): a split left with fewer pairs is an error; a split that
    # model.max_length dropped or truncated more than this fraction of gets a warning.
    min_pairs: int = 1
    warn_fraction: float = 0.05
    # Eval pairs that are also training pairs (same prompt, chosen and rejected): above this fraction of an
    # objective's eval split the job refuses to run (1 = allow any).
    max_overlap: float = 0.01


@dataclass
class OrderConfig:
    name: str = MISSING
    # One entry per stage: a letter (a = dataset.objectives[0], b = [1], ...) or an objective name.
    stages: list[str] = MISSING
    # sDPO-style partitioning when an objective appears in several stages: each appearance trains on
    # its own chunk. none | random | easy_to_hard (by the base model's margin).
    partition: str = "none"
    # Per-stage settings: position (from 1, a string key) -> {setting key: value}, e.g.
    # order.stage_overrides.2.lr=1e-5; resolved and checked by seqdpo/stage_settings.py
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LoraSettings:
    r: int = 32
    alpha: Optional[int] = None  # None = 2r, so `lora.r=8` alone keeps the papers' alpha/r = 2
    dropout: float = 0.05  # active in training unless train.disable_dropout
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def effective_alpha(self) -> int:
        return 2 * self.r if self.alpha is None else self.alpha


@dataclass
class LossConfig:
    name: str = "dpo"  # key of seqdpo.losses.LOSSES
    # Weighted combination of registered losses, e.g. components=[dpo, sft] weights=[1.0, 0.1].
    components: Optional[list[str]] = None
    weights: Optional[list[float]] = None
    label_smoothing: float = 0.0  # robust, exo_pair, aot
    beta_pos: Optional[float] = None  # flex_dpo: beta of the chosen term (None = the run's beta)
    beta_neg: Optional[float] = None  # flex_dpo: absolute beta of the rejected term (None = beta_neg_ratio * beta_pos)
    beta_neg_ratio: Optional[float] = None  # flex_dpo: beta_neg / beta_pos (None = 1: plain DPO)
    gamma: float = 0.1  # sft_dpo: weight of the chosen NLL
    spo_lambda: float = 1.0  # spo: weight of the penalty on the chosen log-prob falling below the reference
    discopop_tau: float = 0.05


@dataclass
class TrainConfig:
    epochs: float = 1.0  # per stage
    max_steps: int = -1  # per stage; > 0 overrides epochs
    batch_size: int = 8  # preference pairs per device step
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    logging_steps: int = 5
    save_steps: int = 50  # mid-stage checkpoint interval (what a requeued job resumes from)
    gradient_checkpointing: bool = False
    bf16: bool = False
    # TRL's switch (its default is True): sets every torch Dropout of the model, LoRA's included, to p=0
    # for the whole job. False keeps lora.dropout (and the model's own dropout modules) active in training.
    disable_dropout: bool = False


@dataclass
class GenerationSettings:
    prompts: int = 32  # K held-out prompts per objective (eval split, seeded choice)
    samples: int = 4  # N sampled responses per prompt
    greedy: bool = False  # also one greedy response per prompt (sample index -1)
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability (0 = off)
    max_new_tokens: int = 48
    batch_size: int = 64  # sequences per generate call
    seed: Optional[int] = None  # prompt choice and sampling; None = the run seed
    backend: str = "auto"  # auto (vLLM on a GPU when installed, else transformers) | transformers | vllm


@dataclass
class ScorerConfig:
    """How generations are scored, one registry (seqdpo/behaviour/scorers.py SCORERS)."""

    name: str = "oracle"  # oracle | reward_model | trained_rm | implicit
    # reward_model: objective -> hub id or local directory of a sequence-classification model
    models: dict[str, str] = field(default_factory=dict)
    revision: Optional[str] = None  # reward_model: hub revision for every model
    batch_size: int = 32
    max_length: int = 512
    # trained_rm: the architecture (None = the policy's base model, with a fresh scalar head)
    base_model: Optional[str] = None
    epochs: float = 3.0
    lr: float = 1e-3
    train_batch_size: int = 16


# eval.min_effect's default, per verdict column: 5 accuracy points; a tenth of a reward-margin unit (beta x log-ratio).
MIN_EFFECT = {"accuracy": 0.05, "margin": 0.1}


@dataclass
class EvalConfig:
    batch_size: int = 16
    tie_tolerance: float = 1e-6  # |margin| at or below this counts as a tie (accuracy 0.5)
    bootstrap: int = 1000  # paired bootstrap replicates for 95% intervals and verdicts (0 = none); seeded by `seed`
    # Per verdict column, the smallest change worth a claim: a verdict whose interval lies inside +-min_effect is
    # "equivalent", one that holds 0 and more than that "inconclusive". Declare it before looking at results.
    min_effect: dict[str, float] = field(default_factory=lambda: dict(MIN_EFFECT))
    generate: bool = False  # behaviour: generate after every stage and score it (seqdpo/behaviour)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class DiagnosticsConfig:
    grad_cosine: bool = True  # cosine between the current and every earlier objective's gradient
    grad_cosine_points: int = 5  # probes per stage, spread evenly from its first to its last step (1 = start only)
    probe_source: str = "train"  # train | eval: whose pairs the gradient probes use
    probe_pairs: int = 64  # pairs per objective in a gradient probe (16 measured as noise on the synthetic world)
    probe_blocks: int = 8  # a probe's backward passes; its blocks give the split-half reliability and the jackknife interval
    # the disattenuated cosine is reported only when both objectives' probe reliabilities reach this
    # (0.5: the correction at most doubles a cosine); below it, raise probe_pairs
    min_reliability: float = 0.5
    adapter_movement: bool = True
    likelihood: bool = True  # 3D-properties: chosen/rejected/held-out likelihood shifts
    # Pair-level analysis: a pair "stayed" when |delta| <= stay_threshold * sd(values after the training
    # stage); redistribution = flat aggregate with at least this fraction of pairs moving each way.
    stay_threshold: float = 0.1
    redistribution_min_fraction: float = 0.2


@dataclass
class StrategyConfig:
    """How the stages combine into a model (seqdpo/strategies/): a forgetting mitigation or the plain sequence."""

    name: str = "sequential"  # sequential | joint | replay | merge | anchor
    ratio: float = 0.25  # replay: pairs replayed in a stage per pair of its own objective
    match_steps: bool = True  # replay: a stage trains as many optimizer steps as sequential's stage would
    method: str = "linear"  # merge: PEFT combination, linear | ties | dare_linear | dare_ties
    weights: Optional[list[float]] = None  # merge: one per stage's adapter; None = equal (seqdpo/strategies/merge.py)
    density: float = 0.5  # merge: fraction of each adapter's entries kept by ties / dare
    penalty: str = "l2"  # anchor: l2 | ewc, both on the LoRA factors (seqdpo/strategies/anchor.py)
    strength: float = 1.0  # anchor: weight of the penalty (0 = sequential)
    fisher_pairs: int = 64  # anchor ewc: pairs of each earlier stage in its Fisher estimate
    decay: float = 1.0  # anchor: stage j's term weighs decay^(k-1-j) in stage k (1 = every earlier stage in full)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "seqdpo"
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE in the environment wins)
    entity: Optional[str] = None
    group: Optional[str] = None  # None = the sweep directory's name (one group per multirun)
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    order: OrderConfig = MISSING
    lora: LoraSettings = MISSING
    loss: LossConfig = MISSING
    logger: LoggerConfig = MISSING
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    beta: float = 0.3
    lr: float = 5e-5
    seed: int = 0
    reference: str = "base"  # base: frozen base model in every stage | previous: model after the previous stage (sDPO)
    ref_cache_dir: Optional[str] = None  # base-reference log-prob cache; None = outputs/.refcache
    # Trained stages shared across jobs by stage signature (seqdpo/stage_store.py); off: every job trains its own
    stage_store: bool = True
    stage_store_dir: Optional[str] = None  # None = .stagestore beside the reference cache


REFERENCES = ("base", "previous")
PARTITIONS = ("none", "random", "easy_to_hard")
DTYPES = ("float32", "bfloat16", "float16")
LOGGERS = ("wandb", "none")
PROBE_SOURCES = ("train", "eval")
LOGGER_MODES = ("offline", "online", "disabled")
# The keys each strategy reads; a key of another strategy set away from its default is an error, not ignored.
STRATEGY_KEYS = {
    "sequential": (),
    "joint": (),
    "replay": ("ratio", "match_steps"),
    "merge": ("method", "weights", "density"),
    "anchor": ("penalty", "strength", "fisher_pairs", "decay"),
}
MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
ANCHOR_PENALTIES = ("l2", "ewc")


def stage_objectives(cfg: RunConfig) -> list[str]:
    """Objective name trained in each stage, in order (order letters resolved against the dataset)."""
    names = list(cfg.dataset.objectives)
    out = []
    for i, entry in enumerate(cfg.order.stages):
        if len(entry) == 1 and entry.isalpha() and entry.islower() and entry not in names:
            idx = ord(entry) - ord("a")
            if idx >= len(names):
                letters = ", ".join(f"{chr(ord('a') + j)}={n}" for j, n in enumerate(names))
                raise ConfigError(
                    f"order.stages[{i}]",
                    f"order '{cfg.order.name}' names objective '{entry}', but dataset '{cfg.dataset.name}' "
                    f"defines only {len(names)} objective(s) ({letters})",
                )
            out.append(names[idx])
        elif entry in names:
            out.append(entry)
        else:
            raise ConfigError(
                f"order.stages[{i}]",
                f"'{entry}' is neither an order letter nor one of dataset '{cfg.dataset.name}' objectives {names}",
            )
    return out


def validate(cfg: RunConfig) -> None:
    """Checks that need more than types: registries, enumerations, cross-field constraints."""
    from seqdpo.data import DATASETS
    from seqdpo.losses import check_loss_config

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
        from seqdpo.behaviour.settings import check_behaviour_config

        check_behaviour_config(cfg)
    _validate_strategy(cfg)
    from seqdpo.stage_settings import check_stage_overrides

    check_stage_overrides(cfg)


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
    return f"did you mean '{close[0]}'?" if close else "the keys are listed in README.md (Configuration)"


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
    from seqdpo.packing import MASKED_ATTENTION, PACKINGS

    if model.packing not in PACKINGS:
        raise ConfigError("model.packing", f"'{model.packing}' is not one of {list(PACKINGS)}")
    if model.packing == "shared_prompt" and model.attn_implementation not in MASKED_ATTENTION:
        raise ConfigError(
            "model.packing",
            f"shared_prompt needs a custom attention mask, which model.attn_implementation "
            f"'{model.attn_implementation}' does not take (one of {list(MASKED_ATTENTION)} does); use pair",
        )


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return asdict(cfg)


def signature(cfg: RunConfig) -> str:
    """Identity of the science a job does: same signature = same results, so a rerun may reuse its outputs.

    The logger settings, the cache and stage-store locations and whether the store is used do not change
    results and are left out (so are per-stage overrides when there are none), so
    switching W&B on or off keeps a job's identity. So are the strategy keys the strategy does not
    read, and the whole strategy when it is `sequential`, and the batch layout when it is the default
    (model.packing changes no log-prob, but LoRA dropout draws its masks over the layout's tokens):
    jobs from before strategies and layouts existed keep theirs.
    """
    d = to_dict(cfg)
    d.pop("logger")
    d.pop("ref_cache_dir")
    d.pop("stage_store")
    d.pop("stage_store_dir")
    if not d["order"]["stage_overrides"]:
        d["order"].pop("stage_overrides")
    if d["model"]["packing"] == ModelConfig.packing:
        d["model"].pop("packing")
    strategy = d.pop("strategy")
    if strategy["name"] != "sequential":
        d["strategy"] = {k: strategy[k] for k in ("name", *STRATEGY_KEYS.get(strategy["name"], ()))}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
