"""DiagnosticsRecorder: the runner's training-time analysis hooks (see docs/DESIGN.md, "Analysis hooks").

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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from seqdpo.analysis import gradient_probes as GP
from seqdpo.analysis import gradients as G
from seqdpo.analysis import likelihood as L
from seqdpo.analysis import movement as M
from seqdpo.analysis.diagnostics import compact_stage, job_analysis, jsonable
from seqdpo.config import DiagnosticsConfig
from seqdpo.distributed import is_main_process
from seqdpo.logprobs import sequence_logps


TRACE_FILE = "grad_cosine_trace.jsonl"


def _grad_cosine_callback(recorder: "DiagnosticsRecorder", trainer, points: int):
    """A TrainerCallback taking the cosines at `points` steps spread over the stage."""
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
    def __init__(self, settings: DiagnosticsConfig, out_dir, objectives_tokenized: dict, *, stage_objectives: list[str],
                 lora_scaling: float, max_length: int, batch_size: int, tie_tolerance: float,
                 fresh_stages: frozenset[int] = frozenset(), grad_probes: dict | None = None):
        """`stage_objectives`: the strategy's rows after base (joint: one stage; merge: a merged row);
        `fresh_stages`: those that train from the initial adapter rather than the previous stage's (merge);
        `lora_scaling`: alpha / r, which turns the factors' movement into the weights'; `max_length`,
        `batch_size`: the off-prompt probe's forwards; `tie_tolerance`: the job analysis's ties."""
        self.dcfg = settings
        self.out_dir = Path(out_dir)
        self.stage_objectives = list(stage_objectives)
        self.fresh_stages = fresh_stages
        self.max_length, self.batch_size, self.tie_tolerance = max_length, batch_size, tie_tolerance
        self.objectives = list(objectives_tokenized)
        n = int(self.dcfg.probe_pairs)
        self.probes = {name: [ds[i] for i in range(min(n, len(ds)))] for name, ds in objectives_tokenized.items()}
        # Gradient probes: the runner passes the training pairs (probe_source: train); else the eval pairs.
        grad_sets = objectives_tokenized if grad_probes is None else grad_probes
        self.grad_probes = {name: [ds[i] for i in range(min(n, len(ds)))] for name, ds in grad_sets.items()}
        self.scaling = float(lora_scaling)
        self._states: dict[int, dict[str, torch.Tensor]] = {}
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
        if is_main_process():
            with open(self._trace_path(stage), "a") as f:
                f.write(json.dumps(jsonable({**point, "grad_cosine": {p: _trace_entry(v) for p, v in cosines.items()}})) + "\n")
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
        return jsonable(res)

    def _offprompt(self, trainer) -> dict[str, Any]:
        model = trainer.model
        out = {}
        for name, rows in self.probes.items():
            if len(rows) < 2:
                continue
            feats = L.offprompt_features(rows, int(self.max_length))
            pol = self._logps(trainer, model, feats)
            if name not in self._base_offprompt:
                with model.disable_adapter():
                    self._base_offprompt[name] = self._logps(trainer, model, feats)
            out[name] = L.dispersion_summary(pol, self._base_offprompt[name])
        return out

    def _logps(self, trainer, model, feats) -> dict[str, np.ndarray]:
        was_training = model.training
        model.eval()
        acc: dict[str, list] = {}
        device = next(p for p in model.parameters()).device
        bs = max(int(self.batch_size), 1)
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
            tie_tolerance=float(self.tie_tolerance),
        )
        stages = {}
        for k in range(1, len(self.stage_objectives) + 1):
            p = self.out_dir / f"stage_{k}" / "diagnostics.json"
            if p.exists():
                stages[str(k)] = compact_stage(json.loads(p.read_text()))
        out["stages"] = stages
        return jsonable(out)


def _trace_entry(res: dict[str, Any]) -> dict[str, Any]:
    """A cosine without its per-layer / per-module breakdown (what the step trace keeps)."""
    return {k: v for k, v in res.items() if k not in ("per_layer", "per_module")}
