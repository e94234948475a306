"""Per-stage settings (seqdpo/stage_settings.py): `+order.stage_overrides.<k>.<key>=value` composed by Hydra,
resolved into one StageSettings per stage, refused with the full key when a position, key or value is wrong."""

import pandas as pd
import pytest

from conftest import compose, run_config
from seqdpo.app import _dirname
from seqdpo.config import ConfigError, signature
from seqdpo.stage_settings import stage_settings


def test_without_overrides_every_stage_trains_with_the_global_settings_and_the_signature_stays():
    cfg = run_config(["order=aba", "lr=1e-3", "loss=ipo"])
    for s in stage_settings(cfg):
        assert (s.lr, s.beta, s.loss, s.train, s.strategy, s.overridden) == (
            cfg.lr, cfg.beta, cfg.loss, cfg.train, cfg.strategy, ())
    # the store switch and its location are not part of a job's identity or its directory name
    assert signature(run_config(["stage_store=off", "stage_store_dir=/tmp/elsewhere"])) == signature(run_config())
    hc = compose(["stage_store=off", "stage_store_dir=/tmp/elsewhere"], hydra_cfg=True).hydra
    assert _dirname(hc.job.override_dirname) == "default"


def test_an_override_changes_only_its_stage_and_is_carried_by_the_signature_and_the_directory_name():
    overrides = ["+order.stage_overrides.2.beta=0.1", "+order.stage_overrides.2.loss.name=ipo",
                 "+order.stage_overrides.2.train.max_steps=7", "+order.stage_overrides.2.lr=1"]
    cfg = run_config(overrides)
    first, second = stage_settings(cfg)
    assert (first.lr, first.beta, first.loss.name, first.train.max_steps) == (cfg.lr, cfg.beta, cfg.loss.name, cfg.train.max_steps)
    # Hydra parses 1 as an int; the stage gets the float the global lr is
    assert (second.lr, second.beta, second.loss.name, second.train.max_steps) == (1.0, 0.1, "ipo", 7)
    assert isinstance(second.lr, float)
    assert set(second.overridden) == {"beta", "loss.name", "train.max_steps", "lr"}
    assert cfg.beta == 0.3  # evaluation keeps the job's beta
    assert signature(cfg) != signature(run_config())
    assert signature(cfg) != signature(run_config(overrides[:1]))
    name = _dirname(compose(overrides[:1], hydra_cfg=True).hydra.job.override_dirname)
    assert name == "+order.stage_overrides.2.beta=0.1"


def test_strategy_knobs_act_per_stage_from_stage_2(tmp_path):
    from seqdpo.strategies.replay import draw

    cfg = run_config(["strategy=replay", "order=abc", "dataset.objectives=[polite,factual,concise]",
                      "+order.stage_overrides.3.strategy.ratio=1.0"])
    assert [s.strategy.ratio for s in stage_settings(cfg)] == [0.25, 0.25, 1.0]
    own = [pd.DataFrame({"objective": o, "pair_id": [f"{o}-{i}" for i in range(8)]}) for o in ("polite", "factual", "concise")]
    drawn = draw([s.strategy.ratio for s in stage_settings(cfg)], cfg.seed, own)
    assert drawn.groupby("stage").size().to_dict() == {2: 2, 3: 8}  # 0.25 x 8, then 1.0 x 8 from the 16 earlier pairs


@pytest.mark.parametrize("overrides,key,says", [
    (["+order.stage_overrides.3.beta=0.1"], "order.stage_overrides.3", "not a stage position of order 'ab' (1 to 2"),
    (["+order.stage_overrides.x.lr=1"], "order.stage_overrides.x", "not a stage position"),
    (["+order.stage_overrides.2.lrr=1"], "order.stage_overrides.2.lrr", "did you mean 'lr'?"),
    (["+order.stage_overrides.2.seed=1"], "order.stage_overrides.2.seed", "cannot be set per stage"),
    (["+order.stage_overrides.2.beta=-1"], "order.stage_overrides.2.beta", "must be > 0, got -1.0"),
    (["+order.stage_overrides.2.beta=high"], "order.stage_overrides.2.beta", "must be a float"),
    (["+order.stage_overrides.2.lr=null"], "order.stage_overrides.2.lr", "cannot be null"),
    (["+order.stage_overrides.2.train.max_steps=0"], "order.stage_overrides.2.train.max_steps", "or -1 to train"),
    (["+order.stage_overrides.2.loss.name=nope"], "order.stage_overrides.2.loss.name", "unknown loss 'nope'"),
    (["+order.stage_overrides.2.loss.label_smoothing=0.1"], "order.stage_overrides.2.loss.label_smoothing",
     "none of ['dpo'] reads it"),
    (["+order.stage_overrides.2.strategy.ratio=0.5"], "order.stage_overrides.2.strategy.ratio",
     "not a per-stage knob of strategy 'sequential'"),
    (["strategy=replay", "+order.stage_overrides.2.strategy.strength=1"], "order.stage_overrides.2.strategy.strength",
     "not a per-stage knob of strategy 'replay'"),
    (["strategy=replay", "+order.stage_overrides.1.strategy.ratio=0.5"], "order.stage_overrides.1.strategy.ratio",
     "acts from stage 2 on"),
    (["strategy=replay", "+order.stage_overrides.2.strategy.ratio=0"], "order.stage_overrides.2.strategy.ratio",
     "must be > 0"),
    (["strategy=joint", "+order.stage_overrides.1.lr=1e-3"], "order.stage_overrides.1", "joint trains one stage"),
    (["strategy=anchor", "strategy.penalty=ewc", "order=aba", "+order.stage_overrides.2.strategy.strength=0"],
     "order.stage_overrides.2.strategy.strength", "skips the EWC Fisher of stage 1"),
])
def test_a_wrong_override_is_refused_with_its_full_key(overrides, key, says):
    with pytest.raises(ConfigError) as e:
        run_config(overrides)
    assert e.value.key == key and says in str(e.value), str(e.value)


def test_an_override_of_a_strategy_knob_is_accepted_where_the_strategy_reads_it():
    cfg = run_config(["strategy=anchor", "order=aba", "+order.stage_overrides.3.strategy.strength=0.5",
                      "+order.stage_overrides.2.strategy.decay=0.5"])
    assert [(s.strategy.strength, s.strategy.decay) for s in stage_settings(cfg)] == [(1.0, 1.0), (1.0, 0.5), (0.5, 1.0)]


def test_an_anchor_stage_at_strength_0_is_planned_as_sequentials(tmp_path):
    from datasets import Dataset

    from seqdpo.strategies import plan_stages

    cfg = run_config(["strategy=anchor", "order=aba", "+order.stage_overrides.2.strategy.strength=0",
                      "+order.stage_overrides.3.strategy.strength=2.5"])
    sets = [Dataset.from_dict({"pair_id": [f"{o}-{i}" for i in range(4)]}) for o in ("polite", "factual", "polite")]
    plans = plan_stages(["polite", "factual", "polite"], sets, stage_settings(cfg), tmp_path, dataset="synthetic", write=False)
    assert [p.anchored for p in plans] == [False, False, True]
    assert plans[2].info == {"anchor": "l2", "strength": 2.5, "anchored_stages": 2}
