"""One seqdpo job: evaluate the base model, then train and evaluate stage after stage.

    run_job(cfg, out_dir) -> matrix dict

The job is resumable at two levels, so nothing is lost on a crash or a SLURM requeue: a stage whose
`stage_<k>/DONE` exists is skipped (its adapter is reloaded), and a stage interrupted midway resumes
from the newest Trainer checkpoint in `stage_<k>/checkpoints/`. A directory holding another config's
results is refused rather than mixed (see `seqdpo.job.directory`). The layout is in docs/DESIGN.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import get_peft_model, load_peft_weights, set_peft_model_state_dict
from transformers import TrainerCallback, set_seed

from seqdpo import config as C
from seqdpo.analysis.diagnostics import grad_cosine_rows, report_tables, wandb_payload
from seqdpo.analysis.intervals import job_intervals
from seqdpo.analysis.recorder import DiagnosticsRecorder
from seqdpo.behaviour.generate import reset_base_generation_counts
from seqdpo.behaviour.stage import BehaviourEval
from seqdpo.config import RunConfig
from seqdpo.data import build_objectives
from seqdpo.data.accounting import prepare_pairs
from seqdpo.distributed import is_main_process
from seqdpo.evaluation import evaluate_base, evaluate_stage, summarize
from seqdpo.filemodes import follow_umask
from seqdpo.job.directory import check_output_dir, claim_output_dir, clear_job_results
from seqdpo.job.lock import job_lock
from seqdpo.job.log import StageClock
from seqdpo.job.resume import latest_intact_checkpoint, read_trained, stage_train_loss, trainer_state_step, write_trained
from seqdpo.job.status import JobStatus, read_status, stop_on_sigterm, where
from seqdpo.logprobs import dataset_logps
from seqdpo.modeling import check_target_modules, load_model, load_tokenizer, make_lora_config, model_fingerprint
from seqdpo.partition import partition_stages
from seqdpo.refcache import ref_forward_counts, reference_logps, reset_ref_forward_counts, with_reference_columns
from seqdpo.report import job_plots
from seqdpo.stage_settings import stage_config, stage_settings
from seqdpo.stage_sharing import StageSharing, sources_line, summary_keys
from seqdpo.strategies import plan_stages, summary
from seqdpo.strategies.anchor import build_penalty
from seqdpo.strategies.merge import merge_into_default
from seqdpo.tracking import Tracker
from seqdpo.trainer import SeqDPOTrainer, make_dpo_config
from seqdpo.wandb_keys import eval_row, transfer_summary

log = logging.getLogger("seqdpo")


def run_job(cfg: RunConfig, out_dir: str, *, group: str | None = None) -> dict:
    """Runs the job holding the directory's lock (seqdpo.job.lock): one live job per directory."""
    out = Path(out_dir)
    if not is_main_process():  # DDP: rank 0 holds the lock and writes; the other ranks only read
        out.mkdir(parents=True, exist_ok=True)
        return _run_job(cfg, out, group)
    sig = C.signature(cfg)
    check_output_dir(out, cfg, sig)  # another config's directory is refused before the lock file is made
    with job_lock(out) as lock:
        claim_output_dir(out, cfg, sig)
        lock.record_holder()
        return _run_job(cfg, out, group)


