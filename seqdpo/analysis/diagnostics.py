"""DiagnosticsRecorder: the runner's analysis hooks (see docs/DESIGN.md, "Analysis hooks").

Per stage k (objective o_k):
  on_stage_start  snapshots the adapter (phi_start) and, when `diagnostics.grad_cosine`, takes the
                  gradient of every objective's loss on its fixed probe set (the first `probe_pairs`
                  training pairs, or eval pairs with `probe_source: eval`) at phi_start, in
                  `probe_blocks` blocks; cosines of o_k's gradient with every other objective's, each
                  with both objectives' split-half reliabilities and a jackknife interval (gradient_probes.py). The loss is
                  `trainer.batch_loss` (the stage's loss and beta) on probe rows whose reference columns
                  hold the base model's log-probs whatever `reference` trains with. A callback repeats
                  the cosines at `grad_cosine_points` steps spread over the stage (both ends included);
                  every point is appended to stage_k/grad_cosine_trace.jsonl, so a resumed stage keeps
                  the points an interrupted process took.
  on_stage_end    adapter movement start -> end (raw and effective), its cosine with every earlier
                  stage's movement, the update's alignment with each objective's gradient at phi_start,
                  and the off-prompt dispersion probe (likelihood.py).
  finalize        job_analysis() of the per-pair table and the matrix (transfer, quartiles, 3D-properties)
                  plus a compact copy of every stage's diagnostics.json found on disk (so a resumed
                  job's summary still covers the stages an earlier process ran).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from seqdpo.analysis import gradient_probes as GP
from seqdpo.analysis import gradients as G
from seqdpo.analysis import likelihood as L
from seqdpo.analysis import movement as M
from seqdpo.analysis import pairs as P
from seqdpo.analysis import transfer as T
from seqdpo.config import DiagnosticsConfig, EvalConfig

def pair_key(a: str, b: str) -> str:
    return f"{a}__{b}"


def job_analysis(
    pairs: pd.DataFrame,
    matrix: dict,
    stay_threshold: float = DiagnosticsConfig.stay_threshold,
    min_fraction: float = DiagnosticsConfig.redistribution_min_fraction,
    tie_tolerance: float = EvalConfig.tie_tolerance,
) -> dict[str, Any]:
    """Everything that follows from the per-pair table and the matrix alone (no model needed)."""
    stages = list(matrix["stages"])
    out: dict[str, Any] = {"transfer": T.matrix_transfer(matrix, [m for m in T.JOB_METRICS if m in matrix["metrics"]])}
    out["quartiles"] = [
        d
        for col in P.DECOMPOSED_COLUMNS
        if col in pairs.columns
        for d in P.pair_decomposition(pairs, stages, col, stay_threshold, min_fraction, tie_tolerance)
    ]
    needed = {"policy_chosen_logps", "ref_chosen_logps", "policy_rejected_logps", "ref_rejected_logps", "chosen_len", "rejected_len"}
    if needed <= set(pairs.columns):
        shifts = L.likelihood_shifts(pairs, stages)
        out["likelihood"] = shifts
        out["dispersion_untrained"] = {str(k): v for k, v in L.untrained_dispersion(shifts).items()}
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


TRACE_FILE = "grad_cosine_trace.jsonl"


def _grad_cosine_callback(recorder: "DiagnosticsRecorder", trainer, points: int):
    """A TrainerCallback taking the cosines at `points` steps spread over the stage (built lazily: transformers is heavy)."""
    from transformers import TrainerCallback

    class GradCosineCallback(TrainerCallback):
        steps: set[int] = set()

        def on_train_begin(self, args, state, control, **kwargs):
            self.steps = set(GP.trace_steps(int(state.max_steps), points)) - {0}  # step 0 is the stage start
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.steps:
                recorder._trace_point(trainer, int(state.global_step))
            return control

    return GradCosineCallback()


class DiagnosticsRecorder:
    def __init__(self, cfg, out_dir, objectives_tokenized: dict, grad_probes: dict | None = None):
        from seqdpo.config import stage_objectives

        self.cfg = cfg
        self.dcfg = cfg.diagnostics
        self.out_dir = Path(out_dir)
        self.stage_objectives = stage_objectives(cfg)
        self.objectives = list(objectives_tokenized)
        n = int(self.dcfg.probe_pairs)
        self.probes = {name: [ds[i] for i in range(min(n, len(ds)))] for name, ds in objectives_tokenized.items()}
        # Gradient probes: the runner passes the training pairs (probe_source: train); else the eval pairs.
        grad_sets = objectives_tokenized if grad_probes is None else grad_probes
        self.grad_probes = {name: [ds[i] for i in range(min(n, len(ds)))] for name, ds in grad_sets.items()}
        self.scaling = float(cfg.lora.effective_alpha()) / float(cfg.lora.r)
        self._states: dict[int, dict[str, torch.Tensor]] = {}
        # Stages that train from the initial adapter rather than the previous stage's (strategy=merge);
        # set by the runner from the strategy's plan
        self.fresh_stages: frozenset[int] = frozenset()
        self._start_grads: dict[str, dict[str, torch.Tensor]] = {}
        self._trace: list[dict[str, Any]] = []
        self._callback = None
        self._stage_result: dict[str, Any] = {}
        self._base_offprompt: dict[str, dict[str, np.ndarray]] = {}

    # -- gradients -------------------------------------------------------------------------------
    def _block_gradients(self, trainer) -> tuple[dict[str, list], dict[str, np.ndarray]]:
        """Block gradients of every objective's probe set at the current parameters, and the block sizes."""
        model = trainer.model
        params = G.lora_parameters(model)
        was_training = model.training
        # Dropout off: a probe gradient must be a function of the parameters only.
        model.eval()
        grads, sizes = {}, {}
        try:
            with torch.enable_grad():
                for n in self.objectives:
                    if self.grad_probes.get(n):
                        grads[n], sizes[n] = GP.block_gradients(trainer.batch_loss, params, self.grad_probes[n], int(self.dcfg.probe_blocks))
        finally:
            model.train(was_training)
        return grads, sizes

    def _probe(self, trainer, step: int, per_group: bool) -> tuple[dict[str, Any], GP.ProbeGram, dict, dict]:
        """One trace point: the cosines of the stage's objective with every other, with reliabilities and intervals."""
        stage = self._stage
        grads, sizes = self._block_gradients(trainer)
        gram = GP.ProbeGram(grads, sizes, per_group=per_group)
        cosines = GP.pair_cosines(
            gram, self.stage_objectives[stage - 1], set(self.stage_objectives[: stage - 1]),
            float(self.dcfg.min_reliability), per_group=per_group,
        )
        point = {"step": step, "grad_cosine": cosines}
        self._trace.append(point)
        from seqdpo.runner import is_main_process

        if is_main_process():
            with open(self._trace_path(stage), "a") as f:
                f.write(json.dumps(_jsonable({**point, "grad_cosine": {p: _trace_entry(v) for p, v in cosines.items()}})) + "\n")
        return cosines, gram, grads, sizes

    def _trace_point(self, trainer, step: int) -> None:
        self._probe(trainer, step, per_group=False)

    def _trace_path(self, stage: int) -> Path:
        d = self.out_dir / f"stage_{stage}"
        d.mkdir(parents=True, exist_ok=True)
        return d / TRACE_FILE

    def _saved_trace(self, stage: int) -> list[dict[str, Any]]:
        """Trace points on disk, one per step (a resumed stage's later entry for a step wins)."""
        path = self.out_dir / f"stage_{stage}" / TRACE_FILE
        if not path.exists():
            return [{**p, "grad_cosine": {k: _trace_entry(v) for k, v in p["grad_cosine"].items()}} for p in self._trace]
        points = {}
        for line in path.read_text().splitlines():
            if line.strip():
                p = json.loads(line)
                points[p["step"]] = p
        return [points[s] for s in sorted(points)]

    # -- hooks -----------------------------------------------------------------------------------
    def on_stage_start(self, stage: int, trainer) -> None:
        self._stage = stage
        self._trace = []
        self._stage_result = {"stage": stage, "objective": self.stage_objectives[stage - 1]}
        self._states[0 if stage in self.fresh_stages else stage - 1] = M.state_from_model(trainer.model)
        if self.dcfg.grad_cosine:
            cosines, gram, grads, sizes = self._probe(trainer, 0, per_group=True)
            self._start_grads = {n: GP.mean_gradient(grads[n], sizes[n]) for n in grads}
            self._stage_result["grad_cosine"] = cosines
            self._stage_result["grad_norm"] = {n: gram.norm(n) for n in gram.objectives}
            self._stage_result["probe"] = {
                "source": self.dcfg.probe_source, "pairs": {n: len(r) for n, r in self.grad_probes.items()},
                "blocks": {n: len(s) for n, s in sizes.items()},
            }
            if int(self.dcfg.grad_cosine_points) > 1:
                self._callback = _grad_cosine_callback(self, trainer, int(self.dcfg.grad_cosine_points))
                trainer.add_callback(self._callback)

    def _state_before(self, k: int) -> dict[str, torch.Tensor] | None:
        """Adapter stage k started from."""
        return self._state_after(0 if k in self.fresh_stages else k - 1)

    def _state_after(self, k: int) -> dict[str, torch.Tensor] | None:
        """Adapter after stage k (k = 0: before any training), from memory or from disk (resumed jobs)."""
        if k in self._states:
            return self._states[k]
        d = self.out_dir / ("adapter_init" if k == 0 else f"stage_{k}/adapter")
        if (d / "adapter_model.safetensors").exists() or (d / "adapter_model.bin").exists():
            self._states[k] = M.load_adapter_state(str(d))
            return self._states[k]
        return None

    def on_stage_end(self, stage: int, trainer) -> dict[str, Any]:
        res = self._stage_result if self._stage_result.get("stage") == stage else {"stage": stage, "objective": self.stage_objectives[stage - 1]}
        if self._callback is not None:
            trainer.remove_callback(self._callback)
            self._callback = None
        if self.dcfg.grad_cosine:
            # progress = stage - 1 + step / steps of the stage: one axis for every stage and order
            total = int(getattr(trainer.state, "max_steps", 0) or 0) if hasattr(trainer, "state") else 0
            res["grad_cosine_trace"] = [
                {**p, "progress": stage - 1 + (p["step"] / total if total > 0 else 0.0)} for p in self._saved_trace(stage)
            ]
        end = M.state_from_model(trainer.model)
        start = self._state_before(stage)
        self._states[stage] = end
        if self.dcfg.adapter_movement and start is not None:
            res["movement"] = M.movement(start, end, self.scaling)
            res["movement_cosine"] = {}
            for k in range(1, stage):
                s0, s1 = self._state_before(k), self._state_after(k)
                if s0 is not None and s1 is not None:
                    res["movement_cosine"][f"stage_{k}"] = M.movement_cosine(s0, s1, end, self.scaling, start)
        if self._start_grads and start is not None:
            delta = M.delta_state(start, end)
            res["update_alignment"] = {n: G.update_alignment(delta, g) for n, g in self._start_grads.items()}
        self._start_grads = {}
        if self.dcfg.likelihood:
            res["dispersion_offprompt"] = self._offprompt(trainer)
        self._stage_result = {}
        return _jsonable(res)

    def _offprompt(self, trainer) -> dict[str, Any]:
        from seqdpo.logprobs import sequence_logps

        model = trainer.model
        out = {}
        for name, rows in self.probes.items():
            if len(rows) < 2:
                continue
            feats = L.offprompt_features(rows, int(self.cfg.model.max_length))
            pol = self._logps(trainer, model, feats, sequence_logps)
            if name not in self._base_offprompt:
                with model.disable_adapter():
                    self._base_offprompt[name] = self._logps(trainer, model, feats, sequence_logps)
            out[name] = L.dispersion_summary(pol, self._base_offprompt[name])
        return out

    def _logps(self, trainer, model, feats, sequence_logps) -> dict[str, np.ndarray]:
        was_training = model.training
        model.eval()
        acc: dict[str, list] = {}
        device = next(p for p in model.parameters()).device
        bs = max(int(self.cfg.eval.batch_size), 1)
        try:
            with torch.no_grad():
                for i in range(0, len(feats), bs):
                    batch = trainer.data_collator(feats[i : i + bs])
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    for k, v in sequence_logps(model, batch).items():
                        acc.setdefault(k, []).append(v.detach().float().cpu().numpy())
        finally:
            model.train(was_training)
        return {k: np.concatenate(v) for k, v in acc.items()}

    def finalize(self, pairs: pd.DataFrame, matrix: dict) -> dict[str, Any]:
        out = job_analysis(
            pairs,
            matrix,
            stay_threshold=float(self.dcfg.stay_threshold),
            min_fraction=float(self.dcfg.redistribution_min_fraction),
            tie_tolerance=float(self.cfg.eval.tie_tolerance),
        )
        stages = {}
        for k in range(1, len(self.stage_objectives) + 1):
            p = self.out_dir / f"stage_{k}" / "diagnostics.json"
            if p.exists():
                stages[str(k)] = compact_stage(json.loads(p.read_text()))
        out["stages"] = stages
        return _jsonable(out)


