"""One stage of a strategy's plan (`StagePlan`) and the optimizer steps a sequential stage takes on a
number of pairs; `seqdpo.strategies.plan_stages` and the replay strategy build plans from them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from seqdpo.config import TrainConfig
from seqdpo.stage_settings import StageSettings

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class StagePlan:
    name: str  # the matrix row: the objective trained, `joint` or `merged`
    train: Dataset | None  # the pairs it trains on; None: no training (the merged row)
    settings: StageSettings  # what it trains with (the merged row: the strategy's merge knobs and seed)
    pairs: pd.DataFrame | None = None  # objective, pair_id of each row of `train`
    fresh: bool = False  # starts from adapter_init instead of the previous stage's adapter
    max_steps: int | None = None  # overrides train.max_steps
    anchor_sets: list[Dataset] = field(default_factory=list)  # anchor: each earlier stage's pairs (its EWC Fisher's data)
    merge: tuple[int, ...] = ()  # merged row: the stages whose adapters combine
    info: dict = field(default_factory=dict)  # counts shown in DONE, the log, matrix.json and W&B

    @property
    def anchored(self) -> bool:
        return bool(self.anchor_sets)


def optimizer_steps(t: TrainConfig, n_pairs: int) -> int:
    """The optimizer steps a sequential stage takes on `n_pairs` pairs (transformers' Trainer:
    set_initial_training_values, with the dataloader split over WORLD_SIZE processes)."""
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(n_pairs / (t.batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    return math.ceil(t.epochs * max(math.ceil(batches / t.grad_accum), 1))
