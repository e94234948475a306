"""Every key with a wrong value fails before any work, with a ConfigError naming the key (composed by Hydra)."""

import pytest

from conftest import run_config
from test_config import BAD_CONFIGS
from seqdpo.config import ConfigError
from seqdpo.validation import _schema_keys

# (override, key named by the error, words of the message). One row per key that a type cannot guard.
BAD_VALUES = [
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("eval.tie_tolerance=-0.1", "eval.tie_tolerance", ">= 0"),
    ("eval.bootstrap=-1", "eval.bootstrap", ">= 0"),
    ("eval.min_effect.margin=0", "eval.min_effect.margin", "> 0"),
    ("eval.min_effect.accuracy=-0.1", "eval.min_effect.accuracy", "> 0"),
    ("+eval.min_effect.margn=0.1", "eval.min_effect", "exactly the verdict columns ['accuracy', 'margin']"),
    ("train.save_steps=0", "train.save_steps", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.lr_scheduler=cosin", "train.lr_scheduler", "'cosine'"),
    ("train.epochs=0", "train.epochs", "> 0"),
    ("train.epochs=nan", "train.epochs", "> 0"),
    ("train.max_steps=0", "train.max_steps", "-1"),
    ("train.max_steps=-5", "train.max_steps", "-1"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.warmup_ratio=1.0", "train.warmup_ratio", "[0, 1)"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio", "[0, 1)"),
    ("train.logging_steps=0", "train.logging_steps", ">= 1"),
    ("train.weight_decay=-1", "train.weight_decay", ">= 0"),
    ("lora.r=0", "lora.r", "> 0"),
    ("lora.alpha=0", "lora.alpha", "null for 2r"),
    ("lora.dropout=1.0", "lora.dropout", "[0, 1)"),
    ("lora.dropout=-0.1", "lora.dropout", "[0, 1)"),
    ("lora.target_modules=[]", "lora.target_modules", "empty"),
    ("lora.target_modules=[q_proj,lm_head]", "lora.target_modules", "lm_head"),
    ("model.max_length=0", "model.max_length", ">= 2"),
    ("model.name=''", "model.name", "empty"),
    ("model.attn_implementation=fast", "model.attn_implementation", "'sdpa'"),
    ("model.dtype=float8", "model.dtype", "not one of"),
    ("model.packing=zip", "model.packing", "not one of"),
    ("model.tiny.hidden_size=0", "model.tiny.hidden_size", "> 0"),
    ("model.tiny.intermediate_size=0", "model.tiny.intermediate_size", "> 0"),
    ("model.tiny.num_hidden_layers=0", "model.tiny.num_hidden_layers", "> 0"),
    ("model.tiny.num_attention_heads=0", "model.tiny.num_attention_heads", "> 0"),
    ("model.tiny.num_key_value_heads=-1", "model.tiny.num_key_value_heads", "> 0"),
    ("model.tiny.vocab_size=0", "model.tiny.vocab_size", "> 0"),
    ("model.tiny.num_attention_heads=3", "model.tiny", "multiple of num_attention_heads"),
    ("diagnostics.grad_cosine_points=0", "diagnostics.grad_cosine_points", ">= 1"),
    ("diagnostics.probe_pairs=0", "diagnostics.probe_pairs", ">= diagnostics.probe_blocks"),
    ("diagnostics.probe_blocks=1", "diagnostics.probe_blocks", ">= 2"),
    ("diagnostics.min_reliability=0", "diagnostics.min_reliability", "in (0, 1]"),
    ("diagnostics.probe_source=test", "diagnostics.probe_source", "not one of"),
    ("diagnostics.stay_threshold=-1", "diagnostics.stay_threshold", ">= 0"),
    ("diagnostics.redistribution_min_fraction=0.8", "diagnostics.redistribution_min_fraction", "[0, 0.5]"),
    ("seed=-1", "seed", "between 0 and"),
    ("beta=0", "beta", "> 0"),
    ("lr=-1e-5", "lr", "> 0"),
    ("reference=latest", "reference", "not one of"),
    ("order.partition=sorted", "order.partition", "not one of"),
    ("logger.name=tensorboard", "logger.name", "not one of"),
    ("logger.mode=cloud", "logger.mode", "not one of"),
    ("dataset.objectives=[polite,polite]", "dataset.objectives", "twice"),
    ("model.tiny.warm_start_steps=0", "model.tiny.warm_start_steps", "> 0"),
    ("model.tiny.warm_start_lr=0", "model.tiny.warm_start_lr", "> 0"),
    ("model=llama31_8b_instruct model.tiny.warm_start=true", "model.tiny.warm_start", "tiny model only"),
    ("eval.generation.seed=-1", "eval.generation.seed", "between 0 and"),
    # Behaviour options are checked when generation is on
    ("eval.generate=true eval.generation.prompts=0", "eval.generation.prompts", ">= 1"),
    ("eval.generate=true eval.generation.samples=-1", "eval.generation.samples", ">= 0"),
    ("eval.generate=true eval.generation.samples=0 eval.generation.greedy=false", "eval.generation.samples", "nothing"),
    ("eval.generate=true eval.generation.max_new_tokens=0", "eval.generation.max_new_tokens", ">= 1"),
    ("eval.generate=true eval.generation.batch_size=0", "eval.generation.batch_size", ">= 1"),
    ("eval.generate=true eval.generation.temperature=0", "eval.generation.temperature", "> 0"),
    ("eval.generate=true eval.generation.top_p=0", "eval.generation.top_p", "(0, 1]"),
    ("eval.generate=true eval.generation.min_p=1", "eval.generation.min_p", "[0, 1)"),
    ("eval.generate=true eval.generation.backend=tgi", "eval.generation.backend", "not one of"),
    ("eval.generate=true scorer.name=nope", "scorer.name", "unknown scorer"),
    ("eval.generate=true scorer.name=reward_model", "scorer.models", "one model per objective"),
    ("eval.generate=true scorer.batch_size=0", "scorer.batch_size", ">= 1"),
    ("eval.generate=true scorer.max_length=0", "scorer.max_length", ">= 1"),
    ("eval.generate=true scorer.train_batch_size=0", "scorer.train_batch_size", ">= 1"),
    ("eval.generate=true scorer.epochs=0", "scorer.epochs", "> 0"),
    ("eval.generate=true scorer.lr=0", "scorer.lr", "> 0"),
    ("dataset.n_eval=0", "dataset.n_eval", ">= 1, or null for all"),
    ("dataset.n_train=-1", "dataset.n_train", ">= 1, or null for all"),
    ("dataset.min_pairs=0", "dataset.min_pairs", ">= 1"),
    ("dataset.warn_fraction=1.5", "dataset.warn_fraction", "[0, 1]"),
    ("dataset.max_overlap=-0.1", "dataset.max_overlap", "[0, 1]"),
    # Added with + (what Hydra suggests after a typo): refused with the nearest real key.
    ("+train.batch_sise=4", "train.batch_sise", "did you mean 'train.batch_size'"),
    ("++eval.tie_tolerence=0.1", "eval.tie_tolerence", "did you mean 'eval.tie_tolerance'"),
    ("+sed=3", "sed", "did you mean 'seed'"),
    ("+lora.rank=8", "lora.rank", "unknown key"),
]


@pytest.mark.parametrize("override,key,words", BAD_VALUES, ids=[row[0] for row in BAD_VALUES])
def test_bad_value_names_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        run_config(override.split())
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_min_effect_composes_per_column():
    cfg = run_config(["eval.min_effect.margin=0.25"])
    assert cfg.eval.min_effect == {"accuracy": 0.05, "margin": 0.25}


def test_the_defaults_and_builder_options_pass():
    # dataset.options is the builders' own (they validate it), so keys added there are not refused.
    assert run_config(["++dataset.options.markers=2"]).dataset.options["markers"] == 2


def test_every_numeric_and_name_key_has_a_bad_value_row():
    """A new key with a range or a list of names must get a row in BAD_VALUES."""
    free = {  # keys whose every typed value is valid, or that only the dataset builders can judge
        "model", "dataset", "order", "lora", "loss", "logger", "strategy", "train", "eval", "diagnostics", "model.tiny",
        "model.revision", "model.tiny.init_seed", "dataset.name", "dataset.path", "dataset.revision",
        "dataset.options", "order.name", "order.stages", "logger.project",
        "logger.entity", "logger.group", "logger.tags", "train.gradient_checkpointing", "train.bf16",
        "train.disable_dropout", "diagnostics.grad_cosine", "diagnostics.adapter_movement",
        "diagnostics.likelihood", "ref_cache_dir", "eval.generate", "eval.generation", "eval.generation.greedy",
        "scorer", "scorer.revision", "scorer.base_model", "stage_store", "stage_store_dir",
        "order.stage_overrides",  # its positions, keys and values: tests/test_stage_settings.py
    }
    loss_keys = {k for k in _schema_keys(run_config()) if k.startswith("loss.")}  # tests/test_losses.py
    tested = {row[1] for row in BAD_VALUES} | {row[1] for row in BAD_CONFIGS}
    assert set(_schema_keys(run_config())) - free - loss_keys - tested == set()



def test_a_typo_gets_did_you_mean_on_the_first_attempt_and_leaves_no_directory(tmp_path):
    """`lrr=1e-3` got Hydra's "Key 'lrr' not in 'RunConfig'" and its `+lrr` hint; only that second attempt
    got seqdpo's suggestion, and it left outputs/runs/+lrr=1e-3/seqdpo.log behind."""
    from cluster_helpers import explain, run, seqdpo_cmd

    first = run(seqdpo_cmd("lrr=1e-3", f"hydra.run.dir={tmp_path / 'first'}"), cwd=tmp_path)
    assert first.returncode == 1, explain(first)
    assert "seqdpo: 'lrr' is not a key of seqdpo's config: did you mean 'lr'?" in first.stderr, explain(first)
    second = run(seqdpo_cmd("+lrr=1e-3", "logger=none"), cwd=tmp_path)  # Hydra's default directory, from the overrides
    assert second.returncode == 1 and "did you mean 'lr'?" in second.stdout + second.stderr, explain(second)
    assert not (tmp_path / "first").exists()
    assert not (tmp_path / "outputs" / "runs" / "+lrr=1e-3").exists(), explain(second)


def test_override_hints_leave_groups_hydra_keys_and_free_dicts_alone():
    from seqdpo.app import unknown_override_hints

    fine = ["dataset=hh_rlhf", "experiment=sdpo", "hydra/launcher=submitit_local", "hydra.run.dir=x",
            "dataset.options.markers=2", "+lrr=1", "train.max_steps=4", "-m"]
    assert unknown_override_hints(fine) == []
    assert unknown_override_hints(["dataset.n_trian=4"]) == [
        "'dataset.n_trian' is not a key of seqdpo's config: did you mean 'dataset.n_train'? "
        "(adding it with +dataset.n_trian is refused too)"
    ]
