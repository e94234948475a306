"""Every experiment file composes, and every point of its sweep grid is a valid RunConfig.

The grid is expanded the way Hydra's basic sweeper does it (OverridesParser, cartesian product of
`hydra.sweeper.params`), so a typo in a sweep value fails here and not on the cluster.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import seqdpo.app  # noqa: F401  (registers the run_schema node and the seqdpo_dirname resolver)
from seqdpo.config import RunConfig, stage_objectives
from seqdpo.validation import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    # one initialisation for the module: re-initialising per compose costs about a second each
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_run(overrides: list[str]) -> tuple[RunConfig, dict]:
    return _compose_run(tuple(overrides))


@functools.lru_cache(maxsize=None)  # each grid point is composed once for the whole module (~0.4 s each)
def _compose_run(overrides: tuple[str, ...]) -> tuple[RunConfig, dict]:
    cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    with open_dict(cfg):
        del cfg["hydra"]
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    validate(run)
    return run, params


def grid(params: dict) -> list[list[str]]:
    """The sweep's jobs as override lists, as hydra's BasicSweeper builds them."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


def test_there_are_experiments():
    assert {"paper_orders", "sdpo", "loss_ablation", "synthetic_relations"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_grid_composes_and_validates(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n# Question:"), "open with the package line, then the question"
    assert f"experiment={name}" in text, "the file must show the exact command"
    _, params = compose_run([f"experiment={name}"])
    assert params, f"experiment '{name}' declares no sweep (hydra.sweeper.params)"
    jobs = grid(params)
    runs = [compose_run([f"experiment={name}", *job])[0] for job in jobs]
    # every grid point is a different job: a sweep value that is silently ignored would collapse them
    identities = {(r.dataset.name, r.order.name, r.loss.name, r.reference, r.seed, str(r.dataset.options), str(r.strategy),
                   str(r.order.stage_overrides)) for r in runs}
    assert len(identities) == len(jobs)


def test_paper_orders_grid():
    _, params = compose_run(["experiment=paper_orders"])
    runs = [compose_run(["experiment=paper_orders", *job])[0] for job in grid(params)]
    assert sorted((r.dataset.name, r.order.name) for r in runs) == sorted(
        itertools.product(["helpsteer2", "hh_rlhf", "pku_saferlhf", "ultrafeedback"], ["ab", "ba"])
    )
    for r in runs:
        assert (r.beta, r.lr, r.lora.r, r.model.name) == (0.3, 5e-5, 32, "meta-llama/Llama-3.1-8B-Instruct")
        assert r.loss.name == "dpo" and r.reference == "base"
        # the experiment's values must beat conf/config.yaml's (experiment after _self_ in the defaults)
        assert (r.train.grad_accum, r.train.bf16, r.train.gradient_checkpointing) == (4, True, True)
        assert len(stage_objectives(r)) == 2


def test_sdpo_orders_partition_one_objective():
    cases = [("sdpo2", 2, "easy_to_hard"), ("sdpo3", 3, "easy_to_hard"), ("sdpo2_random", 2, "random")]
    for order, stages, partition in cases:
        run, _ = compose_run(["experiment=sdpo", f"order={order}", "reference=previous"])
        objectives = stage_objectives(run)
        assert len(objectives) == stages and len(set(objectives)) == 1
        assert run.order.partition == partition and run.reference == "previous"


def test_synthetic_relations_overrides_top_level_scalars():
    run, _ = compose_run(["experiment=synthetic_relations"])
    assert (run.lr, run.model.name, run.dataset.name) == (5e-3, "tiny", "synthetic")


def test_synthetic_grid_options_build():
    # validate() does not see builder options; building the (cheap, local) synthetic data does
    from seqdpo.data import build_objectives

    _, params = compose_run(["experiment=synthetic_relations"])
    configs = {}
    for job in grid(params):
        run, _ = compose_run(["experiment=synthetic_relations", *job])
        configs[str(run.dataset)] = run.dataset
    assert len(configs) > 1
    for dataset in configs.values():
        objectives = build_objectives(dataset, seed=0)
        assert list(objectives) == list(dataset.objectives)


def test_loss_ablation_keeps_each_loss_file():
    run, _ = compose_run(["experiment=loss_ablation", "loss=flex_dpo"])
    assert (run.loss.beta_pos, run.loss.beta_neg, run.loss.beta_neg_ratio) == (None, None, 0.8)
    run, _ = compose_run(["experiment=loss_ablation", "loss=rpo"])
    assert run.loss.components == ["dpo", "sft"]


def test_stage2_beta_study_shares_stage_1_within_a_seed():
    """The stage-2 study: 27 jobs, 3 distinct stage-1 signatures (one per seed), 27 distinct stage 2s, so the stage
    store trains 30 stages instead of 54."""
    from seqdpo.stage_settings import stage_settings
    from seqdpo.stage_signature import StageEnvironment, stage_signatures

    _, params = compose_run(["experiment=stage2_beta"])
    runs = [compose_run(["experiment=stage2_beta", *job])[0] for job in grid(params)]
    env = StageEnvironment("cpu", 1, "code")
    signatures = [stage_signatures(r, env) for r in runs]
    assert len(runs) == 27 and len({s[0] for s in signatures}) == 3 and len({s[1] for s in signatures}) == 27
    assert sorted({stage_settings(r)[1].beta for r in runs}) == [0.1, 0.3, 1.0]
    assert {stage_settings(r)[0].beta for r in runs} == {0.3} == {r.beta for r in runs}
