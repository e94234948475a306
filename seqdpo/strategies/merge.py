"""Merging per-objective adapters after training, with PEFT's `add_weighted_adapter`.

Each stage trains its own adapter from the base (adapter_init); the `merged` row combines them with
weights w (`strategy.weights`, default equal and summing to 1). Methods (`strategy.method`, PEFT's
`combination_type`), with task vectors tau_i taken separately on the LoRA A and B factors as PEFT does:

- `linear`: A = sum_i sqrt(w_i s) A_i, B = sum_i sqrt(w_i s) B_i (rewarded soups, Rame et al. 2023,
  interpolate weights the same way). At weights (1, 0, ...) the merged adapter is the first one.
- `ties`: trim each tau_i to its `density` largest entries, elect a sign per entry, average the agreeing
  entries (TIES-merging, Yadav et al. 2023).
- `dare_linear` / `dare_ties`: drop entries at random with probability 1 - density and rescale the rest
  by 1 / density, then linear / TIES (DARE, Yu et al. 2024). The draw is seeded with the run seed.

The merged factors are written into the job's `default` adapter (B rescaled by the ratio of the two
adapters' scalings, so B A is unchanged), so it is saved, reloaded and evaluated like any stage's adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seqdpo.config import StrategyConfig

DEFAULT = "default"
MERGED = "seqdpo_merged"


def merge_weights(strategy: StrategyConfig, n_adapters: int) -> list[float]:
    return list(strategy.weights) if strategy.weights is not None else [1.0 / n_adapters] * n_adapters


def merge_into_default(peft_model, adapter_dirs: list[Path], strategy: StrategyConfig, seed: int) -> None:
    from peft.tuners.lora import LoraLayer

    names = [f"seqdpo_single_{i}" for i in range(1, len(adapter_dirs) + 1)]
    for name, folder in zip(names, adapter_dirs):
        peft_model.load_adapter(str(folder), adapter_name=name)
    weights = merge_weights(strategy, len(names))
    density = None if strategy.method == "linear" else strategy.density
    with torch.random.fork_rng(devices=[]):  # DARE draws from the global RNG: seeded here, restored after
        torch.manual_seed(seed)
        peft_model.add_weighted_adapter(names, weights, MERGED, combination_type=strategy.method, density=density)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and MERGED in module.lora_A:
                ratio = module.scaling[MERGED] / module.scaling[DEFAULT]
                module.lora_A[DEFAULT].weight.copy_(module.lora_A[MERGED].weight)
                module.lora_B[DEFAULT].weight.copy_(module.lora_B[MERGED].weight * ratio)
    for name in [*names, MERGED]:
        peft_model.delete_adapter(name)
    peft_model.set_adapter(DEFAULT)
