"""Preference losses as pure per-pair tensor functions, and the `LOSSES` registry.

Every loss takes a `PairLogps` (sequence log-probs summed over completion tokens, shape [B]), the
`LossConfig` and beta, and returns a per-pair loss of shape [B]; `compute_loss` averages it over the
batch and sums the weighted components. The registry is the only list of loss names: config
validation, `conf/loss/`, `docs/losses.md` and the tests all read it.

Notation in the docstrings: pc, pr = policy log-prob of the chosen / rejected completion; rc, rr =
the reference's; lr+ = pc - rc, lr- = pr - rr (log-ratios); delta = lr+ - lr-; |y+|, |y-| = completion
token counts; sigma = logistic function; eps = label_smoothing.

TRL losses. The TRL 1.16 `loss_type` names are registered with TRL's exact formulas
(`DPOTrainer._compute_loss`, f_divergence_type="reverse_kl", no WPO weighting, ld_alpha=None);
`tests/test_losses.py` runs TRL's own `_compute_loss` on the same numbers to prove it. Two TRL
quirks are kept on purpose: `ipo` and `sigmoid_norm` divide log-ratios by the completion length, and
`sft` is one batch-level number (token-mean NLL of all chosen tokens in the batch), repeated per pair.
`aot` / `aot_unpaired` sort across the batch, so their entries are per quantile, not per pair; only
their mean is meaningful.

Seed-paper losses (not in TRL):
- `dpo`: plain sigmoid DPO (Rafailov et al. 2023); same function as TRL's `sigmoid`.
- `flex_dpo` (3D-properties paper, Yan et al. ICLR 2025, Sec. 3.3): separate beta for the chosen and
  rejected log-ratios, -log sigma(beta_pos lr+ - beta_neg lr-); beta_pos = the run's beta and
  beta_neg = beta_neg_ratio * beta_pos unless set.
- `sft_dpo` (3D-properties paper, Eq. 7): -log sigma(beta delta) - gamma * pc, where pc is the
  *sequence* log-prob (a sum over tokens). This is not TRL's `sigmoid`+`sft` (RPO): TRL's sft term is
  a token mean, so the same gamma weighs the NLL about |y+| times less there. The sequence sum is what
  keeps d loss / d pc = -gamma when pr -> -inf and the DPO term saturates (the paper's argument).
- `spo` (Stable Preference Optimization, Jian, Yang et al. 2025/2026): the paper's equation was not
  obtained, so we implement the value-function reading (a) of its bilevel problem
  (min L_DPO s.t. theta stays in the SFT feasible set): with L_SFT_i = -pc_i and the lower-level value
  estimated per example by the reference, v_i = -rc_i, the single-level penalty objective is

      loss_i = -log sigma(beta delta_i) + spo_lambda * max(0, rc_i - pc_i).

  The penalty is zero while the chosen completion is at least as likely as under the reference (the
  "safe region" pi(y+) >= pi_ref(y+), the paper's "absolute probability improvement of the preferred
  output") and grows linearly, in nats of sequence log-prob, below it. Default spo_lambda = 1.0: the
  paper gives no value; the DPO term's pull on pc is beta * sigma(-beta delta) <= beta (0.1-0.3 in our
  configs), so lambda = 1 > beta makes a violated constraint dominate the chosen's gradient, which is
  what a penalty standing in for a hard constraint should do. Sweep {0.1, 0.5, 1, 2, 5} to probe it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from seqdpo.config import ConfigError, LossConfig


@dataclass
class PairLogps:
    """Per-pair sequence log-probs (sums over completion tokens) and completion lengths, all shape [B]."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor


LossFn = Callable[[PairLogps, LossConfig, float], Tensor]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    description: str  # one line: the formula in the module's notation
    paper: str
    params: tuple[str, ...] = ()  # LossConfig fields the loss reads (besides beta)
    trl_name: str | None = None  # the TRL 1.16 loss_type computing the same value, if any


def _logratios(lp: PairLogps) -> tuple[Tensor, Tensor]:
    return lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected


def _delta(lp: PairLogps) -> Tensor:
    chosen, rejected = _logratios(lp)
    return chosen - rejected


