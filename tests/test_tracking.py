"""W&B run ids belong to job directories: the same config in two directories is two runs, and a
process that continues a directory continues its run. Real offline W&B files, read back."""

import pytest

from conftest import SMALL_JOB, run_config
from seqdpo.config import signature
from seqdpo.job_settings import run_labels
from seqdpo.tracking import Tracker




@pytest.mark.slow
def test_each_job_directory_has_its_own_run_id(tmp_path):
    from wandb_offline import read_closed_run

    cfg = run_config([*SMALL_JOB, "logger=wandb"])
    for name, x in (("a", 1.0), ("b", 2.0), ("a", 3.0)):  # a twice: a requeued or resumed job
        (tmp_path / name).mkdir(exist_ok=True)
        tracker = Tracker(cfg.logger, run_labels(cfg), tmp_path / name, signature=signature(cfg), group="g")
        tracker.series("eval", "stage", [{"stage": 0, "polite/accuracy": x}])
        tracker.finish()
    runs = {name: [read_closed_run(f) for f in sorted((tmp_path / name / "wandb").glob("offline-run-*/run-*.wandb"))]
            for name in ("a", "b")}
    id_a, id_b = ((tmp_path / n / "wandb_run_id.txt").read_text().strip() for n in ("a", "b"))
    assert id_a != id_b and id_a.startswith(f"seqdpo-{signature(cfg)}-") and id_b.startswith(f"seqdpo-{signature(cfg)}-")
    assert [r["run_id"] for r in runs["a"]] == [id_a, id_a] and [r["run_id"] for r in runs["b"]] == [id_b]
    assert [r["history"][0]["eval/polite/accuracy"] for r in runs["a"]] == [1.0, 3.0]

    # a finished job's rerun opens no run: its W&B run already holds everything
    Tracker(cfg.logger, run_labels(cfg), tmp_path / "b", signature=signature(cfg), group="g", finished=True).finish()
    assert len(list((tmp_path / "b" / "wandb").glob("offline-run-*"))) == 1


def test_intervals_and_verdicts_become_summary_scalars():
    from seqdpo.wandb_keys import interval_summary

    matrix = {
        "stages": ["base", "polite", "factual"], "objectives": ["polite", "factual"],
        "intervals": {"metrics": {"accuracy": [[[0.5, 0.5], [0.5, 0.5]], [[0.8, 0.9], [0.1, 0.2]], [[0.3, 0.5], [0.6, 0.8]]]},
                      "transfer": {"accuracy": {"_all": {"BWT": [-0.6, -0.3]}, "polite": {"forgetting": [0.3, 0.6]}}}},
        "verdicts": [{"objective": "polite", "stage": 2, "column": "accuracy", "change": -0.45,
                      "interval": [-0.6, -0.3], "verdict": "degraded", "reading": "retention", "min_detectable": 0.21}],
    }
    s = interval_summary(matrix)
    assert s["matrix/accuracy/stage1/polite_low"] == 0.8 and s["matrix/accuracy/stage2/factual_high"] == 0.8
    assert (s["transfer/accuracy/BWT_low"], s["transfer/accuracy/BWT_high"]) == (-0.6, -0.3)
    assert s["transfer/accuracy/polite/forgetting_high"] == 0.6
    assert s["verdict/accuracy/stage2/polite"] == "degraded" and s["change/accuracy/stage2/polite"] == -0.45
    assert s["change/accuracy/stage2/polite_low"] == -0.6
    assert s["reading/accuracy/stage2/polite"] == "retention"
    assert s["min_detectable/accuracy/stage2/polite"] == 0.21
    assert interval_summary({"stages": [], "objectives": [], "metrics": {}}) == {}


@pytest.mark.slow
def test_wandb_stages_its_files_in_the_job_directory_not_the_home(tmp_path, monkeypatch):
    """W&B 0.31 copied every logged table into ~/.local/share/wandb/artifacts/staging (read-only, ~9 a job,
    never removed)."""
    import pandas as pd

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home-data"))  # where W&B's default data directory goes
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    cfg = run_config([*SMALL_JOB, "logger=wandb"])
    job = tmp_path / "job"
    job.mkdir()
    tracker = Tracker(cfg.logger, run_labels(cfg), job, signature=signature(cfg), group="g")
    tracker.log_tables({"transfer": pd.DataFrame({"stage": [1, 2], "value": [0.5, 0.25]})})
    tracker.finish()
    staged = list((job / "wandb" / "data" / "artifacts" / "staging").rglob("*"))
    assert staged, list(job.rglob("*"))
    assert not [p for p in (tmp_path / "home-data").rglob("*") if p.is_file()]
    assert "WANDB_DATA_DIR" not in __import__("os").environ  # the next job (a multirun's) sets its own
