"""Per-pair sequence log-probabilities: tokenisation, collation and the forward pass (the hot path).

Contract (docs/DESIGN.md, "Log-prob contract"):

* `tokenize_pairs(ds, tokenizer, max_length)` adds `prompt_ids`, `chosen_ids`, `rejected_ids` exactly as
  TRL 1.16 `DPOTrainer._prepare_dataset` does, drops pairs whose prompt alone fills `max_length` and
  applies TRL's collator truncation (keep_start) to the stored ids, so every later step sees the
  tokens that are actually scored. A pair whose truncation leaves chosen and rejected the same tokens
  is dropped too (TRL keeps it: a tie no step can move). `tokenize_pairs_counted` also says how many
  pairs each rule dropped or truncated.
* `PairCollator` (`seqdpo.packing`) lays a batch out in one of three layouts (`model.packing`):
  `shared_prompt` (each pair's prompt computed once, the default), `pair` (prompt + chosen and
  prompt + rejected packed padding-free) or `padded` (TRL's layout); all give the same log-probs.
* `sequence_logps(model, batch)` runs the decoder for hidden states and projects through the LM head
  only the positions whose next token is a completion token. On an accelerator in vocabulary tiles
  (`trl.kernels.ChunkedLogProbFunction`, the kernel TRL's own `fused_lm_head` uses): no
  `[tokens x vocab]` logits are materialised, in the forward or the backward. On the CPU in tiles of
  tokens whose fp32 logits are held for the backward (see `_token_logps`).
* `dataset_logps(model, ds, batch_size, desc)` is the no-grad pass over a dataset in length-sorted
  batches, returned in dataset row order.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seqdpo.packing import DEFAULT_PACKING, PairCollator, attention_mask_4d, pair_num_tokens

__all__ = ["PairCollator", "dataset_logps", "sequence_logps", "tokenize_pairs"]

_VOCAB_CHUNK = 32768  # vocabulary tile of the LM-head kernel (TRL's default)
_CPU_TILE_ELEMENTS = 2**26  # logits per token tile on the CPU: 256 MiB of fp32, 523 tokens of a 128k vocabulary
# TRL's chunked kernel on the CPU too: what an accelerator runs (tests/test_llama8b_shape.py sets it)
CHUNKED_LM_HEAD_ON_CPU = False


# --------------------------------------------------------------------------------------------------
# tokenisation


def _is_conversational(value) -> bool:
    return isinstance(value, list) and (len(value) == 0 or isinstance(value[0], dict))


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_row(row: dict, tokenizer, max_length: int | None) -> dict:
    if _is_conversational(row["prompt"]):
        prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        with_chosen = _chat_ids(tokenizer, row["prompt"] + row["chosen"])
        with_rejected = _chat_ids(tokenizer, row["prompt"] + row["rejected"])
    else:
        # TRL appends EOS to plain-text completions (conversational ones end with the template's own end token)
        eos = tokenizer.eos_token
        chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
        rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
        prompt = list(tokenizer(text=row["prompt"])["input_ids"])
        with_chosen = list(tokenizer(text=row["prompt"] + chosen)["input_ids"])
        with_rejected = list(tokenizer(text=row["prompt"] + rejected)["input_ids"])
    # Like TRL: the completion starts where prompt and prompt+completion diverge (templates or BPE merges
    # can make the prompt alone tokenize differently)
    n_prompt = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
    chosen_ids = with_chosen[n_prompt:]
    rejected_ids = with_rejected[n_prompt:]
    full = len(chosen_ids) + len(rejected_ids)
    if max_length is not None:
        # TRL's collator keeps the first max_length tokens of prompt+completion (keep_start)
        room = max(max_length - n_prompt, 0)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if max_length is not None and n_prompt >= max_length:
        fate = "prompt_too_long"
    elif chosen_ids == rejected_ids:
        fate = "truncated_to_identical" if len(chosen_ids) + len(rejected_ids) < full else "identical_tokens"
    else:
        fate = ""
    return {
        "prompt_ids": prompt[:n_prompt],
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        _LOST: full - len(chosen_ids) - len(rejected_ids),
        _FATE: fate,
    }


_LOST, _FATE = "_tokens_lost", "_drop_reason"  # bookkeeping columns, removed before tokenize_pairs returns
TOKEN_DROP_REASONS = ("prompt_too_long", "truncated_to_identical", "identical_tokens")


def tokenize_pairs_counted(ds, tokenizer, max_length: int | None, num_proc: int | None = None):
    """`tokenize_pairs` and what it did: (tokenized rows, counts).

    counts: `dropped_<reason>` per reason of TOKEN_DROP_REASONS (prompt alone `max_length` tokens or more;
    truncation left chosen == rejected; chosen == rejected tokens without truncation), `truncated` (kept
    pairs that lost completion tokens) and `tokens_lost` (completion tokens they lost, chosen + rejected).
    """
    out = ds.map(
        _tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        num_proc=num_proc,
        desc="Tokenizing pairs",
    )
    fate, lost = np.asarray(out[_FATE], dtype=object), np.asarray(out[_LOST], dtype=np.int64)
    keep = fate == ""
    counts = {f"dropped_{r}": int((fate == r).sum()) for r in TOKEN_DROP_REASONS}
    counts.update(truncated=int((lost[keep] > 0).sum()), tokens_lost=int(lost[keep].sum()))
    if not keep.all():
        out = out.select(np.flatnonzero(keep))
    return out.remove_columns([_LOST, _FATE]), counts


def tokenize_pairs(ds, tokenizer, max_length: int | None, num_proc: int | None = None):
    """Adds `prompt_ids`, `chosen_ids`, `rejected_ids` (TRL 1.16 tokenisation + keep_start truncation).

    Rows whose prompt alone has `max_length` tokens or more are dropped, as TRL does, and so are rows
    whose chosen and rejected tokens are the same (after truncation); every other column (`pair_id`
    included) is kept.
    """
    return tokenize_pairs_counted(ds, tokenizer, max_length, num_proc)[0]


# --------------------------------------------------------------------------------------------------
# forward


def _unwrap(model):
    """(causal LM with any LoRA layers injected, its decoder). PEFT injects LoRA in place, so the decoder
    of the base model runs the adapter too, and `disable_adapter()` on the PeftModel still applies."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    decoder = model.base_model if hasattr(model, "base_model") else model.model
    return model, decoder


