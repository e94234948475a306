"""Every registered loss, and sDPO, runs end to end in a real job on the tiny model."""

import json

import pytest

from conftest import CONF, run_config
from seqdpo.losses import LOSSES
from seqdpo.runner import run_job

pytestmark = pytest.mark.slow

TINY = ["dataset.n_train=8", "dataset.n_eval=4", "train.batch_size=4", "train.max_steps=2",
        "logger=none", "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false",
        "diagnostics.likelihood=false", "lr=5e-3"]
LOSS_FILES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


def test_every_registered_loss_has_a_config_file():
    assert set(LOSSES) <= set(LOSS_FILES)


@pytest.mark.parametrize("loss", LOSS_FILES)
def test_loss_trains_in_a_job(loss, tmp_path):
    cfg = run_config([f"loss={loss}", *TINY, f"ref_cache_dir={tmp_path / 'cache'}"])
    matrix = run_job(cfg, str(tmp_path / "run"))
    done = json.loads((tmp_path / "run" / "stage_2" / "DONE").read_text())
    assert done["train_steps"] == 2 and done["train_loss"] == done["train_loss"]  # ran, and not NaN
    # The adapter moved: stage-1 margins on the trained objective are no longer the base's zeros.
    assert matrix["metrics"]["margin_mean"][1][0] != 0.0


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
