"""Merging per-objective adapters on their weight changes (task vectors).

Each stage trains its own adapter from the job's initial adapter (adapter_init: PEFT draws A at random
and sets B = 0, so the adapters share A's init and start from a zero weight change). Stage i's task
vector on a module is its weight change dW_i = s B_i A_i (s the LoRA scaling); combining the factors A_i
and B_i separately instead would multiply the shared random A's into the product (a "linear" merge of
two adapters then has about the size of their sum, not of their average). The `merged` row is the base
plus a combination of the dW_i (`strategy.method`) with weights w (`strategy.weights`):

- `linear`: sum_i w_i dW_i (task arithmetic, Ilharco et al. 2023). Rewarded soups (Rame et al. 2023)
  interpolate the fine-tuned weights, theta = sum_i w_i theta_i with sum_i w_i = 1; for adapters trained
  from one base that is this sum. Held exactly, at rank sum_i r_i, by concatenating the factors (PEFT's
  `cat`).
- `ties`: each dW_i keeps its `density` largest-magnitude entries, a sign is elected per entry, and the
  weighted entries that agree with it are averaged (TIES-merging, Yadav et al. 2023).
- `dare_linear` / `dare_ties`: each dW_i drops entries at random with probability 1 - density and
  rescales the rest by 1 / density, then linear / TIES (DARE, Yu et al. 2024); the draw is seeded with
  the run seed.
  These three are PEFT's `ties_svd` / `dare_linear_svd` / `dare_ties_svd`: peft.utils.merge_utils on the
  dense dW_i, then the SVD truncated to rank sum_i r_i. The result is dense, so the truncation can lose
  some of it (nothing when sum_i r_i >= the module's smaller dimension).

Weights (null = equal): 1/n for linear and dare_linear, so the merge is the average of the weight
changes; 1 for ties and dare_ties, whose disjoint mean already averages (the TIES paper's lambda = 1), so
two identical adapters merge into that adapter (with density 1; else into its trimmed version).

The merged adapter replaces the job's `default` adapter (rank sum_i r_i, alpha = rank so its scaling is
1), so it is saved and evaluated like any stage's. The stage records `rank` and `reconstruction_error` =
sqrt(sum over modules ||dW - stored||_F^2 / sum over modules ||dW||_F^2), dW the intended combination.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from seqdpo.config import StrategyConfig

DEFAULT = "default"
PLACEHOLDER = "seqdpo_merge_placeholder"
AVERAGING = ("linear", "dare_linear")  # equal weights are 1/n; the other methods average by themselves


def merge_weights(strategy: StrategyConfig, n_adapters: int) -> list[float]:
    if strategy.weights is not None:
        return list(strategy.weights)
    return [1.0 / n_adapters if strategy.method in AVERAGING else 1.0] * n_adapters


def combine(deltas: list[torch.Tensor], weights: list[float], method: str, density: float) -> torch.Tensor:
    """The merged weight change of one module from its task vectors (dense; module docstring)."""
    from peft.utils import merge_utils as MU

    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    if method == "linear":
        return MU.task_arithmetic(deltas, w)
    if method == "ties":
        return MU.ties(deltas, w, density)
    if method == "dare_linear":
        return MU.dare_linear(deltas, w, density)
    return MU.dare_ties(deltas, w, density)  # config.MERGE_METHODS: the last one


def _factors(factors: list[tuple[float, torch.Tensor, torch.Tensor]], scaling: float, method: str, density: float,
             rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, dW) with B A the stored merge at `rank` and dW the intended one."""
    weights = [w for w, _, _ in factors]
    deltas = [scaling * (b @ a) for _, a, b in factors]
    target = combine(deltas, weights, method, density)
    if method == "linear":  # exact: [w_1 s B_1, ..., w_n s B_n] [A_1; ...; A_n] = sum_i w_i dW_i
        return torch.cat([a for _, a, _ in factors]), torch.cat([w * scaling * b for w, _, b in factors], dim=1), target
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    A, B = torch.zeros(rank, target.shape[1]).to(target), torch.zeros(target.shape[0], rank).to(target)
    k = min(rank, S.numel())
    A[:k], B[:, :k] = Vh[:k], U[:, :k] * S[:k]
    return A, B, target


def merge_into_default(peft_model, adapter_dirs: list[Path], init_dir: Path, strategy: StrategyConfig, seed: int) -> dict:
    """Writes the merge of the adapters in `adapter_dirs` (trained from `init_dir`) into the model's `default`
    adapter; returns the stage's record (rank, reconstruction_error)."""
    from peft import load_peft_weights
    from peft.tuners.lora import LoraLayer

    device = str(next(peft_model.parameters()).device)
    init = load_peft_weights(str(init_dir), device=device)
    singles = [load_peft_weights(str(d), device=device) for d in adapter_dirs]
    weights = merge_weights(strategy, len(singles))
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and DEFAULT in m.lora_A}
    rank = max(sum(int(s[f"{n}.lora_A.weight"].shape[0]) for s in singles) for n in layers)
    merged, err, size = {}, 0.0, 0.0
    with torch.random.fork_rng(devices=[]):  # DARE draws from the global RNG: seeded here, restored after
        torch.manual_seed(seed)
        for name, layer in layers.items():
            if init[f"{name}.lora_B.weight"].any():
                raise ValueError(f"{init_dir}: lora_B of {name} is not zero at init, so s B A is not the weight change "
                                 "the adapter trained; merging needs PEFT's default init (B = 0)")
            factors = [(w, s[f"{name}.lora_A.weight"].float(), s[f"{name}.lora_B.weight"].float()) for w, s in zip(weights, singles)]
            A, B, target = _factors(factors, float(layer.scaling[DEFAULT]), strategy.method, strategy.density, rank)
            merged[name] = (A, B)
            err += float(((B @ A - target) ** 2).sum())
            size += float((target ** 2).sum())
    _replace_default(peft_model, rank)
    with torch.no_grad():
        for name, m in peft_model.named_modules():
            if name in merged:
                m.lora_A[DEFAULT].weight.copy_(merged[name][0])
                m.lora_B[DEFAULT].weight.copy_(merged[name][1])
    return {"rank": rank, "reconstruction_error": (err / size) ** 0.5 if size > 0 else 0.0}


def _replace_default(peft_model, rank: int) -> None:
    """A fresh `default` adapter of rank `rank` and scaling 1 in place of the trained one."""
    config = replace(peft_model.peft_config[DEFAULT], r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    peft_model.add_adapter(PLACEHOLDER, config)  # PEFT keeps at least one adapter
    peft_model.set_adapter(PLACEHOLDER)
    peft_model.delete_adapter(DEFAULT)
    peft_model.add_adapter(DEFAULT, config)
    peft_model.set_adapter(DEFAULT)
    peft_model.delete_adapter(PLACEHOLDER)
