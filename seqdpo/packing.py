"""How the preference pairs of a batch are laid out for one forward pass (`model.packing`).

Three layouts, one collator (`PairCollator`); all give the same per-pair log-probs, up to the
rounding of a different summation order (tests/test_logprobs.py checks them against TRL 1.16):

* `shared_prompt` (default): one row (one per pair when all pairs of the batch have the same length,
  as `pair` does for equal sequences); each pair is prompt + chosen + rejected, so the prompt is
  computed once per pair (P + C + R tokens instead of 2P + C + R). Chosen sees the prompt and
  itself; rejected sees the prompt and itself, never chosen, and its positions continue from the
  prompt's end as if it followed the prompt directly. The mask is block-causal within a pair minus
  the rejected-to-chosen block; `attention_mask_4d` builds it on the model's device from two
  per-token tensors (`pair_index`, `branch`), so the batch stays O(tokens). The prompt's last
  position scores both chosen's and rejected's first token. transformers 5.23 passes a 4D mask
  through as it is (SDPA: boolean, eager: additive); it would also take a flex-attention BlockMask,
  which could skip the blocks between pairs on a GPU, but that path is not built (no GPU to test it
  on, and flex attention on CPU needs torch.compile).
* `pair`: one row; the 2B sequences prompt + chosen, prompt + rejected (chosen 0..B-1, then
  rejected 0..B-1: TRL's order) concatenated with per-sequence `position_ids`; transformers derives
  the block-causal mask from the position resets (`masking_utils.find_packed_sequence_indices`).
  When all 2B sequences have the same length this is the rectangle of `padded` without padding.
* `padded`: TRL's layout, 2B right-padded rows with a 2D `attention_mask`.

Which hidden state scores which token is explicit in every layout, as three flat tensors:
`score_pos` (index into the flattened [rows x width] token grid), `score_target` (the token it
scores) and `score_seq` (0..B-1 chosen, B..2B-1 rejected). A position scores the next token of its
own sequence only, so nothing is scored across pairs or across chosen and rejected.

Batch keys: `input_ids`, `score_pos`, `score_target`, `score_seq`, `completion_mask` (TRL's meaning,
in the row's own layout), `num_pairs`, `ref_chosen_logps` / `ref_rejected_logps` when the rows carry
them; then `position_ids` (pair), `attention_mask` (padded), or `position_ids`, `pair_index` and
`branch` (shared_prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PACKINGS = ("shared_prompt", "pair", "padded")
DEFAULT_PACKING = "shared_prompt"
# attention implementations that take a custom 4D mask through `attention_mask` (flash kernels do not)
MASKED_ATTENTION = ("sdpa", "eager")
_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


def pair_num_tokens(row: dict, packing: str = DEFAULT_PACKING) -> int:
    """Tokens a pair costs in one forward of `packing` (the prompt counted once in shared_prompt)."""
    p, c, r = len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])
    return p + c + r if packing == "shared_prompt" else 2 * p + c + r


def _truncate(f: dict, max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    """TRL's keep_start truncation of prompt + completion, applied to chosen and rejected alike."""
    p, c, r = list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])
    if max_length is None:
        return p, c, r
    room = max(max_length - len(p), 0)
    return p[:max_length], c[:room], r[:room]


def _scores(where: list[int], ids: list[int], n_prompt: int, seq: int, out: list[list[int]]) -> None:
    """Appends (grid position, target, sequence) for each completion token of a sequence whose tokens
    `ids` sit at grid positions `where`: token k is scored by the hidden state of token k-1."""
    for k in range(max(n_prompt, 1), len(ids)):
        out[0].append(where[k - 1])
        out[1].append(ids[k])
        out[2].append(seq)


def _score_tensors(scores: list[list[int]]) -> dict[str, torch.Tensor]:
    return {
        key: torch.tensor(values, dtype=torch.long)
        for key, values in zip(("score_pos", "score_target", "score_seq"), scores)
    }


def _round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


