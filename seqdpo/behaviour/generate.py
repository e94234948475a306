"""Generation after a stage: K held-out prompts per objective, N samples each, batched with the KV cache.

    prompts = generation_prompts(...)[0][objective]           # [(prompt_id, messages)], seeded (prompts.py)
    table = generate(model, tok, prompts, settings, seed=s, objective=o)   # one DataFrame per objective

Columns of a generation table: objective, prompt_id, sample (-1 = greedy, 0..N-1 sampled), text,
n_tokens (generated tokens before the end token), finish_reason (eos | length: cut at max_new_tokens).

Sampling seeds depend on (seed, objective, batch), never on the stage: stage k and the base sample
with the same random numbers, so their paired difference is not inflated by sampling noise, and a
stage interrupted halfway regenerates exactly what it lost. The base model's tables are cached across
a sweep (`base_generations`), keyed like the reference log-probs.

Backends: transformers' `generate` (left padding, KV cache) everywhere; vLLM when
`eval.generation.backend` asks for it or is `auto` on a GPU with vLLM installed (an optional extra,
see `vllm_available`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd
import torch

from seqdpo.cachecounts import CacheCounts
from seqdpo.config import GenerationSettings
from seqdpo.refcache import atomic_write

log = logging.getLogger("seqdpo")
FORMAT_VERSION = 1
COLUMNS = ["objective", "prompt_id", "sample", "text", "n_tokens", "finish_reason"]

_counts = CacheCounts()


def base_generation_counts() -> dict[str, int]:
    """Base-model generation tables this process generated, and tables served from the cache."""
    return _counts.snapshot()


def reset_base_generation_counts() -> None:
    _counts.reset()


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("-".join(map(str, parts)).encode()).digest()[:4], "little")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def use_vllm(settings: GenerationSettings, model_name: str = "") -> bool:
    """vLLM when asked for, or on `auto` with a GPU, vLLM installed and a model vLLM can load (not the
    embedded tiny one, which lives only in memory)."""
    if settings.backend == "vllm":
        return True
    return settings.backend == "auto" and model_name != "tiny" and torch.cuda.is_available() and vllm_available()


class VLLMBackend:
    """Generation with vLLM: the base model by name, a stage's LoRA adapter from its directory.

    Called like `generate` (the in-memory model is not used); `adapter_dir` is set per stage (None = base).
    One engine per process, sized to leave the GPU to training (`gpu_memory_utilization`).
    """

    _engines: dict = {}

    def __init__(self, model_cfg, lora_rank: int, gpu_memory_utilization: float = 0.3):
        self.model_cfg, self.lora_rank, self.gpu = model_cfg, lora_rank, gpu_memory_utilization
        self.adapter_dir: Path | None = None
        self.adapter_id = 0

    def _engine(self):
        from vllm import LLM

        key = (self.model_cfg.name, self.model_cfg.revision, self.model_cfg.dtype)
        if key not in self._engines:
            self._engines[key] = LLM(model=self.model_cfg.name, revision=self.model_cfg.revision, dtype=self.model_cfg.dtype,
                                     enable_lora=True, max_lora_rank=self.lora_rank, gpu_memory_utilization=self.gpu)
        return self._engines[key]

    def __call__(self, model, tok, prompts, settings: GenerationSettings, *, seed: int, objective: str) -> pd.DataFrame:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        rows = _rows(prompts, settings)
        lora = None if self.adapter_dir is None else LoRARequest(f"stage-{self.adapter_id}", self.adapter_id, str(self.adapter_dir))
        params = [
            SamplingParams(temperature=0.0 if s < 0 else settings.temperature, top_p=1.0 if s < 0 else settings.top_p,
                           min_p=0.0 if s < 0 else settings.min_p, max_tokens=settings.max_new_tokens,
                           seed=_seed(seed, objective, i))  # per row: a rerun regenerates the same responses
            for i, (_, _, s) in enumerate(rows)
        ]
        results = self._engine().chat([m for _, m, _ in rows], params, lora_request=lora, use_tqdm=False)
        out = {c: [] for c in COLUMNS}
        for (pid, _, s), res in zip(rows, results):
            res = res.outputs[0]
            for c, v in zip(COLUMNS, (objective, pid, s, res.text.strip(), len(res.token_ids),
                                      "length" if res.finish_reason == "length" else "eos")):
                out[c].append(v)
        return pd.DataFrame(out)


def _rows(prompts, settings: GenerationSettings) -> list[tuple[str, list[dict], int]]:
    rows = [(pid, msgs, -1) for pid, msgs in prompts] if settings.greedy else []
    return rows + [(pid, msgs, s) for pid, msgs in prompts for s in range(settings.samples)]


def generate(model, tok, prompts, settings: GenerationSettings, *, seed: int, objective: str) -> pd.DataFrame:
    """Responses of `model` as it stands (wrap in `disable_adapter()` for the base) to `prompts`."""
    rows = _rows(prompts, settings)
    out = {c: [] for c in COLUMNS}
    device = next(model.parameters()).device
    pad_side = tok.padding_side
    tok.padding_side = "left"  # generation continues the right end of every row
    was_training = model.training
    model.eval()
    try:
        for b, start in enumerate(range(0, len(rows), settings.batch_size)):
            batch = rows[start : start + settings.batch_size]
            greedy = [r for r in batch if r[2] < 0]
            sampled = [r for r in batch if r[2] >= 0]
            for part, sample in ((greedy, False), (sampled, True)):
                if not part:
                    continue
                texts, n_tokens, reasons = _generate_batch(
                    model, tok, [m for _, m, _ in part], settings, device, sample=sample, seed=_seed(seed, objective, b, sample)
                )
                for (pid, _, s), text, n, reason in zip(part, texts, n_tokens, reasons):
                    for c, v in zip(COLUMNS, (objective, pid, s, text, n, reason)):
                        out[c].append(v)
    finally:
        tok.padding_side = pad_side
        model.train(was_training)
    return pd.DataFrame(out)


def _generate_batch(model, tok, messages, settings: GenerationSettings, device, *, sample: bool, seed: int):
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    kwargs = {"do_sample": False}
    if sample:
        kwargs = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        if settings.min_p > 0:
            kwargs["min_p"] = settings.min_p
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        seqs = model.generate(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=settings.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            use_cache=True, **kwargs,
        )
    new = seqs[:, enc["input_ids"].shape[1] :].cpu()
    texts, n_tokens, reasons = [], [], []
    for row in new.tolist():
        ended = tok.eos_token_id in row
        row = row[: row.index(tok.eos_token_id)] if ended else row
        row = [t for t in row if t != tok.pad_token_id]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
        n_tokens.append(len(row))
        reasons.append("eos" if ended else "length")
    return texts, n_tokens, reasons


def generate_objectives(model, tok, prompts: dict, settings: GenerationSettings, *, seed: int, parts_dir: Path | None = None,
                        backend=None) -> pd.DataFrame:
    """Every objective's table, one after the other. With `parts_dir`, each finished objective is saved
    there and reused by a rerun: a stage stopped halfway keeps what it had generated. `backend`: a
    callable like `generate` (a `VLLMBackend`); None = transformers."""
    frames = []
    for objective, obj_prompts in prompts.items():
        part = parts_dir / f"{objective}.parquet" if parts_dir is not None else None
        if part is not None and part.exists():
            frames.append(pd.read_parquet(part))
            log.info("generations of %s reused from %s", objective, part)
            continue
        df = (backend or generate)(model, tok, obj_prompts, settings, seed=seed, objective=objective)
        if part is not None:
            write_parquet(part, df)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def generation_key(*, fingerprint: str, prompts: dict, settings: GenerationSettings, seed: int, model, backend: str) -> str:
    """Identity of the base model's generations: model, prompts, settings that shape a response, seed."""
    p = next(model.parameters())
    head = {
        "format": FORMAT_VERSION, "fingerprint": fingerprint, "seed": seed,
        "param_dtype": str(p.dtype), "device_type": p.device.type, "backend": backend,
        "settings": {k: getattr(settings, k) for k in ("samples", "greedy", "temperature", "top_p", "min_p", "max_new_tokens", "batch_size")},
        "prompts": {o: [[pid, m] for pid, m in ps] for o, ps in prompts.items()},
    }
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


def base_generations(model, tok, prompts: dict, settings: GenerationSettings, *, seed: int, fingerprint: str,
                     cache_dir: str | os.PathLike, parts_dir: Path | None = None, backend=None) -> pd.DataFrame:
    """The base model's tables (adapter disabled), from `<cache_dir>/generations-<key>.parquet` or generated."""
    key = generation_key(fingerprint=fingerprint, prompts=prompts, settings=settings, seed=seed, model=model,
                         backend="transformers" if backend is None else "vllm")
    path = Path(cache_dir) / f"generations-{key}.parquet"
    if path.exists():
        try:
            df = pd.read_parquet(path)
            _counts.add("cached")
            return df
        except (OSError, ValueError) as e:  # a truncated file is a miss
            log.warning("generation cache: unreadable %s (%r), generating again", path, e)
    ctx = model.disable_adapter() if hasattr(model, "peft_config") else torch.no_grad()
    with ctx:
        df = generate_objectives(model, tok, prompts, settings, seed=seed, parts_dir=parts_dir, backend=backend)
    write_parquet(path, df)
    _counts.add("computed")
    return df
