"""The job's RunConfig cut into what each part of a job reads: below the job, no module sees RunConfig.

    stage_settings(cfg)    -> one StageSettings per entry of order.stages (training, strategies)
    scoring_settings(cfg)  -> ScoringSettings (behaviour's scorers and guards)
    run_labels(cfg)        -> RunLabels (the W&B run's name, tags and stored config)
"""

from __future__ import annotations

from seqdpo.behaviour.scorers import ScoringSettings
from seqdpo.config import RunConfig, stage_objectives, to_dict
from seqdpo.stage_settings import StageSettings
from seqdpo.tracking import RunLabels


def stage_settings(cfg: RunConfig) -> list[StageSettings]:
    """What each entry of order.stages trains with: today the job's values, the same for every stage."""
    job = StageSettings(lr=cfg.lr, beta=cfg.beta, loss=cfg.loss, train=cfg.train, strategy=cfg.strategy, seed=cfg.seed)
    return [job] * len(stage_objectives(cfg))


def scoring_settings(cfg: RunConfig) -> ScoringSettings:
    return ScoringSettings(scorer=cfg.scorer, model=cfg.model, dataset=cfg.dataset, beta=cfg.beta, seed=cfg.seed,
                           batch_size=cfg.eval.batch_size)


def run_labels(cfg: RunConfig) -> RunLabels:
    flat = {"dataset": cfg.dataset.name, "order": cfg.order.name, "loss": cfg.loss.name, "lora_r": cfg.lora.r,
            "beta": cfg.beta, "lr": cfg.lr, "seed": cfg.seed, "reference": cfg.reference}
    return RunLabels(
        name=f"{cfg.dataset.name}-{cfg.order.name}-{cfg.loss.name}-b{cfg.beta}-lr{cfg.lr}-r{cfg.lora.r}-s{cfg.seed}",
        job_type=cfg.reference + "-reference",
        tags=[cfg.dataset.name, f"order={cfg.order.name}", f"loss={cfg.loss.name}", f"reference={cfg.reference}",
              f"model={cfg.model.name}"],
        config={**flat, "cfg": to_dict(cfg)},
    )
