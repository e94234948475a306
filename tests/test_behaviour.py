"""Behavioural evaluation: generation, its cache and resume, the scorers, the metrics, the behaviour block."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SMALL_JOB, run_config
from seqdpo.behaviour import generate as G
from seqdpo.behaviour.guards import distinct_n
from seqdpo.behaviour.metrics import bootstrap_interval, stage_metrics, wilson_interval
from seqdpo.behaviour.prompts import generation_prompts, prompt_key
from seqdpo.behaviour.scorers import OracleScorer, RewardModelScorer, ScoringContext, TrainedRMScorer, oracle_score
from seqdpo.data import DataError, build_objectives
from seqdpo.data import synthetic as S
from seqdpo.job_settings import scoring_settings
from seqdpo.modeling import load_model_and_tokenizer

WELL_FORMED = re.compile(r"^(%s) : [a-z ]+ \.$" % "|".join(S.TOPICS))


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory):
    """One cache directory for the session: the warm start trains once."""
    return tmp_path_factory.mktemp("behaviour-cache")


@pytest.fixture(scope="session")
def warm_base(warm_cache):
    cfg = run_config(["eval.generate=true", f"ref_cache_dir={warm_cache}"])
    model, tok = load_model_and_tokenizer(cfg.model, str(warm_cache))
    return cfg, model, tok


def test_oracle_reads_the_worlds_attributes():
    objs = build_objectives(run_config(["dataset.n_eval=8"]).dataset, 0)
    for name in ("polite", "factual"):
        for row in objs[name].eval:
            # one marker in a slot of 8 (the world's defaults); without the attribute, none
            assert oracle_score(name, row["chosen"][0]["content"]) == 1 / 8
            assert oracle_score(name, row["rejected"][0]["content"]) == 0.0
    assert oracle_score("concise", "tea : it is .") > oracle_score("concise", "tea : it is a thing .")
    assert not OracleScorer().supports("unseen")


def test_destroying_plain_words_cannot_raise_the_oracle_score():
    # The degeneration the issue measured: plain words dropped, or turned into words of no response.
    objs = build_objectives(run_config(["dataset.n_train=64"]).dataset, 0)
    for name in ("polite", "factual"):
        for row in objs[name].train:
            for text in (row["chosen"][0]["content"], row["rejected"][0]["content"]):
                words = text.split()
                plain = [i for i, w in enumerate(words) if w in S.PLAIN_WORDS[name]]
                dropped = " ".join(w for i, w in enumerate(words) if i not in plain[: len(plain) // 2 + 1])
                junk = " ".join("Ġx" if i in plain[:1] else w for i, w in enumerate(words))
                assert S.well_formed(text) and S.well_formed(dropped) and not S.well_formed(junk)
                assert oracle_score(name, dropped) <= oracle_score(name, text)
                assert np.isnan(oracle_score(name, junk))
    # a lengthened response, whose extra slot words carry a marker by chance, is diluted as before
    assert oracle_score("polite", "tea : please " + "you " * 15 + ".") == 1 / 16
    assert oracle_score("polite", "tea : please you .") == 1 / 8 == oracle_score("polite", "tea : please .")


def test_guards_of_a_text():
    assert distinct_n("a b a b", 1) == 0.5 and distinct_n("a b a b", 2) == 2 / 3
    assert np.isnan(distinct_n("a", 2)) and np.isnan(distinct_n("", 1))
    assert S.well_formed("tea : it is please .") and not S.well_formed("tea : it is please")
    assert not S.well_formed("paris : it is .") and not S.well_formed("tea : .")


def test_generation_prompts_are_held_out_from_every_training_prompt(caplog):
    objs = build_objectives(run_config(["dataset.objectives=[polite,factual,unseen]"]).dataset, 0)
    train = {o: obj.train for o, obj in objs.items()}
    chosen, check = generation_prompts(train, {o: obj.eval for o, obj in objs.items()}, 64, seed=0)
    training = {prompt_key(p) for ds in train.values() for p in ds["prompt"]}
    for o, prompts in chosen.items():
        keys = [prompt_key(m) for _, m in prompts]
        assert len(set(keys)) == len(keys) == 64 and not set(keys) & training
        assert check[o] == {"eval_prompts": 64, "in_training": 0, "used": 64}
    # A user whose eval split shares prompts with training is told, and those prompts are left out.
    polite = objs["polite"]
    leaky = {"polite": polite.eval.select(range(8))}
    with caplog.at_level("WARNING", logger="seqdpo"):
        chosen, check = generation_prompts({**train, "copied": leaky["polite"].select(range(3))}, leaky, 8, seed=0)
    assert check["polite"] == {"eval_prompts": 8, "in_training": 3, "used": 5}
    assert "3 of the 8 distinct eval prompts of polite also occur among the training prompts" in caplog.text
    with pytest.raises(DataError, match="every one of the 8 distinct eval prompts of objective 'polite'"):
        generation_prompts({"copied": leaky["polite"]}, leaky, 8, seed=0)


def test_metrics_pair_stage_and_base_by_prompt():
    base = pd.DataFrame({"objective": "polite", "prompt_id": ["p1", "p1", "p2", "p2", "p3", "p3"], "sample": [0, 1] * 3,
                         "score": [0, 0, 1, 1, 0, 1], "n_tokens": [10] * 6})
    stage = base.assign(score=[1, 1, 1, 1, 0, 0], n_tokens=[20, 10, 10, 10, 10, 10])
    m = stage_metrics(stage, base, n_boot=200, seed=0)["polite"]
    # per prompt: base (0, 1, .5), stage (1, 1, 0): deltas (1, 0, -.5), wins (1, .5, 0)
    assert m["score_mean"][0] == pytest.approx(2 / 3)
    assert m["score_delta"][0] == pytest.approx(0.5 / 3)
    assert m["win_rate"][0] == pytest.approx(0.5)
    assert m["length"][0] == pytest.approx(35 / 3)
    for value, lo, hi in m.values():
        assert lo <= value <= hi
    lo, hi = bootstrap_interval(np.r_[np.zeros(50), np.ones(50)], 1000, 0)
    assert 0.35 < lo < 0.5 < hi < 0.65
    # An objective-blind scorer gets no win rate; an unscored generation (NaN) is left out, and so is a
    # prompt with none scored.
    blind = stage_metrics(stage, base, n_boot=200, seed=0, win_rate=False)["polite"]
    assert "win_rate" not in blind and blind["score_mean"] == m["score_mean"]
    holes = stage.assign(score=[1, np.nan, np.nan, np.nan, 0, 0])
    h = stage_metrics(holes, base, n_boot=200, seed=0)["polite"]
    assert h["score_mean"][0] == pytest.approx(0.5) and h["score_delta"][0] == pytest.approx((1 - 0.5) / 2)


def test_win_rate_intervals_stay_wide_at_0_and_1():
    # 16 wins in 16: a percentile bootstrap gives [1, 1]; Wilson's interval reaches down to n / (n + z^2).
    lo, hi = wilson_interval(16, 16)
    assert lo == pytest.approx(16 / (16 + 1.96**2), abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(0, 16)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (16 + 1.96**2), abs=1e-4)
    lo, hi = wilson_interval(8, 16)
    assert lo == pytest.approx(1 - hi) and 0.25 < lo < 0.5
    base = pd.DataFrame({"objective": "polite", "prompt_id": [f"p{i}" for i in range(16)], "sample": 0,
                         "score": 0.0, "n_tokens": 10})
    value, lo, hi = stage_metrics(base.assign(score=1.0), base, n_boot=200, seed=0)["polite"]["win_rate"]
    assert value == 1.0 and lo < 0.81 and hi == 1.0


def test_report_gives_behaviour_seed_means_with_t_intervals():
    from pathlib import Path

    from seqdpo.analysis.intervals import t_quantile
    from seqdpo.report.behaviour import behaviour_across_seeds
    from seqdpo.report.jobs import Job

    def job(seed, delta, state="done"):
        b = {"stages": ["base", "polite"], "objectives": ["polite"],
             "metrics": {"score_delta": [[0.0], [delta]], "well_formed": [[0.9], [0.8]]}}
        return Job(Path("."), f"s{seed}", {"state": state}, {}, {"order": "ab", "seed": seed}, matrix={"behaviour": b})

    table = behaviour_across_seeds([job(0, 0.1), job(1, 0.2), job(2, 0.3), job(3, 9.0, state="interrupted")])
    row = table[(table.stage == 1)].iloc[0]
    half = t_quantile(0.975, 2) * 0.1 / np.sqrt(3)
    assert row["seeds"] == 3 and row["score_delta"] == f"{0.2:.3g} [{0.2 - half:.3g}, {0.2 + half:.3g}]"
    assert row["well_formed"] == "0.8 [0.8, 0.8]"
    assert behaviour_across_seeds([job(0, 0.1)]).empty  # one seed: no interval across seeds


@pytest.mark.slow
def test_warm_start_generates_the_worlds_format_and_is_cached(warm_base, warm_cache):
    cfg, model, tok = warm_base
    objs = build_objectives(cfg.dataset, 0)
    prompts = {"polite": generation_prompts({"polite": objs["polite"].train}, {"polite": objs["polite"].eval}, 16, 0)[0]["polite"]}
    settings = cfg.eval.generation
    kw = dict(seed=0, fingerprint="fp", cache_dir=warm_cache)
    G.reset_base_generation_counts()
    first = G.base_generations(model, tok, prompts, settings, **kw)
    again = G.base_generations(model, tok, prompts, settings, **kw)
    assert G.base_generation_counts() == {"computed": 1, "cached": 1}
    pd.testing.assert_frame_equal(first, again)
    assert list(first.columns) == G.COLUMNS and len(first) == 16 * settings.samples
    # Well-formed responses of the world, about half of them polite: rates DPO can move either way.
    assert first.text.map(lambda t: bool(WELL_FORMED.match(t))).mean() > 0.7
    assert (first.finish_reason == "eos").mean() > 0.9
    polite = first.text.map(lambda t: any(w in S.ATTRIBUTE_WORDS["polite"] for w in t.split()))
    assert 0.15 < polite.mean() < 0.75
    # Same seed, same samples (a regenerated stage matches); another seed samples others.
    fresh = G.generate_objectives(model, tok, prompts, settings, seed=0)
    pd.testing.assert_frame_equal(first, fresh)
    assert not G.generate_objectives(model, tok, prompts, settings, seed=1).text.equals(first.text)
    # The warm start itself is cached: a second load reads the weights, it does not train.
    model2, _ = load_model_and_tokenizer(cfg.model, str(warm_cache))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert len(list(warm_cache.glob("warmstart-*.safetensors"))) == 1


def _tiny_reward_model(path, tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_reward_model_scores_a_local_sequence_classifier(tmp_path):
    from seqdpo.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer(1024)
    _tiny_reward_model(tmp_path / "rm", tok)
    cfg = run_config(["eval.generate=true", "scorer=reward_model", "scorer.batch_size=3",
                      f"++scorer.models={{polite:{tmp_path / 'rm'},factual:{tmp_path / 'rm'}}}"])
    scorer = RewardModelScorer(ScoringContext(scoring_settings(cfg)))
    assert scorer.supports("polite") and not scorer.supports("unseen")
    prompt = [{"role": "user", "content": "tell me about tea ."}]
    texts = ["tea : please .", "tea : it is a thing that many people know about .", "tea : correct honest one some .", "", "tea"]
    batched = scorer.score("polite", [prompt] * len(texts), texts)
    single = np.concatenate([scorer.score("polite", [prompt], [t]) for t in texts])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)  # padding does not leak into a score
    assert len(set(np.round(batched, 5))) == len(texts)
    assert scorer.models["polite"].tok.chat_template  # its own template, saved with it


@pytest.mark.slow
def test_trained_rm_ranks_held_out_pairs_like_the_oracle(warm_base, warm_cache):
    _, model, tok = warm_base
    cfg = run_config(["eval.generate=true", "scorer=trained_rm", f"ref_cache_dir={warm_cache}"])
    objectives = build_objectives(cfg.dataset, 0)
    ctx = ScoringContext(scoring_settings(cfg), tok, model, "fp-tiny", objectives, warm_cache)
    scorer = TrainedRMScorer(ctx)
    ev = objectives["polite"].eval
    chosen = [r[0]["content"] for r in ev["chosen"]]
    rejected = [r[0]["content"] for r in ev["rejected"]]
    sc = scorer.score("polite", list(ev["prompt"]), chosen)
    sr = scorer.score("polite", list(ev["prompt"]), rejected)
    oracle = np.sign([oracle_score("polite", c) - oracle_score("polite", r) for c, r in zip(chosen, rejected)])
    assert (np.sign(sc - sr) == oracle).mean() >= 0.8
    assert scorer.trained == {"polite": "trained"}
    # A second job of the sweep finds it in the cache and scores the same.
    again = TrainedRMScorer(ctx)
    np.testing.assert_allclose(again.score("polite", list(ev["prompt"]), chosen), sc, rtol=1e-5)
    assert again.trained == {"polite": "cached"}


@pytest.mark.slow
def test_trained_rm_job_records_its_accuracy_on_every_objective(tmp_path, warm_cache):
    from seqdpo.runner import run_job

    cfg = run_config([*SMALL_JOB, "dataset.n_train=128", "eval.generate=true", "scorer=trained_rm", "logger=none",
                      f"ref_cache_dir={warm_cache}", "eval.generation.prompts=4", "eval.generation.samples=1",
                      "eval.generation.max_new_tokens=16", "diagnostics.grad_cosine=false",
                      "diagnostics.adapter_movement=false", "diagnostics.likelihood=false"])
    run_job(cfg, str(tmp_path / "run"))
    b = json.loads((tmp_path / "run" / "matrix.json").read_text())["behaviour"]
    acc = b["scorer_accuracy"]
    assert set(acc) == {"polite", "factual"} and all(set(per) == {"polite", "factual"} for per in acc.values())
    for per in acc.values():  # on the job's pairs: its 128 training pairs, its 16 held-out ones
        assert all(s["train"]["pairs"] == 128 and s["eval"]["pairs"] == 16 for s in per.values())
    # Each reward model learns its objective and, in the conflicting world, ranks the other's pairs backwards.
    for rm, other in (("polite", "factual"), ("factual", "polite")):
        assert acc[rm][rm]["train"]["accuracy"] >= acc[rm][rm]["eval"]["accuracy"] >= 0.75, acc
        assert acc[rm][other]["eval"]["accuracy"] <= 0.25, acc


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the study's jobs on three seeds, with generation after every stage
def test_a_polite_stage_lowers_the_factual_share_and_the_factual_stage_raises_it_again(tmp_path_factory, warm_cache):
    """What the behaviour study (conf/experiment/behaviour.yaml) shows on seeds 0-2, order ab, held-out prompts.

    Its first criterion, that the polite stage raises the polite share above the base's, holds on seed 0
    only (+0.020 [0.013, 0.027]; seeds 1 and 2: -0.009 [-0.018, -0.002], -0.006 [-0.013, 0.001]) and is not
    asserted: docs/behaviour-study.md. What holds on every seed is the conflict read from the other side."""
    from seqdpo.runner import run_job

    root = tmp_path_factory.mktemp("behaviour-study")
    for seed in (0, 1, 2):
        cfg = run_config(["experiment=behaviour", "order=ab", f"seed={seed}", "logger=none", f"ref_cache_dir={warm_cache}",
                          "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false", "diagnostics.likelihood=false"])
        out = root / f"seed{seed}"
        b = run_job(cfg, str(out))["behaviour"]
        factual = b["objectives"].index("factual")
        # stage 1 stays mostly well formed (the base: 93-96%), so the oracle speaks for most generations
        assert min(b["metrics"]["well_formed"][1]) >= 0.7, (seed, b["metrics"]["well_formed"])
        # the polite stage makes the generations less factual than the base's: the interval excludes 0
        _, hi = b["intervals"]["score_delta"][1][factual]
        assert hi < 0, (seed, b["metrics"]["score_delta"])
        # the factual stage makes them more factual than after the polite stage, paired by prompt
        stage = [pd.read_parquet(out / f"stage_{k}" / "generations.parquet").merge(
            pd.read_parquet(out / f"stage_{k}" / "scores.parquet"), on=["objective", "prompt_id", "sample"]) for k in (1, 2)]
        change = stage_metrics(stage[1], stage[0], n_boot=1000, seed=seed)["factual"]["score_delta"][0]
        assert change > 0, (seed, b["metrics"]["score_mean"])


@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory, warm_cache):
    """A job with generation (implicit scorer) stopped during stage 1's generation, then rerun."""
    from seqdpo.runner import run_job

    out = tmp_path_factory.mktemp("behaviour-job") / "run"
    overrides = [*SMALL_JOB, "eval.generate=true", "scorer=implicit", f"ref_cache_dir={warm_cache}",
                 "eval.generation.prompts=6", "eval.generation.samples=2", "eval.generation.greedy=true",
                 "eval.generation.max_new_tokens=24", "diagnostics.grad_cosine=false", "diagnostics.likelihood=false"]
    real = G.generate
    calls = []

    def stop_in_stage_1(model, tok, prompts, settings, *, seed, objective):
        calls.append(objective)
        if len(calls) == 4:  # base: polite, factual; stage 1: polite, then stop in factual
            raise KeyboardInterrupt("stopped during generation")
        return real(model, tok, prompts, settings, seed=seed, objective=objective)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(G, "generate", stop_in_stage_1)
        with pytest.raises(KeyboardInterrupt):
            run_job(run_config([*overrides, "logger=none"]), str(out))
    stopped = {
        "status": json.loads((out / "status.json").read_text())["state"],
        "trained": (out / "stage_1" / "trained.json").read_text(),
        "parts": sorted(p.name for p in (out / "stage_1" / "generations.parts").glob("*.parquet")),
        "polite_part": pd.read_parquet(out / "stage_1" / "generations.parts" / "polite.parquet"),
        "done": (out / "stage_1" / "DONE").exists(),
    }
    with pytest.MonkeyPatch.context() as mp:
        resumed_calls = []
        mp.setattr(G, "generate", lambda *a, **k: resumed_calls.append(k["objective"]) or real(*a, **k))
        cfg = run_config([*overrides, "logger=wandb"])
        matrix = run_job(cfg, str(out))
    return cfg, out, matrix, stopped, resumed_calls


