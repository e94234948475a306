"""The Llama-3.1-8B code path on CPU: what a GPU job runs, minus the device and 30 of the 32 layers.

The real shape (hidden 4096, GQA 32/8, MLP 14336, vocabulary 128,256) cut to two layers, in bfloat16,
with gradient checkpointing and the chunked LM-head log-probs (TRL's kernel, as on a GPU; the CPU's
own LM head is compared with it at the end), composed from the real config, goes
through seqdpo's reference pass, one training step of SeqDPOTrainer and one evaluation pass; the three
batch layouts agree within bf16 rounding. Random weights, a word-level tokenizer over the whole
vocabulary, short sequences: no download, about 3 GB of weights. The peak RSS is printed and recorded
(`peak_rss_gib` in the JUnit report).
"""

from __future__ import annotations

import random
import resource
import sys

import numpy as np
import pytest
import torch

from conftest import run_config

pytestmark = pytest.mark.slow

LAYERS = 2
VOCAB = 128256
OVERRIDES = [
    "model.tiny.hidden_size=4096",
    "model.tiny.intermediate_size=14336",
    f"model.tiny.num_hidden_layers={LAYERS}",
    "model.tiny.num_attention_heads=32",
    "model.tiny.num_key_value_heads=8",
    f"model.tiny.vocab_size={VOCAB}",
    "model.dtype=bfloat16",
    "model.max_length=40",
    "train.bf16=true",
    "train.gradient_checkpointing=true",
    "train.max_steps=1",
    "train.batch_size=2",
    "train.warmup_ratio=0",
    "lr=1e-3",
    "eval.batch_size=4",
    "logger=none",
]
_BLOCK = 1_048_573  # prime: a matrix row of any width starts at a different place of the block


def _random_init_(model, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in about a second: each matrix runs cyclically through one block of normal draws
    from its own offset (drawing 1.5 billion normals one by one takes minutes on two cores). Norms stay 1."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(_BLOCK, generator=g) * std
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 2:
                continue
            off = int(torch.randint(_BLOCK, (1,), generator=g))
            rolled = torch.cat([block[off:], block[:off]]).to(p.dtype)
            flat = p.view(-1)
            for start in range(0, flat.numel(), _BLOCK):
                n = min(_BLOCK, flat.numel() - start)
                flat[start : start + n].copy_(rolled[:n])


def _pairs(n: int, seed: int = 0):
    """Plain-text pairs of words spread over the whole vocabulary (ids up to the last LM-head tile)."""
    from datasets import Dataset

    rng = random.Random(seed)
    say = lambda k: " ".join(f"w{rng.randrange(VOCAB - 2)}" for _ in range(k))  # noqa: E731
    return Dataset.from_dict(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": [say(rng.randint(8, 16)) for _ in range(n)],
            "chosen": [" " + say(rng.randint(3, 8)) for _ in range(n)],
            "rejected": [" " + say(rng.randint(3, 8)) for _ in range(n)],
        }
    )


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def _layouts(peft_model, feats) -> dict[str, dict[str, np.ndarray]]:
    from seqdpo.logprobs import PairCollator, sequence_logps
    from seqdpo.packing import PACKINGS

    out = {}
    with torch.no_grad():
        for packing in PACKINGS:
            res = sequence_logps(peft_model, PairCollator(packing=packing)(feats))
            out[packing] = {k: v.float().numpy() for k, v in res.items()}
    return out


