"""Jobs that share stages through the stage store give the outputs they give alone, and a sweep trains each
distinct stage once (seqdpo/stage_store.py, seqdpo/stage_signature.py).

- `order=ab` after `order=a`, and replay and anchor after sequential: stage 1 comes from the store, and
  pairs.parquet, matrix.json (but its "stage_store" accounting and this process's reference-forward
  counts) and every adapter are byte for byte those of the same job with `stage_store=false`; so are a
  taken stage's generations and scores and the later stages' with `eval.generate=true`, and stage 2 with
  `reference=previous` (sDPO), whose reference is the taken stage 1;
- a changed stage-1 setting never takes a stored stage; a stage-2 override takes stage 1;
- a live local_submitit sweep of two concurrent jobs that share stage 1 trains it once, and its end says so.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # fifteen tiny jobs and a two-job sweep

TINY = ["dataset.n_train=8", "dataset.n_eval=4", "train.batch_size=4", "train.max_steps=3", "train.warmup_ratio=0",
        "train.logging_steps=1", "lr=5e-3", "diagnostics.grad_cosine_points=1", "diagnostics.probe_pairs=8",
        "eval.bootstrap=50"]
# What a process reports of itself, not of the results: the store's accounting, how many reference
# log-probs this process computed rather than read from the shared cache, and the behaviour block's wall
# times (a taken stage's are those of the job that trained it).
PROCESS_KEYS = ("stage_store", "reference_forwards")
BEHAVIOUR_PROCESS_KEYS = ("time",)
# Generation and scoring as tests/test_behaviour.py's resumed job has them, fewer prompts and tokens; a short
# warm start of the base (its 300 default steps are most of such a job's time; what matters here is equality)
GENERATE = ["eval.generate=true", "scorer=implicit", "eval.generation.prompts=4", "eval.generation.samples=2",
            "eval.generation.greedy=true", "eval.generation.max_new_tokens=16", "model.tiny.warm_start_steps=20"]
NO_DIAGNOSTICS = ["diagnostics.grad_cosine=false", "diagnostics.likelihood=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sharing")


def _job(root, name, *overrides, logger="none"):
    from seqdpo.runner import run_job

    cfg = run_config([*TINY, f"ref_cache_dir={root / 'refcache'}", f"stage_store_dir={root / 'store'}",
                      f"logger={logger}", *overrides])
    out = root / name
    matrix = run_job(cfg, str(out))
    return out, matrix


def _sources(matrix):
    return [row["source"] for row in matrix["stage_store"]["stages"]]


def _results(job):
    """matrix.json without what the process reports of itself."""
    matrix = {k: v for k, v in json.loads((job / "matrix.json").read_text()).items() if k not in PROCESS_KEYS}
    if "behaviour" in matrix:
        matrix["behaviour"] = {k: v for k, v in matrix["behaviour"].items() if k not in BEHAVIOUR_PROCESS_KEYS}
    return matrix


def _assert_same_outputs(shared, alone, stages):
    assert (shared / "pairs.parquet").read_bytes() == (alone / "pairs.parquet").read_bytes()
    for k in range(1, stages + 1):
        for f in ("adapter/adapter_model.safetensors", "pairs.parquet", "diagnostics.json"):
            assert (shared / f"stage_{k}" / f).read_bytes() == (alone / f"stage_{k}" / f).read_bytes(), (k, f)
    assert _results(shared) == _results(alone)
    assert (shared / "diagnostics.json").read_bytes() == (alone / "diagnostics.json").read_bytes()


@pytest.fixture(scope="module")
def first(root):
    """order=a: trains stage 1 and publishes it."""
    out, matrix = _job(root, "a", "order=a")
    assert _sources(matrix) == ["trained"]
    return out, matrix


def test_order_ab_after_order_a_takes_stage_1_and_ends_as_alone(root, first):
    from wandb_offline import read_run

    shared, matrix = _job(root, "ab", "order=ab", logger="wandb")
    assert _sources(matrix) == ["store", "trained"]
    row = matrix["stage_store"]["stages"][0]
    assert row["signature"] == first[1]["stage_store"]["stages"][0]["signature"] and row["trained_by"] == str(first[0])
    alone, alone_matrix = _job(root, "ab_alone", "order=ab", "stage_store=false")
    assert _sources(alone_matrix) == ["trained", "trained"] and alone_matrix["stage_store"]["enabled"] is False
    _assert_same_outputs(shared, alone, 2)
    # stage 1's files are the job's own copies (a self-contained directory), its DONE says where they came from
    assert json.loads((shared / "stage_1" / "DONE").read_text())["stage_store"]["from"] == row["signature"]
    assert not (shared / "stage_1" / "adapter" / "adapter_model.safetensors").samefile(
        first[0] / "stage_1" / "adapter" / "adapter_model.safetensors")
    run = read_run(next((shared / "wandb").glob("offline-run-*/run-*.wandb")))
    assert run["summary"]["stage_store/from_store"] == 1 and run["summary"]["stage_store/trained"] == 1
    assert run["summary"]["stage_store/stage1"] == "store"
    # the taken stage's training curve and evaluation reach W&B as a trained one's do
    assert any("stage1/train/loss" in r for r in run["history"]) and any(r.get("eval/stage") == 1 for r in run["history"])


@pytest.mark.parametrize("strategy", [["strategy=replay", "strategy.ratio=0.5"], ["strategy=anchor", "strategy.strength=1000"]])
def test_replay_and_anchor_take_sequentials_stage_1_and_end_as_alone(root, first, strategy):
    name = strategy[0].split("=")[1]
    shared, matrix = _job(root, name, "order=ab", *strategy)
    assert _sources(matrix) == ["store", "trained"]
    alone, _ = _job(root, name + "_alone", "order=ab", *strategy, "stage_store=false")
    _assert_same_outputs(shared, alone, 2)


def test_a_changed_stage_1_setting_never_takes_the_store(root, first):
    _, matrix = _job(root, "stage1_lr", "order=ab", "+order.stage_overrides.1.lr=1e-3")
    assert _sources(matrix) == ["trained", "trained"]


def test_two_concurrent_jobs_of_a_sweep_train_their_shared_stage_1_once(tmp_path):
    """A stage-2 study (`+order.stage_overrides.2.beta` swept with -m): both jobs want the same stage 1 at once;
    one trains it, the other waits on its lock and takes it."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "seqdpo", "-m", "hydra/launcher=local_submitit", "hydra.launcher.timeout_min=20",
           "order=ab", "+order.stage_overrides.2.beta=0.1,1.0", *TINY, "logger=none",
           f"ref_cache_dir={tmp_path / 'refcache'}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/matrix.json"))
    assert len(jobs) == 2 and all("+order.stage_overrides.2.beta=" in j.name for j in jobs), [j.name for j in jobs]
    matrices = [json.loads((j / "matrix.json").read_text()) for j in jobs]
    assert sorted(_sources(m)[0] for m in matrices) == ["store", "trained"]
    assert [_sources(m)[1] for m in matrices] == ["trained", "trained"]
    assert matrices[0]["stage_store"]["stages"][0]["signature"] == matrices[1]["stage_store"]["stages"][0]["signature"]
    assert matrices[0]["stage_store"]["stages"][1]["signature"] != matrices[1]["stage_store"]["stages"][1]["signature"]
    # the same stage 1 in both, and stage 2 as its beta says
    assert matrices[0]["metrics"]["accuracy"][1] == matrices[1]["metrics"]["accuracy"][1]
    assert (jobs[0] / "stage_1" / "pairs.parquet").read_bytes() == (jobs[1] / "stage_1" / "pairs.parquet").read_bytes()
    waiter = next(j for j, m in zip(jobs, matrices) if _sources(m)[0] == "store")
    # Started together, the second job usually finds stage 1 being trained and waits on its lock ("another job
    # is training it"); on a loaded machine it may find it published already. Either way it trains none of it.
    assert "stage 1/2: polite taken from the stage store" in (waiter / "seqdpo.log").read_text()
    assert f"seqdpo sweep {sweep}: 2 job(s): 2 done; 3 stage(s) trained, 1 taken from the stage store" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if waiter.name in x)
    assert f"(from the stage store: stage 1 = {matrices[0]['stage_store']['stages'][0]['signature']}; trained: 2)" in line


