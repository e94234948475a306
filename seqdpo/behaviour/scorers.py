"""Scorers of generated responses, one registry (`SCORERS`), chosen by the `scorer` config group.

    scorer = make_scorer(context)                  # context: ScoringContext (settings, model, tokenizer, data, caches)
    scorer.supports(objective) -> bool             # objectives it cannot score are counted, not scored
    scorer.score(objective, prompts, texts) -> np.ndarray    # one float per response, higher = better; NaN = unscored

oracle        the synthetic world's attributes read from the text (exact), over well-formed generations only
              (NaN for the others; their fraction is the `well_formed` guard): polite/factual the markers of
              the attribute over max(its slot words, slot), so that dropping plain words cannot raise it;
              concise minus, detailed plus the word count
reward_model  a Hugging Face sequence-classification model per objective (hub id or local directory),
              with its own tokenizer and chat template
trained_rm    a reward model per objective trained with TRL's RewardTrainer on the job's training pairs of
              that objective, once per (model, data, settings), cached beside the reference log-probs; its
              pairwise accuracy on every objective's training and eval pairs goes to matrix.json
implicit      not a score of the objective: beta * (log pi(y|x) - log ref(y|x)) of the policy's own samples,
              whose mean estimates beta x KL(policy || base) on those prompts, whatever the objective. Reported
              as distance from the base, without win rates
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from seqdpo.data import synthetic as S
from seqdpo.logprobs import dataset_logps, tokenize_pairs
from seqdpo.refcache import reference_logps, row_digests

if TYPE_CHECKING:
    from seqdpo.config import DatasetConfig, ModelConfig, ScorerConfig

log = logging.getLogger("seqdpo")


@dataclass(frozen=True)
class ScoringSettings:
    """What scoring reads of a job's config. Several sections, since the scorers and guards read the policy's
    model settings (max_length; trained_rm's base architecture), the dataset (the oracle's slot, the
    well_formed guard), the run's beta (implicit) and seed (trained_rm's training), and eval.batch_size
    (the base model's forwards behind the guards)."""

    scorer: ScorerConfig
    model: ModelConfig
    dataset: DatasetConfig
    beta: float
    seed: int
    batch_size: int


@dataclass
class ScoringContext:
    settings: ScoringSettings
    tokenizer: object = None
    model: object = None  # the PeftModel as it stands at the stage (implicit)
    fingerprint: str = ""
    objectives: dict = field(default_factory=dict)  # name -> seqdpo.data.Objective (trained_rm: training pairs)
    cache_dir: str | os.PathLike = ""


@dataclass
class ScorerSpec:
    build: Callable[[ScoringContext], object]
    description: str  # what its number measures (matrix.json, report)
    synthetic_only: bool = False
    objective_blind: bool = False  # the same number whatever the objective: no per-objective win rates


# ---------------------------------------------------------------------------------------------- oracle

def oracle_score(objective: str, text: str, slot: int = 8) -> float:
    """NaN unless `text` is well formed (`synthetic.well_formed`). polite / factual: the attribute's markers
    over max(markers + its plain words, `slot`): markers/slot for a response of the world's slot (0 without
    the attribute, 1/8 with one marker in a slot of 8); fewer slot words than `slot` (plain words dropped)
    do not raise it, more (a lengthened response, where a marker turns up by chance) lower it. concise /
    detailed: minus / plus the word count."""
    if not S.well_formed(text):
        return float("nan")
    words = text.split()
    if objective in S.ATTRIBUTE_WORDS:
        markers = sum(w in S.ATTRIBUTE_WORDS[objective] for w in words)
        plain = sum(w in S.PLAIN_WORDS[objective] for w in words)
        return markers / max(markers + plain, slot)
    return float(-len(words) if objective == "concise" else len(words))


class OracleScorer:
    ORACLE_OBJECTIVES = ("polite", "factual", "concise", "detailed")

    def __init__(self, ctx: ScoringContext | None = None):
        options = dict(ctx.settings.dataset.options) if ctx is not None else {}
        self.slot = S.parse_options(options)["slot"]

    def supports(self, objective: str) -> bool:
        return objective in self.ORACLE_OBJECTIVES

    def score(self, objective, prompts, texts) -> np.ndarray:
        return np.asarray([oracle_score(objective, t, self.slot) for t in texts], dtype=float)


# -------------------------------------------------------------------------------------------- implicit

def _response_pairs(prompts, texts):
    from datasets import Dataset

    responses = [[{"role": "assistant", "content": t}] for t in texts]
    # Only the chosen side is read. The rejected must differ from it (tokenize_pairs drops identical pairs).
    others = [[{"role": "assistant", "content": t + " ."}] for t in texts]
    return Dataset.from_dict(
        {"pair_id": [f"r{i}" for i in range(len(texts))], "prompt": list(prompts), "chosen": responses, "rejected": others}
    )


def base_response_logps(ctx: ScoringContext, objective: str, prompts, texts, batch_size: int):
    """(tokenized responses, the base model's `dataset_logps` of them: chosen_logps and chosen_len are the
    responses'), through the reference cache. A response that `model.max_length` cuts to nothing of its
    own is dropped (its row's `pair_id` is `r<index in texts>`)."""
    max_length = ctx.settings.model.max_length
    ds = tokenize_pairs(_response_pairs(prompts, texts), ctx.tokenizer, max_length)
    ref = reference_logps(ctx.model, ds, fingerprint=ctx.fingerprint, cache_dir=ctx.cache_dir, batch_size=batch_size,
                          max_length=max_length, desc=f"base log-probs of generations ({objective})")
    return ds, ref


class ImplicitScorer:
    def __init__(self, ctx: ScoringContext):
        self.ctx = ctx

    def supports(self, objective: str) -> bool:
        return True

    def score(self, objective, prompts, texts) -> np.ndarray:
        bs = self.ctx.settings.scorer.batch_size
        ds, ref = base_response_logps(self.ctx, objective, prompts, texts, bs)
        if len(ds) != len(texts):
            raise ValueError(f"implicit scorer: tokenisation dropped {len(texts) - len(ds)} response(s) of {objective} "
                             "(prompt and response beyond model.max_length)")
        policy = dataset_logps(self.ctx.model, ds, bs, desc=f"implicit reward ({objective})", show_progress=False)
        return self.ctx.settings.beta * (policy["chosen_logps"] - ref["chosen_logps"])


# ------------------------------------------------------------------------------------ reward models

def format_for_reward_model(tok, prompt: list[dict], text: str) -> str:
    """The conversation in the reward model's own chat template, or plain turns when it has none."""
    messages = [*prompt, {"role": "assistant", "content": text}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class RewardModel:
    """One sequence-classification model; scores batched, right-padded, truncated to `max_length`."""

    def __init__(self, path: str, *, revision: str | None, batch_size: int, max_length: int, device=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, revision=revision)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, revision=revision).eval()
        if self.model.config.pad_token_id is None:  # the head reads the last non-pad token
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, prompts, texts) -> np.ndarray:
        import torch

        strings = [format_for_reward_model(self.tok, p, t) for p, t in zip(prompts, texts)]
        out = []
        with torch.no_grad():
            for i in range(0, len(strings), self.batch_size):
                enc = self.tok(strings[i : i + self.batch_size], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt", add_special_tokens=False).to(self.device)
                out.append(self.model(**enc).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


class RewardModelScorer:
    def __init__(self, ctx: ScoringContext, paths: dict[str, str] | None = None):
        s = ctx.settings.scorer
        self.paths = dict(s.models) if paths is None else paths
        self.revision = s.revision if paths is None else None
        self.batch_size, self.max_length = s.batch_size, s.max_length
        self.models: dict[str, RewardModel] = {}

    def supports(self, objective: str) -> bool:
        return objective in self.paths

    def score(self, objective, prompts, texts) -> np.ndarray:
        if objective not in self.models:
            self.models[objective] = RewardModel(self.paths[objective], revision=self.revision,
                                                 batch_size=self.batch_size, max_length=self.max_length)
        return self.models[objective].score(prompts, texts)


# --------------------------------------------------------------------------------------- trained_rm

RM_FORMAT_VERSION = 1


def trained_rm_key(ctx: ScoringContext, objective: str) -> str:
    """(base architecture, training pairs, settings): every job of a sweep on the same data shares it."""
    s = ctx.settings.scorer
    train = ctx.objectives[objective].train
    digests = row_digests(tokenize_pairs(train, ctx.tokenizer, s.max_length)) if s.base_model is None else None
    h = hashlib.sha256()
    h.update(json.dumps({"format": RM_FORMAT_VERSION, "objective": objective,
                         "base": s.base_model or ctx.fingerprint, "epochs": s.epochs, "lr": s.lr,
                         "batch": s.train_batch_size, "max_length": s.max_length}, sort_keys=True).encode())
    if digests is None:  # a named base model tokenizes differently; the raw rows identify the data
        digests = [hashlib.sha256(json.dumps([r["pair_id"], r["prompt"], r["chosen"], r["rejected"]]).encode()).hexdigest()
                   for r in train]
    for d in sorted(digests):
        h.update(str(d).encode())
    return h.hexdigest()[:32]


def _fresh_reward_model(ctx: ScoringContext):
    """The policy's base architecture with a scalar head (tiny), or the named / hub base model."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    s, m = ctx.settings.scorer, ctx.settings.model
    if s.base_model is None and m.name == "tiny":
        base_config = ctx.model.get_base_model().config if hasattr(ctx.model, "get_base_model") else ctx.model.config
        config = base_config.__class__.from_dict({**base_config.to_dict(), "num_labels": 1})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.tiny.init_seed)
            return LlamaForSequenceClassification(config), ctx.tokenizer
    from transformers import AutoTokenizer

    name = s.base_model or m.name
    revision = None if s.base_model else m.revision
    tok = AutoTokenizer.from_pretrained(name, revision=revision)
    return AutoModelForSequenceClassification.from_pretrained(name, revision=revision, num_labels=1), tok


def train_reward_model(ctx: ScoringContext, objective: str, out_dir: Path) -> dict:
    """RewardTrainer on the objective's training pairs (the job's: after the draw of `dataset.n_train`);
    the model and tokenizer saved to `out_dir`."""
    from trl import RewardConfig, RewardTrainer

    s = ctx.settings.scorer
    model, tok = _fresh_reward_model(ctx)
    train = ctx.objectives[objective].train.select_columns(["prompt", "chosen", "rejected"])
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp, num_train_epochs=s.epochs, learning_rate=s.lr, per_device_train_batch_size=s.train_batch_size,
            max_length=s.max_length, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
            logging_steps=10, seed=ctx.settings.seed, lr_scheduler_type="cosine", warmup_steps=0.1,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
        result = trainer.train()
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        trainer.save_model(str(staging))
        tok.save_pretrained(str(staging))
    info = {"objective": objective, "train_loss": result.training_loss, "steps": result.global_step}
    (staging / "seqdpo_rm.json").write_text(json.dumps(info))
    try:
        os.replace(staging, out_dir)  # whole directory or nothing; a concurrent job's identical one may win
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return info


class TrainedRMScorer(RewardModelScorer):
    def __init__(self, ctx: ScoringContext):
        super().__init__(ctx, paths={})
        self.ctx = ctx
        self.trained: dict[str, str] = {}  # objective -> "trained" | "cached"

    def supports(self, objective: str) -> bool:
        return objective in self.ctx.objectives

    def score(self, objective, prompts, texts) -> np.ndarray:
        if objective not in self.paths:
            self.paths[objective] = str(self.model_dir(objective))
        return super().score(objective, prompts, texts)

    def model_dir(self, objective: str) -> Path:
        path = Path(self.ctx.cache_dir) / f"rm-{trained_rm_key(self.ctx, objective)}"
        if (path / "seqdpo_rm.json").exists():
            self.trained[objective] = "cached"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            info = train_reward_model(self.ctx, objective, path)
            log.info("trained_rm %s: %s -> %s", objective, info, path)
            self.trained[objective] = "trained"
        return path

    def accuracy(self, objectives) -> dict:
        """Reward model of each of `objectives` -> every objective -> split -> pairwise accuracy on that
        objective's pairs of the job (chosen scored above rejected; ties 1/2), with `pairs` per split."""
        return {rm: {name: {split: pairwise_accuracy(self, rm, getattr(obj, split)) for split in ("train", "eval")}
                     for name, obj in self.ctx.objectives.items()}
                for rm in objectives}


def pairwise_accuracy(scorer, objective: str, pairs) -> dict:
    prompts = list(pairs["prompt"])
    chosen = scorer.score(objective, prompts, [r[-1]["content"] for r in pairs["chosen"]])
    rejected = scorer.score(objective, prompts, [r[-1]["content"] for r in pairs["rejected"]])
    wins = (chosen > rejected) + 0.5 * (chosen == rejected)
    return {"accuracy": float(wins.mean()) if len(wins) else None, "pairs": len(wins)}


SCORERS: dict[str, ScorerSpec] = {
    "oracle": ScorerSpec(OracleScorer, "the synthetic world's attribute read from the text, over well-formed generations",
                         synthetic_only=True),
    "reward_model": ScorerSpec(RewardModelScorer, "a Hugging Face sequence-classification model per objective"),
    "trained_rm": ScorerSpec(TrainedRMScorer, "a reward model per objective trained with TRL's RewardTrainer on the "
                                              "job's training pairs of that objective (accuracies in scorer_accuracy)"),
    "implicit": ScorerSpec(ImplicitScorer, "distance from the base, not a score of the objective: beta x log(pi / ref) "
                                           "of the policy's own samples (objective-blind)", objective_blind=True),
}


def make_scorer(ctx: ScoringContext):
    return SCORERS[ctx.settings.scorer.name].build(ctx)
