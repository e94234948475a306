"""Every option of every config group composes into a valid RunConfig; bad config fails with a clear error."""

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from conftest import CONF, compose, run_config
from seqdpo.config import ConfigError, signature

GROUPS = ["model", "dataset", "order", "lora", "loss", "logger"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    # A glob that silently finds nothing would make the parametrised test below vacuous.
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes(group, option):
    from dataclasses import asdict

    from omegaconf import OmegaConf

    extra = []
    if group == "order":  # an order over three objectives needs a dataset that has three
        letters = set(OmegaConf.load(CONF / "order" / f"{option}.yaml").stages)
        if len(letters) > 2:
            extra = ["dataset=helpsteer2", "dataset.objectives=[helpfulness,correctness,coherence,complexity]"]
    cfg = run_config([f"{group}={option}", *extra])
    node = asdict(getattr(cfg, group))
    written = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    written.pop("defaults", None)
    # Every key the file sets reached the typed node unchanged.
    assert {k: node[k] for k in written} == written


def test_defaults_reproduce_the_paper():
    cfg = run_config()
    assert (cfg.beta, cfg.lr, cfg.train.epochs, cfg.reference) == (0.3, 5e-5, 1.0, "base")
    assert cfg.lora.r == 32 and len(cfg.lora.target_modules) == 7
    assert cfg.model.name == "tiny" and cfg.dataset.name == "synthetic"


def test_scalars_and_nested_keys_override():
    cfg = run_config(["beta=0.1", "lr=1e-4", "seed=3", "reference=previous", "train.max_steps=7"])
    assert (cfg.beta, cfg.lr, cfg.seed, cfg.reference, cfg.train.max_steps) == (0.1, 1e-4, 3, "previous", 7)


def test_output_dir_follows_overrides_not_the_clock():
    a = compose(["order=ba", "beta=0.1"], hydra_cfg=True).hydra.run.dir
    b = compose(["order=ba", "beta=0.1"], hydra_cfg=True).hydra.run.dir
    assert a == b and "order=ba" in a and "beta=0.1" in a
    assert compose([], hydra_cfg=True).hydra.run.dir.endswith("runs/default")
    # Logger settings do not change results, so they neither rename the directory nor the signature.
    assert compose(["order=ba", "logger=none"], hydra_cfg=True).hydra.run.dir.endswith("runs/order=ba")
    assert signature(run_config(["logger=none"])) == signature(run_config())
    assert signature(run_config(["beta=0.1"])) != signature(run_config())


def test_wrong_type_fails_at_compose():
    with pytest.raises((ValidationError, ConfigCompositionException)):
        run_config(["beta=high"])


def test_unknown_group_option_fails():
    with pytest.raises(MissingConfigException, match="dataset/nope"):
        compose(["dataset=nope"])


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["dataset.name=nope"], "dataset.name", "unknown dataset 'nope'"),
        (["order.stages=[a,shiny]"], "order.stages[1]", "neither an order letter"),
        (["order.stages=[a,c]"], "order.stages[1]", "defines only 2 objective(s)"),
        (["order.stages=[]"], "order.stages", "has no stages"),
        (["reference=latest"], "reference", "not one of ['base', 'previous']"),
        (["order.partition=sorted"], "order.partition", "not one of"),
        (["beta=0"], "beta", "must be > 0"),
        (["lora.target_modules=[q_proj,lm_head]"], "lora.target_modules", "lm_head"),
        (["loss.name=nope"], "loss.name", "nope"),
    ],
)
def test_bad_config_names_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        run_config(overrides)
    assert e.value.key == key and words in str(e.value)


def test_order_letters_and_names_resolve():
    from seqdpo.config import stage_objectives

    cfg = run_config(["order=ba"])
    a, b = cfg.dataset.objectives[:2]
    assert stage_objectives(cfg) == [b, a]
    cfg = run_config([f"order.stages=[{a},b,a]"])
    assert stage_objectives(cfg) == [a, b, a]


def test_r32_is_the_papers_parameter_count():
    """lora=r32 on a Llama-3.1-8B-shaped model gives the paper's 83,886,080 trainable parameters."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqdpo.modeling import make_lora_config

    shape = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):  # shapes only: no 16 GB of weights
        model = get_peft_model(LlamaForCausalLM(shape), make_lora_config(run_config(["lora=r32"]).lora))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 83_886_080


def test_model_packing_composes_is_validated_and_leaves_the_job_identity():
    assert run_config().model.packing == "shared_prompt"
    for packing in ("pair", "padded", "shared_prompt"):
        assert run_config([f"model.packing={packing}"]).model.packing == packing
    with pytest.raises(ConfigError) as e:
        run_config(["model.packing=tree"])
    assert e.value.key == "model.packing" and "not one of" in str(e.value)
    with pytest.raises(ConfigError) as e:
        run_config(["model.attn_implementation=flash_attention_2"])
    assert e.value.key == "model.packing" and "use pair" in str(e.value)
    assert run_config(["model.attn_implementation=flash_attention_2", "model.packing=pair"]).model.packing == "pair"
    # the layout gives the same log-probs: same directory, same signature
    assert signature(run_config(["model.packing=padded"])) == signature(run_config())
    assert compose(["model.packing=pair"], hydra_cfg=True).hydra.run.dir.endswith("runs/default")