@dataclass
class PairCollator:
    """Collates tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) in the layout `packing`.

    `max_length` truncates again (keep_start) for rows that were not tokenized with `tokenize_pairs` at
    this length; it is a no-op on rows that were. `pad_to_multiple_of` pads the row (or the width).
    """

    pad_token_id: int = 0
    max_length: int | None = None
    packing: str = DEFAULT_PACKING
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"packing '{self.packing}' is not one of {list(PACKINGS)}")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [_truncate(f, self.max_length) for f in features]
        if self.packing == "shared_prompt":
            out = self._shared_prompt(pairs)
        else:
            # chosen 0..B-1, then rejected 0..B-1 (TRL's order)
            seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
            # Equal lengths are already padding-free as a rectangle, and without a mask SDPA keeps its
            # causal flash kernel instead of a dense block mask over all 2B sequences
            same = len({len(p) + len(c) for p, c in seqs}) == 1 and not self.pad_to_multiple_of
            out = self._pair(seqs) if self.packing == "pair" and not same else self._padded(seqs)
        out["num_pairs"] = len(features)
        out["num_tokens"] = sum(len(p) + len(c) + len(r) for p, c, r in pairs)  # of the pairs, whatever the layout
        for key in _REF_KEYS:
            if key in features[0]:
                out[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return out

    def _row(self, ids: list[int], positions: list[int], comp: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        pad = _round_up(len(ids), self.pad_to_multiple_of) - len(ids)
        row = {
            "input_ids": torch.tensor([ids + [self.pad_token_id] * pad], dtype=torch.long),
            "position_ids": torch.tensor([positions + list(range(pad))], dtype=torch.long),
            "completion_mask": torch.tensor([comp + [0] * pad], dtype=torch.long),
        }
        return row, pad

    def _pair(self, seqs) -> dict[str, Any]:
        ids, positions, comp, scores = [], [], [], [[], [], []]
        for i, (p, c) in enumerate(seqs):
            seq = p + c
            _scores(list(range(len(ids), len(ids) + len(seq))), seq, len(p), i, scores)
            ids += seq
            positions += range(len(seq))
            comp += [0] * len(p) + [1] * len(c)
        out, _ = self._row(ids, positions, comp)
        return {**out, **_score_tensors(scores)}

    def _padded(self, seqs) -> dict[str, Any]:
        width = _round_up(max(len(p) + len(c) for p, c in seqs), self.pad_to_multiple_of)
        ids, attn, comp, scores = [], [], [], [[], [], []]
        for i, (p, c) in enumerate(seqs):
            seq, pad = p + c, width - len(p) - len(c)
            _scores(list(range(i * width, i * width + len(seq))), seq, len(p), i, scores)
            ids.append(seq + [self.pad_token_id] * pad)
            attn.append([1] * len(seq) + [0] * pad)
            comp.append([0] * len(p) + [1] * len(c) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(attn, dtype=torch.long),
            "completion_mask": torch.tensor(comp, dtype=torch.long),
            **_score_tensors(scores),
        }

    def _shared_prompt(self, pairs) -> dict[str, Any]:
        b = len(pairs)
        ids, positions, comp, pair_index, branch, scores = [], [], [], [], [], [[], [], []]
        for i, (p, c, r) in enumerate(pairs):
            start = len(ids)
            prompt_at = list(range(start, start + len(p)))
            chosen_at = list(range(start + len(p), start + len(p) + len(c)))
            rejected_at = list(range(start + len(p) + len(c), start + len(p) + len(c) + len(r)))
            _scores(prompt_at + chosen_at, p + c, len(p), i, scores)
            _scores(prompt_at + rejected_at, p + r, len(p), b + i, scores)
            ids += p + c + r
            positions += [*range(len(p) + len(c)), *range(len(p), len(p) + len(r))]
            comp += [0] * len(p) + [1] * (len(c) + len(r))
            pair_index += [i] * (len(p) + len(c) + len(r))
            branch += [_PROMPT] * len(p) + [_CHOSEN] * len(c) + [_REJECTED] * len(r)
        out, pad = self._row(ids, positions, comp)
        out["pair_index"] = torch.tensor([pair_index + [b] * pad], dtype=torch.long)
        out["branch"] = torch.tensor([branch + [_PAD] * pad], dtype=torch.long)
        if len({len(p) + len(c) + len(r) for p, c, r in pairs}) == 1 and not pad:
            # Pairs of one length: one row each (the same grid positions, so the scores hold), and
            # attention costs B L^2 instead of (B L)^2 in the dense mask
            out = {k: v.view(b, -1) for k, v in out.items()}
        return {**out, **_score_tensors(scores)}


def attention_mask_4d(pair_index: torch.Tensor, branch: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """[rows, 1, T, T] mask of the shared_prompt layout: causal within a pair, rejected never sees chosen.

    Boolean (True = attend) for SDPA, additive float for eager attention. Row order is causal order:
    prompt, chosen, rejected, so "key at or before query" already keeps chosen out of the prompt.
    """
    if attn_implementation not in MASKED_ATTENTION:
        raise ValueError(
            f"model.packing=shared_prompt needs an attention implementation that takes a custom mask "
            f"({list(MASKED_ATTENTION)}), not '{attn_implementation}'; use model.packing=pair"
        )
    q_pair, k_pair = pair_index[:, :, None], pair_index[:, None, :]
    q_branch, k_branch = branch[:, :, None], branch[:, None, :]
    n = pair_index.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=pair_index.device).tril()
    allowed = causal & (q_pair == k_pair) & ~((q_branch == _REJECTED) & (k_branch == _CHOSEN))
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