def sigmoid(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigma(beta * delta)."""
    return -F.logsigmoid(beta * _delta(lp))


def hinge(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023): relu(1 - beta * delta)."""
    return torch.relu(1 - beta * _delta(lp))


def _len_normalised_delta(lp: PairLogps) -> Tensor:
    chosen, rejected = _logratios(lp)
    return chosen / lp.chosen_len.clamp(min=1.0) - rejected / lp.rejected_len.clamp(min=1.0)


def ipo(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17) as TRL: (lr+/|y+| - lr-/|y-| - 1/(2 beta))^2, per-token log-ratios."""
    return (_len_normalised_delta(lp) - 1 / (2 * beta)) ** 2


def exo_pair(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q || p), q = (sigma(beta delta), sigma(-beta delta)), p = (1-eps, eps)."""
    z = beta * _delta(lp)
    eps = cfg.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """NCA (Chen et al. 2024): -log sigma(beta lr+) - 0.5 log sigma(-beta lr+) - 0.5 log sigma(-beta lr-)."""
    chosen, rejected = _logratios(lp)
    return -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)


def robust(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): [-(1-eps) log sigma(z) + eps log sigma(-z)] / (1-2 eps), z = beta delta."""
    z = beta * _delta(lp)
    eps = cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def bco_pair(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """BCO, paired form without the reward shift (Jung et al. 2024): -log sigma(beta lr+) - log sigma(-beta lr-)."""
    chosen, rejected = _logratios(lp)
    return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)


def sppo_hard(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7): (lr+ - 1/(2beta))^2 + (lr- + 1/(2beta))^2."""
    chosen, rejected = _logratios(lp)
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def aot(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """AOT paired (Melnyk et al. 2024): smoothed sigmoid of beta (sort(pc - pr) - sort(rc - rr)), per batch quantile."""
    policy = torch.sort(lp.policy_chosen - lp.policy_rejected, dim=0).values
    ref = torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0).values
    return _smoothed_sigmoid(beta * (policy - ref), cfg.label_smoothing)


def aot_unpaired(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """AOT unpaired (Melnyk et al. 2024): smoothed sigmoid of beta (sort(lr+) - sort(lr-)), per batch quantile."""
    chosen, rejected = _logratios(lp)
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return _smoothed_sigmoid(beta * delta, cfg.label_smoothing)


def apo_zero(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 - sigma(beta lr+) + sigma(beta lr-)."""
    chosen, rejected = _logratios(lp)
    return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


def apo_down(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): sigma(beta lr+) + 1 - sigma(beta (lr+ - lr-))."""
    chosen, rejected = _logratios(lp)
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))


