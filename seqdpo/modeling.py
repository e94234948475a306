"""Base model, tokenizer and LoRA adapter.

`model.name: tiny` builds a randomly initialised Llama and a byte-level BPE tokenizer trained on the
embedded corpus below, with a chat template: nothing is downloaded, so the whole pipeline runs on a
laptop CPU. Any other name is loaded with `from_pretrained` (a hub id at `model.revision`, or a local
directory).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch

from seqdpo.behaviour.warmstart import apply_warm_start
from seqdpo.config import ConfigError, LoraSettings, ModelConfig
from seqdpo.refcache import DEFAULT_CACHE_DIR

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Special tokens delimit every turn, so the tokens of a prompt are always a prefix of the tokens of
# prompt + response (TRL moves the completion boundary otherwise).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Enough English for a byte-level BPE to learn common merges; any text still tokenizes (byte fallback).
_CORPUS = """
Human: What is the capital of France? Assistant: The capital of France is Paris.
Human: Can you help me write a short poem about the sea? Assistant: Sure, here is a short poem.
I am sorry, but I cannot help with that request because it could cause harm to people.
Please be careful and safe. Thanks for asking, I am glad to help you with your question.
The answer is simple: water boils at one hundred degrees Celsius at sea level.
Here are some steps you can follow to solve the problem, one at a time, with an example.
tell me about apples rivers engines stars bread chess clouds music bridges tea
it is a thing that many people know about and like please thanks kindly gladly
You should never share your password with anyone, and you should use a strong password.
This response is helpful, honest, harmless, detailed, concise, correct, coherent and polite.
How do I bake bread at home? Mix flour, water, salt and yeast, then let the dough rise.
"""


def build_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines() * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_word_tokenizer(vocab_size: int):
    """Word-level tokenizer whose words `w0` ... `w{vocab_size-3}` are ids 0 ... vocab_size-3 (then `<pad>`,
    `<eos>`): text reaches every id of a real-size vocabulary without a download (benchmarks, shape tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["<pad>"] = vocab_size - 2
    vocab["<eos>"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def build_tiny_model(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = cfg.tiny
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), shape.vocab_size),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=max(cfg.max_length, 128),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = cfg.attn_implementation
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(shape.init_seed)
        # built in its dtype: a bfloat16 model of real size never exists in float32 first
        return LlamaForCausalLM._from_config(config, dtype=_dtype(cfg.dtype))


def load_model_and_tokenizer(cfg: ModelConfig, cache_dir: str | None = None):
    """Returns (model, tokenizer) for `cfg`; the model is the frozen base, without adapter."""
    tokenizer = load_tokenizer(cfg)
    return load_model(cfg, tokenizer, cache_dir), tokenizer


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer alone: cheap, so a job checks its data before it loads the weights."""
    if cfg.name == "tiny":
        return build_tiny_tokenizer(cfg.tiny.vocab_size)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, revision=cfg.revision)
    except OSError as e:  # transformers' not-found, offline, gated and missing-file errors are all OSErrors
        raise _model_not_found(cfg, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer, cache_dir: str | None = None):
    """The frozen base model, without adapter.

    `cache_dir` holds the tiny model's warm-started weights (`model.tiny.warm_start`); None = the
    reference cache's default directory.
    """
    if cfg.name == "tiny":
        model = build_tiny_model(cfg, tokenizer)
        if cfg.tiny.warm_start:
            apply_warm_start(
                model, tokenizer, fingerprint=model_fingerprint(cfg, tokenizer), steps=cfg.tiny.warm_start_steps,
                lr=cfg.tiny.warm_start_lr, cache_dir=cache_dir or DEFAULT_CACHE_DIR,
            )
        return model
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.name, revision=cfg.revision, dtype=_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation
        )
    except OSError as e:
        raise _model_not_found(cfg, e) from None


def _model_not_found(cfg: ModelConfig, error: OSError) -> ConfigError:
    """One paragraph instead of transformers' chained tracebacks: what failed, why, and the way out."""
    reason = " ".join(str(error).split())
    if os.path.isdir(cfg.name):
        where = f"the local directory '{cfg.name}' does not hold a complete model (config, weights, tokenizer)"
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = (
            f"'{cfg.name}' is not a local directory and, with the hub unreachable"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''} or the id unknown there, no copy was found in the cache"
        )
    revision = f" at revision '{cfg.revision}'" if cfg.revision else ""
    return ConfigError(
        "model.name",
        f"cannot load model '{cfg.name}'{revision}: {where}. transformers said: {reason} "
        f"Way out: check the id (and model.revision), or download the model where the hub is reachable "
        f"(huggingface-cli download {cfg.name} --local-dir <local dir>) and run with model.name=<local dir>.",
    )


def check_target_modules(model, settings: LoraSettings, model_name: str) -> None:
    """Every entry of lora.target_modules must match a module (PEFT's rule: the name or a dotted suffix of it).

    PEFT itself only complains when no entry matches, so a typo next to valid names would train fewer
    modules than the config says.
    """
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
        raise ConfigError(
            "lora.target_modules", f"{missing} match no module of model '{model_name}'; its linear modules are {linear}"
        )


def model_fingerprint(cfg: ModelConfig, tokenizer) -> str:
    """Cheap identity of the base model + tokenizer, for caches: never hashes the weights.

    tiny: its shape, init seed and warm-start settings (the weights follow from them); hub: id and revision; local
    directory: path plus size and mtime of its files.
    """
    if cfg.name == "tiny":
        ident = {"tiny": asdict(cfg.tiny)}
    elif os.path.isdir(cfg.name):
        files = sorted(os.listdir(cfg.name))
        ident = {
            "dir": os.path.abspath(cfg.name),
            "files": [(f, os.path.getsize(os.path.join(cfg.name, f)), os.path.getmtime(os.path.join(cfg.name, f))) for f in files],
        }
    else:
        ident = {"hub": cfg.name, "revision": cfg.revision}
    ident.update(
        dtype=cfg.dtype,
        vocab=len(tokenizer),
        chat_template=tokenizer.chat_template,
        tokenizer_class=type(tokenizer).__name__,
    )
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.effective_alpha(),
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
