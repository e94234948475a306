"""Paired bootstrap intervals, verdicts and seed intervals (seqdpo/analysis/intervals.py) on cases with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from conftest import run_config
from seqdpo.analysis import intervals as I
from seqdpo.analysis import pairs as P
from seqdpo.analysis import transfer as T
from seqdpo.config import ConfigError
from seqdpo.evaluation import score, summarize

TOL = 1e-6


def _table(margins: dict[str, list[np.ndarray]], world: str = "w0") -> pd.DataFrame:
    """A per-pair table in pairs.parquet's columns: margins[objective][stage] = one margin per pair; pairs of
    another `world` (e.g. a synthetic world of another seed) differ in content under the same ids."""
    rows = []
    for obj, per_stage in margins.items():
        for t, m in enumerate(per_stage):
            m = np.asarray(m, dtype=float)
            nm = m / 2
            rows.append(pd.DataFrame({"stage": t, "objective": obj, "pair_id": [f"{obj}-{i:03d}" for i in range(len(m))],
                                      "margin": m, "norm_margin": nm, "accuracy": score(m, TOL),
                                      "policy_accuracy": score(nm, TOL),
                                      "content_hash": [f"{world}:{obj}-{i}" for i in range(len(m))]}))
    return pd.concat(rows, ignore_index=True)


def _job(margins, stages, world="w0"):
    pairs = _table(margins, world)
    return pairs, summarize(pairs, stages, list(margins), 0.3)


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_intervals_cover_known_accuracy_and_paired_change():
    """200 independent objectives of 64 pairs in one job: each cell's interval covers the true value
    about 95% of the time, and the paired interval of a change is far narrower than an unpaired one."""
    rng = np.random.default_rng(123)
    n, k, delta = 64, 200, 0.4
    mus = rng.uniform(-0.5, 1.0, k)
    margins = {}
    for j, mu in enumerate(mus):
        m1 = rng.normal(mu, 1.0, n)  # accuracy after stage 1 has mean Phi(mu)
        pair_effect = rng.normal(0.0, 2.0, n)
        m2 = pair_effect + delta + rng.normal(0.0, 0.3, n)  # stage 2 - stage 0 per pair: delta + N(0, 0.3)
        margins[f"o{j}"] = [pair_effect, m1, m2]
    pairs, matrix = _job(margins, ["base", "o0", "o1"])
    boot = I.bootstrap(pairs, matrix, n_boot=500, seed=7, tie_tolerance=TOL)

    acc = boot.interval(("matrix", "accuracy"))[1]  # [objectives, 2] after stage 1
    truth = np.array([_phi(mu) for mu in mus])
    covered = (acc[:, 0] <= truth) & (truth <= acc[:, 1])
    assert 0.90 <= covered[2:].mean() <= 0.98  # o0, o1 are trained: their stage-1 truth is the same, kept for symmetry

    rows = [r for r in I.verdicts(boot) if r["stage"] == 2 and r["column"] == "margin" and r["objective"] not in ("o0", "o1")]
    assert len(rows) == k - 2 and all(r["baseline_stage"] == 0 for r in rows)
    lo, hi = np.array([r["interval"] for r in rows]).T
    assert 0.90 <= np.mean((lo <= delta) & (delta <= hi)) <= 0.98
    unpaired_width = 2 * 1.96 * math.sqrt(2 * 2.0**2 / n)  # what independent draws per stage would give
    assert np.mean(hi - lo) < 0.25 * unpaired_width
    assert all(r["verdict"] == "improved" for r in rows if r["interval"][0] > 0)


def test_point_values_are_the_documented_formulas():
    rng = np.random.default_rng(0)
    margins = {"a": [np.zeros(40), rng.normal(1, 1, 40), rng.normal(0.5, 1, 40)],
               "b": [np.zeros(40), rng.normal(0, 1, 40), rng.normal(1, 1, 40)]}
    pairs, matrix = _job(margins, ["base", "a", "b"])
    boot = I.bootstrap(pairs, matrix, n_boot=50, seed=0, stay_threshold=0.1, tie_tolerance=TOL)
    for metric, R in matrix["metrics"].items():
        assert np.allclose(boot.point[("matrix", metric)], R)
        assert boot.reps[("matrix", metric)].shape == (50, 3, 2)
    tr = T.matrix_transfer(matrix, T.JOB_METRICS)
    for metric, obj, q, value in T.transfer_quantities(tr):
        if value is not None:
            assert boot.point[("transfer", metric, obj, q)] == pytest.approx(value)
    for d in P.pair_decomposition(pairs, matrix["stages"], "margin", 0.1, tie_tolerance=TOL):
        for q in d["quartiles"] + [{"quartile": "all", **d["all"]}]:
            for stat in I.QUARTILE_STATS:
                key = ("quartiles", d["objective"], "margin", d["from_stage"], d["to_stage"], q["quartile"], stat)
                assert boot.point[key] == pytest.approx(q[stat])
    # A seed reproduces the replicates; another seed does not.
    again = I.bootstrap(pairs, matrix, n_boot=50, seed=0, tie_tolerance=TOL)
    other = I.bootstrap(pairs, matrix, n_boot=50, seed=1, tie_tolerance=TOL)
    key = ("transfer", "accuracy", "_all", "BWT")
    assert np.array_equal(boot.reps[key], again.reps[key]) and not np.array_equal(boot.reps[key], other.reps[key])


def _verdict(after_first, after_second, n_boot=400):
    """The verdict on objective a after stage 2 of order a -> b, from a's margins after stages 1 and 2."""
    n = len(after_first)
    pairs, matrix = _job({"a": [np.zeros(n), after_first, after_second], "b": [np.zeros(n)] * 3}, ["base", "a", "b"])
    out = I.job_intervals(pairs, matrix, n_boot=n_boot, seed=0, tie_tolerance=TOL)
    (row,) = [r for r in out["verdicts"] if r["objective"] == "a" and r["stage"] == 2 and r["column"] == "margin"]
    assert row["baseline_stage"] == 1
    return row


