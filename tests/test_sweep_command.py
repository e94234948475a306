"""The sweep over real datasets of docs/sweeps.md runs as typed, with only the hub replaced by fixture files.

`python -m seqdpo -m dataset=hh_rlhf,pku_saferlhf order=ab,ba beta=0.1,0.3 lora=r16,r32`: 16 jobs,
each in its own output directory with its own matrix.
"""

import json
import sys

import pytest

from test_data import _fixture_split

pytestmark = pytest.mark.slow

SWEEP = ["dataset=hh_rlhf,pku_saferlhf", "order=ab,ba", "beta=0.1,0.3", "lora=r16,r32"]
FAST = ["dataset.n_train=8", "dataset.n_eval=4", "train.max_steps=1", "train.batch_size=4", "logger=none",
        "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false", "diagnostics.likelihood=false",
        # the hand-written fixtures cycle through a few topics, so their train and test files share pairs by chance
        "dataset.max_overlap=1"]


def test_readme_sweep_runs_every_job(monkeypatch, tmp_path):
    import datasets

    from seqdpo.app import main
    from seqdpo.data import DATASETS

    by_hub_id = {spec.hub_id: name for name, spec in DATASETS.items() if spec.hub_id}
    served = []

    def hub(path, name=None, data_dir=None, revision=None, split=None, **kwargs):
        served.append((path, revision))
        return _fixture_split(by_hub_id[path], data_dir, split)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    sweep = tmp_path / "sweep"
    argv = ["seqdpo", "-m", *SWEEP, *FAST, f"hydra.sweep.dir={sweep}", f"ref_cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr(sys, "argv", argv)
    main()

    jobs = sorted(p.parent for p in sweep.glob("*/matrix.json"))
    assert len(jobs) == 16
    for job in jobs:
        m = json.loads((job / "matrix.json").read_text())
        dataset = "hh_rlhf" if "dataset=hh_rlhf" in job.name else "pku_saferlhf"
        assert m["objectives"] == {"hh_rlhf": ["helpful", "harmless"], "pku_saferlhf": ["helpfulness", "safety"]}[dataset]
        assert json.loads((job / "status.json").read_text())["state"] == "done"
    # Data came through the real hub code path, at the pinned revisions.
    assert {rev for _, rev in served} == {DATASETS["hh_rlhf"].revision, DATASETS["pku_saferlhf"].revision}
