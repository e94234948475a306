"""Every registered loss, and sDPO, runs end to end in a real job on the tiny model."""

import json

import pytest
import torch

from conftest import CONF, run_config
from seqdpo.losses import ALIASES, LOSSES, PairLogps, compute_loss
from seqdpo.runner import run_job

pytestmark = pytest.mark.slow

TINY = ["dataset.n_train=8", "dataset.n_eval=4", "train.batch_size=4", "train.max_steps=2",
        "logger=none", "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false",
        "diagnostics.likelihood=false", "lr=5e-3"]
LOSS_FILES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


def test_every_registered_loss_has_a_config_file():
    assert set(LOSSES) - set(ALIASES) <= set(LOSS_FILES)


def _slope_at_base(loss_cfg, beta) -> float:
    """d loss / d (chosen - rejected log-prob) where the policy is still the reference: the first step moves the
    trained pairs' margins against its sign. Negative for every loss but discopop, whose tau-gated exponential
    term pushes the margin down near 0 (+0.47 here at beta 0.3 and the paper's tau 0.05; dpo: -0.3)."""
    zero = torch.zeros(4)
    chosen, rejected = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    loss = compute_loss(PairLogps(chosen, rejected, zero, zero, torch.full((4,), 8.0), torch.full((4,), 8.0)), loss_cfg, beta)
    d_chosen, d_rejected = torch.autograd.grad(loss, [chosen, rejected], allow_unused=True, materialize_grads=True)
    return float((d_chosen - d_rejected).sum())


@pytest.mark.parametrize("loss", LOSS_FILES)
def test_loss_trains_in_a_job(loss, tmp_path):
    # One batch of 4 pairs trained twice, every step logged, the first at full lr, no dropout: the second
    # step's forward sees the same pairs after one update, the first an adapter that is still the base.
    one_batch = ["dataset.n_train=4", "train.logging_steps=1", "train.warmup_ratio=0", "lora.dropout=0"]
    cfg = run_config([f"loss={loss}", *TINY, *one_batch, f"ref_cache_dir={tmp_path / 'cache'}"])
    run_job(cfg, str(tmp_path / "run"))
    done = json.loads((tmp_path / "run" / "stage_2" / "DONE").read_text())
    assert done["train_steps"] == 2 and done["train_loss"] == done["train_loss"]  # ran, and not NaN
    # The update went the loss's way: the trained pairs' reward margins moved from 0 against the loss's slope.
    # A loss that does not train leaves them at 0, one wired the wrong way moves them the other way. (Held-out
    # margins after one step are too noisy to tell: dpo's rose, discopop's and spo's fell on a seed.)
    log = [json.loads(line) for line in (tmp_path / "run" / "stage_1" / "train_log.jsonl").read_text().splitlines()]
    margins = [row["rewards/margins"] for row in log if "rewards/margins" in row]
    assert len(margins) == 2 and margins[0] == 0.0, margins
    assert margins[1] * _slope_at_base(cfg.loss, cfg.beta) < 0, margins


def test_sdpo_trains_each_stage_on_its_own_chunk(tmp_path):
    """order=sdpo2: objective a twice, split easy-to-hard into two halves, reference = previous stage."""
    cfg = run_config(["order=sdpo2", "reference=previous", "dataset.n_train=16", "dataset.n_eval=4",
                      "train.batch_size=4", "train.max_steps=-1", "train.epochs=1", "logger=none",
                      "diagnostics.grad_cosine=false", f"ref_cache_dir={tmp_path / 'cache'}"])
    run = tmp_path / "run"
    matrix = run_job(cfg, str(run))
    a = cfg.dataset.objectives[0]
    assert matrix["stages"] == ["base", a, a]
    for k in (1, 2):  # 8 pairs per chunk at 4 pairs per step: 2 steps, not the 4 of the whole set
        assert json.loads((run / f"stage_{k}" / "DONE").read_text())["train_steps"] == 2
        assert (run / f"stage_{k}" / "train_reference.npz").exists()