def test_verdicts_on_constructed_changes():
    rng = np.random.default_rng(5)
    before = np.sort(rng.normal(2.0, 1.0, 64))
    noise = rng.normal(0.0, 0.05, 64)
    assert _verdict(before, before - 0.5 + noise)["verdict"] == "degraded"
    assert _verdict(before, before + 0.5 + noise)["verdict"] == "improved"
    assert _verdict(before, before + noise)["verdict"] == "equivalent"  # inside +-0.1 (eval.min_effect.margin)
    row = _verdict(before, before + rng.normal(0.0, 1.0, 64))
    assert row["verdict"] == "inconclusive" and row["interval"][0] < -0.1  # holds 0 and changes that matter
    assert row["min_detectable"] == pytest.approx(2.8 / math.sqrt(64), rel=0.25)  # (1.96 + 0.84) x SE, sd ~1
    # Q1 (least confident) up, Q4 down, the aggregate flat: the matrix sees nothing.
    shift = np.repeat([1.0, 0.0, 0.0, -1.0], 16)
    row = _verdict(before, before + shift + noise)
    assert row["verdict"] == "redistributed" and row["quartiles_up"] == ["Q1"] and row["quartiles_down"] == ["Q4"]
    assert row["interval"][0] < 0 < row["interval"][1]
    # The same point change decided by the interval: a large mean drop of a few pairs is not significant.
    few = before.copy()
    few[:2] -= 6.0
    row = _verdict(before, few)
    assert row["change"] < -0.15 and row["verdict"] in ("inconclusive", "redistributed")