def test_a_taken_stage_brings_its_generations_and_the_behaviour_evaluation_ends_as_alone(root):
    _, first_matrix = _job(root, "a_gen", "order=a", *GENERATE, *NO_DIAGNOSTICS)
    assert _sources(first_matrix) == ["trained"]
    shared, matrix = _job(root, "ab_gen", "order=ab", *GENERATE, *NO_DIAGNOSTICS)
    assert _sources(matrix) == ["store", "trained"]
    alone, _ = _job(root, "ab_gen_alone", "order=ab", *GENERATE, *NO_DIAGNOSTICS, "stage_store=false")
    _assert_same_outputs(shared, alone, 2)
    for k in range(3):
        for f in ("generations.parquet", "scores.parquet", "guards.parquet"):
            assert (shared / f"stage_{k}" / f).read_bytes() == (alone / f"stage_{k}" / f).read_bytes(), (k, f)
    assert matrix["behaviour"]["stages"] == ["base", "polite", "factual"]


def test_sdpo_stage_2_references_a_taken_stage_1_as_alone(root):
    """reference=previous: stage 2's reference log-probs come from the model after stage 1, here the one
    taken from the store."""
    _, first_matrix = _job(root, "a_sdpo", "order=a", "reference=previous", *NO_DIAGNOSTICS)
    assert _sources(first_matrix) == ["trained"]
    shared, matrix = _job(root, "ab_sdpo", "order=ab", "reference=previous", *NO_DIAGNOSTICS)
    assert _sources(matrix) == ["store", "trained"]
    alone, _ = _job(root, "ab_sdpo_alone", "order=ab", "reference=previous", *NO_DIAGNOSTICS, "stage_store=false")
    _assert_same_outputs(shared, alone, 2)
    assert (shared / "stage_2" / "train_reference.npz").read_bytes() == (alone / "stage_2" / "train_reference.npz").read_bytes()
