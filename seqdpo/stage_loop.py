"""The job's stage loop: evaluate the base model, then per stage k train (or reload), evaluate, generate, record.

    loop = StageLoop(context, training, names)
    loop.run(plan)                                  # plan: seqdpo.strategies.plan_stages

`StageContext` holds what every stage shares (the model, the evaluation sets, the job's recorders);
`StageTraining` trains one stage with that stage's `StagePlan` and its `StageSettings`. A stage whose
`stage_<k>/DONE` exists is skipped (its adapter reloaded); one stopped after training (`TRAINED`) is
evaluated again without retraining; one stopped in training resumes from its newest intact checkpoint.

`StageLoop.obtain` is the one place a stage's adapter comes from (trained now, reloaded, or merged): a
store of trained stages replaces it there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from peft import load_peft_weights, set_peft_model_state_dict
from transformers import TrainerCallback

from seqdpo.analysis.diagnostics import grad_cosine_rows, wandb_payload
from seqdpo.config import EvalConfig
from seqdpo.evaluation import evaluate_base, evaluate_stage
from seqdpo.filemodes import follow_umask
from seqdpo.job.log import StageClock
from seqdpo.job.resume import latest_intact_checkpoint, read_trained, stage_train_loss, trainer_state_step, write_trained
from seqdpo.strategies.anchor import build_penalty
from seqdpo.strategies.merge import merge_into_default
from seqdpo.strategies.stage_plan import StagePlan
from seqdpo.trainer import SeqDPOTrainer, make_dpo_config
from seqdpo.wandb_keys import eval_row

if TYPE_CHECKING:
    from seqdpo.analysis.recorder import DiagnosticsRecorder
    from seqdpo.behaviour.stage import BehaviourEval
    from seqdpo.job.status import JobStatus
    from seqdpo.reference_source import ReferenceSource
    from seqdpo.tracking import Tracker

log = logging.getLogger("seqdpo")


@dataclass
class StageContext:
    """What every stage of a job shares; `main`: this process writes (DDP rank 0)."""

    out: Path
    model: Any  # the PeftModel whose `default` adapter the stages train
    tok: Any
    eval_sets: dict  # objective -> tokenized eval pairs with the base reference
    evaluation: EvalConfig
    beta: float  # of the evaluation's implicit rewards
    packing: str
    status: JobStatus
    tracker: Tracker | None = None  # None on DDP ranks other than 0
    recorder: DiagnosticsRecorder | None = None  # None: diagnostics off
    behaviour: BehaviourEval | None = None  # None: eval.generate off
    main: bool = True

    def stage_dir(self, k: int) -> Path:
        return self.out / f"stage_{k}"


class StageLoop:
    def __init__(self, ctx: StageContext, training: StageTraining, stage_names: list[str]):
        self.ctx, self.training, self.names = ctx, training, stage_names
        self.clock = StageClock(stage_names)

    def run(self, plan: list[StagePlan]) -> None:
        if not (self.ctx.stage_dir(0) / "DONE").exists():
            self.base()
        for k, stage in enumerate(plan, start=1):
            self.stage(k, stage)

    def base(self) -> None:
        self.ctx.status.set("running", stage=0)
        self.clock.start(0, "evaluating the base model")
        e = self.ctx.evaluation
        pairs = evaluate_base(self.ctx.eval_sets, beta=self.ctx.beta, tie_tolerance=e.tie_tolerance)
        self.finish(0, pairs, {})

    def stage(self, k: int, stage: StagePlan) -> None:
        sd = self.ctx.stage_dir(k)
        if (sd / "DONE").exists():
            if stage.merge:  # the last row, and its adapter's rank is not the job's: nothing reads it later
                log.info("stage %d (%s) finished earlier", k, stage.name)
                return
            load_adapter(self.ctx.model, sd / "adapter")
            log.info("stage %d (%s) finished earlier: adapter reloaded from %s", k, stage.name, sd / "adapter")
            return
        self.ctx.status.set("running", stage=k)
        if stage.merge and not self.ctx.main:  # the merge is rank 0's, which wrote the adapters it combines
            return
        info = self.obtain(k, stage)
        self.finish(k, self.evaluate(k), {**stage.info, **info})

    def obtain(self, k: int, stage: StagePlan) -> dict:
        """Stage k's adapter into the model, and what DONE records of how it came about."""
        sd = self.ctx.stage_dir(k)
        if stage.merge:  # strategy=merge: no training, the stages' adapters combined
            self.clock.start(k, f"merging the adapters of stages {list(stage.merge)}, then evaluating")
            merged = merge_into_default(self.ctx.model, [self.ctx.stage_dir(j) / "adapter" for j in stage.merge],
                                        self.ctx.out / "adapter_init", stage.settings.strategy, stage.settings.seed)
            stage.info.update(merged)
            log.info("stage %d: merged adapter of rank %d, reconstruction error %.2e", k, merged["rank"],
                     merged["reconstruction_error"])
            self.ctx.model.save_pretrained(sd / "adapter")
            follow_umask(sd / "adapter")  # safetensors writes 0600
            return {}
        info = read_trained(sd)
        if info is not None:  # stopped after training (in evaluation or generation): evaluate again, do not retrain
            load_adapter(self.ctx.model, sd / "adapter")
            log.info("stage %d (%s) was trained earlier: adapter reloaded from %s, evaluating", k, stage.name, sd / "adapter")
            self.clock.start(k, "trained earlier, evaluating")
            return info
        self.clock.start(k, f"training on {len(stage.train)} pairs, then evaluating")
        return self.training.train(k, stage, label=self.clock.label(k))

    def evaluate(self, k: int) -> pd.DataFrame:
        e = self.ctx.evaluation
        return evaluate_stage(
            self.ctx.model, self.ctx.eval_sets, stage=k, stage_objective=self.names[k], beta=self.ctx.beta,
            batch_size=e.batch_size, tie_tolerance=e.tie_tolerance, packing=self.ctx.packing,
        )

    def finish(self, k: int, pairs: pd.DataFrame, info: dict) -> None:
        """Generation and scoring, then the stage's pair table and metrics, then DONE last: a rerun skips a
        stage only once all is on disk."""
        ctx, sd = self.ctx, self.ctx.stage_dir(k)
        if ctx.main:
            if ctx.behaviour is not None:
                info = {**info, **ctx.behaviour.on_stage(k, sd)}
            write_stage(sd, pairs, info, ctx.tracker, k)
        self.clock.end(k, pairs)


