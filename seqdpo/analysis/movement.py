"""Adapter movement: how far a stage moved the LoRA adapter, raw and in effective-weight space.

An adapter state is a dict normalized-name -> tensor holding lora_A ([r, in]) and lora_B ([out, r])
of every adapted module m. For two states phi, phi' of one stage (start, end):

    raw movement       ||phi' - phi||_2 over the flattened A and B of a module, and over all modules
    effective weight   W_m(phi) = s * B_m A_m, s = lora_alpha / r
    effective movement dW_m = W_m(phi') - W_m(phi);  ||dW_m||_F per module;
                       total = sqrt(sum_m ||dW_m||_F^2) (Frobenius norm of the whole update) and
                       sum_m ||dW_m||_F (the paper's sum over modules)
    cosine of two stages' movements  <d1, d2> / (||d1|| ||d2||) over flattened parameters (raw) or
                       sum_m <dW1_m, dW2_m>_F / (||dW1|| ||dW2||) (effective)

The raw parameters have a gauge freedom (B A = (B G)(G^-1 A)), so the effective numbers are the ones to
interpret. Effective quantities are computed from the factors without forming the [out, in] matrices:
<B A, B' A'>_F = sum((B^T B') * (A A'^T)), which stays cheap for an 8B model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seqdpo.analysis.gradients import group_sort_key, layer_of, module_type_of, normalize_key

# A low-rank matrix expression: sum of coef * B @ A terms.
LowRank = list[tuple[float, torch.Tensor, torch.Tensor]]


def state_from_model(model) -> dict[str, torch.Tensor]:
    """CPU float32 copy of the LoRA parameters of a PeftModel (the snapshot a stage boundary keeps)."""
    return {
        normalize_key(n): p.detach().float().cpu().clone()
        for n, p in model.named_parameters()
        if "lora_A" in n or "lora_B" in n
    }


def load_adapter_state(adapter_dir: str) -> dict[str, torch.Tensor]:
    """LoRA parameters of a save_pretrained directory (adapter_model.safetensors or .bin)."""
    import os

    st = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        raw = load_file(st)
    else:
        raw = torch.load(os.path.join(adapter_dir, "adapter_model.bin"), map_location="cpu", weights_only=True)
    return {normalize_key(k): v.float() for k, v in raw.items() if "lora_A" in k or "lora_B" in k}


def modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module prefix -> (A, B)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in k:
                out.setdefault(k.split(tag)[0], {})[part] = v
    missing = [m for m, d in out.items() if len(d) != 2]
    if missing:
        raise ValueError(f"modules without both lora_A and lora_B: {missing[:5]}")
    return {m: (d["lora_A"], d["lora_B"]) for m, d in sorted(out.items())}


def _lr_inner(x: LowRank, y: LowRank) -> float:
    total = 0.0
    for cx, Bx, Ax in x:
        for cy, By, Ay in y:
            total += cx * cy * float(((Bx.double().T @ By.double()) * (Ax.double() @ Ay.double().T)).sum())
    return total


def _scaling(scaling: float | dict[str, float], module: str) -> float:
    return float(scaling[module]) if isinstance(scaling, dict) else float(scaling)


def _delta_lowrank(before: dict, after: dict, m: str, s: float) -> LowRank:
    A1, B1 = after[m]
    A0, B0 = before[m]
    return [(s, B1, A1), (-s, B0, A0)]


def _grouped(per_module: dict[str, float], fn) -> dict[str, float]:
    """Square-root of summed squares per group: norms of the group's sub-update."""
    acc: dict[str, float] = {}
    for m, v in per_module.items():
        g = fn(m + ".lora_A")
        if g is not None:
            acc[g] = acc.get(g, 0.0) + v * v
    keys = sorted(acc, key=group_sort_key)
    return {g: math.sqrt(acc[g]) for g in keys}


def movement(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], scaling: float | dict[str, float]) -> dict[str, Any]:
    """Raw and effective movement from `before` to `after` (adapter states), per module and in total."""
    mb, ma = modules(before), modules(after)
    if set(mb) != set(ma):
        raise ValueError("adapter states cover different modules")
    raw, eff = {}, {}
    for m in mb:
        (A0, B0), (A1, B1) = mb[m], ma[m]
        raw[m] = math.sqrt(float(((A1 - A0).double() ** 2).sum() + ((B1 - B0).double() ** 2).sum()))
        d = _delta_lowrank(mb, ma, m, _scaling(scaling, m))
        eff[m] = math.sqrt(max(_lr_inner(d, d), 0.0))
    return {
        "raw_norm": math.sqrt(sum(v * v for v in raw.values())),
        "effective_norm": math.sqrt(sum(v * v for v in eff.values())),
        "effective_norm_sum": sum(eff.values()),
        "raw_per_module": raw,
        "effective_per_module": eff,
        "effective_per_layer": _grouped(eff, layer_of),
        "effective_per_module_type": _grouped(eff, module_type_of),
        "raw_per_module_type": _grouped(raw, module_type_of),
    }


def movement_cosine(
    s0: dict[str, torch.Tensor],
    s1: dict[str, torch.Tensor],
    s2: dict[str, torch.Tensor],
    scaling: float | dict[str, float],
    s2_start: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Cosine between the movements s0 -> s1 (an earlier stage) and s2_start -> s2 (a later one), raw and
    effective. s2_start defaults to s1: the later stage continued from the earlier one's adapter (under
    strategy=merge every stage starts from the initial adapter instead)."""
    m0, m1, m2 = modules(s0), modules(s1), modules(s2)
    m2_start = m1 if s2_start is None else modules(s2_start)
    dot = n1 = n2 = 0.0
    edot = en1 = en2 = 0.0
    per_type: dict[str, list[float]] = {}
    for m in m0:
        for i in range(2):
            d1 = (m1[m][i] - m0[m][i]).double().flatten()
            d2 = (m2[m][i] - m2_start[m][i]).double().flatten()
            dot += float(d1 @ d2)
            n1 += float(d1 @ d1)
            n2 += float(d2 @ d2)
        s = _scaling(scaling, m)
        e1, e2 = _delta_lowrank(m0, m1, m, s), _delta_lowrank(m2_start, m2, m, s)
        x, a, b = _lr_inner(e1, e2), _lr_inner(e1, e1), _lr_inner(e2, e2)
        edot, en1, en2 = edot + x, en1 + a, en2 + b
        t = module_type_of(m + ".lora_A")
        if t is not None:
            acc = per_type.setdefault(t, [0.0, 0.0, 0.0])
            acc[0] += x
            acc[1] += a
            acc[2] += b

    def cos(d, a, b):
        den = math.sqrt(max(a, 0.0)) * math.sqrt(max(b, 0.0))
        return d / den if den > 0 else float("nan")

    return {
        "raw_cosine": cos(dot, n1, n2),
        "effective_cosine": cos(edot, en1, en2),
        "effective_cosine_per_module_type": {t: cos(*per_type[t]) for t in sorted(per_type, key=group_sort_key)},
    }


def delta_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k] - before[k] for k in before}
