"""Forgetting mitigations (`strategy=`): plans, penalties, and real jobs of every strategy on the tiny model,
their outputs, resume after an interruption, and what each strategy promises (seqdpo/strategies/)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, concatenate_datasets

from cluster_helpers import assert_same_pairs
from conftest import CONF, run_config
from seqdpo.config import signature

STRATEGY_FILES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))

# --- config ------------------------------------------------------------------------------------------


def test_the_five_strategies_have_files():
    assert STRATEGY_FILES == ["anchor", "joint", "merge", "replay", "sequential"]
    assert run_config().strategy.name == "sequential"


def test_signature_holds_only_the_keys_a_strategy_reads():
    sequential = signature(run_config())
    assert signature(run_config(["strategy=joint"])) != sequential
    assert signature(run_config(["strategy=replay", "strategy.ratio=0.5"])) != signature(run_config(["strategy=replay"]))
    assert signature(run_config(["strategy=anchor", "strategy.strength=0"])) != sequential  # its own directory
    # keys a strategy does not read stay out of its identity (validate() refuses them in a composed config)
    cfg = run_config(["strategy=joint"])
    cfg.strategy.ratio = 0.9
    assert signature(cfg) == signature(run_config(["strategy=joint"]))
    cfg = run_config()
    cfg.strategy.strength = 7.0
    assert signature(cfg) == sequential


# --- plans (no model) ---------------------------------------------------------------------------------


def _set(name, k, swapped=0):
    """k pairs of prompt i with response i over response i + 100; the first `swapped` prefer the other way round."""
    return Dataset.from_dict({"pair_id": [f"{name}-{i}" for i in range(k)], "prompt": [f"prompt {i}" for i in range(k)],
                              "chosen": [f"response {i + 100 * (i < swapped)}" for i in range(k)],
                              "rejected": [f"response {i + 100 * (i >= swapped)}" for i in range(k)]})


def _sets(sizes=(8, 8), names=("polite", "factual")):
    return list(names), [_set(n, k) for n, k in zip(names, sizes)]


def _plan(cfg, objs, sets, out, *, write=True):
    """The plan of `objs` with every stage at the job's settings (seqdpo.job_settings.stage_settings)."""
    from seqdpo.job_settings import stage_settings
    from seqdpo.strategies import plan_stages

    (job, *_) = stage_settings(cfg)
    return plan_stages(objs, sets, [job] * len(objs), out, dataset=cfg.dataset.name, write=write)


@pytest.mark.parametrize("ratio,expected", [(0.25, 2), (0.5, 4), (2.0, 8)])
def test_replay_draws_the_ratio_once_and_trains_on_the_record(tmp_path, ratio, expected):
    cfg = run_config(["strategy=replay", f"strategy.ratio={ratio}"])
    objs, sets = _sets((8, 8))
    plans = _plan(cfg, objs, sets, tmp_path, write=True)
    record = pd.read_parquet(tmp_path / "replay.parquet")
    assert len(record) == expected and set(record.stage) == {2} and set(record.objective) == {"polite"}
    assert len(plans[0].train) == 8 and plans[0].info == {}
    stage2 = plans[1]
    assert list(stage2.train["pair_id"]) == list(stage2.pairs.pair_id)
    assert sorted(stage2.pairs[stage2.pairs.objective == "polite"].pair_id) == sorted(record.pair_id)
    assert (stage2.pairs.objective == "factual").sum() == 8
    assert stage2.info == {"replayed": expected, "replay_requested": int(round(ratio * 8)), "replay_capped": int(round(ratio * 8)) - expected}
    assert stage2.max_steps == 1  # match_steps: sequential's 8 pairs at batch 8, whatever was replayed
    # a rerun trains on the recorded pairs, not on a new draw
    record = record.iloc[1:]
    record.to_parquet(tmp_path / "replay.parquet", index=False)
    again = _plan(cfg, objs, sets, tmp_path, write=True)[1]
    assert sorted(again.pairs[again.pairs.objective == "polite"].pair_id) == sorted(record.pair_id)


