"""Anchoring to the previous stage: from stage 2 on, the training loss adds strength x a distance of
the adapter from its state theta0 after the previous stage (`strategy.penalty`):

- `l2`: sum over adapted modules m of ||s_m (B_m A_m - B0_m A0_m)||_F^2, the squared Frobenius norm of
  the change of the effective weight update (the gauge-free quantity; seqdpo.analysis.movement).
  Computed from the factors, <B A, B' A'>_F = sum((B^T B') * (A A'^T)), without forming W.
- `ewc`: sum_i F_i (theta_i - theta0_i)^2 over the LoRA parameters (elastic weight consolidation,
  Kirkpatrick et al. 2017). F is the diagonal empirical Fisher of the previous stage's loss: the mean
  squared per-pair gradient over `fisher_pairs` pairs of the previous stage's training set (seeded
  draw; dropout off), at theta0, divided by its mean so `strength` has the same scale on any model.
  It is saved as stage_<k>/anchor_fisher.safetensors and reused by a resumed stage.

At strength 0 no penalty is built: the job is `sequential` bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seqdpo.config import RunConfig

FISHER_FILE = "anchor_fisher.safetensors"


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [
        (m.lora_A["default"].weight, m.lora_B["default"].weight, float(m.scaling["default"]))
        for m in model.modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    ]


def _inner(B1, A1, B2, A2):
    return ((B1.T @ B2) * (A1 @ A2.T)).sum()


class L2Anchor:
    """strength * sum_m ||s_m (B_m A_m - B0_m A0_m)||_F^2."""

    def __init__(self, model, strength: float):
        self.strength = strength
        self.modules = [(A, B, s, A.detach().clone(), B.detach().clone()) for A, B, s in _lora_modules(model)]

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for A, B, s, A0, B0 in self.modules:
            A0, B0 = A0.to(A), B0.to(B)
            total = total + s * s * (_inner(B, A, B, A) - 2 * _inner(B, A, B0, A0) + _inner(B0, A0, B0, A0))
        return self.strength * total


class EWCAnchor:
    """strength * sum_i F_i (theta_i - theta0_i)^2 over the LoRA parameters."""

    def __init__(self, model, strength: float, fisher: dict[str, torch.Tensor]):
        self.strength = strength
        self.terms = [(p, p.detach().clone(), fisher[n].to(p)) for n, p in _lora_parameters(model)]

    def __call__(self) -> torch.Tensor:
        return self.strength * sum((f * (p - p0) ** 2).sum() for p, p0, f in self.terms)


def _lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]


def diagonal_fisher(trainer, rows, n_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Mean squared per-pair gradient of the trainer's loss over a seeded draw of `rows`, normalised to mean 1."""
    model = trainer.model
    params = _lora_parameters(trainer.accelerator.unwrap_model(model))
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=min(n_pairs, len(rows)), replace=False))
    acc = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    was_training = model.training
    model.eval()  # dropout off: the Fisher is a function of theta0 only
    try:
        for i in pick:
            with torch.enable_grad():
                grads = torch.autograd.grad(trainer.batch_loss([rows[int(i)]]), [p for _, p in params])
            for a, g in zip(acc, grads):
                a += g.detach().float() ** 2
    finally:
        model.train(was_training)
    mean = sum(float(a.sum()) for a in acc) / sum(a.numel() for a in acc)
    if not mean > 0:
        raise ValueError("the EWC Fisher is zero: the previous stage's loss has no gradient at its end")
    return {n: (a / mean).cpu() for (n, _), a in zip(params, acc)}


def build_penalty(cfg: RunConfig, trainer, rows, stage_dir: Path, main_process: bool):
    """The penalty of a stage that starts now from the previous stage's adapter (the anchor)."""
    s = cfg.strategy
    model = trainer.accelerator.unwrap_model(trainer.model)
    if s.penalty == "l2":
        return L2Anchor(model, s.strength)
    from safetensors.torch import load_file, save_file

    from seqdpo.filemodes import follow_umask

    path = Path(stage_dir) / FISHER_FILE
    if "ref_chosen_logps" not in rows.column_names:  # reference=previous: what the previous stage trained with
        from seqdpo.refcache import with_reference_columns

        k = int(Path(stage_dir).name.split("_")[1])
        rows = with_reference_columns(rows, dict(np.load(Path(stage_dir).parent / f"stage_{k - 1}" / "train_reference.npz")))
    if path.exists():
        fisher = load_file(str(path))
    else:
        fisher = diagonal_fisher(trainer, rows, s.fisher_pairs, seed=cfg.seed)
        if main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in fisher.items()}, str(path))
            follow_umask(path)  # safetensors writes 0600
    return EWCAnchor(model, s.strength, fisher)