def write_stage(sd: Path, pairs: pd.DataFrame, info: dict, tracker, k: int) -> None:
    sd.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(sd / "pairs.parquet", index=False)
    g = pairs.groupby("objective")
    row = eval_row(k, {"accuracy": g.accuracy.mean().to_dict(), "margin_mean": g.margin.mean().to_dict()})
    if tracker is not None:
        tracker.series("eval", "stage", [row])  # eval/<objective>/<metric> over eval/stage
    metrics = {f"eval/{key}": v for key, v in row.items()}
    (sd / "DONE").write_text(json.dumps({"finished": time.time(), **metrics, **info}, indent=1, default=float))
    # The adapter in stage_<k>/adapter is what later stages resume from; checkpoints are only for
    # an interrupted stage and are large on real models.
    shutil.rmtree(sd / "checkpoints", ignore_errors=True)


class StageTraining:
    """Trains one stage's adapter from the model as it stands (or from adapter_init), resuming an interrupted
    stage from its newest intact checkpoint; writes the adapter, the train log, then TRAINED."""

    def __init__(self, ctx: StageContext, refs: ReferenceSource, *, max_length: int, previous_reference: bool):
        self.ctx, self.refs = ctx, refs
        self.max_length = max_length
        self.previous_reference = previous_reference  # sDPO: the model before this stage is its reference

    def train(self, k: int, stage: StagePlan, *, label: str) -> dict:
        ctx, sd, settings = self.ctx, self.ctx.stage_dir(k), stage.settings
        if stage.fresh:  # strategy=merge: every adapter trains from the base
            load_adapter(ctx.model, ctx.out / "adapter_init")
        train_ds = stage.train
        if self.previous_reference:
            train_ds = self.refs.with_current(train_ds, sd / "train_reference.npz", batch_size=ctx.evaluation.batch_size)
        if ctx.main:  # which pairs this stage trains on (replay and joint mix objectives)
            sd.mkdir(parents=True, exist_ok=True)
            stage.pairs.to_parquet(sd / "train_pairs.parquet", index=False)
        args = make_dpo_config(settings, str(sd / "checkpoints"), seed=settings.seed + k, max_length=self.max_length,
                               max_steps=stage.max_steps)
        callbacks = [_CheckpointModes(), *([ctx.tracker.stage_callback(k)] if ctx.tracker is not None else [])]
        trainer = SeqDPOTrainer(
            model=ctx.model, args=args, train_dataset=train_ds, processing_class=ctx.tok, loss=settings.loss,
            packing=ctx.packing, callbacks=callbacks, label=label, penalty=self._penalty(k, stage),
        )
        if ctx.recorder is not None:
            ctx.recorder.on_stage_start(k, trainer)
        resume, torn = latest_intact_checkpoint(sd / "checkpoints", set_aside=ctx.main)
        if resume:
            log.info("stage %d resumes from %s", k, resume)
        resumed_step = trainer_state_step(resume) if resume else 0
        result = trainer.train(resume_from_checkpoint=resume)
        loss, loss_steps = stage_train_loss(trainer.state.log_history, resumed_step, result.training_loss,
                                            result.global_step - resumed_step)
        seen = trainer.seen or {"pairs": None, "tokens": None}
        info = {"train_loss": loss, "train_loss_steps": loss_steps, "train_steps": result.global_step,
                "pairs_seen": seen["pairs"], "tokens_seen": seen["tokens"], "resumed_from": resume, "torn_checkpoints": torn,
                **(trainer.penalty.record if trainer.penalty is not None else {})}
        log.info("stage %d: %d optimizer steps on %s pairs, %s tokens", k, result.global_step, seen["pairs"], seen["tokens"])
        if ctx.recorder is not None:
            self._record_diagnostics(k, ctx.recorder.on_stage_end(k, trainer))
        if ctx.main:
            ctx.model.save_pretrained(sd / "adapter")
            follow_umask(sd / "adapter")  # safetensors writes 0600
            with open(sd / "train_log.jsonl", "w") as f:
                for row in trainer.state.log_history:
                    f.write(json.dumps(row) + "\n")
            # Last: a rerun skips the training of a stage only once all of the above is on disk. The
            # checkpoints stay until DONE, so a stop before then still resumes rather than retrains.
            write_trained(sd, info)
        return info

    def _penalty(self, k: int, stage: StagePlan):
        """strategy=anchor's penalty, built by the trainer from itself (the EWC Fisher is its loss's)."""
        if not stage.anchored:
            return None
        return partial(build_penalty, strategy=stage.settings.strategy, seed=stage.settings.seed,
                       earlier_sets=stage.anchor_sets, stage_dir=self.ctx.stage_dir(k), main_process=self.ctx.main)

    def _record_diagnostics(self, k: int, diag: dict) -> None:
        ctx = self.ctx
        if not ctx.main:
            return
        (ctx.stage_dir(k) / "diagnostics.json").write_text(json.dumps(diag, indent=1, default=float))
        if ctx.tracker is not None:
            ctx.tracker.summary({f"stage{k}/{key}": v for key, v in wandb_payload(diag).items()})
            ctx.tracker.series("grad_cosine", "progress", grad_cosine_rows(diag))


class _CheckpointModes(TrainerCallback):
    """A checkpoint's adapter follows the umask too (safetensors writes 0600)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            follow_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def load_adapter(peft_model, folder: Path) -> None:
    device = next(peft_model.parameters()).device
    set_peft_model_state_dict(peft_model, load_peft_weights(str(folder), device=str(device)))
