"""Anchoring to every earlier stage: from stage 2 on, the training loss of stage k adds

    strength * sum_{j<k} decay^(k-1-j) * sum_i F_ji (theta_i - theta_ji)^2

over the LoRA factors theta (every A and B of the adapter), theta_j their state after stage j
(`strategy.penalty`):

- `l2`: F_j = 1, a pull toward each earlier stage's factors (L2-SP, Li et al. 2018, per stage);
- `ewc`: F_j is the diagonal empirical Fisher of stage j's loss at theta_j: the mean squared per-pair
  gradient over `fisher_pairs` pairs of stage j's training set (seeded draw; dropout off), divided by its
  mean (elastic weight consolidation, Kirkpatrick et al. 2017, one term per earlier task). It is computed
  when stage j + 1 starts from theta_j, saved as stage_<j+1>/anchor_fisher.safetensors (its raw mean in
  the file's metadata and in DONE as `fisher_mean`) and read back by every later stage and a resumed one.

`decay` < 1 fades old stages geometrically, as online EWC's gamma (Schwarz et al. 2018); 1 keeps every
earlier stage in full, so a 3-stage job still protects stage 1's objective in stage 3.

Both penalties live in the factor space, the space the optimizer moves in. The weight change dW = s B A
would be gauge-free (B A = (B G)(G^-1 A)), but a diagonal Fisher over dW is a dense tensor the size of every
adapted weight matrix (about 6e9 entries on Llama-3.1-8B with seven projections), which LoRA is there to
avoid. In one space, L2 is EWC with a flat Fisher; with the Fisher normalised to mean 1 both put the same
total weight on the factors, so one `strength` means the same pull under either penalty. In the usual EWC
form (lambda / 2) sum_i F_i (...)^2 with the raw Fisher, strength = lambda * fisher_mean / 2. The movement
diagnostics still report the effective (dW) movement (seqdpo.analysis.movement).

At strength 0 no penalty is built: the job is `sequential` bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from seqdpo.config import StrategyConfig
from seqdpo.filemodes import follow_umask
from seqdpo.refcache import with_reference_columns

log = logging.getLogger("seqdpo")
FISHER_FILE = "anchor_fisher.safetensors"


def _lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]


def _saved_key(name: str) -> str:
    return name.replace(".default.", ".")  # how save_pretrained names the parameter of the `default` adapter


class Anchor:
    """strength * sum_j c_j sum_i F_ji (theta_i - theta_ji)^2; terms = [(c_j, {name: theta_j}, {name: F_j} or None)]."""

    def __init__(self, model, strength: float, terms: list[tuple[float, dict, dict | None]], record: dict | None = None):
        self.strength = strength
        self.params = _lora_parameters(model)
        self.terms = [(c, [(p, theta[n].to(p), None if F is None else F[n].to(p)) for n, p in self.params]) for c, theta, F in terms]
        self.record = record or {}  # what the stage's DONE keeps of the anchor

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for c, rows in self.terms:
            total = total + c * sum(((p - p0) ** 2 if f is None else f * (p - p0) ** 2).sum() for p, p0, f in rows)
        return self.strength * total


def diagonal_fisher(trainer, rows, n_pairs: int, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """(mean squared per-pair gradient of the trainer's loss over a seeded draw of `rows`, normalised to
    mean 1; the mean it was divided by)."""
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
    return {n: (a / mean).cpu() for (n, _), a in zip(params, acc)}, mean


def _fisher_of_previous(trainer, rows, job_dir: Path, k: int, *, n_pairs: int, seed: int, main_process: bool) -> tuple[dict, float]:
    """F_{k-1} at the current parameters (theta_{k-1}), computed once and saved in stage_<k>/."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = job_dir / f"stage_{k}" / FISHER_FILE
    if path.exists():
        with safe_open(str(path), "pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}, float(f.metadata()["mean"])
    if "ref_chosen_logps" not in rows.column_names:  # reference=previous: what stage k-1 trained with
        rows = with_reference_columns(rows, dict(np.load(job_dir / f"stage_{k - 1}" / "train_reference.npz")))
    fisher, mean = diagonal_fisher(trainer, rows, n_pairs, seed=seed)
    if main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: v.contiguous() for n, v in fisher.items()}, str(path), metadata={"mean": repr(mean)})
        follow_umask(path)  # safetensors writes 0600
    return fisher, mean


def _saved_fisher(job_dir: Path, j: int) -> dict:
    from safetensors.torch import load_file

    path = job_dir / f"stage_{j + 1}" / FISHER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: stage {j}'s EWC Fisher, written when stage {j + 1} started, is missing; "
                                "delete the job directory to start over")
    return load_file(str(path))


def build_penalty(trainer, *, strategy: StrategyConfig, seed: int, earlier_sets: list, stage_dir: Path,
                  main_process: bool) -> Anchor:
    """The penalty of stage k = len(earlier_sets) + 1, which starts now from the adapter after stage k - 1.
    `seed` draws the pairs of the EWC Fisher."""
    from peft import load_peft_weights

    s = strategy
    job_dir, k = Path(stage_dir).parent, len(earlier_sets) + 1
    model = trainer.accelerator.unwrap_model(trainer.model)
    current = {n: p.detach().clone() for n, p in _lora_parameters(model)}
    thetas = {k - 1: current}
    for j in range(1, k - 1):
        saved = load_peft_weights(str(job_dir / f"stage_{j}" / "adapter"), device="cpu")
        thetas[j] = {n: saved[_saved_key(n)] for n in current}
    fishers, record = {j: None for j in thetas}, {}
    if s.penalty == "ewc":
        fishers[k - 1], mean = _fisher_of_previous(trainer, earlier_sets[-1], job_dir, k, n_pairs=s.fisher_pairs, seed=seed,
                                                   main_process=main_process)
        record["fisher_mean"] = mean
        for j in range(1, k - 1):
            fishers[j] = _saved_fisher(job_dir, j)
    terms = [(s.decay ** (k - 1 - j), thetas[j], fishers[j]) for j in range(1, k)]
    return Anchor(model, s.strength, terms, record)
