"""The dataset registry (`DATASETS`, `register`), the row contract (`PAIR_COLUMNS`, `Objective`) and
`build_objectives`; the builders in this package register themselves here (see `seqdpo.data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from datasets import Dataset

    from seqdpo.config import DatasetConfig

PAIR_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")


class DataError(ValueError):
    """The data does not match its schema; the message says where (file, split, row, column) and what was expected."""


@dataclass
class Objective:
    name: str
    train: "Dataset"
    eval: "Dataset"
    description: str = ""
    stats: dict = field(default_factory=dict)  # builder's counts: rows read, pairs kept, ties dropped, ...


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    build: Callable[["DatasetConfig", int], dict[str, Objective]]  # (config, seed) -> {objective: Objective}
    objectives: tuple[str, ...]  # objective names the builder can make
    hub_id: str | None
    revision: str | None  # pinned hub revision
    description: str


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def build_objectives(cfg: "DatasetConfig", seed: int) -> dict[str, Objective]:
    """Builds the objectives named in `cfg.objectives`, in that order, with every pair the builder made.

    The draw of `n_train` / `n_eval` pairs happens at tokenization (`seqdpo.data.accounting`), where
    pairs that `model.max_length` drops are replaced.
    """
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset '{cfg.name}'; known: {sorted(DATASETS)}")
    spec = DATASETS[cfg.name]
    unknown = [o for o in cfg.objectives if o not in spec.objectives]
    if unknown:
        raise DataError(f"dataset '{cfg.name}' has no objective(s) {unknown}; it offers {list(spec.objectives)}")
    built = spec.build(cfg, seed)
    out = {}
    for name in cfg.objectives:
        obj = built[name]
        for split in ("train", "eval"):
            ds = getattr(obj, split)
            missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
            if missing:
                raise DataError(f"dataset '{cfg.name}' objective '{name}' {split} split lacks columns {missing}")
            if len(ds) == 0:
                raise DataError(
                    f"dataset '{cfg.name}' objective '{name}': the {split} split is empty after filtering "
                    f"(builder stats: {obj.stats})"
                )
        out[name] = obj
    return out