def test_decide_rules():
    assert I.decide((-0.3, -0.1), {}, 0.1) == ("degraded", [], [])
    assert I.decide((0.1, 0.3), {"Q1": (0.2, 0.4)}, 0.1) == ("improved", ["Q1"], [])
    moved = {"Q1": (0.1, 0.3), "Q4": (-0.4, -0.1)}
    beyond = {"by_start": (0.3, 0.6), "by_end": (0.05, 0.4), "crossing": (-0.5, -0.1)}
    assert I.decide((-0.1, 0.1), moved, 0.1, beyond)[0] == "redistributed"
    # Q1 up and Q4 down by the baseline's quartiles alone is what regression to the mean gives
    assert I.decide((-0.1, 0.1), moved, 0.1)[0] == "equivalent"
    assert I.decide((-0.1, 0.1), moved, 0.1, {**beyond, "by_end": (-0.3, -0.1)})[0] == "equivalent"
    assert I.decide((-0.1, 0.1), {"Q1": (0.1, 0.3), "Q4": (-0.4, 0.1)}, 0.1, beyond)[0] == "equivalent"
    assert I.decide((-0.1, 0.1), {}, 0.05)[0] == "inconclusive"  # the same interval, a stricter margin
    assert I.decide((0.0, 0.0), {}, 0.1)[0] == "equivalent"


def test_redistribution_rules():
    assert I.redistribution({"by_start": (0.3, 0.6), "by_end": (0.05, 0.4), "crossing": (-0.5, -0.1)}) == ["compression"]
    assert I.redistribution({"by_start": (-0.6, -0.3), "by_end": (-0.5, -0.1), "crossing": (-2.0, -1.0)}) == ["expansion"]
    assert I.redistribution({"by_start": (1.0, 2.0), "by_end": (-0.5, -0.1), "crossing": (0.1, 0.4)}) == ["crossing"]
    # regression to the mean: compression by the baseline's quartiles, expansion by the end's, Q1 still below Q4
    assert I.redistribution({"by_start": (0.3, 0.6), "by_end": (-0.4, -0.1), "crossing": (-1.5, -0.8)}) == []
    assert I.redistribution({}) == []


def _redistribution_verdicts(rng, n, replicates, after):
    """Verdicts on objective a after stage 2 of a -> b, a's true pair values mu ~ N(1, 1) seen after stage 1
    as mu + N(0, noise_b) and after stage 2 as after(mu) (the b objective is a placeholder)."""
    out = []
    for _ in range(replicates):
        mu = rng.normal(1.0, 1.0, n)
        first, second = after(mu)
        pairs, matrix = _job({"a": [np.zeros(n), first, second], "b": [np.zeros(4)] * 3}, ["base", "a", "b"])
        boot = I.bootstrap(pairs, matrix, n_boot=200, seed=int(rng.integers(2**31)), tie_tolerance=TOL)
        (row,) = [r for r in I.verdicts(boot) if (r["objective"], r["stage"], r["column"]) == ("a", 2, "margin")]
        out.append(row)
    return out


@pytest.mark.slow
def test_redistributed_does_not_fire_on_regression_to_the_mean():
    """No training at all: the margins after both stages are the pairs' values plus fresh noise. Quartiles
    of the margin after stage 1 then show Q1 up and Q4 down (regression to the mean) in most jobs, which
    the old rule called `redistributed`; the rule fires at about the interval's error rate, also when the
    noise at stage 2 is small (the boundary of the null). A planted compression and a planted crossing fire."""
    rng = np.random.default_rng(19)
    n = 64
    null = []
    for noise_b, noise_t in ((1.0, 1.0), (1.0, 0.1)):
        null += _redistribution_verdicts(rng, n, 60, lambda mu: (mu + rng.normal(0, noise_b, n), mu + rng.normal(0, noise_t, n)))
    moved_both_ways = np.mean([bool(r["quartiles_up"] and r["quartiles_down"]) and r["verdict"] != "degraded" for r in null])
    assert moved_both_ways > 0.4  # the pattern the old rule read as redistribution
    assert np.mean([r["verdict"] == "redistributed" for r in null]) <= 0.05

    def compress(mu, c):
        return mu + rng.normal(0, 0.3, n), mu.mean() + (1 - c) * (mu - mu.mean()) + rng.normal(0, 0.3, n)

    compressed = _redistribution_verdicts(rng, n, 20, lambda mu: compress(mu, 0.6))
    assert sum(r["verdict"] == "redistributed" and r["redistribution"] == ["compression"] for r in compressed) >= 16
    crossed = _redistribution_verdicts(rng, n, 10, lambda mu: compress(mu, 1.5))
    assert all(r["verdict"] == "redistributed" and "crossing" in r["redistribution"] for r in crossed)


