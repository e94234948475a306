"""Loss registry: hand-computed values, gradient signs, TRL equality, paper properties, validation.

Everything here is parametrised over `LOSSES`, so a newly registered loss fails until it has a hand
value, a gradient sign, a conf/loss file and (for a TRL type) the TRL-equality check.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from seqdpo.config import ConfigError, LossConfig
from seqdpo.losses import ALIASES, LOSSES, PairLogps, check_loss_config, compute_loss, loss_components

CONF_LOSS = Path(__file__).resolve().parents[1] / "conf" / "loss"


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# The shared example, one pair:
#   pc = -4, rc = -3  -> lr+ = -1 (the chosen fell below the reference, so spo's penalty is active)
#   pr = -7, rr = -4  -> lr- = -3
#   delta = lr+ - lr- = 2, beta = 0.25 -> z = beta * delta = 0.5
#   |y+| = 2, |y-| = 4
BETA = 0.25
EXAMPLE = dict(pc=-4.0, pr=-7.0, rc=-3.0, rr=-4.0, lc=2.0, lr=4.0)
# Parameters set for the losses that read them (any other loss sees the LossConfig defaults).
PARAMS = dict(label_smoothing=0.1, beta_pos=0.5, beta_neg=0.1, gamma=0.1, spo_lambda=1.0, discopop_tau=0.05)

DPO = -logsig(0.5)  # = log(1 + e^-0.5) = 0.474077
_m = sig(0.5 / 0.05)  # discopop's mixing weight sigma(z / tau) = sigma(10)
HAND = {
    "dpo": DPO,
    "sigmoid": DPO,
    "hinge": 1 - 0.5,
    # per-token log-ratios: -1/2 - (-3/4) = 0.25; 1/(2 beta) = 2; (0.25 - 2)^2
    "ipo": (0.25 - 2) ** 2,
    # eps = 0.1: sigma(z)(log sigma(z) - log 0.9) + sigma(-z)(log sigma(-z) - log 0.1)
    "exo_pair": sig(0.5) * (logsig(0.5) - math.log(0.9)) + sig(-0.5) * (logsig(-0.5) - math.log(0.1)),
    # beta lr+ = -0.25, beta lr- = -0.75
    "nca_pair": -logsig(-0.25) - 0.5 * logsig(0.25) - 0.5 * logsig(0.75),
    "robust": (-0.9 * logsig(0.5) + 0.1 * logsig(-0.5)) / (1 - 0.2),
    "bco_pair": -logsig(-0.25) - logsig(0.75),
    # (lr+ - 2)^2 + (lr- + 2)^2 = 9 + 1
    "sppo_hard": 10.0,
    # one pair: sorting is the identity, d = (pc - pr) - (rc - rr) = 3 - 1 = 2 = delta
    "aot": -0.9 * logsig(0.5) - 0.1 * logsig(-0.5),
    "aot_unpaired": -0.9 * logsig(0.5) - 0.1 * logsig(-0.5),
    "apo_zero": 1 - sig(-0.25) + sig(-0.75),
    "apo_down": sig(-0.25) + 1 - sig(0.5),
    "discopop": (1 - _m) * -logsig(0.5) + _m * math.exp(-0.5),
    # -pc / |y+| = 4 / 2
    "sft": 2.0,
    # beta * 0.25 = 0.0625
    "sigmoid_norm": -logsig(0.0625),
    # 0.5 * (-1) - 0.1 * (-3) = -0.2
    "flex_dpo": -logsig(-0.2),
    # DPO - gamma * pc = DPO + 0.1 * 4
    "sft_dpo": DPO + 0.4,
    # DPO + lambda * max(0, rc - pc) = DPO + 1 * 1
    "spo": DPO + 1.0,
}

# Sign of (d loss / d pc, d loss / d pr) at the example: -1 means the loss pushes that log-prob up.
GRAD_SIGN = {name: (-1, 1) for name in LOSSES}
GRAD_SIGN.update(
    sft=(-1, 0),  # reference free and blind to the rejected
    # lr- = -3 is below its target -1/(2 beta) = -2, so SPPO pulls the rejected back up
    sppo_hard=(-1, -1),
    # sigma'(beta lr+) - sigma'(beta delta) = sigma'(-0.25) - sigma'(0.5) > 0: APO-down lowers the chosen
    apo_down=(1, 1),
)


def make_logps(pc, pr, rc, rr, lc, lr, requires_grad=False) -> PairLogps:
    t = lambda v: torch.tensor(v, dtype=torch.float64).reshape(-1)  # noqa: E731
    policy_chosen, policy_rejected = t(pc), t(pr)
    if requires_grad:
        policy_chosen.requires_grad_(True)
        policy_rejected.requires_grad_(True)
    return PairLogps(policy_chosen, policy_rejected, t(rc), t(rr), t(lc), t(lr))


def cfg_for(name: str, **overrides) -> LossConfig:
    reads = LOSSES[name].params
    kwargs = {k: v for k, v in PARAMS.items() if k in reads}
    kwargs.update(overrides)
    return LossConfig(name=name, **kwargs)


def test_every_loss_has_test_data():
    assert set(HAND) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hand_value(name):
    cfg = cfg_for(name)
    check_loss_config(cfg, BETA)
    value = compute_loss(make_logps(**EXAMPLE), cfg, BETA).item()
    assert value == pytest.approx(HAND[name], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_sign(name):
    lp = make_logps(**EXAMPLE, requires_grad=True)
    compute_loss(lp, cfg_for(name), BETA).backward()
    # a loss blind to a log-prob leaves its grad None: that is a zero derivative
    grads = [torch.zeros(1) if t.grad is None else t.grad for t in (lp.policy_chosen, lp.policy_rejected)]
    signs = tuple(int(torch.sign(g).item()) for g in grads)
    assert signs == GRAD_SIGN[name]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_pair_shape_and_integer_lengths(name):
    lp = make_logps([-4.0, -1.0, -2.0], [-7.0, -2.0, -1.0], [-3.0] * 3, [-4.0] * 3, [2.0, 3.0, 1.0], [4.0] * 3)
    per_pair = LOSSES[name].fn(lp, cfg_for(name), BETA)
    assert per_pair.shape == (3,)
    # the collator counts tokens as integers
    lp.chosen_len, lp.rejected_len = lp.chosen_len.long(), lp.rejected_len.long()
    torch.testing.assert_close(LOSSES[name].fn(lp, cfg_for(name), BETA), per_pair)


def test_sft_is_a_batch_token_mean():
    # -(pc_1 + pc_2) / (|y+_1| + |y+_2|) = -(-4 - 9) / (2 + 3) = 2.6, not the mean of 4/2 and 9/3 (2.5)
    lp = make_logps([-4.0, -9.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 3.0], [1.0, 1.0])
    assert compute_loss(lp, LossConfig(name="sft"), BETA).item() == pytest.approx(2.6)


def test_aot_sorts_across_the_batch():
    # policy pc - pr = [3, -1] -> sorted [-1, 3]; reference rc - rr = [0, 2] -> sorted [0, 2];
    # d = [-1, 1], beta = 1, eps = 0: mean(-log sigma(-1), -log sigma(1)) = (log(1+e) + log(1+e^-1)) / 2
    lp = make_logps([1.0, 0.0], [-2.0, 1.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0], [1.0, 1.0])
    value = compute_loss(lp, LossConfig(name="aot"), 1.0).item()
    assert value == pytest.approx((-logsig(-1) - logsig(1)) / 2)


def test_combination_is_weighted_sum_of_means():
    lp = make_logps(**EXAMPLE)
    cfg = LossConfig(name="rpo", components=["dpo", "sft"], weights=[1.0, 0.5])
    assert compute_loss(lp, cfg, BETA).item() == pytest.approx(DPO + 0.5 * 2.0)
    assert loss_components(LossConfig(name="x", components=["dpo", "ipo"])) == [("dpo", 1.0), ("ipo", 1.0)]


# ---- equality with TRL: run DPOTrainer._compute_loss itself on a fake model with known log-probs ----


def trl_loss(lp: PairLogps, loss_types: list[str], weights: list[float], beta: float, cfg: LossConfig) -> float:
    """TRL 1.16's `_compute_loss` on a fake model whose per-token log-probs sum to the given sequence log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    prompt_len = 2
    logps = torch.cat([lp.policy_chosen, lp.policy_rejected]).detach().float()
    lens = torch.cat([lp.chosen_len, lp.rejected_len]).long()
    seq = prompt_len + int(lens.max())
    completion_mask = torch.zeros(len(lens), seq, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        completion_mask[i, prompt_len : prompt_len + n] = 1
    shift_mask = completion_mask[:, 1:].float()
    # each completion token carries an equal share of its sequence log-prob; prompt and padding carry 0
    per_token = shift_mask * (logps / lens.clamp(min=1)).unsqueeze(1)

    class FakeModel:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model = FakeModel()
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake_trainer = SimpleNamespace(
        model=model, accelerator=accel, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights, beta=beta,
        label_smoothing=cfg.label_smoothing, use_weighting=False, args=SimpleNamespace(discopop_tau=cfg.discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.ones(len(lens), seq, dtype=torch.long),
        "attention_mask": torch.ones(len(lens), seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": lp.ref_chosen.float(),
        "ref_rejected_logps": lp.ref_rejected.float(),
    }
    return float(DPOTrainer._compute_loss(fake_trainer, model, inputs, return_outputs=False))


def random_logps(seed: int, batch: int = 5) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    lens = lambda: torch.randint(1, 9, (batch,), generator=g).double()  # noqa: E731
    logp = lambda: -torch.rand(batch, generator=g, dtype=torch.float64) * 20  # noqa: E731
    return PairLogps(logp(), logp(), logp(), logp(), lens(), lens())


TRL_LOSSES = sorted(n for n, s in LOSSES.items() if s.trl_name is not None)


@pytest.mark.parametrize("name", TRL_LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_trl(name, seed):
    lp = random_logps(seed)
    cfg = cfg_for(name)
    ours = compute_loss(lp, cfg, 0.1).item()
    assert ours == pytest.approx(trl_loss(lp, [LOSSES[name].trl_name], [1.0], 0.1, cfg), rel=1e-5, abs=1e-6)


def test_combination_equals_trl():
    lp = random_logps(2)
    cfg = LossConfig(name="rpo", components=["dpo", "sft", "ipo"], weights=[1.0, 0.3, 0.2])
    ours = compute_loss(lp, cfg, 0.2).item()
    assert ours == pytest.approx(trl_loss(lp, ["sigmoid", "sft", "ipo"], [1.0, 0.3, 0.2], 0.2, cfg), rel=1e-5)


# ---- seed-paper properties ----


def test_flex_dpo_with_equal_betas_is_dpo():
    lp = random_logps(3)
    flex = LOSSES["flex_dpo"].fn(lp, LossConfig(name="flex_dpo", beta_pos=0.3, beta_neg=0.3), 0.3)
    torch.testing.assert_close(flex, LOSSES["dpo"].fn(lp, LossConfig(), 0.3))
    # unset betas fall back to beta
    torch.testing.assert_close(LOSSES["flex_dpo"].fn(lp, LossConfig(name="flex_dpo"), 0.3), flex)


@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_composed_flex_dpo_takes_the_runs_beta_and_is_dpo_without_damping(beta):
    from conftest import run_config

    from seqdpo.losses import flex_betas

    lp = random_logps(5)
    flex = run_config(["loss=flex_dpo", f"beta={beta}"])
    assert flex_betas(flex.loss, flex.beta) == pytest.approx((beta, 0.8 * beta))  # the paper's 0.08 / 0.1
    undamped = run_config(["loss=flex_dpo", f"beta={beta}", "loss.beta_neg_ratio=1.0"])
    dpo = run_config(["loss=dpo", f"beta={beta}"])
    torch.testing.assert_close(compute_loss(lp, undamped.loss, beta), compute_loss(lp, dpo.loss, beta))
    assert compute_loss(lp, flex.loss, beta).item() != pytest.approx(compute_loss(lp, dpo.loss, beta).item())


def test_flex_dpo_small_beta_neg_damps_rejected_gradient():
    grads = []
    for beta_neg in (0.1, 0.02):
        lp = make_logps(**EXAMPLE, requires_grad=True)
        compute_loss(lp, LossConfig(name="flex_dpo", beta_pos=0.1, beta_neg=beta_neg), 0.1).backward()
        grads.append(lp.policy_rejected.grad.item())
    assert 0 < grads[1] < grads[0]


def test_sft_dpo_keeps_pushing_chosen_when_rejected_vanishes():
    gamma = 0.1
    grads = {}
    for name in ("dpo", "sft_dpo"):
        lp = make_logps(-4.0, -1e4, -3.0, -4.0, 2.0, 4.0, requires_grad=True)
        compute_loss(lp, LossConfig(name=name, gamma=gamma), BETA).backward()
        grads[name] = lp.policy_chosen.grad.item()
    assert abs(grads["dpo"]) < 1e-100  # sigma(-beta delta) with beta delta ~ 2500: DPO's chosen gradient is gone
    assert grads["sft_dpo"] == pytest.approx(-gamma)


@pytest.mark.parametrize("pc", [-3.0, -2.5, 0.0])  # rc = -3: equal to and above the reference
def test_spo_penalty_zero_when_chosen_at_or_above_reference(pc):
    values, grads = [], []
    for name in ("dpo", "spo"):
        lp = make_logps(pc, -7.0, -3.0, -4.0, 2.0, 4.0, requires_grad=True)
        loss = compute_loss(lp, LossConfig(name=name, spo_lambda=2.0), BETA)
        loss.backward()
        values.append(loss.item())
        grads.append(lp.policy_chosen.grad.item())
    assert values[0] == values[1] and grads[0] == grads[1]


def test_spo_penalty_linear_below_reference():
    lp = make_logps(-5.0, -7.0, -3.0, -4.0, 2.0, 4.0)
    gap = compute_loss(lp, LossConfig(name="spo", spo_lambda=2.0), BETA) - compute_loss(lp, LossConfig(), BETA)
    assert gap.item() == pytest.approx(2.0 * 2.0)  # lambda * (rc - pc) = 2 * (-3 + 5)


def test_dpo_and_sigmoid_share_one_implementation():
    assert LOSSES["dpo"].fn is LOSSES["sigmoid"].fn


# ---- validation ----


def test_unknown_name_lists_known():
    with pytest.raises(ConfigError, match="known: .*'dpo'.*'spo'") as e:
        check_loss_config(LossConfig(name="dop"), 0.1)
    assert e.value.key == "loss.name"
    with pytest.raises(ConfigError, match="unknown loss 'nope'") as e:
        check_loss_config(LossConfig(name="mix", components=["dpo", "nope"]), 0.1)
    assert e.value.key == "loss.components[1]"


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(components=["dpo", "sft"], weights=[1.0]), "loss.weights"),
        (dict(weights=[1.0]), "loss.weights"),
        (dict(components=[]), "loss.components"),
        (dict(components=["dpo", "sft"], weights=[1.0, -0.1]), "loss.weights[1]"),
        (dict(name="robust", label_smoothing=0.5), "loss.label_smoothing"),
        (dict(name="robust", label_smoothing=-0.1), "loss.label_smoothing"),
        (dict(name="exo_pair"), "loss.label_smoothing"),
        (dict(name="dpo", label_smoothing=0.1), "loss.label_smoothing"),
        (dict(name="dpo", beta_pos=0.1), "loss.beta_pos"),
        (dict(name="sft_dpo", beta_neg=0.1), "loss.beta_neg"),
        (dict(name="flex_dpo", beta_neg=0.0), "loss.beta_neg"),
        (dict(name="dpo", beta_neg_ratio=0.8), "loss.beta_neg_ratio"),
        (dict(name="flex_dpo", beta_neg_ratio=0.0), "loss.beta_neg_ratio"),
        (dict(name="flex_dpo", beta_neg=0.08, beta_neg_ratio=0.8), "loss.beta_neg"),
        (dict(name="discopop", discopop_tau=0.0), "loss.discopop_tau"),
        (dict(name="sft_dpo", gamma=-1.0), "loss.gamma"),
        (dict(name="spo", spo_lambda=-1.0), "loss.spo_lambda"),
    ],
)
def test_invalid_configs(kwargs, key):
    with pytest.raises(ConfigError) as e:
        check_loss_config(LossConfig(**kwargs), 0.1)
    assert e.value.key == key


def test_beta_must_be_positive():
    with pytest.raises(ConfigError, match="beta"):
        check_loss_config(LossConfig(), 0.0)


def test_flex_dpo_params_allowed_inside_a_combination():
    check_loss_config(LossConfig(name="mix", components=["flex_dpo", "sft"], beta_pos=0.1, beta_neg=0.08), 0.1)


def _conf_files():
    return sorted(CONF_LOSS.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(set(LOSSES) - set(ALIASES)))
def test_every_loss_has_a_conf_file(name):
    assert (CONF_LOSS / f"{name}.yaml").exists(), f"conf/loss/{name}.yaml is missing"


@pytest.mark.parametrize("path", _conf_files(), ids=lambda p: p.stem)
def test_every_conf_file_validates(path):
    # through the schema, as Hydra would: a key LossConfig lacks fails here
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LossConfig), OmegaConf.load(path)))
    assert cfg.name == path.stem
    check_loss_config(cfg, 0.3)


def test_docs_describe_every_loss():
    text = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    missing = [name for name in LOSSES if f"`{name}`" not in text]
    assert not missing, f"docs/losses.md does not describe {missing}"
