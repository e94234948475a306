"""The job's RunConfig cut into what each part of a job reads: below the job, no module sees RunConfig.

    stage_settings(cfg)    -> one StageSettings per entry of order.stages (training, strategies)
    scoring_settings(cfg)  -> ScoringSettings (behaviour's scorers and guards)
"""

from __future__ import annotations

from seqdpo.behaviour.scorers import ScoringSettings
from seqdpo.config import RunConfig, stage_objectives
from seqdpo.stage_settings import StageSettings


def stage_settings(cfg: RunConfig) -> list[StageSettings]:
    """What each entry of order.stages trains with: today the job's values, the same for every stage."""
    job = StageSettings(lr=cfg.lr, beta=cfg.beta, loss=cfg.loss, train=cfg.train, strategy=cfg.strategy, seed=cfg.seed)
    return [job] * len(stage_objectives(cfg))


def scoring_settings(cfg: RunConfig) -> ScoringSettings:
    return ScoringSettings(scorer=cfg.scorer, model=cfg.model, dataset=cfg.dataset, beta=cfg.beta, seed=cfg.seed,
                           batch_size=cfg.eval.batch_size)