def test_matrix_json_intervals_layout():
    rng = np.random.default_rng(1)
    pairs, matrix = _job({"a": [np.zeros(32), rng.normal(1, 1, 32), rng.normal(1, 1, 32)],
                          "b": [np.zeros(32), rng.normal(0, 1, 32), rng.normal(1, 1, 32)]}, ["base", "a", "b"])
    out = I.job_intervals(pairs, matrix, n_boot=100, seed=3, tie_tolerance=TOL)
    iv = out["intervals"]
    assert (iv["level"], iv["n_boot"], iv["seed"], iv["n_pairs"], iv["n_dropped"]) == (0.95, 100, 3, {"a": 32, "b": 32}, {"a": 0, "b": 0})
    acc = np.array(iv["metrics"]["accuracy"])
    assert acc.shape == (3, 2, 2) and (acc[..., 0] <= np.array(matrix["metrics"]["accuracy"]) + 1e-12).all()
    lo, hi = iv["transfer"]["accuracy"]["_all"]["BWT"]
    assert lo <= T.matrix_transfer(matrix)["accuracy"]["BWT"] <= hi
    assert set(iv["transfer"]["margin_mean"]["a"]) >= {"learning", "forgetting", "final"}
    (q,) = [d for d in iv["quartiles"] if d["column"] == "margin"]
    assert (q["objective"], q["from_stage"], q["to_stage"]) == ("a", 1, 2)
    assert set(q["quartiles"]) == {"Q1", "Q2", "Q3", "Q4", "all"} and set(q["quartiles"]["Q4"]) == set(I.QUARTILE_STATS)
    assert {(r["objective"], r["stage"], r["column"]) for r in out["verdicts"]} == {
        (o, t, c) for o in "ab" for t in (1, 2) for c in ("accuracy", "margin")}
    assert {r["verdict"] for r in out["verdicts"]} <= set(I.VERDICTS)
    assert I.job_intervals(pairs, matrix, n_boot=0, seed=0) == {}


def test_pairs_missing_at_a_stage_are_dropped_and_counted():
    rng = np.random.default_rng(2)
    pairs, matrix = _job({"a": [np.zeros(20), rng.normal(1, 1, 20)]}, ["base", "a"])
    pairs = pairs.drop(index=pairs[(pairs.stage == 1) & (pairs.pair_id == "a-003")].index)
    iv = I.job_intervals(pairs, matrix, n_boot=20, seed=0)["intervals"]
    assert iv["n_pairs"] == {"a": 19} and iv["n_dropped"] == {"a": 1}
    boot = I.bootstrap(pairs, matrix, n_boot=5, seed=0)
    assert I.dropped_message(boot) == "intervals leave out 1 pair(s) of a missing at some stage"


def test_seed_interval_and_pool():
    assert I.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert I.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert I.t_quantile(0.975, 29) == pytest.approx(2.045, abs=1e-3)
    s = I.seed_interval([1.0, 2.0, 3.0])
    assert (s["n"], s["mean"], s["sd"]) == (3, 2.0, 1.0)
    assert s["interval"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)], abs=1e-3)
    assert I.seed_interval([1.0, None, float("nan")]) == {"n": 1, "mean": 1.0, "sd": None, "interval": None}

    rng = np.random.default_rng(3)
    boots = []
    for seed in range(3):
        pairs, matrix = _job({"a": [np.zeros(30), rng.normal(1, 1, 30), rng.normal(0, 1, 30)], "b": [np.zeros(30)] * 3},
                             ["base", "a", "b"])
        boots.append(I.bootstrap(pairs, matrix, n_boot=200, seed=seed, tie_tolerance=TOL))
    pooled = I.pool(boots)
    key = ("transfer", "margin_mean", "_all", "BWT")
    assert pooled.point[key] == pytest.approx(np.mean([b.point[key] for b in boots]))
    # The mean of three independent estimates: about 1/sqrt(3) of one job's interval width.
    width = lambda b: np.diff(b.interval(key))[0]  # noqa: E731
    assert width(pooled) < 0.8 * np.mean([width(b) for b in boots])
    assert pooled.n_pairs == {"a": 90, "b": 90}