@pytest.mark.slow
def test_a_stage_stopped_during_generation_resumes(resumed_job, warm_cache):
    from peft import PeftModel

    cfg, out, matrix, stopped, resumed_calls = resumed_job
    assert stopped["status"] == "interrupted" and not stopped["done"] and stopped["parts"] == ["polite.parquet"]
    # The rerun neither retrained stage 1 nor regenerated polite: it generated factual, then stage 2.
    assert (out / "stage_1" / "trained.json").read_text() == stopped["trained"]
    assert resumed_calls == ["factual", "polite", "factual"]
    gens = pd.read_parquet(out / "stage_1" / "generations.parquet")
    assert not (out / "stage_1" / "generations.parts").exists()
    pd.testing.assert_frame_equal(gens[gens.objective == "polite"].reset_index(drop=True), stopped["polite_part"])
    # ... and what it holds is what the stage-1 model generates from scratch.
    base, tok = load_model_and_tokenizer(cfg.model, str(warm_cache))
    model = PeftModel.from_pretrained(base, out / "stage_1" / "adapter")
    objectives = build_objectives(cfg.dataset, cfg.seed)
    prompts = generation_prompts({o: objectives[o].train for o in objectives},
                                 {o: objectives[o].eval for o in ("polite", "factual")}, 6, cfg.seed)[0]
    pd.testing.assert_frame_equal(G.generate_objectives(model, tok, prompts, cfg.eval.generation, seed=cfg.seed), gens)
    # The base model's generations came from the cache on the rerun.
    assert matrix["behaviour"]["base_generations"] == {"computed": 0, "cached": 0}  # stage 0 was DONE already


