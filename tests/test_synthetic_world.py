"""The synthetic preference world: the builder makes the preference structure each relation promises,
and on the tiny model the papers' directions come out (conflict forgets, compatible transfers, DPO
lowers the chosen likelihood and SFT-DPO / SPO do not)."""


import pandas as pd
import pytest

from seqdpo.config import DatasetConfig
from seqdpo.data import DataError, build_objectives
from seqdpo.data import synthetic as S


def world(objectives=("polite", "factual"), run_seed=0, n_train=200, **options):
    cfg = DatasetConfig(name="synthetic", objectives=list(objectives), n_train=n_train, n_eval=20, options=options)
    return build_objectives(cfg, run_seed)


def attributes(message):
    """(polite, factual) marker counts of one assistant message."""
    words = message[0]["content"].split()
    return tuple(sum(w in S.ATTRIBUTE_WORDS[a] for w in words) for a in S.ATTRIBUTE_OBJECTIVES)


def pair_attributes(ds):
    return [(attributes(r["chosen"]), attributes(r["rejected"])) for r in ds]


def test_conflicting_b_prefers_what_a_rejects():
    objs = world(relation="conflicting", strength=1.0, markers=2)
    for chosen, rejected in pair_attributes(objs["polite"].train):
        assert (chosen, rejected) == ((2, 0), (0, 2))
    for chosen, rejected in pair_attributes(objs["factual"].train):
        assert (chosen, rejected) == ((0, 2), (2, 0))


def test_compatible_chosen_has_both_attributes():
    for name in S.ATTRIBUTE_OBJECTIVES:
        for chosen, rejected in pair_attributes(world(relation="compatible", strength=1.0)[name].train):
            assert (chosen, rejected) == ((1, 1), (0, 0))


def test_orthogonal_leaves_the_other_attribute_equal_and_balanced():
    objs = world(relation="orthogonal", strength=1.0)  # strength has no say here
    pairs = pair_attributes(objs["polite"].train)
    assert all(c[0] == 1 and r[0] == 0 and c[1] == r[1] for c, r in pairs)
    with_factual = sum(c[1] for c, _ in pairs) / len(pairs)
    assert 0.35 < with_factual < 0.65


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.8])
def test_strength_is_the_coupled_fraction(strength):
    objs = world(relation="conflicting", strength=strength, n_train=1000)
    pairs = pair_attributes(objs["factual"].train)
    coupled = sum(c[0] == 0 and r[0] == 1 for c, r in pairs)
    assert all(c[0] == r[0] or (c[0], r[0]) == (0, 1) for c, r in pairs)
    assert abs(coupled / len(pairs) - strength) < 0.05
    assert objs["factual"].stats["train"]["coupled"] == coupled


def test_noise_swaps_that_fraction_of_pairs():
    objs = world(relation="orthogonal", noise=0.25, n_train=1000)
    pairs = pair_attributes(objs["polite"].train)
    flipped = sum(c[0] == 0 and r[0] == 1 for c, r in pairs)
    assert abs(flipped / len(pairs) - 0.25) < 0.05
    assert objs["polite"].stats["train"]["flipped"] == flipped


def test_pairs_match_in_length_and_differ_only_in_slot_words():
    shared = set(S.FILLER) | {w for ws in S.PLAIN_WORDS.values() for w in ws}
    for r in world(relation="compatible", slot=5, markers=2)["polite"].train:
        c, j = r["chosen"][0]["content"].split(), r["rejected"][0]["content"].split()
        assert len(c) == len(j)
        assert c[0] == j[0] == r["prompt"][0]["content"].split()[3]  # the prompt's topic
        # The chosen keeps plain words: what lets DPO's push on the rejected drag the chosen down.
        assert sum(w in shared - set(S.FILLER) for w in c) == 2 * 5 - 2 * 2


def test_unseen_words_are_in_no_other_objective():
    objs = world(objectives=("polite", "factual", "concise", "detailed", "unseen"), relation="compatible")
    seen = set()
    for name in ("polite", "factual", "concise", "detailed"):
        for split in ("train", "eval"):
            for r in getattr(objs[name], split):
                seen |= set(r["chosen"][0]["content"].split()[2:]) | set(r["rejected"][0]["content"].split()[2:])
    unseen = {w for r in objs["unseen"].eval for w in r["chosen"][0]["content"].split()[2:-1]}
    assert unseen and unseen <= set(S.UNSEEN) and not unseen & seen


