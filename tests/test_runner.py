"""End-to-end jobs on the tiny model: outputs, per-pair numbers, resume, reference semantics, W&B files."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SMALL_JOB, run_config
from seqdpo.runner import run_job

pytestmark = pytest.mark.slow

PAIR_COLUMNS = {
    "stage", "stage_objective", "objective", "pair_id", "policy_chosen_logps", "policy_rejected_logps",
    "ref_chosen_logps", "ref_rejected_logps", "chosen_len", "rejected_len", "reward_chosen", "reward_rejected",
    "margin", "norm_margin", "accuracy", "policy_accuracy",
}


def _job(tmp_path_factory, *overrides):
    root = tmp_path_factory.mktemp("job")
    cfg = run_config([*SMALL_JOB, f"ref_cache_dir={root / 'refcache'}", *overrides])
    out = root / "run"
    return cfg, out, run_job(cfg, str(out))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return _job(tmp_path_factory, "logger=wandb", "reference=base")


@pytest.fixture(scope="module")
def job_previous(tmp_path_factory):
    # Dropout off: with LoRA dropout active the first training forward differs from the reference pass
    # (taken in eval mode) by the dropout noise alone, which would hide what this job checks.
    return _job(tmp_path_factory, "logger=none", "reference=previous", "diagnostics.grad_cosine=false", "lora.dropout=0")


def test_job_writes_every_output(job):
    cfg, out, matrix = job
    for f in ["config.yaml", "signature.txt", "status.json", "pairs.parquet", "matrix.json", "metrics.jsonl",
              "adapter_init/adapter_config.json", "stage_0/DONE", "stage_1/adapter/adapter_model.safetensors",
              "stage_2/DONE", "stage_2/train_log.jsonl"]:
        assert (out / f).exists(), f
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert not (out / "stage_1" / "checkpoints").exists()  # the adapter is what later stages need
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert PAIR_COLUMNS <= set(pairs.columns)
    objectives = list(cfg.dataset.objectives)
    assert matrix["stages"] == ["base", *objectives] and matrix["objectives"] == objectives
    assert len(pairs) == 3 * 2 * 16  # stages x objectives x eval pairs
    assert not pairs.duplicated(["stage", "objective", "pair_id"]).any()
    assert json.loads((out / "matrix.json").read_text())["metrics"] == matrix["metrics"]


def test_base_stage_is_a_tie_everywhere(job):
    _, _, matrix = job
    assert matrix["metrics"]["accuracy"][0] == [0.5, 0.5]  # policy == reference: ties count 0.5, not 0
    assert matrix["metrics"]["margin_mean"][0] == [0.0, 0.0]


def test_training_moves_the_trained_objective(job):
    _, _, matrix = job
    margins = matrix["metrics"]["margin_mean"]
    # Four steps on 32 pairs move little, but in the trained direction, far beyond float noise.
    assert margins[1][0] > 0.01  # stage 1 trained objective a
    assert margins[2][1] - margins[1][1] > 0.01  # stage 2 trained objective b


def _naive_logps(model, tok, prompt, response):
    """Sum of log p(response tokens | prompt) from full logits: the textbook computation."""
    p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = tok.apply_chat_template(prompt + response, tokenize=True)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[len(p_ids) - 1 :].sum()), len(ids) - len(p_ids)


def test_pair_numbers_match_a_hand_computation(job):
    from peft import PeftModel

    from seqdpo.data import build_objectives
    from seqdpo.modeling import load_model_and_tokenizer

    cfg, out, _ = job
    base, tok = load_model_and_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(base, out / "stage_1" / "adapter").eval()
    obj = cfg.dataset.objectives[1]
    row = build_objectives(cfg.dataset, cfg.seed)[obj].eval[3]
    pc, lc = _naive_logps(model, tok, row["prompt"], row["chosen"])
    pr, lr = _naive_logps(model, tok, row["prompt"], row["rejected"])
    with model.disable_adapter():
        rc, _ = _naive_logps(model, tok, row["prompt"], row["chosen"])
        rr, _ = _naive_logps(model, tok, row["prompt"], row["rejected"])
    pairs = pd.read_parquet(out / "pairs.parquet")
    got = pairs[(pairs.stage == 1) & (pairs.objective == obj) & (pairs.pair_id == row["pair_id"])].iloc[0]
    np.testing.assert_allclose(
        [got.policy_chosen_logps, got.policy_rejected_logps, got.ref_chosen_logps, got.ref_rejected_logps],
        [pc, pr, rc, rr], rtol=1e-5, atol=1e-4,
    )
    assert (got.chosen_len, got.rejected_len) == (lc, lr)
    margin = cfg.beta * ((pc - rc) - (pr - rr))
    assert got.margin == pytest.approx(margin, abs=1e-4)
    assert got.norm_margin == pytest.approx(pc / lc - pr / lr, abs=1e-5)
    assert got.accuracy == (1.0 if margin > 0 else 0.0)


def _stage_log(out, stage):
    rows = [json.loads(line) for line in (out / f"stage_{stage}" / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "rewards/margins" in r]


def test_reference_base_measures_stage2_against_the_base_model(job):
    """Stage 2 starts from the stage-1 adapter; with reference=base its rewards are relative to the base,
    so at the first step they already carry stage 1's effect on objective b (not 0, as TRL's own
    "ref" adapter copy would make them)."""
    _, out, _ = job
    first = _stage_log(out, 2)[0]
    assert first["step"] == 1 and abs(first["rewards/margins"]) > 1e-3
    assert not (out / "stage_2" / "train_reference.npz").exists()
    assert not (out / "stage_2" / "adapter" / "ref").exists()


def test_reference_previous_is_the_stage_start_model(job_previous):
    _, out, matrix = job_previous
    first = _stage_log(out, 2)[0]
    assert first["step"] == 1 and abs(first["rewards/margins"]) < 1e-5  # policy == reference before the first update
    ref = np.load(out / "stage_2" / "train_reference.npz")
    assert ref["chosen_logps"].shape == (32,)
    # Evaluation keeps the fixed base reference whatever the training reference is.
    assert matrix["metrics"]["accuracy"][0] == [0.5, 0.5]


def _mtimes(out):
    return {p: os.stat(p).st_mtime_ns for p in sorted(out.glob("stage_*/DONE")) + sorted(out.glob("stage_*/adapter/*"))}


def _offline_runs(out):
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_rerun_skips_finished_stages(job):
    cfg, out, matrix = job
    before = _mtimes(out)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert [f.name for f in _offline_runs(out)] == [f"run-{run_id}.wandb"]
    assert run_job(cfg, str(out))["metrics"] == matrix["metrics"]
    assert _mtimes(out) == before  # nothing retrained, nothing re-evaluated
    assert len(_offline_runs(out)) == 1  # a finished job's rerun adds no W&B run directory

    (out / "stage_2" / "DONE").unlink()
    again = run_job(cfg, str(out))
    # new work resumes the same W&B run (an offline process writes its own directory; sync merges them)
    assert [f.name for f in _offline_runs(out)] == [f"run-{run_id}.wandb"] * 2
    after = _mtimes(out)
    stage1 = [p for p in before if "stage_1" in str(p) or "stage_0" in str(p)]
    assert all(after[p] == before[p] for p in stage1)  # stage 1 reloaded, not retrained
    assert after[out / "stage_2" / "DONE"] != before[out / "stage_2" / "DONE"]
    np.testing.assert_allclose(again["metrics"]["margin_mean"], matrix["metrics"]["margin_mean"], atol=1e-5)


def test_a_different_config_is_refused_in_the_same_directory(job):
    cfg, out, _ = job
    cfg2 = run_config([*SMALL_JOB, "beta=0.1"])
    with pytest.raises(RuntimeError, match="different config"):
        run_job(cfg2, str(out))


def test_wandb_offline_run_holds_the_matrix(job):
    from wandb_offline import read_run

    cfg, out, matrix = job
    # The rerun tests above resumed the same run id: each process writes its own offline file.
    runs = [read_run(f) for f in _offline_runs(out)]
    assert len(runs) >= 1 and len({r["run_id"] for r in runs}) == 1
    run = runs[-1]
    history = [row for r in runs for row in r["history"]]
    assert run["run_id"] == (out / "wandb_run_id.txt").read_text().strip() and f"order={cfg.order.name}" in run["tags"]
    # flat config keys: W&B groups runs by any of them
    config = runs[0]["config"]
    assert {k: config[k] for k in ("dataset", "order", "loss", "lora_r", "beta", "lr", "seed", "reference")} == {
        "dataset": cfg.dataset.name, "order": cfg.order.name, "loss": cfg.loss.name, "lora_r": cfg.lora.r,
        "beta": cfg.beta, "lr": cfg.lr, "seed": cfg.seed, "reference": cfg.reference}
    assert config["cfg"]["dataset"]["objectives"] == list(cfg.dataset.objectives)
    objectives, stages = matrix["objectives"], matrix["stages"]
    for k in range(len(stages)):
        # eval series: one row per stage on the eval/stage axis, the same keys in every order
        (row,) = [r for r in runs[0]["history"] if r.get("eval/stage") == k]
        for j, obj in enumerate(objectives):
            assert row[f"eval/{obj}/accuracy"] == pytest.approx(matrix["metrics"]["accuracy"][k][j])
            key = f"matrix/accuracy/stage{k}/{obj}"
            assert run["summary"][key] == pytest.approx(matrix["metrics"]["accuracy"][k][j])
    transfer = json.loads((out / "diagnostics.json").read_text())["transfer"]["accuracy"]
    assert run["summary"]["transfer/accuracy/BWT"] == pytest.approx(transfer["BWT"])
    first = objectives[0]
    assert run["summary"][f"transfer/accuracy/{first}/forgetting"] == pytest.approx(transfer["per_objective"][first]["forgetting"])
    # intervals and verdicts of matrix.json as summary scalars
    saved = json.loads((out / "matrix.json").read_text())
    assert run["summary"]["transfer/accuracy/BWT_low"] == pytest.approx(saved["intervals"]["transfer"]["accuracy"]["_all"]["BWT"][0])
    for v in saved["verdicts"]:
        assert run["summary"][f"verdict/{v['column']}/stage{v['stage']}/{v['objective']}"] == v["verdict"]
        assert run["summary"][f"reading/{v['column']}/stage{v['stage']}/{v['objective']}"] == v["reading"]
    # the objective trained last: what its stage taught apart from the transfer before it, both with intervals
    last, k = stages[-1], len(stages) - 1
    (taught,) = [v for v in saved["verdicts"] if (v["objective"], v["stage"], v["column"]) == (last, k, "accuracy")]
    assert (taught["reading"], taught["baseline_stage"]) == ("learning", k - 1)
    assert taught["change"] == pytest.approx(transfer["per_objective"][last]["learning"])
    (before,) = [v for v in saved["verdicts"] if (v["objective"], v["stage"], v["column"]) == (last, k - 1, "accuracy")]
    assert (before["reading"], before["baseline_stage"]) == ("transfer", 0)
    assert before["change"] == pytest.approx(transfer["per_objective"][last]["forward"])
    for q in ("learning", "forward"):
        low, high = saved["intervals"]["transfer"]["accuracy"][last][q]
        assert run["summary"][f"transfer/accuracy/{last}/{q}_low"] == pytest.approx(low) and low <= high
    assert any("stage1/train/loss" in row for row in history)
    assert any("stage2/train/rewards/margins" in row for row in history)


def test_stage_0_is_a_tie_whatever_layout_filled_the_reference_cache(tmp_path):
    """The shared cache serves reference log-probs computed in another job's batch layout; the base model's own
    margins must still be exactly 0 (chance), not that layout's rounding."""
    cache = f"ref_cache_dir={tmp_path / 'refcache'}"
    quick = [*SMALL_JOB, cache, "logger=none", "train.max_steps=1", "diagnostics.grad_cosine=false"]
    run_job(run_config([*quick, "model.packing=padded", "eval.batch_size=3"]), str(tmp_path / "padded"))
    matrix = run_job(run_config(quick), str(tmp_path / "shared"))
    pairs = pd.read_parquet(tmp_path / "shared" / "pairs.parquet").set_index(["objective", "pair_id"])
    base, trained = pairs[pairs.stage == 0], pairs[pairs.stage == 1]
    assert (base.margin == 0).all() and (base.accuracy == 0.5).all()
    assert matrix["metrics"]["accuracy"][0] == [0.5, 0.5]
    # stage 0's lengths come from the token ids, a trained stage's from the forward pass: the same counts
    pd.testing.assert_frame_equal(base[["chosen_len", "rejected_len"]], trained.loc[base.index, ["chosen_len", "rejected_len"]])
