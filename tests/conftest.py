"""Shared test setup: no network, W&B offline, and helpers to compose the real Hydra config."""

import os

# Before any import of huggingface_hub / wandb: the hub is unreachable here, and tests must never try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cluster_helpers import slurm_cluster  # noqa: E402,F401  (the live-SLURM fixture, shared by the cluster tests)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A job small enough for CI: a few pairs, a few steps per stage.
SMALL_JOB = [
    "dataset.n_train=32",
    "dataset.n_eval=16",
    "train.max_steps=4",
    "train.batch_size=4",
    "train.logging_steps=1",
    "lr=5e-3",
    # gradient cosines at each stage start only: probes at 5 points per stage would double a test job's cost
    "diagnostics.grad_cosine_points=1",
]


def compose(overrides=(), hydra_cfg=False):
    """The config `python -m seqdpo <overrides>` would run, composed by Hydra itself."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import seqdpo.app  # noqa: F401  (registers the schema and the dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def run_config(overrides=()):
    """Composed and converted to the typed RunConfig, as seqdpo.app does."""
    from omegaconf import OmegaConf

    from seqdpo.validation import validate

    cfg = OmegaConf.to_object(compose(overrides))
    validate(cfg)
    return cfg


@pytest.fixture
def small_job_overrides(tmp_path):
    return [*SMALL_JOB, f"ref_cache_dir={tmp_path / 'refcache'}"]


# Every test has a time limit (pytest-timeout; the default, 600 s, is in pyproject.toml). An end-to-end test
# (`slow`) gets more, since CI on a loaded machine runs two to three times slower than a quiet one;
# the studies that run many jobs set their own, longer @pytest.mark.timeout. docs/testing.md lists them.
SLOW_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