def _logit_scale(config) -> float:
    # same lookup as TRL's fused LM head, for the model families that scale logits
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, name, None) is not None:
            return float(getattr(cfg, name))
    if getattr(cfg, "logits_scaling", None) is not None:
        return float(cfg.logits_scaling) if cfg.model_type == "hyperclovax" else 1.0 / float(cfg.logits_scaling)
    return 1.0


def _token_logps(causal_lm, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from trl.kernels import ChunkedLogProbFunction

    head = causal_lm.get_output_embeddings()
    cfg = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    softcap, scale = getattr(cfg, "final_logit_softcapping", None), _logit_scale(causal_lm.config)
    if isinstance(head, torch.nn.Linear) and (head.weight.device.type != "cpu" or CHUNKED_LM_HEAD_ON_CPU):
        logps, *_ = ChunkedLogProbFunction.apply(
            hidden.to(head.weight.device), head.weight, head.bias, targets.to(head.weight.device),
            1.0, _VOCAB_CHUNK, softcap, scale, (),
        )
        return logps
    # On the CPU TRL's kernel runs its torch fallback, which recomputes each logits tile in the backward
    # and makes about fifteen passes over it: 2.2x the time of this on the bench's small shape, where the
    # LM head is a third of a training step. Memory is the cheaper resource there, so each tile of tokens
    # keeps its fp32 log-softmax for the backward (tokens x vocab x 4 bytes for the whole batch).
    # This path also serves an LM head that is not a plain Linear (e.g. wrapped by an adapter).
    out = []
    step = max(1, _CPU_TILE_ELEMENTS // cfg.vocab_size)
    for start in range(0, hidden.size(0), step):
        logits = head(hidden[start : start + step]).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        out.append(-F.cross_entropy(logits, targets[start : start + step], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model, batch: dict) -> dict[str, torch.Tensor]:
    """Sums of completion-token log-probs for chosen and rejected (shape [B]) and their token counts.

    Differentiable with respect to the trainable parameters of `model` (a causal LM, a PeftModel, or
    either wrapped in DistributedDataParallel).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # DDP all-reduces gradients only for work done inside its own forward: run ours there, as the
        # wrapped module's forward for this one call.
        inner = model.module
        own = inner.__dict__.get("forward")  # an instance-level forward (a patch) to put back afterwards
        inner.forward = lambda: _sequence_logps(inner, batch)
        try:
            return model()
        finally:
            if own is None:
                del inner.forward
            else:
                inner.forward = own
    return _sequence_logps(model, batch)


def _sequence_logps(model, batch: dict) -> dict[str, torch.Tensor]:
    causal_lm, decoder = _unwrap(model)
    device = next(decoder.parameters()).device
    input_ids = batch["input_ids"].to(device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if "pair_index" in batch:  # shared_prompt
        kwargs["position_ids"] = batch["position_ids"].to(device)
        kwargs["attention_mask"] = attention_mask_4d(
            batch["pair_index"].to(device),
            batch["branch"].to(device),
            causal_lm.config._attn_implementation,
            decoder.get_input_embeddings().weight.dtype,
        )
    elif "position_ids" in batch:
        # no attention_mask: transformers derives the block-causal mask from the position resets
        kwargs["position_ids"] = batch["position_ids"].to(device)
    else:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    hidden = decoder(**kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["score_pos"].to(device))
    per_token = _token_logps(causal_lm, hidden, batch["score_target"].to(device))
    n_seq = 2 * int(batch["num_pairs"])
    seq = batch["score_seq"].to(per_token.device)
    sums = torch.zeros(n_seq, device=per_token.device, dtype=torch.float32).index_add(0, seq, per_token.float())
    lens = torch.zeros(n_seq, device=seq.device, dtype=torch.long).index_add(0, seq, torch.ones_like(seq))
    b = n_seq // 2
    return {
        "chosen_logps": sums[:b],
        "rejected_logps": sums[b:],
        "chosen_len": lens[:b],
        "rejected_len": lens[b:],
    }


def length_sorted_batches(lengths, batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices grouped longest first into batches of at most `batch_size` pairs (and `max_tokens`
    packed tokens when given), so each forward holds similar lengths and memory peaks at the first."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, cur, cur_tokens = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and (len(cur) >= batch_size or (max_tokens is not None and cur_tokens + n > max_tokens)):
            batches.append(cur)
            cur, cur_tokens = [], 0
        cur.append(int(i))
        cur_tokens += n
    if cur:
        batches.append(cur)
    return batches


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def dataset_logps(
    model,
    ds_tokenized,
    batch_size: int,
    desc: str = "log-probs",
    *,
    max_tokens: int | None = None,
    packing: str = DEFAULT_PACKING,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """No-grad pass (eval mode: no dropout) over `ds_tokenized` in batch layout `packing`, results in
    dataset row order.

    Keys: chosen_logps, rejected_logps (float64), chosen_len, rejected_len (int64). The model is used as
    it stands: wrap the call in `peft_model.disable_adapter()` for the base model.
    """
    from tqdm.auto import tqdm

    collator = PairCollator(packing=packing)
    cols = ds_tokenized.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    rows = cols.to_dict()
    n = len(ds_tokenized)
    feats = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])
    ]
    lengths = [pair_num_tokens(f, packing) for f in feats]
    out = {
        "chosen_logps": np.zeros(n, dtype=np.float64),
        "rejected_logps": np.zeros(n, dtype=np.float64),
        "chosen_len": np.zeros(n, dtype=np.int64),
        "rejected_len": np.zeros(n, dtype=np.int64),
    }
    batches = length_sorted_batches(lengths, batch_size, max_tokens)
    with torch.no_grad(), _eval_mode(model):
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not show_progress, leave=False):
            res = sequence_logps(model, collator([feats[i] for i in idx]))
            for key in out:
                out[key][idx] = res[key].detach().cpu().numpy()
    return out