def test_concise_and_detailed_prefer_opposite_lengths():
    objs = world(objectives=("concise", "detailed"))
    for name, sign in (("concise", -1), ("detailed", 1)):
        for r in objs[name].train:
            diff = len(r["chosen"][0]["content"].split()) - len(r["rejected"][0]["content"].split())
            assert sign * diff > 0


def test_world_words_are_single_tokens_of_the_tiny_tokenizer():
    # Each attribute must move one token's probability; a word split into pieces would blur that.
    from seqdpo.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer(1024)
    words = [*S.TOPICS, *S.FILLER, *S.UNSEEN, *(w for d in (S.ATTRIBUTE_WORDS, S.PLAIN_WORDS) for ws in d.values() for w in ws)]
    assert len(words) == len(set(words))
    assert [w for w in words if len(tok.tokenize(" " + w)) != 1] == []


def test_eval_prompts_are_held_out_from_every_objective_s_training_prompts():
    cfg = DatasetConfig(name="synthetic", objectives=list(S.OBJECTIVES), n_train=256, n_eval=None, options={})
    objs = build_objectives(cfg, 0)
    train = {r[0]["content"] for o in objs.values() for r in o.train["prompt"]}
    for o in objs.values():
        prompts = [r[0]["content"] for r in o.eval["prompt"]]
        assert len(prompts) == S.SIZES["n_eval"] and len(set(prompts)) >= 64
        assert set(prompts).isdisjoint(train)
        # the response is about the topic its prompt asks about
        for prompt, chosen in zip(prompts, o.eval["chosen"]):
            assert chosen[0]["content"].split()[0] in prompt.split()
    assert train == {S.TRAIN_TEMPLATE.format(topic=t) for t in S.TOPICS}


def test_eval_prompt_words_are_single_tokens_and_carry_no_attribute():
    from seqdpo.behaviour.warmstart import WARM_START_TEMPLATES
    from seqdpo.modeling import build_tiny_tokenizer

    tok = build_tiny_tokenizer(1024)
    attribute_words = {*S.UNSEEN} | {w for d in (S.ATTRIBUTE_WORDS, S.PLAIN_WORDS) for ws in d.values() for w in ws}
    for template in [S.TRAIN_TEMPLATE, *S.EVAL_TEMPLATES, *WARM_START_TEMPLATES]:
        words = template.format(topic="tea").split()
        # as in the training prompt: the first word has no leading space, punctuation is its own word
        pieces = [tok.tokenize(w if i == 0 else " " + w) for i, w in enumerate(words)]
        assert [w for w, p in zip(words, pieces) if len(p) != (2 if w in ".?" else 1)] == [], template
        assert not set(words) & attribute_words, template


def test_warm_start_prompts_are_disjoint_from_the_held_out_eval_prompts():
    from seqdpo.behaviour.warmstart import WARM_START_TEMPLATES, warm_start_examples

    # the warm start teaches the format on varied prompts, never on the held-out ones
    assert set(WARM_START_TEMPLATES).isdisjoint(S.EVAL_TEMPLATES)
    warm = {p[0]["content"] for p, _ in warm_start_examples(512)}
    held_out = {t.format(topic=topic) for t in S.EVAL_TEMPLATES for topic in S.TOPICS}
    assert warm.isdisjoint(held_out) and len(warm) > len(S.TOPICS)


def test_dataset_n_train_and_n_eval_set_the_generated_pairs():
    # dataset.n_train above the old options.n_train (256) was capped to 256 silently
    objs = world(n_train=300)
    assert (len(objs["polite"].train), len(objs["polite"].eval)) == (300, 20)
    assert objs["polite"].stats["train"]["rows"] == 300
    # a larger split extends the smaller one: the first pairs stay the same
    assert world(n_train=300)["polite"].train["chosen"][:200] == world()["polite"].train["chosen"]


def test_data_follow_the_seed_and_the_seed_option():
    a, b = world(run_seed=1)["polite"].train, world(run_seed=1)["polite"].train
    assert a["chosen"] == b["chosen"] and a["pair_id"] == b["pair_id"]
    assert world(run_seed=2)["polite"].train["chosen"] != a["chosen"]
    # The seed option pins the data while the run seed varies the initialisation and data order.
    assert world(run_seed=5, seed=1)["polite"].train["chosen"] == a["chosen"]


