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
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import get_peft_model
from transformers import set_seed

from seqdpo import config as C
from seqdpo.analysis.diagnostics import report_tables
from seqdpo.analysis.intervals import job_intervals
from seqdpo.analysis.recorder import DiagnosticsRecorder
from seqdpo.behaviour.generate import reset_base_generation_counts
from seqdpo.behaviour.scorers import ScoringContext
from seqdpo.behaviour.stage import BehaviourEval
from seqdpo.config import RunConfig
from seqdpo.data import build_objectives
from seqdpo.data.accounting import prepare_pairs
from seqdpo.distributed import is_main_process
from seqdpo.evaluation import summarize
from seqdpo.filemodes import follow_umask
from seqdpo.job.directory import check_output_dir, claim_output_dir, clear_job_results
from seqdpo.job.lock import job_lock
from seqdpo.job.status import JobStatus, read_status, stop_on_sigterm, where
from seqdpo.job_settings import run_labels, scoring_settings, stage_settings
from seqdpo.modeling import check_target_modules, load_model, load_tokenizer, make_lora_config, model_fingerprint
from seqdpo.partition import partition_stages
from seqdpo.reference_source import ReferenceSource
from seqdpo.refcache import DEFAULT_CACHE_DIR, reset_ref_forward_counts
from seqdpo.report import job_plots
from seqdpo.stage_loop import StageContext, StageLoop, StageTraining
from seqdpo.strategies import plan_stages, summary
from seqdpo.tracking import Tracker
from seqdpo.wandb_keys import transfer_summary

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
            tracker = (Tracker(cfg.logger, run_labels(cfg), out, signature=sig, group=group, finished=finished)
                       if is_main_process() else None)
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
    main = is_main_process()
    if main and not (out / "adapter_init").exists():
        peft_model.save_pretrained(out / "adapter_init")
        follow_umask(out / "adapter_init")  # safetensors writes 0600

    fingerprint = model_fingerprint(cfg.model, tok)
    refs = ReferenceSource(peft_model, fingerprint, cache_dir=cfg.ref_cache_dir, max_length=cfg.model.max_length,
                           packing=cfg.model.packing, main=main)
    eval_tok = {n: refs.with_base(ds, batch_size=cfg.eval.batch_size) for n, ds in eval_tok.items()}
    plan = plan_stages(stage_objs, _stage_train_sets(cfg, stage_objs, train_tok, refs), stage_settings(cfg), out,
                       dataset=cfg.dataset.name, write=main)
    stage_names = ["base", *(stage.name for stage in plan)]
    recorder = _diagnostics_recorder(cfg, out, eval_tok, train_tok, refs, stage_names[1:],
                                     frozenset(k for k, stage in enumerate(plan, start=1) if stage.fresh))
    behaviour = _behaviour_eval(cfg, out, tok, objectives, prepared, peft_model, fingerprint, tracker)
    ctx = StageContext(out, peft_model, tok, eval_tok, cfg.eval, cfg.beta, cfg.model.packing, status, tracker=tracker,
                       recorder=recorder, behaviour=behaviour, main=main)
    training = StageTraining(ctx, refs, max_length=cfg.model.max_length, previous_reference=cfg.reference == "previous")
    StageLoop(ctx, training, stage_names).run(plan)

    if not main:
        # DDP: only rank 0 writes stage tables, and it may not have written the last one yet (evaluation
        # is not synchronised across ranks), so other ranks stop here instead of reading them.
        return {"stages": stage_names, "rank": int(os.environ.get("RANK", "0"))}
    return _write_results(cfg, out, tracker, stage_names, list(objectives), refs, recorder, plan, prepared.table(),
                          behaviour)


def _write_results(cfg: RunConfig, out: Path, tracker, stage_names, objectives, refs, recorder, plan, accounting,
                   behaviour=None) -> dict:
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
    pairs.to_parquet(out / "pairs.parquet", index=False)
    (out / "matrix.json").write_text(json.dumps(matrix, indent=1))
    job_diag = recorder.finalize(pairs, matrix) if recorder is not None else None
    if job_diag is not None:
        job_diag["pairs"] = accounting
        (out / "diagnostics.json").write_text(json.dumps(job_diag, indent=1, default=float))
    if tracker is not None:
        tracker.log_matrix(matrix)
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


def _stage_train_sets(cfg: RunConfig, stage_objs: list[str], train_tok: dict, refs: ReferenceSource) -> list:
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


def _diagnostics_recorder(cfg: RunConfig, out: Path, eval_tok: dict, train_tok: dict, refs: ReferenceSource,
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
    return DiagnosticsRecorder(d, out, eval_tok, stage_objectives=stage_names, fresh_stages=fresh_stages,
                               lora_scaling=cfg.lora.effective_alpha() / cfg.lora.r, max_length=cfg.model.max_length,
                               batch_size=cfg.eval.batch_size, tie_tolerance=cfg.eval.tie_tolerance, grad_probes=probes)


def _behaviour_eval(cfg: RunConfig, out: Path, tok, objectives, prepared, peft_model, fingerprint: str, tracker):
    if not cfg.eval.generate:
        return None
    reset_base_generation_counts()
    # the job's pairs, not the builder's whole splits: what the policy trained on and what it is scored on
    job = {n: replace(obj, train=prepared.train[n], eval=prepared.eval[n]) for n, obj in objectives.items()}
    scoring = ScoringContext(scoring_settings(cfg), tok, peft_model, fingerprint, job, cfg.ref_cache_dir or DEFAULT_CACHE_DIR)
    # strategy=merge's merged adapter holds every stage's rank (seqdpo/strategies/merge.py)
    rank = cfg.lora.r * (len(cfg.order.stages) if cfg.strategy.name == "merge" else 1)
    return BehaviourEval(scoring, cfg.eval.generation, out, bootstrap=cfg.eval.bootstrap, adapter_rank=rank, tracker=tracker)
