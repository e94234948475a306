"""Typed configuration of one seqdpo job.

Hydra composes `conf/` against these dataclasses (the `run_schema` entry of the defaults list), so a
wrong type fails at compose time; `seqdpo.validation.validate()` then does the checks that need the registries
(dataset names, loss names, order letters). Only `seqdpo.app` touches Hydra: everything else takes
a `RunConfig`, which a notebook can build by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
    gamma: float = 0.1  # sft_dpo: weight of the chosen NLL (the paper reports no value)
    # spo: weight of the penalty on the chosen log-prob falling below the reference; unknown in the paper,
    # > beta so that a violated constraint dominates the chosen's gradient
    spo_lambda: float = 1.0
    discopop_tau: float = 0.05  # discopop: the paper's value


@dataclass
class TrainConfig:
    epochs: float = 1.0  # per stage (the paper: one epoch)
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
    generate: bool = False  # behaviour: generate after every stage and score it with `scorer` (seqdpo/behaviour)
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
    beta: float = 0.3  # DPO beta, the paper's value
    lr: float = 5e-5  # the paper's LoRA learning rate; the tiny model needs ~5e-3 to move visibly
    seed: int = 0  # data order, LoRA init, subsampling
    reference: str = "base"  # base: frozen base model in every stage | previous: model after the previous stage (sDPO)
    ref_cache_dir: Optional[str] = None  # base-reference log-prob cache; None = outputs/.refcache


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


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return asdict(cfg)


def default(key: str) -> Any:
    """The schema's default of a dotted key ('eval.tie_tolerance'); '???' for one a group file must set (model.name)."""
    hints = typing.get_type_hints(RunConfig)
    # lora and logger have no default of their own (a group file picks one): their type's fields do
    node: Any = RunConfig(**{f.name: hints[f.name]() for f in dataclasses.fields(RunConfig)
                             if f.default is MISSING and dataclasses.is_dataclass(hints[f.name])})
    for part in key.split("."):
        node = getattr(node, part) if dataclasses.is_dataclass(node) else node[part]
    return node


def setting(config: dict, key: str) -> Any:
    """`key` of a job's saved config (its config.yaml as a dict), or the schema's default when the job predates the key."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default(key)
        node = node[part]
    return node


def signature(cfg: RunConfig) -> str:
    """Identity of the science a job does: same signature = same results, so a rerun may reuse its outputs.

    The logger settings and the cache location do not change results and are left out, so switching W&B
    on or off keeps a job's identity; so are the strategy keys the strategy does not read (validate()
    refuses them away from their defaults), so a key added for one strategy leaves the others' jobs as they were.
    """
    d = to_dict(cfg)
    d.pop("logger")
    d.pop("ref_cache_dir")
    d["strategy"] = {k: d["strategy"][k] for k in ("name", *STRATEGY_KEYS.get(cfg.strategy.name, ()))}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
