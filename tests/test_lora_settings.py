"""The LoRA the config describes is the LoRA that trains: alpha follows r, dropout is active in training."""

import pytest
import torch

from conftest import SMALL_JOB, run_config


def test_lora_alpha_follows_r_unless_set():
    from seqdpo.modeling import make_lora_config

    assert make_lora_config(run_config(["lora.r=8"]).lora).lora_alpha == 16
    assert make_lora_config(run_config(["lora=r64"]).lora).lora_alpha == 128
    assert make_lora_config(run_config(["lora.r=8", "lora.alpha=32"]).lora).lora_alpha == 32
    assert make_lora_config(run_config().lora).lora_alpha == 64


def test_disable_dropout_reaches_trl(tmp_path):
    from seqdpo.job_settings import stage_settings
    from seqdpo.trainer import make_dpo_config

    for overrides, disabled in [([], False), (["train.disable_dropout=true"], True)]:
        (settings, *_) = stage_settings(run_config(overrides))
        assert make_dpo_config(settings, str(tmp_path), seed=0, max_length=64).disable_dropout is disabled


@pytest.mark.slow
def test_lora_dropout_is_active_in_training(tmp_path):
    """Every Dropout call of a real one-stage job is recorded: training forwards use lora.dropout, evaluation none."""
    from seqdpo.runner import run_job

    calls = []

    def record(module, args):
        if isinstance(module, torch.nn.Dropout):
            calls.append((module.training, module.p))

    cfg = run_config([*SMALL_JOB, "order=a", "train.max_steps=2", "logger=none", "lora.dropout=0.2",
                      "diagnostics.grad_cosine=false", "diagnostics.likelihood=false",
                      "diagnostics.adapter_movement=false", f"ref_cache_dir={tmp_path / 'refcache'}"])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run_job(cfg, str(tmp_path / "run"))
    finally:
        handle.remove()
    in_training = {p for training, p in calls if training}
    assert in_training == {0.2}, in_training  # TRL's disable_dropout=True default would make this {0}
    assert any(not training for training, _ in calls)  # evaluation runs the same modules in eval mode


def test_target_module_matching_nothing_fails_right_after_loading(tmp_path):
    """PEFT only complains when no entry matches; one typo next to valid names would train less than configured."""
    from seqdpo.config import ConfigError
    from seqdpo.runner import run_job

    cfg = run_config([*SMALL_JOB, "logger=none", "lora.target_modules=[q_proj,v_prj]",
                      f"ref_cache_dir={tmp_path / 'refcache'}"])
    with pytest.raises(ConfigError) as e:
        run_job(cfg, str(tmp_path / "run"))
    assert e.value.key == "lora.target_modules" and "['v_prj'] match no module of model 'tiny'" in str(e.value)
    assert "'v_proj'" in str(e.value)  # the names that would match are listed
    assert not (tmp_path / "run" / "stage_0").exists()  # before any evaluation or training