def _trace_entry(res: dict[str, Any]) -> dict[str, Any]:
    """A cosine without its per-layer / per-module breakdown (what the step trace keeps)."""
    return {k: v for k, v in res.items() if k not in ("per_layer", "per_module")}


def compact_stage(d: dict[str, Any]) -> dict[str, Any]:
    """A stage's diagnostics without the per-module entries (kept in stage_k/diagnostics.json)."""
    drop = {"raw_per_module", "effective_per_module"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in drop}
        return x

    return strip(d)


def _flatten(prefix: str, x: Any, out: dict[str, float]) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(x, bool):
        out[prefix] = int(x)
    elif isinstance(x, (int, float)) and x is not None:
        out[prefix] = float(x)


def wandb_payload(stage_diag: dict[str, Any]) -> dict[str, float]:
    """Flat scalar keys of a stage's diagnostics for wandb.log, e.g. `diag/grad_cosine/<a>__<b>/total`,
    `diag/movement/effective_norm`, `diag/update_alignment/<obj>/cos_update_neg_grad`.

    Per-module entries and the step trace are left out (last trace point kept as `diag/grad_cosine_last/...`).
    """
    out: dict[str, float] = {}
    d = compact_stage(stage_diag)
    for key in ("grad_cosine", "grad_norm", "movement", "movement_cosine", "update_alignment", "dispersion_offprompt"):
        if key in d:
            _flatten(f"diag/{key}", d[key], out)
    trace = stage_diag.get("grad_cosine_trace") or []
    if trace:
        for pair, v in trace[-1]["grad_cosine"].items():
            out[f"diag/grad_cosine_last/{pair}"] = float(v["total"]) if v.get("total") is not None else float("nan")
    return out


