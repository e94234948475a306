"""Scorers of generated responses, one registry (`SCORERS`), chosen by the `scorer` config group.

    scorer = make_scorer(cfg, context)             # context: ScoringContext (model, tokenizer, data, caches)
    scorer.supports(objective) -> bool             # objectives it cannot score are counted, not scored
    scorer.score(objective, prompts, texts) -> np.ndarray    # one float per response, higher = better

oracle        the synthetic world's attributes read from the text (exact): polite/factual the share of
              the attribute's slot words that are markers; concise minus, detailed plus the word count
reward_model  a Hugging Face sequence-classification model per objective (hub id or local directory),
              with its own tokenizer and chat template
trained_rm    a reward model per objective trained with TRL's RewardTrainer on that objective's training
              pairs, once per (model, data, settings), cached beside the reference log-probs
implicit      the policy's implicit reward against the base model, beta * (log pi(y|x) - log ref(y|x)),
              computed like the preference matrix (same tokenisation, same reference cache)
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
from typing import Callable

import numpy as np

log = logging.getLogger("seqdpo")


@dataclass
class ScoringContext:
    cfg: object  # RunConfig
    tokenizer: object = None
    model: object = None  # the PeftModel as it stands at the stage (implicit)
    fingerprint: str = ""
    objectives: dict = field(default_factory=dict)  # name -> seqdpo.data.Objective (trained_rm: training pairs)
    cache_dir: str | os.PathLike = ""


@dataclass
class ScorerSpec:
    build: Callable[[ScoringContext], object]
    description: str
    synthetic_only: bool = False


# ---------------------------------------------------------------------------------------------- oracle

def oracle_score(objective: str, text: str) -> float:
    """polite / factual: the share of the attribute's slot words (its markers and its plain words) that are
    markers: 0 without the attribute, markers/slot with it (1/8 by default), more when a generation leans
    to it. A share, not presence, because DPO lengthens generations here: a longer response holds a
    marker more often by chance while its slot turns plain (docs: README "Behaviour, not only preferences")."""
    from seqdpo.data import synthetic as S

    words = text.split()
    if objective in S.ATTRIBUTE_WORDS:
        markers = sum(w in S.ATTRIBUTE_WORDS[objective] for w in words)
        plain = sum(w in S.PLAIN_WORDS[objective] for w in words)
        return markers / (markers + plain) if markers + plain else 0.0
    return float(-len(words) if objective == "concise" else len(words))


class OracleScorer:
    ORACLE_OBJECTIVES = ("polite", "factual", "concise", "detailed")

    def supports(self, objective: str) -> bool:
        return objective in self.ORACLE_OBJECTIVES

    def score(self, objective, prompts, texts) -> np.ndarray:
        return np.asarray([oracle_score(objective, t) for t in texts], dtype=float)


# -------------------------------------------------------------------------------------------- implicit

def _response_pairs(prompts, texts):
    from datasets import Dataset

    responses = [[{"role": "assistant", "content": t}] for t in texts]
    # Only the chosen side is read. The rejected must differ from it (tokenize_pairs drops identical pairs).
    others = [[{"role": "assistant", "content": t + " ."}] for t in texts]
    return Dataset.from_dict(
        {"pair_id": [f"r{i}" for i in range(len(texts))], "prompt": list(prompts), "chosen": responses, "rejected": others}
    )


class ImplicitScorer:
    def __init__(self, ctx: ScoringContext):
        self.ctx = ctx

    def supports(self, objective: str) -> bool:
        return True

    def score(self, objective, prompts, texts) -> np.ndarray:
        from seqdpo.logprobs import dataset_logps, tokenize_pairs
        from seqdpo.refcache import reference_logps

        cfg = self.ctx.cfg
        ds = tokenize_pairs(_response_pairs(prompts, texts), self.ctx.tokenizer, cfg.model.max_length)
        if len(ds) != len(texts):
            raise ValueError(f"implicit scorer: tokenisation dropped {len(texts) - len(ds)} response(s) of {objective} "
                             "(prompt at model.max_length or longer)")
        bs = cfg.scorer.batch_size
        policy = dataset_logps(self.ctx.model, ds, bs, desc=f"implicit reward ({objective})", show_progress=False)
        ref = reference_logps(self.ctx.model, ds, fingerprint=self.ctx.fingerprint, cache_dir=self.ctx.cache_dir,
                              batch_size=bs, max_length=cfg.model.max_length)
        return cfg.beta * (policy["chosen_logps"] - ref["chosen_logps"])


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
        s = ctx.cfg.scorer
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
    from seqdpo.refcache import row_digests
    from seqdpo.logprobs import tokenize_pairs

    s = ctx.cfg.scorer
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

    s, m = ctx.cfg.scorer, ctx.cfg.model
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
    """RewardTrainer on the objective's training pairs; the model and tokenizer saved to `out_dir`."""
    from trl import RewardConfig, RewardTrainer

    s = ctx.cfg.scorer
    model, tok = _fresh_reward_model(ctx)
    train = ctx.objectives[objective].train.select_columns(["prompt", "chosen", "rejected"])
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp, num_train_epochs=s.epochs, learning_rate=s.lr, per_device_train_batch_size=s.train_batch_size,
            max_length=s.max_length, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
            logging_steps=10, seed=ctx.cfg.seed, lr_scheduler_type="cosine", warmup_steps=0.1,
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


SCORERS: dict[str, ScorerSpec] = {
    "oracle": ScorerSpec(lambda ctx: OracleScorer(), "the synthetic world's attributes read from the text", synthetic_only=True),
    "reward_model": ScorerSpec(RewardModelScorer, "a Hugging Face sequence-classification model per objective"),
    "trained_rm": ScorerSpec(TrainedRMScorer, "a reward model per objective trained with TRL's RewardTrainer, cached"),
    "implicit": ScorerSpec(ImplicitScorer, "the policy's implicit reward against the base model"),
}


def make_scorer(ctx: ScoringContext):
    return SCORERS[ctx.cfg.scorer.name].build(ctx)
