"""SFT warm start of the embedded tiny model on responses of the synthetic world's format.

The tiny model starts from random weights, so what it samples is noise and no scorer can read an
attribute from it. A short supervised pass on prompts naming a topic (the training template and
`WARM_START_TEMPLATES`) -> `<topic> : w1 ... wn .` responses, each attribute present in half of
them independently, gives a base model that generates well-formed responses carrying about half of each attribute: DPO stages then have rates to move.

The pass is deterministic (its own seeds) and runs once: the weights are cached under
`<cache_dir>/warmstart-<key>.safetensors`, keyed like the reference cache on the model fingerprint
*before* the warm start plus the settings below. `model_fingerprint` covers `model.tiny.warm_start*`,
so the reference cache, the generation cache and the job signature all tell a warm-started base apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import torch

from seqdpo.data import synthetic as S
from seqdpo.logprobs import _chat_ids
from seqdpo.refcache import atomic_write

log = logging.getLogger("seqdpo")

FORMAT_VERSION = 2  # bump when the data or the training loop changes
# Prompts of the warm start besides the training template: trained on that template alone, the base opened
# with `<topic> :` on 12.5% of the held-out eval prompts. These are a third set, disjoint from
# `EVAL_TEMPLATES` (held-out prompts must stay unseen), of words that are single tokens of the tiny tokenizer
# and no marker, plain or unseen word, so the base learns the format on any prompt that names a topic.
WARM_START_TEMPLATES = [
    "tell me of {topic} .",
    "is {topic} a simple thing ?",
    "tell me a short thing about {topic} .",
    "tell me about {topic} for people .",
    "is {topic} a thing at home ?",
    "tell me about the {topic} that people know .",
    "is {topic} a thing for people ?",
    "tell me of the {topic} at home .",
    "is the {topic} a short thing ?",
    "tell me a thing that people know about {topic} .",
]
BATCH_SIZE = 32
SEED = 0


def warm_start_examples(n: int, seed: int = SEED) -> list[tuple[list[dict], list[dict]]]:
    """(prompt, response) messages in the synthetic world's format, each attribute present with p = 1/2."""
    rng = random.Random(f"warm-start-{seed}")
    opts = S.DEFAULTS
    out = []
    for _ in range(n):
        topic = rng.choice(S.TOPICS)
        attrs = {a: int(rng.random() < 0.5) for a in S.ATTRIBUTE_OBJECTIVES}
        text = S.response(rng, topic, rng.randint(*S.FILLER_WORDS), attrs, opts["markers"], opts["slot"])
        template = rng.choice([S.TRAIN_TEMPLATE, *WARM_START_TEMPLATES])
        out.append(([{"role": "user", "content": template.format(topic=topic)}], [{"role": "assistant", "content": text}]))
    return out


def _batch(tok, examples) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the response tokens only (the prompt is given, not learned)."""
    seqs, starts = [], []
    for prompt, response in examples:
        p = _chat_ids(tok, prompt, add_generation_prompt=True)
        ids = _chat_ids(tok, prompt + response)
        seqs.append(ids)
        starts.append(len(p))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (ids, s) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, s : len(ids)] = torch.tensor(ids[s:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_warm_start(model, tok, *, steps: int, lr: float) -> list[float]:
    """The supervised pass, in place; returns the loss of every step."""
    examples = warm_start_examples(steps * BATCH_SIZE)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    losses = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for step in range(steps):
            batch = {k: v.to(device) for k, v in _batch(tok, examples[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]).items()}
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    return losses


def warm_start_key(fingerprint: str, steps: int, lr: float, param_dtype: str, device_type: str) -> str:
    head = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "steps": steps, "lr": lr, "batch": BATCH_SIZE,
            "seed": SEED, "param_dtype": param_dtype, "device_type": device_type}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


def apply_warm_start(model, tok, *, fingerprint: str, steps: int, lr: float, cache_dir: str | os.PathLike) -> bool:
    """Loads the cached warm-started weights into `model`, or trains and caches them. True when trained."""
    from safetensors.torch import load_file, save

    p = next(model.parameters())
    key = warm_start_key(fingerprint, steps, lr, str(p.dtype).replace("torch.", ""), p.device.type)
    path = Path(cache_dir) / f"warmstart-{key}.safetensors"
    if path.exists():
        try:
            model.load_state_dict(load_file(str(path), device=str(p.device)))
            log.info("warm start: weights from %s", path)
            return False
        except (OSError, RuntimeError, ValueError) as e:  # a truncated file is a miss, as in the reference cache
            log.warning("warm start: unreadable cache file %s (%r), training again", path, e)
    losses = train_warm_start(model, tok, steps=steps, lr=lr)
    log.info("warm start: %d steps, loss %.3f -> %.3f, saved to %s", steps, losses[0], losses[-1], path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(state)))
    return True