@pytest.mark.slow
def test_behaviour_outputs_and_implicit_scores_equal_the_matrix(resumed_job):
    from wandb_offline import read_run

    cfg, out, matrix, _, _ = resumed_job
    b = json.loads((out / "matrix.json").read_text())["behaviour"]
    assert b == json.loads(json.dumps(matrix["behaviour"]))
    assert b["scorer"] == "implicit" and b["stages"] == ["base", "polite", "factual"] and b["objectives"] == ["polite", "factual"]
    # implicit is distance from the base, whatever the objective: said so, and no per-objective win rate
    assert b["objective_blind"] and "distance from the base" in b["scorer_measures"] and "win_rate" not in b["metrics"]
    assert set(b["metrics"]) == {"score_mean", "score_delta", "length", "nll_base", "distinct_1", "distinct_2", "well_formed"}
    for m in b["metrics"]:
        assert np.asarray(b["metrics"][m]).shape == (3, 2) and np.asarray(b["intervals"][m]).shape == (3, 2, 2)
    assert b["metrics"]["score_mean"][0] == [0.0, 0.0]  # the base against itself
    # generation prompts: distinct, none among the training prompts (SMALL_JOB: 16 eval pairs, 6 drawn)
    assert b["prompt_check"] == {o: {"eval_prompts": 16, "in_training": 0, "used": 6} for o in ("polite", "factual")}
    assert all(t is not None and t >= 0 for t in b["time"]["generate_s"] + b["time"]["score_s"])
    gens = pd.read_parquet(out / "stage_2" / "generations.parquet")
    assert list(gens.columns) == G.COLUMNS and len(gens) == 2 * 6 * 3  # objectives x prompts x (greedy + 2 samples)
    assert set(gens["sample"]) == {-1, 0, 1} and set(gens.finish_reason) <= {"eos", "length"}
    assert b["length_capped"][2] == int((gens.finish_reason == "length").sum())
    assert b["prompts_used"] == {"polite": 6, "factual": 6} and b["unscored_objectives"] == []
    # implicit: scoring the eval pairs' responses gives the per-pair rewards of the preference matrix.
    from peft import PeftModel

    from seqdpo.behaviour.scorers import ImplicitScorer
    from seqdpo.modeling import model_fingerprint

    base, tok = load_model_and_tokenizer(cfg.model, cfg.ref_cache_dir)
    objectives = build_objectives(cfg.dataset, cfg.seed)
    # the fluency guard: the base model's NLL per response token (end token included), computed here directly
    guards = pd.read_parquet(out / "stage_2" / "guards.parquet").merge(gens, on=["objective", "prompt_id", "sample"])
    prompts = {pid: p for o in objectives.values() for pid, p in zip(o.eval["pair_id"], o.eval["prompt"])}
    for row in guards.iloc[[0, -1]].itertuples():
        start = len(tok.apply_chat_template(prompts[row.prompt_id], add_generation_prompt=True, return_dict=True)["input_ids"])
        ids = tok.apply_chat_template([*prompts[row.prompt_id], {"role": "assistant", "content": row.text}],
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(base(torch.tensor([ids])).logits[0, :-1].float(), -1)
        own = -logp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].mean().item()
        assert row.nll_base == pytest.approx(own, rel=1e-4)
    assert guards.well_formed.isin([0.0, 1.0]).all() and guards.distinct_1.between(0, 1).all()
    model = PeftModel.from_pretrained(base, out / "stage_1" / "adapter")
    scorer = ImplicitScorer(ScoringContext(scoring_settings(cfg), tok, model, model_fingerprint(cfg.model, tok), objectives, cfg.ref_cache_dir))
    ev = objectives["factual"].eval
    rc = scorer.score("factual", list(ev["prompt"]), [r[0]["content"] for r in ev["chosen"]])
    rr = scorer.score("factual", list(ev["prompt"]), [r[0]["content"] for r in ev["rejected"]])
    pairs = pd.read_parquet(out / "pairs.parquet").query("stage == 1 and objective == 'factual'").set_index("pair_id").loc[ev["pair_id"]]
    np.testing.assert_allclose(rc, pairs.reward_chosen, atol=1e-5)
    np.testing.assert_allclose(rr, pairs.reward_rejected, atol=1e-5)
    assert np.mean(rc - rr) == pytest.approx(matrix["metrics"]["margin_mean"][1][1], abs=1e-5)
    # W&B: the behaviour matrix in the summary, the sample generations as a table.
    runs = [read_run(f) for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]
    summary = {k: v for r in runs for k, v in r["summary"].items()}
    keys = {k for r in runs for row in r["history"] for k in row}
    assert summary["behaviour/score_mean/1:polite/polite"] == pytest.approx(b["metrics"]["score_mean"][1][0])
    assert summary["behaviour/length_capped/2:factual"] == b["length_capped"][2]
    assert "stage2/behaviour/factual/nll_base" in keys
    assert summary["behaviour/prompts/polite/in_training"] == 0
    rows = [row for r in runs for row in r["history"] if "analysis/behaviour_samples/nrows" in row]
    assert rows and rows[-1]["analysis/behaviour_samples/nrows"] == 3 * 2 * 3  # stages x objectives x samples shown