def test_replay_pool_is_every_earlier_stage_and_the_draw_follows_the_seed(tmp_path):
    from seqdpo.strategies.replay import draw

    objs, sets = _sets((8, 8, 8), ("polite", "factual", "concise"))
    cfg = run_config(["strategy=replay", "strategy.ratio=1.0", "order.stages=[a,b,c]",
                      "dataset.objectives=[polite,factual,concise]"])
    plans = _plan(cfg, objs, sets, tmp_path, write=False)
    assert not (tmp_path / "replay.parquet").exists()  # write=False: a DDP rank other than 0
    assert set(plans[2].pairs.objective) == {"polite", "factual", "concise"} and len(plans[2].train) == 16
    own = [p.pairs[p.pairs.objective == o] for p, o in zip(plans, objs)]
    first = draw(cfg.strategy.ratio, cfg.seed, own)
    assert first.equals(draw(cfg.strategy.ratio, cfg.seed, own))
    cfg.seed = 1
    assert not first.equals(draw(cfg.strategy.ratio, cfg.seed, own))


@pytest.mark.parametrize("n,batch,accum,epochs", [(8, 8, 1, 1.0), (9, 4, 1, 1.0), (12, 4, 2, 1.0), (10, 4, 1, 2.5), (3, 8, 4, 1.0)])
def test_optimizer_steps_is_what_the_trainer_runs(n, batch, accum, epochs, tmp_path):
    """The count match_steps and joint plan with, against transformers' own count for the same dataloader."""
    from transformers import Trainer, TrainingArguments

    from seqdpo.strategies import optimizer_steps

    cfg = run_config([f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.epochs={epochs}"])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             num_train_epochs=epochs, use_cpu=True, report_to="none")
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=[{"x": i} for i in range(n)])
    expected = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[6]  # its max_steps
    assert optimizer_steps(cfg.train, n) == expected


def test_replay_without_match_steps_passes_over_every_pair(tmp_path):
    cfg = run_config(["strategy=replay", "strategy.ratio=1.0", "strategy.match_steps=false"])
    objs, sets = _sets((8, 8))
    assert _plan(cfg, objs, sets, tmp_path, write=True)[1].max_steps is None  # 16 pairs: 2 steps, sequential's 1


def test_joint_is_one_stage_on_the_union(tmp_path):
    objs, sets = _sets((8, 6))
    (plan,) = _plan(run_config(["strategy=joint"]), objs, sets, tmp_path, write=True)
    assert plan.name == "joint" and len(plan.train) == 14 and plan.max_steps == 2  # sequential: 1 step a stage at batch 8
    assert plan.info["contradictory_pairs"] == 0
    from seqdpo.strategies import row_names

    assert row_names("joint", objs) == ["joint"] and row_names("replay", objs) == objs
    assert plan.pairs.objective.value_counts().to_dict() == {"polite": 8, "factual": 6}
    (plan,) = _plan(run_config(["strategy=joint", "train.max_steps=5"]), objs, sets, tmp_path, write=True)
    assert plan.max_steps == 10  # as many steps as the two sequential stages
    # an objective in two stages (no partition) trains once in the union; the repeats are counted
    cfg = run_config(["strategy=joint", "order.stages=[a,b,a]"])
    (plan,) = _plan(cfg, ["polite", "factual", "polite"], [sets[0], sets[1], sets[0]], tmp_path, write=True)
    assert len(plan.train) == 14 and plan.info["repeated_pairs_dropped"] == 8


def test_contradictory_pairs_are_the_same_prompt_with_the_responses_swapped():
    from seqdpo.strategies.contradictions import contradictory_pairs

    union = concatenate_datasets([_set("helpful", 8), _set("harmless", 8, swapped=3)])  # prompts 0-2 flip
    assert contradictory_pairs(union, "hh_rlhf") == 6  # both members of each of the 3 twins
    assert contradictory_pairs(_set("helpful", 8), "hh_rlhf") == 0


@pytest.mark.parametrize("relation,strength,expected", [("conflicting", 1.0, 256), ("conflicting", 0.5, 132), ("orthogonal", 0.5, 0)])
def test_joint_counts_and_warns_about_the_synthetic_worlds_contradictions(tmp_path, caplog, relation, strength, expected):
    """The conflicting world's coupled pairs are twins across objectives (polite over factual, factual over
    polite): every pair at strength 1, about half at 0.5 (the study's setting), none when orthogonal."""
    from seqdpo.data import build_objectives
    cfg = run_config(["experiment=mitigations", "strategy=joint", f"dataset.options.relation={relation}",
                      f"dataset.options.strength={strength}"])
    objectives = build_objectives(cfg.dataset, cfg.seed)
    with caplog.at_level("WARNING", logger="seqdpo"):
        (plan,) = _plan(cfg, ["polite", "factual"], [objectives[o].train for o in ("polite", "factual")], tmp_path, write=True)
    assert plan.info["contradictory_pairs"] == expected
    assert (f"joint: {expected} of the 256 pairs in the union have a twin" in caplog.text) == (expected > 0)


def test_each_stage_plans_with_its_own_settings(tmp_path):
    """A plan carries each stage's settings (seqdpo.stage_settings): replay's match_steps counts stage 2's steps
    with stage 2's batch size, and the settings must match the stages one to one."""
    from dataclasses import replace

    from seqdpo.job_settings import stage_settings
    from seqdpo.strategies import plan_stages

    cfg = run_config(["strategy=replay", "strategy.ratio=1.0"])
    first, second = stage_settings(cfg)
    second = replace(second, lr=1e-3, train=replace(second.train, batch_size=2))
    objs, sets = _sets((8, 8))
    plans = plan_stages(objs, sets, [first, second], tmp_path, dataset=cfg.dataset.name, write=False)
    assert [p.settings for p in plans] == [first, second]
    assert plans[1].max_steps == 4  # its own 8 pairs at batch 2 (the job's batch, 8, would be 1 step)
    with pytest.raises(ValueError, match="1 stage settings for the 2 stages"):
        plan_stages(objs, sets, [first], tmp_path, dataset=cfg.dataset.name, write=False)


def test_merge_trains_fresh_adapters_then_a_merged_row(tmp_path):
    from seqdpo.strategies import row_names

    objs, sets = _sets()
    plans = _plan(run_config(["strategy=merge", "strategy.method=ties"]), objs, sets, tmp_path, write=True)
    assert [p.name for p in plans] == ["polite", "factual", "merged"]
    assert [p.fresh for p in plans] == [False, True, False] and plans[2].train is None and plans[2].merge == (1, 2)
    assert plans[2].info == {"method": "ties", "weights": [1.0, 1.0], "density": 0.5}  # ties averages by itself
    assert [p.name for p in plans] == ["polite", "factual", "merged"] == row_names("merge", objs)


def _lora_net():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 8)),
                          LoraConfig(r=2, lora_alpha=6, target_modules=["0", "1"]))