def test_llama31_8b_shape_trains_and_evaluates_on_cpu(tmp_path, record_property, monkeypatch):
    from peft import get_peft_model
    from transformers.initialization import no_init_weights

    from seqdpo import logprobs
    from seqdpo.evaluation import evaluate_stage
    from seqdpo.logprobs import tokenize_pairs
    from seqdpo.modeling import build_tiny_model, build_word_tokenizer, make_lora_config, model_fingerprint
    from seqdpo.refcache import reference_logps, with_reference_columns
    from seqdpo.job_settings import stage_settings
    from seqdpo.trainer import SeqDPOTrainer, make_dpo_config

    monkeypatch.setattr(logprobs, "CHUNKED_LM_HEAD_ON_CPU", True)  # the accelerator's LM head
    cfg = run_config(OVERRIDES)
    assert cfg.model.packing == "shared_prompt"
    tok = build_word_tokenizer(VOCAB)
    with no_init_weights():  # the weights are drawn below, in a second instead of minutes
        model = build_tiny_model(cfg.model, tok)
    _random_init_(model)
    assert model.config.vocab_size == VOCAB and model.dtype == torch.bfloat16
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert sum(p.numel() for p in model.parameters()) == 2 * VOCAB * 4096 + LAYERS * per_layer + 4096
    torch.manual_seed(cfg.seed)  # LoRA A's init: the same adapter, and the same rounding, on every run
    peft_model = get_peft_model(model, make_lora_config(cfg.lora))
    # r=32 on the seven projections: 83,886,080 trainable parameters over 32 layers, the paper's count
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 83_886_080 // 32 * LAYERS

    tds = tokenize_pairs(_pairs(4), tok, cfg.model.max_length)
    assert max(max(r) for r in [*tds["chosen_ids"], *tds["rejected_ids"]]) >= 3 * 32768  # the last LM-head tile
    ref = reference_logps(
        peft_model, tds, fingerprint=model_fingerprint(cfg.model, tok), cache_dir=tmp_path / "refcache",
        batch_size=cfg.eval.batch_size, max_length=cfg.model.max_length, packing=cfg.model.packing,
    )
    rows = with_reference_columns(tds, ref)

    (settings, *_) = stage_settings(cfg)
    args = make_dpo_config(settings, str(tmp_path / "checkpoints"), seed=cfg.seed, max_length=cfg.model.max_length)
    assert args.bf16 and args.gradient_checkpointing
    trainer = SeqDPOTrainer(
        model=peft_model, args=args, train_dataset=rows, processing_class=tok, loss=cfg.loss, packing=cfg.model.packing
    )
    result = trainer.train()
    assert peft_model.base_model.model.is_gradient_checkpointing
    assert result.global_step == 1 and np.isfinite(result.training_loss)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b), "the step must move the adapter (LoRA B starts at zero)"

    pairs = evaluate_stage(
        peft_model, {"a": rows}, stage=1, stage_objective="a", beta=cfg.beta, batch_size=cfg.eval.batch_size,
        tie_tolerance=cfg.eval.tie_tolerance, packing=cfg.model.packing,
    )
    assert len(pairs) == 4 and np.isfinite(pairs[["policy_chosen_logps", "margin"]].to_numpy()).all()
    assert (pairs.chosen_len.to_numpy() == np.asarray([len(c) for c in tds["chosen_ids"]])).all()
    assert pairs.margin.abs().max() > 0

    # The three layouts on the trained adapter, within bf16 rounding: each layout rounds its hidden
    # states along its own matmul shapes; up to 0.44 nat on a 28-nat sum (1.6%) was seen. That the masks
    # are right is checked exactly, in float64 and float32, by tests/test_logprobs.py.
    got = _layouts(peft_model, [tds[i] for i in range(len(tds))])
    for packing in ("pair", "shared_prompt"):
        for key in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(got[packing][key], got["padded"][key], rtol=0.02, atol=0.25, err_msg=packing)
        assert (got[packing]["chosen_len"] == got["padded"]["chosen_len"]).all()
    np.testing.assert_allclose(pairs.policy_chosen_logps.to_numpy(), got["padded"]["chosen_logps"], rtol=0.02, atol=0.25)
    # The CPU's own LM head (token tiles over the whole vocabulary) on the same hidden states: both round
    # the logits to bf16, each along its own matmul shape (TRL's in 32,768-wide vocabulary tiles), so
    # they agree within bf16 rounding too (up to 0.41 nat on a 28-nat sum was seen)
    monkeypatch.setattr(logprobs, "CHUNKED_LM_HEAD_ON_CPU", False)
    cpu_head = _layouts(peft_model, [tds[i] for i in range(len(tds))])
    for packing in got:
        for key in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(cpu_head[packing][key], got[packing][key], rtol=0.02, atol=0.25, err_msg=packing)

    peak = _peak_rss_gib()
    record_property("peak_rss_gib", round(peak, 2))
    print(f"8B-shape ({LAYERS} layers, bf16): peak RSS {peak:.2f} GiB; layouts max |diff| vs padded: "
          + ", ".join(f"{p} {np.abs(got[p]['chosen_logps'] - got['padded']['chosen_logps']).max():.3f}" for p in got))
    assert peak < 8.0