def test_bootstrap_key_composes_and_is_validated():
    assert run_config().eval.bootstrap == 1000
    assert run_config(["eval.bootstrap=200"]).eval.bootstrap == 200
    with pytest.raises(ConfigError) as e:
        run_config(["eval.bootstrap=-1"])
    assert e.value.key == "eval.bootstrap"


def test_pooling_seeds_that_scored_the_same_pairs_draws_them_once():
    """Three runs that scored identical pairs identically: their mean is that one run, and so must be its
    pooled interval; independent draws would pretend to three times the pairs."""
    rng = np.random.default_rng(4)
    pairs, matrix = _job({"a": [np.zeros(40), rng.normal(1, 1, 40)]}, ["base", "a"])
    shared = [I.bootstrap(pairs, matrix, n_boot=300, seed=0) for _ in range(3)]
    independent = [I.bootstrap(pairs, matrix, n_boot=300, seed=s) for s in range(3)]
    assert I.same_pairs(shared)
    key = ("matrix", "margin_mean")
    assert np.allclose(I.pool(shared).interval(key), shared[0].interval(key))
    assert np.diff(I.pool(independent).interval(key)[1, 0]) < 0.8 * np.diff(shared[0].interval(key)[1, 0])
    # Pairs are matched by content, never by id: another world's pairs under the same ids are other pairs.
    other, _ = _job({"a": [np.zeros(40), rng.normal(1, 1, 40)]}, ["base", "a"], world="seed1")
    assert list(other.pair_id) == list(pairs.pair_id)
    assert not I.same_pairs([shared[0], I.bootstrap(other, matrix, n_boot=10, seed=0)])
    assert not I.same_pairs([shared[0], I.bootstrap(pairs.drop(columns="content_hash"), matrix, n_boot=10, seed=0)])


def test_proportion_cells_near_0_or_1_get_a_wilson_interval():
    """32 of 32 pairs right: the bootstrap says [1, 1]; the interval says how far below 1 the truth may lie."""
    pairs, matrix = _job({"a": [np.zeros(32), np.full(32, 2.0)]}, ["base", "a"])
    boot = I.bootstrap(pairs, matrix, n_boot=100, seed=0)
    lo, hi = boot.interval(("matrix", "accuracy"))[1, 0]
    assert hi == 1.0 and 0.85 < lo < 0.95
    assert np.all(boot.reps[("matrix", "accuracy")][:, 1, 0] == 1.0)  # what the percentile interval would have said


def test_an_objective_with_fewer_eval_pairs_than_quartiles():
    """3 eval pairs (model.max_length=16 on the held-out synthetic eval prompts keeps 3): one quartile is empty
    and has no statistics; the job used to fail at its end with KeyError 'frac_improved'."""
    pairs, matrix = _job({"a": [np.zeros(3), np.array([0.5, -0.2, 1.0]), np.array([0.1, 0.3, -0.4])],
                          "b": [np.zeros(3), np.array([0.2, 0.1, 0.0]), np.array([0.6, 0.2, 0.9])]}, ["base", "a", "b"])
    iv = I.job_intervals(pairs, matrix, n_boot=50, seed=0, tie_tolerance=TOL)["intervals"]
    (q,) = [d for d in iv["quartiles"] if d["column"] == "margin"]
    assert set(q["quartiles"]["all"]) == set(I.QUARTILE_STATS)
    assert sum(not q["quartiles"].get(k) for k in ("Q1", "Q2", "Q3", "Q4")) == 1  # the empty one