def _trained_from(model, init: dict, seed: int, scale=0.1):
    """The adapter moved at random from `init`, as a stage trained from it; its weight change per module."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(init[n] + scale * torch.randn(p.shape, generator=gen))
    return {n: m.get_delta_weight("default").detach().clone() for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _merged(tmp_path, weights=None, method="linear", density=0.5, same=False):
    """(merge record, the merged weight change per module, the singles' weight changes) of two adapters."""
    from peft.tuners.lora import LoraLayer

    from seqdpo.config import StrategyConfig
    from seqdpo.strategies.merge import merge_into_default

    model = _lora_net()
    model.save_pretrained(tmp_path / "init")
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    deltas = []
    for i in (1, 2):
        deltas.append(_trained_from(model, init, seed=1 if same else i))
        model.save_pretrained(tmp_path / f"stage_{i}")
    strategy = StrategyConfig(name="merge", method=method, weights=weights, density=density)
    record = merge_into_default(model, [tmp_path / "stage_1", tmp_path / "stage_2"], tmp_path / "init", strategy, seed=0)
    merged = {n: m.get_delta_weight("default").detach() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    return record, merged, deltas


def _close(a: dict, b: dict):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6 * float(b[n].abs().max()))


@pytest.mark.parametrize("weights,expected", [(None, 0.5), ([0.5, 0.5], 0.5), ([1.0, 1.0], 1.0)])
def test_linear_merge_is_the_weighted_sum_of_the_weight_changes(tmp_path, weights, expected):
    """Equal weights (null) are the average of the two dW_i, (1, 1) their sum, exactly at rank 2 + 2."""
    record, merged, (d1, d2) = _merged(tmp_path, weights)
    _close(merged, {n: expected * (d1[n] + d2[n]) for n in d1})
    assert record["rank"] == 4 and record["reconstruction_error"] < 1e-6


def test_ties_on_two_identical_adapters_returns_that_adapter(tmp_path):
    record, merged, (d1, d2) = _merged(tmp_path, method="ties", density=1.0, same=True)
    _close(d1, d2)
    _close(merged, d1)
    assert record["rank"] == 4 and record["reconstruction_error"] < 1e-6


def test_ties_trims_the_weight_changes_and_records_what_rank_4_loses(tmp_path):
    """At density 0.5 TIES keeps the larger half of each dW_i's entries: a dense matrix of full rank, stored
    at rank 4; the record is the relative Frobenius error of that truncation, computed here independently."""
    record, merged, (d1, _) = _merged(tmp_path, method="ties", density=0.5, same=True)
    err, size = 0.0, 0.0
    for n, d in d1.items():
        keep = d.abs() >= d.abs().flatten().topk(int(0.5 * d.numel())).values[-1]
        trimmed = d * keep
        U, S, Vh = torch.linalg.svd(trimmed, full_matrices=False)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        _close({n: merged[n]}, {n: best})
        err, size = err + float(((best - trimmed) ** 2).sum()), size + float((trimmed ** 2).sum())
    assert record["reconstruction_error"] == pytest.approx((err / size) ** 0.5, rel=1e-4) and record["reconstruction_error"] > 0.05


def test_anchor_penalty_is_the_own_sum_over_earlier_stages_on_the_factors():
    """strength * sum_j c_j sum_i F_ji (theta_i - theta_ji)^2 over every LoRA A and B (F = 1: L2)."""
    from seqdpo.strategies.anchor import Anchor

    model = _lora_net()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta1 = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    theta2 = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    for F in (None, fisher):
        penalty = Anchor(model, 3.0, [(0.5, theta1, F), (1.0, theta2, F)])
        with torch.no_grad():
            for p in params.values():
                p.add_(0.05)
        own = sum(c * float((((params[n].detach() - t[n]) ** 2) * (1 if F is None else F[n])).sum())
                  for c, t in ((0.5, theta1), (1.0, theta2)) for n in params)
        assert penalty().item() == pytest.approx(3.0 * own, rel=1e-5)


# --- real jobs -----------------------------------------------------------------------------------------

# Three steps a stage, no warmup (its first step would have lr 0): the anchor acts from the second step on.
TINY = ["dataset.n_train=8", "dataset.n_eval=4", "train.batch_size=4", "train.max_steps=3",
        "train.warmup_ratio=0", "train.save_steps=1", "lr=5e-3"]
NO_DIAGNOSTICS = ["diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false", "diagnostics.likelihood=false"]
CASES = {  # diagnostics and W&B where a strategy changes the rows they follow (joint, merge)
    "sequential": ["strategy=sequential", *NO_DIAGNOSTICS],
    "joint": ["strategy=joint"],
    "replay": ["strategy=replay", "strategy.ratio=0.5", *NO_DIAGNOSTICS],
    "merge": ["strategy=merge", "strategy.method=dare_ties", "logger=wandb"],
    "anchor": ["strategy=anchor", "strategy.strength=1000", *NO_DIAGNOSTICS],
    "anchor_ewc": ["strategy=anchor", "strategy.penalty=ewc", "strategy.strength=1000", "strategy.fisher_pairs=4", *NO_DIAGNOSTICS],
}
EXPECTED_ROWS = {"joint": ["base", "joint"], "merge": ["base", "polite", "factual", "merged"]}


def _run(tmp_path_factory, name, overrides, cache):
    from seqdpo.runner import run_job

    overrides = [*TINY, f"ref_cache_dir={cache}", *overrides]
    if not any(o.startswith("logger=") for o in overrides):
        overrides.append("logger=none")
    cfg = run_config(overrides)
    out = tmp_path_factory.mktemp(name) / "run"
    return cfg, out, run_job(cfg, str(out))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refcache")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, cache):
    """One uninterrupted job per case, run once for the module."""
    return {name: _run(tmp_path_factory, name, overrides, cache) for name, overrides in CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_strategy_writes_every_output(jobs, case):
    cfg, out, matrix = jobs[case]
    rows = EXPECTED_ROWS.get(case, ["base", "polite", "factual"])
    assert matrix["stages"] == rows and json.loads((out / "status.json").read_text())["state"] == "done"
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert len(pairs) == len(rows) * 2 * 4 and not pairs.duplicated(["stage", "objective", "pair_id"]).any()
    saved = json.loads((out / "matrix.json").read_text())
    assert saved["metrics"] == matrix["metrics"] and saved["strategy"]["name"] == cfg.strategy.name
    assert (out / "diagnostics.json").exists() == cfg.diagnostics.likelihood
    for k in range(1, len(rows)):
        assert (out / f"stage_{k}" / "DONE").exists() and (out / f"stage_{k}" / "adapter" / "adapter_config.json").exists()
        trains = rows[k] != "merged"
        assert (out / f"stage_{k}" / "train_pairs.parquet").exists() == trains
        assert (out / f"stage_{k}" / "diagnostics.json").exists() == (trains and cfg.diagnostics.likelihood)
    if cfg.logger.name == "wandb":
        from wandb_offline import read_run

        run = read_run(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
        for k in range(len(rows)):  # the merged row too
            assert run["summary"][f"matrix/accuracy/stage{k}/polite"] == pytest.approx(matrix["metrics"]["accuracy"][k][0])
        # the compute of each trained stage and the merged adapter's rank (2 x 32) beside them
        assert [run["summary"][f"strategy/stage{k}/train_steps"] for k in (1, 2)] == [3, 3]
        assert run["summary"]["strategy/stage1/pairs_seen"] == 12 and run["summary"]["strategy/stage3/rank"] == 64


@pytest.mark.slow
def test_merge_measures_every_stage_from_the_initial_adapter(jobs):
    """strategy=merge trains each stage from adapter_init: stage 2's movement, and its cosine with stage 1's,
    are measured from there (stage 2's start used to overwrite the adapter after stage 1: stage 1's
    movement read as zero and the cosine as NaN)."""
    from seqdpo.analysis import movement as M

    cfg, out, _ = jobs["merge"]
    init, s1, s2 = (M.load_adapter_state(str(p)) for p in (out / "adapter_init", out / "stage_1" / "adapter", out / "stage_2" / "adapter"))
    scaling = cfg.lora.effective_alpha() / cfg.lora.r
    diag = json.loads((out / "stage_2" / "diagnostics.json").read_text())
    got = diag["movement_cosine"]["stage_1"]
    assert all(got[k] is not None and np.isfinite(got[k]) for k in ("effective_cosine", "raw_cosine")), got  # NaN is saved as null
    want = M.movement_cosine(init, s1, s2, scaling, s2_start=init)
    assert got["effective_cosine"] == pytest.approx(want["effective_cosine"], rel=1e-6)
    assert got["raw_cosine"] == pytest.approx(want["raw_cosine"], rel=1e-6)
    assert diag["movement"]["effective_norm"] == pytest.approx(M.movement(init, s2, scaling)["effective_norm"], rel=1e-6)


@pytest.mark.slow
def test_a_finished_merge_job_runs_again_without_reloading_the_merged_adapter(tmp_path_factory, cache):
    """The merged adapter's rank (2 x 32) is not the job's (32): reloading it into the job's adapter failed."""
    from seqdpo.runner import run_job

    cfg, out, matrix = _run(tmp_path_factory, "merge_again", ["strategy=merge", *NO_DIAGNOSTICS], cache)
    assert run_job(cfg, str(out))["metrics"] == matrix["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["joint", "replay", "merge", "anchor_ewc"])  # sequential: tests/test_requeue.py
def test_an_interrupted_job_resumes_to_the_same_pairs(jobs, case, tmp_path_factory, cache, monkeypatch):
    """Stopped (KeyboardInterrupt, as a signal handler raises) at the 5th optimizer step, i.e. inside the last
    trained stage after its first checkpoint, then run again in the same directory."""
    from seqdpo.trainer import SeqDPOTrainer

    real, calls = SeqDPOTrainer.training_step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated preemption")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SeqDPOTrainer, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path_factory, case + "_resumed", CASES[case], cache)
    monkeypatch.undo()
    out = next(p for p in tmp_path_factory.getbasetemp().glob(f"{case}_resumed*/run"))
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    from seqdpo.runner import run_job

    cfg = jobs[case][0]
    run_job(cfg, str(out))
    last_trained = 1 if case == "joint" else 2
    done = json.loads((out / f"stage_{last_trained}" / "DONE").read_text())
    assert "checkpoint-" in done["resumed_from"]
    # the compute record spans the interruption: the checkpoint carries what was seen before it
    uninterrupted = json.loads((jobs[case][1] / f"stage_{last_trained}" / "DONE").read_text())
    assert (done["pairs_seen"], done["tokens_seen"]) == (uninterrupted["pairs_seen"], uninterrupted["tokens_seen"])
    assert_same_pairs(out / "pairs.parquet", jobs[case][1] / "pairs.parquet")


@pytest.mark.slow
def test_replay_job_trains_on_exactly_the_recorded_pairs(jobs):
    cfg, out, matrix = jobs["replay"]
    record = pd.read_parquet(out / "replay.parquet")
    trained = pd.read_parquet(out / "stage_2" / "train_pairs.parquet")
    assert len(record) == 4 == cfg.strategy.ratio * 8  # ratio 0.5 of the 8 factual pairs
    assert sorted(trained[trained.objective == "polite"].pair_id) == sorted(record.pair_id)
    assert set(record.pair_id) <= set(pd.read_parquet(out / "stage_1" / "train_pairs.parquet").pair_id)
    assert matrix["strategy"]["stages"][1]["replayed"] == 4


@pytest.mark.slow
def test_joint_trains_once_on_every_objectives_pairs(jobs, tmp_path_factory, cache):
    _, out, _ = jobs["joint"]
    trained = pd.read_parquet(out / "stage_1" / "train_pairs.parquet")
    assert trained.objective.value_counts().to_dict() == {"polite": 8, "factual": 8}
    assert json.loads((out / "stage_1" / "DONE").read_text())["train_steps"] == 6  # 2 stages x max_steps 3
    # by epochs: one pass over the 16 pairs of the union, 4 per step
    _, out, _ = _run(tmp_path_factory, "joint_epoch", ["strategy=joint", "train.max_steps=-1", *NO_DIAGNOSTICS], cache)
    assert json.loads((out / "stage_1" / "DONE").read_text())["train_steps"] == 4


@pytest.mark.slow
def test_merge_at_weights_one_zero_is_the_first_adapter(jobs, tmp_path_factory, cache):
    _, out, _ = _run(tmp_path_factory, "merge10", ["strategy=merge", "strategy.weights=[1.0,0.0]", *NO_DIAGNOSTICS], cache)
    pairs = pd.read_parquet(out / "pairs.parquet").sort_values(["objective", "pair_id"])
    first, merged = pairs[pairs.stage == 1], pairs[pairs.stage == 3]
    for col in ("policy_chosen_logps", "policy_rejected_logps", "margin"):
        np.testing.assert_allclose(merged[col].to_numpy(), first[col].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=col)
    assert (merged.accuracy.to_numpy() == first.accuracy.to_numpy()).all()
    # the second single adapter trained from the base: its stage-1 numbers are the sequential job's
    seq = pd.read_parquet(jobs["sequential"][1] / "pairs.parquet")
    pd.testing.assert_frame_equal(pairs[pairs.stage == 1].reset_index(drop=True),
                                  seq[seq.stage == 1].sort_values(["objective", "pair_id"]).reset_index(drop=True))


@pytest.mark.slow
def test_replay_with_match_steps_trains_sequentials_optimizer_steps(tmp_path_factory, cache, tmp_path):
    """By epochs (no max_steps): sequential takes 2 steps of 4 pairs a stage on 8 pairs; replay's stage 2 holds
    8 + 4 replayed pairs and, with match_steps, also takes 2 steps (8 of its 12 pairs seen)."""
    from seqdpo.data import build_objectives
    from seqdpo.data.accounting import prepare_pairs
    from seqdpo.modeling import load_tokenizer
    from seqdpo.report import build_report

    epochs = ["train.max_steps=-1", *NO_DIAGNOSTICS]
    runs = {name: _run(tmp_path_factory, name, [*strategy, *epochs], cache)
            for name, strategy in (("sequential", ["strategy=sequential"]), ("replay", ["strategy=replay", "strategy.ratio=0.5"]))}
    stages = {name: m["strategy"]["stages"] for name, (_, _, m) in runs.items()}
    assert [s["train_steps"] for s in stages["replay"]] == [s["train_steps"] for s in stages["sequential"]] == [2, 2]
    assert stages["replay"][1]["pairs"] == 12 and stages["replay"][1]["pairs_seen"] == 8
    # stage 1 sees each of its 8 pairs once: its tokens are theirs, prompt + chosen + rejected
    cfg = runs["sequential"][0]
    polite = prepare_pairs(build_objectives(cfg.dataset, cfg.seed), load_tokenizer(cfg.model), cfg.dataset, cfg.model.max_length,
                           cfg.seed).train["polite"]
    own = sum(len(p) + len(c) + len(r) for p, c, r in zip(polite["prompt_ids"], polite["chosen_ids"], polite["rejected_ids"]))
    assert stages["sequential"][0]["tokens_seen"] == stages["replay"][0]["tokens_seen"] == own
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name, (_, out, _) in runs.items():
        (sweep / name).symlink_to(out, target_is_directory=True)
    build_report(sweep, tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "mitigations.csv")
    assert set(table.steps) == {4} and "tokens_seen" in (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.slow
def test_anchor_at_stage_3_includes_stage_1s_term(tmp_path_factory, cache):
    """Three stages, EWC, decay 0.5: the penalty at stage 3's first step (at theta_2, so stage 2's own term is 0)
    is strength x 0.5 x sum_i F_1i (theta_2i - theta_1i)^2, from the saved adapters and stage 1's saved Fisher."""
    from peft import load_peft_weights
    from safetensors.torch import load_file

    overrides = ["strategy=anchor", "strategy.penalty=ewc", "strategy.fisher_pairs=4", "strategy.decay=0.5", "strategy.strength=10",
                 "order.stages=[a,b,c]", "dataset.objectives=[polite,factual,concise]", "train.logging_steps=1", *NO_DIAGNOSTICS]
    _, out, matrix = _run(tmp_path_factory, "anchor3", overrides, cache)
    log = [json.loads(line) for line in (out / "stage_3" / "train_log.jsonl").read_text().splitlines()]
    first = next(row["anchor/penalty"] for row in log if "anchor/penalty" in row)
    theta1, theta2 = (load_peft_weights(str(out / f"stage_{k}" / "adapter")) for k in (1, 2))
    fisher1 = load_file(str(out / "stage_2" / "anchor_fisher.safetensors"))
    own = 10 * 0.5 * sum(float((f * (theta2[n.replace(".default.", ".")] - theta1[n.replace(".default.", ".")]) ** 2).sum())
                         for n, f in fisher1.items())
    assert own > 0 and first == pytest.approx(own, rel=1e-4)
    stage3 = matrix["strategy"]["stages"][2]
    assert stage3["anchored_stages"] == 2 and stage3["fisher_mean"] > 0 and (out / "stage_3" / "anchor_fisher.safetensors").exists()


def _stage2_movement(out, fisher=None):
    """Effective movement of stage 2 (what L2 pulls on), or its Fisher-weighted raw distance (what EWC pulls on)."""
    from seqdpo.analysis.gradients import normalize_key
    from seqdpo.analysis.movement import load_adapter_state, movement

    s1, s2 = (load_adapter_state(str(out / f"stage_{k}" / "adapter")) for k in (1, 2))
    if fisher is None:
        return movement(s1, s2, 2.0)["effective_norm"]
    weights = {normalize_key(k): v for k, v in fisher.items()}
    return sum(float((weights[k] * (s2[k] - s1[k]) ** 2).sum()) for k in s1)


@pytest.mark.slow
def test_anchor_at_zero_is_sequential_and_pulls_toward_the_previous_stage(jobs, tmp_path_factory, cache):
    from safetensors.torch import load_file

    _, out, _ = _run(tmp_path_factory, "anchor0", ["strategy=anchor", "strategy.strength=0", *NO_DIAGNOSTICS], cache)
    sequential = jobs["sequential"][1]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "pairs.parquet"), pd.read_parquet(sequential / "pairs.parquet"))
    assert not (out / "stage_2" / "anchor_fisher.safetensors").exists()
    free = _stage2_movement(sequential)
    assert free > 0 and _stage2_movement(jobs["anchor"][1]) < 0.9 * free
    # EWC holds the parameters its Fisher marks as important: the Fisher-weighted distance shrinks
    fisher = load_file(str(jobs["anchor_ewc"][1] / "stage_2" / "anchor_fisher.safetensors"))
    assert np.mean(np.concatenate([v.numpy().ravel() for v in fisher.values()])) == pytest.approx(1.0, rel=1e-4)
    assert _stage2_movement(jobs["anchor_ewc"][1], fisher) < 0.9 * _stage2_movement(sequential, fisher)


@pytest.mark.slow
def test_report_has_the_mitigations_view(jobs, tmp_path):
    from seqdpo.report import build_report

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for case in ("sequential", "joint", "replay", "merge"):
        (sweep / case).symlink_to(jobs[case][1], target_is_directory=True)
    written = build_report(sweep, tmp_path / "report")
    rows = pd.read_csv(tmp_path / "report" / "mitigations_jobs.csv")
    assert sorted(rows.strategy.unique()) == ["joint", "merge method=dare_ties weights=equal density=0.5",
                                              "replay ratio=0.5 match_steps=True", "sequential"]
    matrices = {case: jobs[case][2]["metrics"]["accuracy"] for case in ("sequential", "joint", "merge")}
    seq = rows[rows.strategy == "sequential"].set_index("objective")
    assert seq.loc["polite", "final"] == matrices["sequential"][2][0] and seq.loc["polite", "role"] == "A"
    assert seq.loc["polite", "forgetting"] == pytest.approx(matrices["sequential"][1][0] - matrices["sequential"][2][0])
    # joint is aligned with the sequential job: what A learned there, against joint's only stage
    joint = rows[rows.strategy == "joint"].set_index("objective")
    assert joint.loc["polite", "learned_from"] == "sequential"
    assert joint.loc["polite", "forgetting"] == pytest.approx(matrices["sequential"][1][0] - matrices["joint"][1][0])
    merged = rows[rows.strategy.str.startswith("merge")].set_index("objective")
    assert merged.loc["factual", "final"] == matrices["merge"][3][1]  # the merged row is the last
    assert merged.loc["factual", "forgetting"] == pytest.approx(matrices["merge"][2][1] - matrices["merge"][3][1])
    table = pd.read_csv(written["mitigations_csv"])
    assert set(table.seeds) == {1} and table.final_low.notna().all()  # one seed: the job's bootstrap interval
    # compute and merge records: 3 steps a stage for every strategy (joint: 2 x 3); the merged adapter's rank 2 x 32
    assert set(table.steps) == {6} and table.tokens_seen.gt(0).all()
    # dare_ties is dense, but rank 64 is every module's smaller dimension on the tiny model: nothing is lost
    assert merged.loc["factual", "rank"] == 64 and merged.loc["factual", "reconstruction_error"] < 1e-5
    assert rows[rows.strategy == "sequential"]["rank"].isna().all()
    assert list((tmp_path / "report").glob("tradeoff_*.png"))
    assert "## Mitigations" in (tmp_path / "report" / "summary.md").read_text()


# --- the synthetic study (conf/experiment/mitigations.yaml, smaller) ---------------------------------------

STUDY = ["experiment=mitigations", "dataset.options.relation=conflicting", "dataset.n_train=128",
         "dataset.n_eval=64", "logger=none", "eval.bootstrap=0", *NO_DIAGNOSTICS]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three jobs of 128 pairs
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_and_joint_keep_more_of_a_than_sequential(seed, tmp_path):
    """Conflicting world at strength 0.5 (both objectives can be satisfied together): B's stage erodes A
    under sequential training; replaying A's pairs (ratio 0.5) or training jointly keeps more of it."""
    from seqdpo.runner import run_job

    final, learned = {}, {}
    for name, strategy in (("sequential", ["strategy=sequential"]), ("replay", ["strategy=replay", "strategy.ratio=0.5"]),
                           ("joint", ["strategy=joint"])):
        cfg = run_config([*STUDY, *strategy, f"seed={seed}", f"ref_cache_dir={tmp_path / 'cache'}"])
        acc = run_job(cfg, str(tmp_path / name))["metrics"]["accuracy"]
        final[name], learned[name] = acc[-1][0], acc[1][0]
    learned["joint"] = learned["sequential"]  # joint is aligned with the sequential job (report/mitigations.py)
    forgetting = {k: learned[k] - final[k] for k in final}
    assert learned["replay"] == learned["sequential"]  # stage 1 is the same training in both
    assert forgetting["sequential"] > 0.2, forgetting
    assert forgetting["replay"] < forgetting["sequential"] and forgetting["joint"] < forgetting["sequential"], forgetting
