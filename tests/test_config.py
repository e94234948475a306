"""Every option of every config group composes into a valid RunConfig; bad config fails with a clear error."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from conftest import CONF, compose, run_config
from seqdpo.config import ConfigError, signature

GROUPS = ["model", "dataset", "order", "lora", "loss", "logger", "scorer", "strategy"]
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
    written = OmegaConf.load(CONF / group / f"{option}.yaml")
    written.pop("defaults", None)
    # An interpolation in a group file (model.tiny.warm_start: ${eval.generate}) refers to the whole config.
    root = {**OmegaConf.to_container(compose([f"{group}={option}", *extra])), group: written}
    written = OmegaConf.to_container(OmegaConf.create(root), resolve=True)[group]
    # Every key the file sets, nested ones included, reached the typed node unchanged.
    leaves = dict(_leaves(node))
    assert {k: leaves[k] for k, _ in _leaves(written)} == dict(_leaves(written))


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# The key that names a group's option (loss/dpo.yaml's `name: dpo`, lora/r32.yaml's `r: 32`) says which option
# it is, so it stays even where it equals the schema's default; dataset.options are the builders' (test_data.py).
NAMING_KEYS = {"name", "r"}


@pytest.mark.parametrize("group,option", [("", "config"), *OPTIONS])
def test_conf_files_state_only_what_differs_from_the_schema(group, option):
    from omegaconf import OmegaConf

    from seqdpo.config import default

    path = Path(group, f"{option}.yaml")
    written = OmegaConf.to_container(OmegaConf.load(CONF / path))
    for key in ("defaults", "hydra"):
        written.pop(key, None)
    prefix = f"{group}." if group else ""
    repeated = [k for k, v in _leaves(written) if k not in NAMING_KEYS and not k.startswith("options.")
                and v == default(prefix + k)]
    assert not repeated, f"conf/{path} repeats the schema's defaults of {repeated} (seqdpo/config.py)"


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


# (overrides, key named by the error, words of the message); tests/test_config_validation.py counts these keys too
BAD_CONFIGS = [
    (["dataset.name=nope"], "dataset.name", "unknown dataset 'nope'"),
    (["order.stages=[a,shiny]"], "order.stages[1]", "neither an order letter"),
    (["order.stages=[a,c]"], "order.stages[1]", "defines only 2 objective(s)"),
    (["order.stages=[]"], "order.stages", "has no stages"),
    (["reference=latest"], "reference", "not one of ['base', 'previous']"),
    (["order.partition=sorted"], "order.partition", "not one of"),
    (["beta=0"], "beta", "must be > 0"),
    (["lora.target_modules=[q_proj,lm_head]"], "lora.target_modules", "lm_head"),
    (["loss.name=nope"], "loss.name", "nope"),
    (["eval.generate=true", "scorer=reward_model", "++scorer.models={polite:x}"], "scorer.models", "missing ['factual']"),
    (["eval.generate=true", "scorer.name=nope"], "scorer.name", "unknown scorer 'nope'"),
    (["eval.generate=true", "dataset=hh_rlhf"], "scorer.name", "reads the synthetic world"),
    (["eval.generate=true", "eval.generation.min_p=1"], "eval.generation.min_p", "in [0, 1)"),
    (["eval.generate=true", "eval.generation.backend=vllm"], "eval.generation.backend", "vllm"),
    (["eval.generate=true", "eval.generation.backend=nope"], "eval.generation.backend", "not one of"),
    (["eval.generate=true", "eval.generation.prompts=0"], "eval.generation.prompts", "must be >= 1"),
    (["eval.generate=true", "eval.generation.samples=0"], "eval.generation.samples", "generate nothing"),
    (["eval.generate=true", "eval.generation.top_p=0"], "eval.generation.top_p", "in (0, 1]"),
    (["eval.generate=true", "scorer=trained_rm", "scorer.lr=0"], "scorer.lr", "must be > 0"),
    (["eval.generate=true", "scorer.batch_size=0"], "scorer.batch_size", "must be >= 1"),
    (["model=llama31_8b_instruct", "model.tiny.warm_start=true"], "model.tiny.warm_start", "tiny model only"),
    (["model.tiny.warm_start=true", "model.tiny.warm_start_steps=0"], "model.tiny.warm_start_steps", "must be > 0"),
    (["diagnostics.probe_source=test"], "diagnostics.probe_source", "not one of ['train', 'eval']"),
    (["diagnostics.probe_blocks=1"], "diagnostics.probe_blocks", "must be >= 2"),
    (["diagnostics.probe_pairs=4"], "diagnostics.probe_pairs", ">= diagnostics.probe_blocks (8)"),
    (["diagnostics.grad_cosine_points=0"], "diagnostics.grad_cosine_points", "must be >= 1"),
    (["strategy.name=nope"], "strategy.name", "not one of"),
    (["strategy=replay", "strategy.ratio=0"], "strategy.ratio", "must be > 0"),
    (["strategy=merge", "strategy.method=svd"], "strategy.method", "not one of"),
    (["strategy=merge", "strategy.weights=[1.0]"], "strategy.weights", "one weight per stage (2)"),
    (["strategy=merge", "strategy.density=0"], "strategy.density", "(0, 1]"),
    (["strategy=anchor", "strategy.penalty=l1"], "strategy.penalty", "not one of"),
    (["strategy=anchor", "strategy.strength=-1"], "strategy.strength", ">= 0"),
    (["strategy=anchor", "strategy.fisher_pairs=0"], "strategy.fisher_pairs", ">= 1"),
    (["strategy=anchor", "strategy.decay=0"], "strategy.decay", "(0, 1]"),
    (["strategy=anchor", "strategy.decay=1.5"], "strategy.decay", "(0, 1]"),
    (["strategy=anchor", "strategy.match_steps=false"], "strategy.match_steps", "applies to strategy ['replay']"),
    (["strategy=replay", "strategy.strength=2"], "strategy.strength", "applies to strategy ['anchor']"),
    (["strategy.ratio=0.5"], "strategy.ratio", "not 'sequential'"),
]


@pytest.mark.parametrize("overrides,key,words", BAD_CONFIGS)
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


def test_model_packing_composes_and_is_validated():
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
    # the same log-probs, but LoRA dropout masks follow the layout's tokens: another job
    assert signature(run_config(["model.packing=padded"])) != signature(run_config())
    assert compose(["model.packing=pair"], hydra_cfg=True).hydra.run.dir.endswith("runs/model.packing=pair")


def test_generation_turns_the_warm_start_on_and_changes_the_job():
    from seqdpo.modeling import build_tiny_tokenizer, model_fingerprint

    off, on = run_config(), run_config(["eval.generate=true"])
    assert (off.eval.generate, off.model.tiny.warm_start) == (False, False)
    assert (on.eval.generate, on.model.tiny.warm_start) == (True, True)
    assert not run_config(["eval.generate=true", "model.tiny.warm_start=false"]).model.tiny.warm_start
    # The warm start changes the base model: its fingerprint (reference and generation caches) and the signature.
    tok = build_tiny_tokenizer(on.model.tiny.vocab_size)
    warm = run_config(["model.tiny.warm_start=true"])
    assert model_fingerprint(warm.model, tok) != model_fingerprint(off.model, tok)
    assert signature(warm) != signature(off)
    opts = run_config(["eval.generate=true", "scorer=trained_rm", "eval.generation.samples=2", "eval.generation.greedy=true",
                       "eval.generation.temperature=0.7", "eval.generation.top_p=0.9", "eval.generation.min_p=0.05", "eval.generation.max_new_tokens=20",
                       "eval.generation.batch_size=8", "eval.generation.seed=5", "eval.generation.backend=transformers",
                       "eval.generation.prompts=8", "scorer.base_model=some/model",
                       "scorer.epochs=1", "scorer.train_batch_size=4", "scorer.max_length=64",
                       "model.tiny.warm_start_steps=10", "model.tiny.warm_start_lr=0.01"])
    g = opts.eval.generation
    assert (g.samples, g.greedy, g.temperature, g.top_p, g.max_new_tokens, g.batch_size, g.seed, g.backend,
            g.prompts) == (2, True, 0.7, 0.9, 20, 8, 5, "transformers", 8)
    assert (opts.scorer.name, opts.scorer.base_model, opts.scorer.epochs, opts.scorer.train_batch_size,
            opts.scorer.max_length) == ("trained_rm", "some/model", 1.0, 4, 64)
    assert g.min_p == 0.05
    assert (opts.model.tiny.warm_start_steps, opts.model.tiny.warm_start_lr) == (10, 0.01)


def test_gradient_probe_options_compose():
    d = run_config([]).diagnostics
    assert (d.probe_source, d.probe_pairs, d.probe_blocks, d.grad_cosine_points, d.min_reliability) == ("train", 64, 8, 5, 0.5)
    d = run_config(["diagnostics.probe_source=eval", "diagnostics.probe_pairs=16", "diagnostics.probe_blocks=4",
                    "diagnostics.grad_cosine_points=3", "diagnostics.min_reliability=0.7"]).diagnostics
    assert (d.probe_source, d.probe_pairs, d.probe_blocks, d.grad_cosine_points, d.min_reliability) == ("eval", 16, 4, 3, 0.7)
