"""Gradient cosines on the synthetic world, whose relations fix the sign the cosine must have: with the
default probes (64 training pairs per objective in 8 blocks) the cosine between the two objectives at
the start of stage 2 orders conflicting < orthogonal < compatible on every seed, and each cosine comes
with its interval, both probes' reliabilities and a trace over the stage's steps."""

import json

import pytest

from conftest import run_config
from seqdpo.runner import run_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the module fixture runs nine jobs

RELATIONS = ("conflicting", "orthogonal", "compatible")
# Stage 1 is short (4 steps at the synthetic study's lr): what matters is the model at stage 2's start.
# Only the probe defaults are under test; the other diagnostics are off to keep the 9 jobs cheap.
JOB = [
    "lr=5e-3", "train.max_steps=4", "dataset.n_train=64", "dataset.n_eval=16",
    "diagnostics.likelihood=false", "diagnostics.adapter_movement=false",
]


@pytest.fixture(scope="module")
def stage2_cosines(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradcos")
    out = {}
    for seed in (0, 1, 2):
        for relation in RELATIONS:
            # one job keeps 3 trace points per stage and W&B on, for the trace checks below
            traced = (seed, relation) == (0, "conflicting")
            extra = ["diagnostics.grad_cosine_points=3", "logger=wandb"] if traced else ["diagnostics.grad_cosine_points=1", "logger=none"]
            cfg = run_config([*JOB, *extra, f"dataset.options.relation={relation}", f"seed={seed}",
                              f"ref_cache_dir={root / 'refcache'}"])
            job = root / f"{relation}-{seed}"
            run_job(cfg, str(job))
            out[seed, relation] = (job, json.loads((job / "stage_2" / "diagnostics.json").read_text()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relations_order_the_stage2_start_cosine(stage2_cosines, seed):
    cos = {}
    for relation in RELATIONS:
        _, diag = stage2_cosines[seed, relation]
        assert diag["probe"] == {"source": "train", "pairs": {"polite": 64, "factual": 64},
                                 "blocks": {"polite": 8, "factual": 8}}
        c = diag["grad_cosine"]["factual__polite"]
        assert c["earlier"] is True and -1 <= c["ci_low"] <= c["total"] <= c["ci_high"] <= 1
        assert set(c["reliability"]) == {"factual", "polite"} and all(r is None or r <= 1 for r in c["reliability"].values())
        assert "noise_floor" not in c
        # the disattenuated cosine: never outside [-1, 1], withheld when a probe is unreliable
        if c["corrected_status"] == "unreliable":
            assert c["corrected"] is None
        else:
            assert -1 <= c["corrected"] <= 1 and c["corrected_status"] in ("ok", "clipped")
        cos[relation] = c["total"]
    assert cos["conflicting"] < cos["orthogonal"] < cos["compatible"], cos


def test_cosines_are_traced_over_every_stage(stage2_cosines):
    from wandb_offline import read_run

    job, _ = stage2_cosines[0, "conflicting"]
    for stage, pair in ((1, "polite__factual"), (2, "factual__polite")):
        trace = json.loads((job / f"stage_{stage}" / "diagnostics.json").read_text())["grad_cosine_trace"]
        assert [p["step"] for p in trace] == [0, 2, 4]
        assert [p["progress"] for p in trace] == [stage - 1, stage - 0.5, stage]
        for p in trace:
            c = p["grad_cosine"][pair]
            assert c["ci_low"] <= c["total"] <= c["ci_high"] and "per_layer" not in c
    (run_file,) = (job / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [r for r in read_run(run_file)["history"] if "grad_cosine/factual__polite/total" in r]
    # one W&B row per trace point, on one axis for every order: stage - 1 + step / steps
    assert [r["grad_cosine/progress"] for r in rows] == [0, 0.5, 1, 1, 1.5, 2]
    assert all(r["grad_cosine/factual__polite/ci_low"] <= r["grad_cosine/factual__polite/total"] for r in rows)
    assert all("grad_cosine/reliability/polite" in r for r in rows)
    assert not any(k.startswith("grad_cosine/noise_floor") for r in rows for k in r)
    assert all(-1 <= r[k] <= 1 for r in rows for k in r if k.endswith("/corrected"))
    summary = read_run(run_file)["summary"]
    assert "stage2/diag/grad_cosine/factual__polite/reliability/polite" in summary