def grad_cosine_rows(stage_diag: dict[str, Any]) -> list[dict[str, float]]:
    """One row per trace point for a W&B series over `progress` (stage - 1 + step / steps of the stage).

    Pairs are keyed with their objectives sorted (`factual__polite` in every stage and order), so the
    series of one pair runs through all stages and overlays across orders.
    """
    rows = []
    for point in stage_diag.get("grad_cosine_trace") or []:
        row: dict[str, float] = {"progress": float(point["progress"]), "stage": float(stage_diag["stage"])}
        for pair, res in point["grad_cosine"].items():
            key = pair_key(*sorted(pair.split("__", 1)))
            for field in ("total", "ci_low", "ci_high", "corrected"):
                if res.get(field) is not None:
                    row[f"{key}/{field}"] = float(res[field])
            if res.get("corrected") is not None:
                row[f"{key}/corrected_clipped"] = float(res.get("corrected_status") == GP.CLIPPED)
            for obj, r in (res.get("reliability") or {}).items():
                if r is not None:
                    row[f"reliability/{obj}"] = float(r)
        rows.append(row)
    return rows


def report_tables(job_diag: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """DataFrames of finalize()'s output for wandb.Table(dataframe=...): transfer, quartiles, likelihood, grad_cosine."""
    tables: dict[str, pd.DataFrame] = {}
    if "transfer" in job_diag:
        tables["transfer"] = pd.DataFrame(T.transfer_rows(job_diag["transfer"]))
    if job_diag.get("quartiles"):
        tables["quartiles"] = pd.DataFrame(P.decomposition_rows(job_diag["quartiles"]))
    if job_diag.get("likelihood"):
        tables["likelihood"] = pd.DataFrame(job_diag["likelihood"])
    rows = []
    for k, st in (job_diag.get("stages") or {}).items():
        for pair, res in (st.get("grad_cosine") or {}).items():
            rows.append({"stage": int(k), "pair": pair, "group": "total", "cosine": res.get("total")})
            for grp in ("per_layer", "per_module"):
                for name, c in (res.get(grp) or {}).items():
                    rows.append({"stage": int(k), "pair": pair, "group": f"{grp[4:]}:{name}", "cosine": c})
    if rows:
        tables["grad_cosine"] = pd.DataFrame(rows)
    return tables