def discopop(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """DiscoPOP (Chan Lu et al. 2024, Eq. 5): z = beta delta, m = sigma(z/tau); (1-m)(-log sigma(z)) + m exp(-z)."""
    z = beta * _delta(lp)
    m = torch.sigmoid(z / cfg.discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


def sft(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """TRL's `sft`: token-mean NLL of all chosen tokens in the batch, -sum_i pc_i / sum_i |y+_i|, repeated per pair.

    Reference free; RPO (Pang et al. 2024) is `components: [dpo, sft]`. Differs from `sft_dpo`'s sequence NLL.
    """
    value = -lp.policy_chosen.sum() / lp.chosen_len.sum().clamp(min=1.0)
    return value.expand_as(lp.policy_chosen)


def sigmoid_norm(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """TRL's length-normalised DPO (SimPO-like but with a reference): -log sigma(beta (lr+/|y+| - lr-/|y-|))."""
    return -F.logsigmoid(beta * _len_normalised_delta(lp))


def flex_betas(cfg: LossConfig, beta: float) -> tuple[float, float]:
    """(beta_pos, beta_neg) of Flex-DPO: beta_pos defaults to the run's beta and beta_neg to a ratio of it, so
    `loss=flex_dpo` against `loss=dpo` at one beta differs only in the damping of the rejected term."""
    beta_pos = beta if cfg.beta_pos is None else cfg.beta_pos
    ratio = 1.0 if cfg.beta_neg_ratio is None else cfg.beta_neg_ratio
    return beta_pos, (ratio * beta_pos if cfg.beta_neg is None else cfg.beta_neg)


def flex_dpo(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """Flex-DPO (3D-properties, Yan et al. 2025, Sec. 3.3): -log sigma(beta_pos lr+ - beta_neg lr-).

    The paper uses beta_pos = 0.1, beta_neg = 0.08 (poems), a ratio of 0.8, to damp the rejected gradient.
    """
    chosen, rejected = _logratios(lp)
    beta_pos, beta_neg = flex_betas(cfg, beta)
    return -F.logsigmoid(beta_pos * chosen - beta_neg * rejected)


def sft_dpo(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """SFT-DPO (3D-properties, Yan et al. 2025, Eq. 7): -log sigma(beta delta) - gamma * pc, pc a sequence sum.

    d/d pc = -gamma even when pr -> -inf saturates the DPO term, so the chosen keeps rising. The paper
    reports no gamma; ours defaults to 0.1.
    """
    return sigmoid(lp, cfg, beta) - cfg.gamma * lp.policy_chosen


def spo(lp: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """SPO, value-function reading (a): -log sigma(beta delta) + spo_lambda * max(0, rc - pc); see the module doc."""
    return sigmoid(lp, cfg, beta) + cfg.spo_lambda * torch.relu(lp.ref_chosen - lp.policy_chosen)


_DPO_PAPER = "Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290)"
_3D_PAPER = "Yan et al. 2025, 3D-Properties of DPO (ICLR 2025), Sec. 3.3"
_APO_PAPER = "D'Oosterlinck et al. 2024, Anchored Preference Optimization (arXiv:2408.06266)"
_AOT_PAPER = "Melnyk et al. 2024, Distributional Preference Alignment via Optimal Transport (arXiv:2406.05882)"

LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(sigmoid, "-log sigma(beta delta)", _DPO_PAPER, (), "sigmoid"),
    "hinge": LossSpec(hinge, "relu(1 - beta delta)", "Zhao et al. 2023, SLiC-HF (arXiv:2305.10425)", (), "hinge"),
    "ipo": LossSpec(
        ipo, "(lr+/|y+| - lr-/|y-| - 1/(2 beta))^2", "Azar et al. 2023, IPO (arXiv:2310.12036)", (), "ipo"
    ),
    "exo_pair": LossSpec(
        exo_pair,
        "sigma(z)(log sigma(z) - log(1-eps)) + sigma(-z)(log sigma(-z) - log eps), z = beta delta",
        "Ji et al. 2024, EXO (arXiv:2402.00856)",
        ("label_smoothing",),
        "exo_pair",
    ),
    "nca_pair": LossSpec(
        nca_pair,
        "-log sigma(beta lr+) - 0.5 log sigma(-beta lr+) - 0.5 log sigma(-beta lr-)",
        "Chen et al. 2024, Noise Contrastive Alignment (arXiv:2402.05369)",
        (),
        "nca_pair",
    ),
    "robust": LossSpec(
        robust,
        "[-(1-eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps)",
        "Chowdhury et al. 2024, Provably Robust DPO (arXiv:2403.00409)",
        ("label_smoothing",),
        "robust",
    ),
    "bco_pair": LossSpec(
        bco_pair,
        "-log sigma(beta lr+) - log sigma(-beta lr-)",
        "Jung et al. 2024, Binary Classifier Optimization (arXiv:2404.04656)",
        (),
        "bco_pair",
    ),
    "sppo_hard": LossSpec(
        sppo_hard,
        "(lr+ - 1/(2 beta))^2 + (lr- + 1/(2 beta))^2",
        "Wu et al. 2024, Self-Play Preference Optimization (arXiv:2405.00675)",
        (),
        "sppo_hard",
    ),
    "aot": LossSpec(
        aot,
        "-(1-eps) log sigma(beta d) - eps log sigma(-beta d), d = sort(pc - pr) - sort(rc - rr)",
        _AOT_PAPER,
        ("label_smoothing",),
        "aot",
    ),
    "aot_unpaired": LossSpec(
        aot_unpaired,
        "-(1-eps) log sigma(beta d) - eps log sigma(-beta d), d = sort(lr+) - sort(lr-)",
        _AOT_PAPER,
        ("label_smoothing",),
        "aot_unpaired",
    ),
    "apo_zero": LossSpec(apo_zero, "1 - sigma(beta lr+) + sigma(beta lr-)", _APO_PAPER, (), "apo_zero"),
    "apo_down": LossSpec(apo_down, "sigma(beta lr+) + 1 - sigma(beta delta)", _APO_PAPER, (), "apo_down"),
    "discopop": LossSpec(
        discopop,
        "(1-m)(-log sigma(z)) + m exp(-z), z = beta delta, m = sigma(z / tau)",
        "Chan Lu et al. 2024, DiscoPOP (arXiv:2406.08414)",
        ("discopop_tau",),
        "discopop",
    ),
    "sft": LossSpec(
        sft,
        "-sum_i pc_i / sum_i |y+_i| (batch token-mean NLL of the chosen)",
        "TRL sft term; RPO: Pang et al. 2024",
        (),
        "sft",
    ),
    "sigmoid_norm": LossSpec(
        sigmoid_norm,
        "-log sigma(beta (lr+/|y+| - lr-/|y-|))",
        "TRL; length-normalised DPO (cf. SimPO)",
        (),
        "sigmoid_norm",
    ),
    "flex_dpo": LossSpec(
        flex_dpo, "-log sigma(beta_pos lr+ - beta_neg lr-)", _3D_PAPER, ("beta_pos", "beta_neg", "beta_neg_ratio")
    ),
    "sft_dpo": LossSpec(sft_dpo, "-log sigma(beta delta) - gamma pc (sequence NLL)", _3D_PAPER + ", Eq. 7", ("gamma",)),
    "spo": LossSpec(
        spo,
        "-log sigma(beta delta) + lambda max(0, rc - pc)",
        "Jian, Yang et al. 2025, Stable Preference Optimization (arXiv v1/v2); penalty form reconstructed",
        ("spo_lambda",),
    ),
}
# Other names of a registered loss (TRL's loss_type for dpo): valid in loss.name and loss.components, with no
# conf/loss file of their own, since the file of the loss they name already composes the same job.
ALIASES = {"sigmoid": "dpo"}
LOSSES.update({alias: LOSSES[name] for alias, name in ALIASES.items()})


def loss_components(cfg: LossConfig) -> list[tuple[str, float]]:
    """(registered name, weight) pairs the config trains on: `components`/`weights` if set, else [(name, 1.0)]."""
    if cfg.components is None:
        return [(cfg.name, 1.0)]
    weights = cfg.weights if cfg.weights is not None else [1.0] * len(cfg.components)
    return list(zip(cfg.components, (float(w) for w in weights), strict=True))


def _check_known(key: str, name: str) -> None:
    if name not in LOSSES:
        raise ConfigError(key, f"unknown loss '{name}'; known: {sorted(LOSSES)}")


def check_loss_config(cfg: LossConfig, beta: float) -> None:
    """Raises ConfigError on a config `compute_loss` cannot run as written (TRL's checks, made errors)."""
    if cfg.components is None:
        if cfg.weights is not None:
            raise ConfigError("loss.weights", "weights are set but loss.components is not")
        _check_known("loss.name", cfg.name)
    else:
        if len(cfg.components) == 0:
            raise ConfigError("loss.components", "is empty; leave it null to train on loss.name alone")
        for i, name in enumerate(cfg.components):
            _check_known(f"loss.components[{i}]", name)
        if cfg.weights is not None and len(cfg.weights) != len(cfg.components):
            raise ConfigError(
                "loss.weights",
                f"{len(cfg.weights)} weights for {len(cfg.components)} components {list(cfg.components)}",
            )
        for i, w in enumerate(cfg.weights or []):
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"loss.weights[{i}]", f"must be finite and >= 0, got {w}")
    if not beta > 0:
        raise ConfigError("beta", f"must be > 0, got {beta}")
    used = {name for name, _ in loss_components(cfg)}
    reads = {p for name in used for p in LOSSES[name].params}
    eps = cfg.label_smoothing
    if eps != 0.0 and "label_smoothing" not in reads:
        raise ConfigError("loss.label_smoothing", f"= {eps}, but none of {sorted(used)} reads it")
    if not 0.0 <= eps < 0.5:
        raise ConfigError("loss.label_smoothing", f"must lie in [0, 0.5), got {eps}")
    if "exo_pair" in used and eps == 0.0:
        raise ConfigError("loss.label_smoothing", "exo_pair needs label_smoothing > 0 (log eps); EXO uses 1e-3")
    for key in ("beta_pos", "beta_neg", "beta_neg_ratio"):
        value = getattr(cfg, key)
        if value is not None and "flex_dpo" not in used:
            raise ConfigError(f"loss.{key}", f"= {value}, but only flex_dpo reads it (losses: {sorted(used)})")
        if value is not None and not value > 0:
            raise ConfigError(f"loss.{key}", f"must be > 0, got {value}")
    if cfg.beta_neg is not None and cfg.beta_neg_ratio is not None:
        raise ConfigError(
            "loss.beta_neg",
            f"= {cfg.beta_neg} and loss.beta_neg_ratio = {cfg.beta_neg_ratio} both set the rejected beta; "
            "keep one (loss.beta_neg_ratio=null for an absolute beta_neg)",
        )
    if not cfg.discopop_tau > 0:
        raise ConfigError("loss.discopop_tau", f"must be > 0, got {cfg.discopop_tau}")
    if cfg.gamma < 0:
        raise ConfigError("loss.gamma", f"must be >= 0, got {cfg.gamma}")
    if cfg.spo_lambda < 0:
        raise ConfigError("loss.spo_lambda", f"must be >= 0, got {cfg.spo_lambda}")


def compute_loss(logps: PairLogps, cfg: LossConfig, beta: float) -> Tensor:
    """Scalar training loss: sum over components of weight * mean over the batch of the per-pair loss (as TRL)."""
    total = logps.policy_chosen.new_zeros(())
    for name, weight in loss_components(cfg):
        total = total + weight * LOSSES[name].fn(logps, cfg, beta).mean()
    return total