@pytest.mark.parametrize(
    "options,words",
    [
        ({"relaton": "conflicting"}, "unknown option(s) ['relaton']"),
        ({"relation": "opposed"}, "relation='opposed' must be one of"),
        ({"strength": 1.5}, "strength=1.5 must be a number in [0, 1.0]"),
        ({"strength": "high"}, "strength='high'"),
        ({"noise": 0.6}, "noise=0.6 must be a number in [0, 0.5]"),
        ({"n_eval": 32}, "moved to dataset.n_train / dataset.n_eval (e.g. dataset.n_eval=32)"),
        ({"markers": True}, "markers=True must be an integer"),
        ({"markers": 8, "slot": 8}, "markers=8 must be below slot=8"),
        ({"slot": 40}, "slot=40 must be at most"),
        ({"seed": "zero"}, "seed='zero' must be an integer or null"),
    ],
)
def test_bad_options_name_the_key(options, words):
    with pytest.raises(DataError) as err:
        world(**options)
    assert words in str(err.value)


# --- the papers' directions on the tiny model --------------------------------------------------------

SEEDS = (0, 1, 2)
FAST = [
    "logger=none",
    "lr=5e-3",
    "lora.dropout=0",  # as conf/experiment/synthetic_relations.yaml
    "diagnostics.grad_cosine=false",
    "diagnostics.adapter_movement=false",
    "diagnostics.likelihood=false",
]


def _job(tmp_path, name, overrides):
    from conftest import run_config

    from seqdpo.runner import run_job

    cfg = run_config([*FAST, f"ref_cache_dir={tmp_path / 'refcache'}", *overrides])
    out = tmp_path / name
    run_job(cfg, str(out))
    return pd.read_parquet(out / "pairs.parquet")


def _at(pairs, stage, objective):
    g = pairs[(pairs.stage == stage) & (pairs.objective == objective)]
    return {
        "accuracy": g.accuracy.mean(),
        "margin": g.margin.mean(),
        "d_chosen": (g.policy_chosen_logps - g.ref_chosen_logps).mean(),
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five jobs
@pytest.mark.parametrize("seed", SEEDS)
def test_relations_and_losses_show_the_papers_directions(tmp_path, seed):
    s = f"seed={seed}"
    # Accuracies are on held-out eval prompts (templates no training pair asks), where what a stage
    # learned carries over unevenly: seed 2's polite accuracy after the conflicting stage 2 is 0.14-0.88
    # across the 8 templates (0.45 overall). The criteria below were set on that split
    # (docs/synthetic-world-study.md); on the old split, whose eval prompts were training prompts, conflict
    # asked a drop of 0.4 and compatible "within 0.05 of stage 1".
    # 1. Conflict: training B undoes A: after stage 2, A is below chance (0.25, 0.14, 0.45 on seeds 0-2)
    # and its margin negative (-0.30, -0.43, -0.06), after being learned in stage 1.
    conflict = _job(tmp_path, "conflicting", [s, "dataset.options.relation=conflicting"])
    a1, a2 = _at(conflict, 1, "polite"), _at(conflict, 2, "polite")
    assert a1["accuracy"] >= 0.75 and a2["accuracy"] < 0.5, (a1, a2)
    assert a2["margin"] < 0 < a1["margin"]

    # 2. Compatible: B already improves while A trains, and A stays learned while B trains.
    compat = _job(tmp_path, "compatible", [s, "dataset.options.relation=compatible"])
    a1, a2, b1 = _at(compat, 1, "polite"), _at(compat, 2, "polite"), _at(compat, 1, "factual")
    assert b1["accuracy"] >= 0.75 and b1["margin"] > 0, b1
    assert a2["accuracy"] >= 0.75 and a2["margin"] > 0.5 * a1["margin"], (a1, a2)

    # 3. 3D-properties: DPO lowers the chosen log-likelihood of the objective it trains; SFT-DPO and SPO
    # raise it, at the same learning of the preference.
    one = [s, "dataset.options.relation=orthogonal", "order.stages=[a]"]
    dpo = _at(_job(tmp_path, "dpo", [*one, "loss=dpo"]), 1, "polite")
    assert dpo["accuracy"] >= 0.75 and dpo["d_chosen"] < -2.0, dpo
    for loss in (["loss=sft_dpo", "loss.gamma=0.015"], ["loss=spo"]):
        kept = _at(_job(tmp_path, loss[0][5:], [*one, *loss]), 1, "polite")
        assert kept["d_chosen"] > 0.5 and kept["accuracy"] >= 0.7, (loss, kept)