def _run_job(cfg: RunConfig, out: Path, group: str | None) -> dict:
    sig = C.signature(cfg)
    # A rerun of a finished job (every stage DONE) adds nothing its W&B run lacks: it opens none.
    finished = (read_status(out) or {}).get("state") == "done" and all(
        (out / f"stage_{k}" / "DONE").exists() for k in range(len(C.stage_objectives(cfg)) + 1)
    )
    if is_main_process():
        clear_job_results(out)
    status = JobStatus(out, enabled=is_main_process())
    status.reserve_space()
    status.set("running")
    status.start_heartbeat()

    tracker = None
    try:
        with stop_on_sigterm():
            tracker = Tracker(cfg, out, signature=sig, group=group, finished=finished) if is_main_process() else None
            matrix = _run_stages(cfg, out, tracker, status)
    except BaseException as e:  # KeyboardInterrupt and SystemExit too: the status must say the job stopped
        # A signal (preemption, requeue, Ctrl-C, SIGTERM) stops a job that a rerun resumes; an exception is a failure.
        state = "interrupted" if isinstance(e, (SystemExit, KeyboardInterrupt)) else "failed"
        try:
            status.set(state, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        except OSError as status_error:  # the job's own error is what a user must see, not this one
            log.warning("could not record the job's end in %s: %r", status.path, status_error)
        status.release_space()
        # The error itself is reported once, by whoever catches it (seqdpo.app: one paragraph or a traceback).
        log.info("job %s %s (status.json)", state, where(status.stage, at="at "))
        if tracker is not None:
            # A SLURM requeue kills the whole job step, W&B's service process included, while submitit's
            # SystemExit unwinds through here: closing the run can then fail, and that error must not
            # replace the SystemExit (Hydra would turn it into a failed job result and submitit would
            # report the job finished instead of waiting for the requeued run).
            try:
                tracker.finish()
            except Exception as finish_error:
                log.warning("could not close the W&B run while stopping: %r", finish_error)
            tracker = None
        raise
    finally:
        status.stop_heartbeat()
        if tracker is not None:
            tracker.finish()
    status.set("done", stage=len(matrix["stages"]) - 1)
    status.release_space()
    return matrix


def _run_stages(cfg: RunConfig, out: Path, tracker, status) -> dict:
    reset_ref_forward_counts()  # per job, also when a multirun runs several jobs in one process
    set_seed(cfg.seed)
    stage_objs = C.stage_objectives(cfg)
    # The data are built, tokenized and checked before the weights load: a data error costs seconds, not
    # the minutes an 8B model takes to load.
    tok = load_tokenizer(cfg.model)
    objectives = build_objectives(cfg.dataset, cfg.seed)
    prepared = prepare_pairs(objectives, tok, cfg.dataset, cfg.model.max_length, cfg.seed)
    train_tok, eval_tok = prepared.train, prepared.eval
    if tracker is not None:
        tracker.summary(prepared.summary_keys())
    model = load_model(cfg.model, tok, cfg.ref_cache_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")

    set_seed(cfg.seed)  # the LoRA A init draws from the global RNG
    check_target_modules(model, cfg.lora, cfg.model.name)
    peft_model = get_peft_model(model, make_lora_config(cfg.lora))
    if is_main_process() and not (out / "adapter_init").exists():
        peft_model.save_pretrained(out / "adapter_init")
        follow_umask(out / "adapter_init")  # safetensors writes 0600

    fingerprint = model_fingerprint(cfg.model, tok)
    refs = _ReferenceSource(cfg, peft_model, fingerprint)
    eval_tok = {n: refs.with_base(ds, batch_size=cfg.eval.batch_size) for n, ds in eval_tok.items()}
    plan = plan_stages(cfg, stage_objs, _stage_train_sets(cfg, stage_objs, train_tok, refs), out, write=is_main_process())
    stage_names = ["base", *(stage.name for stage in plan)]
    recorder = _diagnostics_recorder(cfg, out, eval_tok, train_tok, refs, stage_names[1:],
                                     frozenset(k for k, stage in enumerate(plan, start=1) if stage.fresh))
    behaviour = _behaviour_eval(cfg, out, tok, objectives, prepared, peft_model, fingerprint, tracker)

    def behave(stage: int, sd: Path) -> dict:  # generation and scoring, written before the stage's DONE
        return behaviour.on_stage(stage, sd) if behaviour is not None and is_main_process() else {}

    def evaluate(stage: int):
        return evaluate_stage(
            peft_model, eval_tok, stage=stage, stage_objective=stage_names[stage], beta=cfg.beta,
            batch_size=cfg.eval.batch_size, tie_tolerance=cfg.eval.tie_tolerance, packing=cfg.model.packing,
        )

    clock = StageClock(stage_names)
    settings = stage_settings(cfg)  # one per entry of order.stages (joint trains them as one stage)
    sharing = StageSharing.for_job(cfg)
    if not (out / "stage_0" / "DONE").exists():
        status.set("running", stage=0)
        clock.start(0, "evaluating the base model")
        pairs = evaluate_base(eval_tok, beta=cfg.beta, tie_tolerance=cfg.eval.tie_tolerance)
        _finish_stage(out / "stage_0", pairs, behave(0, out / "stage_0"), tracker, 0)
        clock.end(0, pairs)
    for k, stage in enumerate(plan, start=1):
        sd = out / f"stage_{k}"
        if (sd / "DONE").exists():
            if stage.merge:  # the last row, and its adapter's rank is not the job's: nothing reads it later
                log.info("stage %d (%s) finished earlier", k, stage.name)
                continue
            _load_adapter(peft_model, sd / "adapter")
            log.info("stage %d (%s) finished earlier: adapter reloaded from %s", k, stage.name, sd / "adapter")
            continue
        status.set("running", stage=k)
        if stage.merge:  # strategy=merge: no training, the stages' adapters combined (by rank 0, which wrote them)
            if is_main_process():
                clock.start(k, f"merging the adapters of stages {list(stage.merge)}, then evaluating")
                merged = merge_into_default(peft_model, [out / f"stage_{j}" / "adapter" for j in stage.merge],
                                            out / "adapter_init", cfg.strategy, cfg.seed)
                stage.info.update(merged)
                log.info("stage %d: merged adapter of rank %d, reconstruction error %.2e", k, merged["rank"],
                         merged["reconstruction_error"])
                peft_model.save_pretrained(sd / "adapter")
                follow_umask(sd / "adapter")  # safetensors writes 0600
                pairs = evaluate(k)
                _finish_stage(sd, pairs, {**stage.info, **behave(k, sd)}, tracker, k)
                clock.end(k, pairs)
            continue

        def train_and_evaluate(k=k, stage=stage, sd=sd):
            info = read_trained(sd)
            if info is not None:  # stopped after training (in evaluation or generation): evaluate again, do not retrain
                _load_adapter(peft_model, sd / "adapter")
                log.info("stage %d (%s) was trained earlier: adapter reloaded from %s, evaluating", k, stage.name, sd / "adapter")
                clock.start(k, "trained earlier, evaluating")
            else:
                if stage.fresh:  # strategy=merge: every adapter trains from the base
                    _load_adapter(peft_model, out / "adapter_init")
                train_ds = stage.train
                clock.start(k, f"training on {len(train_ds)} pairs, then evaluating")
                if cfg.reference == "previous":  # sDPO: the model as it stands before this stage is the reference
                    train_ds = refs.with_current(train_ds, sd / "train_reference.npz", batch_size=cfg.eval.batch_size)
                # this stage's settings (order.stage_overrides); joint refuses them, so its one stage is the global's
                info = _train_stage(stage_config(cfg, settings[k - 1]), peft_model, tok, train_ds, sd, k, tracker, recorder, stage, label=clock.label(k))
            pairs = evaluate(k)
            _finish_stage(sd, pairs, {**stage.info, **info, **behave(k, sd)}, tracker, k)
            clock.end(k, pairs)

        if sharing.run(k, stage.name, sd, clock.label(k), train_and_evaluate):
            _load_adapter(peft_model, sd / "adapter")
            log.info("%s taken from the stage store (%s), trained by %s", clock.label(k), sharing.signatures[k - 1],
                     json.loads((sd / "DONE").read_text())["stage_store"]["trained_by"])
            _log_taken_stage(tracker, sd, k)

    if not is_main_process():
        # DDP: only rank 0 writes stage tables, and it may not have written the last one yet (evaluation
        # is not synchronised across ranks), so other ranks stop here instead of reading them.
        return {"stages": stage_names, "rank": int(os.environ.get("RANK", "0"))}
    return _write_results(cfg, out, tracker, stage_names, list(objectives), refs, recorder, plan, prepared.table(),
                          behaviour, sharing)


def _write_results(cfg: RunConfig, out: Path, tracker, stage_names, objectives, refs, recorder, plan, accounting,
                   behaviour, sharing: StageSharing) -> dict:
    """The job-level files (pairs.parquet, matrix.json, diagnostics.json) and their W&B counterparts."""
    pairs = pd.concat([pd.read_parquet(out / f"stage_{k}" / "pairs.parquet") for k in range(len(stage_names))])
    matrix = summarize(pairs, stage_names, objectives, cfg.beta)
    matrix.update(job_intervals(pairs, matrix, n_boot=cfg.eval.bootstrap, seed=cfg.seed,
                                stay_threshold=cfg.diagnostics.stay_threshold, tie_tolerance=cfg.eval.tie_tolerance,
                                min_effect=cfg.eval.min_effect))
    matrix["reference_forwards"] = refs.counter()
    done = [json.loads((out / f"stage_{k}" / "DONE").read_text()) for k in range(1, len(stage_names))]
    matrix["strategy"] = {"name": cfg.strategy.name, "stages": summary(plan, done)}
    if behaviour is not None:
        matrix["behaviour"] = behaviour.summary(stage_names)
    matrix["pairs"] = accounting  # seqdpo.data.accounting: rows read, pairs built, dropped, truncated, kept
    matrix["stage_store"] = sharing.accounting(done)
    log.info("stage store: %s", sources_line(matrix["stage_store"]))
    pairs.to_parquet(out / "pairs.parquet", index=False)
    (out / "matrix.json").write_text(json.dumps(matrix, indent=1))
    job_diag = recorder.finalize(pairs, matrix) if recorder is not None else None
    if job_diag is not None:
        job_diag["pairs"] = accounting
        (out / "diagnostics.json").write_text(json.dumps(job_diag, indent=1, default=float))
    if tracker is not None:
        tracker.log_matrix(matrix)
        tracker.summary(summary_keys(matrix["stage_store"]))
        tracker.summary({"reference_forwards/" + k: v for k, v in matrix["reference_forwards"].items()})
        tracker.summary({f"strategy/stage{row['stage']}/{key}": v for row in matrix["strategy"]["stages"]
                         for key, v in row.items() if isinstance(v, (int, float)) and key != "stage"})
        if job_diag is not None:
            tracker.summary(transfer_summary(job_diag.get("transfer") or {}))
            tracker.log_tables(report_tables(job_diag))
        tracker.log_images(job_plots(out))
        if behaviour is not None:
            behaviour.log_job(matrix["behaviour"], stage_names)
    return matrix


def _finish_stage(sd: Path, pairs: pd.DataFrame, info: dict, tracker, k: int) -> None:
    """Writes a stage's pair table and metrics, then DONE last: a rerun skips a stage only once all is on disk."""
    if not is_main_process():
        return
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


def _train_stage(cfg, peft_model, tok, train_ds, sd: Path, k: int, tracker, recorder, stage, *, label: str) -> dict:
    if is_main_process():  # which pairs this stage trains on (replay and joint mix objectives)
        sd.mkdir(parents=True, exist_ok=True)
        stage.pairs.to_parquet(sd / "train_pairs.parquet", index=False)
    args = make_dpo_config(cfg, str(sd / "checkpoints"), seed=cfg.seed + k, max_steps=stage.max_steps)
    callbacks = [_CheckpointModes(), *([tracker.stage_callback(k)] if tracker is not None else [])]
    trainer = SeqDPOTrainer(
        model=peft_model, args=args, train_dataset=train_ds, processing_class=tok, loss=cfg.loss,
        packing=cfg.model.packing, callbacks=callbacks, label=label,
    )
    if stage.anchored:
        trainer.penalty = build_penalty(cfg, trainer, stage.anchor_sets, sd, is_main_process())
    if recorder is not None:
        recorder.on_stage_start(k, trainer)
    resume, torn = latest_intact_checkpoint(sd / "checkpoints", set_aside=is_main_process())
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
    if recorder is not None:
        diag = recorder.on_stage_end(k, trainer)
        if is_main_process():
            (sd / "diagnostics.json").write_text(json.dumps(diag, indent=1, default=float))
            _log_stage_diagnostics(tracker, k, diag)
    if is_main_process():
        peft_model.save_pretrained(sd / "adapter")
        follow_umask(sd / "adapter")  # safetensors writes 0600
        with open(sd / "train_log.jsonl", "w") as f:
            for row in trainer.state.log_history:
                f.write(json.dumps(row) + "\n")
        # Last: a rerun skips the training of a stage only once all of the above is on disk. The
        # checkpoints stay until DONE, so a stop before then still resumes rather than retrains.
        write_trained(sd, info)
    return info


def _log_stage_diagnostics(tracker, k: int, diag: dict) -> None:
    if tracker is None:
        return
    tracker.summary({f"stage{k}/{key}": v for key, v in wandb_payload(diag).items()})
    tracker.series("grad_cosine", "progress", grad_cosine_rows(diag))


def _log_taken_stage(tracker, sd: Path, k: int) -> None:
    """What training and evaluating the stage would have logged to W&B, from its files."""
    if tracker is None:
        return
    done = json.loads((sd / "DONE").read_text())
    tracker.series("eval", "stage", [{key[len("eval/"):]: v for key, v in done.items() if key.startswith("eval/")}])
    prefix = f"stage{k}/train"
    tracker.stage_callback(k)  # the stage's step axis
    if (sd / "train_log.jsonl").exists():
        for line in (sd / "train_log.jsonl").read_text().splitlines():
            row = json.loads(line)
            tracker.log({f"{prefix}/step": row.get("step"), **{f"{prefix}/{key}": v for key, v in row.items() if key != "step"}})
    if (sd / "diagnostics.json").exists():
        _log_stage_diagnostics(tracker, k, json.loads((sd / "diagnostics.json").read_text()))


class _CheckpointModes(TrainerCallback):
    """A checkpoint's adapter follows the umask too (safetensors writes 0600)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            follow_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _load_adapter(peft_model, folder: Path) -> None:
    device = next(peft_model.parameters()).device
    set_peft_model_state_dict(peft_model, load_peft_weights(str(folder), device=str(device)))


class _ReferenceSource:
    """Reference log-probs for training rows and evaluation: base (shared disk cache) or current model."""

    def __init__(self, cfg: RunConfig, peft_model, fingerprint: str):
        self.cfg, self.model, self.fingerprint = cfg, peft_model, fingerprint
        self.cache_dir = cfg.ref_cache_dir  # None: refcache's default, outputs/.refcache
        self.current_pairs = 0

    def with_base(self, ds, *, batch_size: int):
        lp = reference_logps(
            self.model, ds, fingerprint=self.fingerprint, cache_dir=self.cache_dir, batch_size=batch_size,
            max_length=self.cfg.model.max_length, packing=self.cfg.model.packing,
        )
        return with_reference_columns(ds, lp)

    def with_current(self, ds, path: Path, *, batch_size: int):
        """The model as it stands now; saved beside the stage so a requeued stage reuses the same numbers."""
        if path.exists():
            lp = dict(np.load(path))
        else:
            lp = dataset_logps(
                self.model, ds, batch_size, desc="reference log-probs (previous stage)",
                packing=self.cfg.model.packing,
            )
            self.current_pairs += len(ds)
            if is_main_process():
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **lp)
        return with_reference_columns(ds, lp)

    def counter(self) -> dict:
        return {**ref_forward_counts(), "previous_stage_pairs": self.current_pairs}


def _stage_train_sets(cfg: RunConfig, stage_objs: list[str], train_tok: dict, refs: _ReferenceSource) -> list:
    """One training set per stage; an objective that appears in several stages is split into chunks (sDPO).

    The base reference is attached to the whole sets before they are split: the cache is keyed on a
    set's rows, so each chunk would otherwise miss it and pay a second forward over the same pairs.
    """
    if cfg.reference == "base" or cfg.order.partition == "easy_to_hard":
        train_tok = {n: refs.with_base(train_tok[n], batch_size=cfg.eval.batch_size) for n in dict.fromkeys(stage_objs)}
    base_margins = None
    if cfg.order.partition == "easy_to_hard":
        base_margins = {  # only split objectives are sorted
            n: np.asarray(train_tok[n]["ref_chosen_logps"]) - np.asarray(train_tok[n]["ref_rejected_logps"])
            for n in stage_objs if stage_objs.count(n) > 1
        }
    return partition_stages(stage_objs, train_tok, cfg.order.partition, cfg.seed, base_margins)


def _diagnostics_recorder(cfg: RunConfig, out: Path, eval_tok: dict, train_tok: dict, refs: _ReferenceSource,
                          stage_names: list[str], fresh_stages: frozenset[int]):
    d = cfg.diagnostics
    if not (d.grad_cosine or d.adapter_movement or d.likelihood):
        return None

    probes = None
    if d.grad_cosine and d.probe_source == "train":
        # The first probe_pairs training pairs of each objective, with the base reference (as eval rows carry).
        probes = {
            n: refs.with_base(ds.select(range(min(d.probe_pairs, len(ds)))), batch_size=cfg.eval.batch_size)
            for n, ds in train_tok.items()
        }
    recorder = DiagnosticsRecorder(cfg, out, eval_tok, probes)
    recorder.stage_objectives = stage_names  # the strategy's rows (joint: one stage; merge: a merged row)
    recorder.fresh_stages = fresh_stages
    return recorder


def _behaviour_eval(cfg: RunConfig, out: Path, tok, objectives, prepared, peft_model, fingerprint: str, tracker):
    if not cfg.eval.generate:
        return None

    reset_base_generation_counts()
    # the job's pairs, not the builder's whole splits: what the policy trained on and what it is scored on
    job = {n: replace(obj, train=prepared.train[n], eval=prepared.eval[n]) for n, obj in objectives.items()}
    return BehaviourEval(cfg, out, tok, job, peft_model, fingerprint, tracker)
