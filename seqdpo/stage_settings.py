"""What one stage trains with: its learning rate, beta, loss, trainer settings and strategy knobs.

The job gives every stage its own `StageSettings` (one per entry of `order.stages`), and everything
that trains a stage reads them from there, never from the job's config: the Trainer's arguments
(`seqdpo.trainer.make_dpo_config`), the loss, the anchor penalty, the steps a strategy plans. Today
every stage carries the job's values; a job whose stages differ (issue 23) changes only where the
list is built (`seqdpo.job_settings.stage_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from seqdpo.config import LossConfig, StrategyConfig, TrainConfig


@dataclass(frozen=True)
class StageSettings:
    lr: float
    beta: float
    loss: LossConfig
    train: TrainConfig
    strategy: StrategyConfig  # its knobs (replay ratio, anchor strength, ...); the strategy's name is the job's
    seed: int  # the run seed: stage k's Trainer seeds with seed + k, its draws (the EWC Fisher's pairs) with seed