@pytest.mark.slow
def test_report_shows_behaviour_beside_preferences(resumed_job, tmp_path):
    from seqdpo.report import build_report
    from seqdpo.report.behaviour import disagreement_points

    _, out, matrix, _, _ = resumed_job
    written = build_report(out.parent, tmp_path / "report", html_too=True)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Behaviour (implicit): mean score of the generations" in summary and "Sample generations" in summary
    figures = [p for p in written["plots"] if p.startswith("behaviour_")]
    assert len(figures) == 1 and (tmp_path / "report" / figures[0]).exists()
    assert "data:image/png;base64" in (tmp_path / "report" / "summary.html").read_text()
    # the scatter's points: accuracy change and score change against the base, per stage >= 1 and objective
    from seqdpo.report.jobs import load_job

    points = disagreement_points(load_job(out, out.parent))
    assert len(points) == 2 * 2
    acc = matrix["metrics"]["accuracy"]
    p = next(q for q in points if q["stage"] == 2 and q["objective"] == "factual")
    assert p["accuracy_change"] == pytest.approx(acc[2][1] - acc[0][1])
    assert p["behaviour_change"] == matrix["behaviour"]["metrics"]["score_delta"][2][1]
    assert (out / "plots" / "behaviour.png").exists()  # the per-job plot W&B shows
