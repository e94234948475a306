"""The runner's behaviour hook: generate, score and summarise after every stage.

    behaviour = BehaviourEval(scoring, generation, out_dir, bootstrap=..., adapter_rank=..., tracker=tracker)
    info = behaviour.on_stage(k, stage_dir)        # before the stage's DONE; returns its timings
    block = behaviour.summary(stage_names)         # matrix.json["behaviour"]

`scoring` (a ScoringContext) holds the model, the tokenizer and the job's objectives, whose pairs (after
the draw of dataset.n_train / n_eval) give the generation prompts: from their eval splits, held out from
all their training splits (`prompts.py`); `trained_rm` trains on their training splits. A stage
directory gets `generations.parquet` (generate.COLUMNS), `scores.parquet` (objective, prompt_id, sample,
score) and `guards.parquet` (the degeneration guards, `guards.py`), all before DONE. A rerun of a stage
stopped midway reuses what is on disk: the finished objectives' generations (`generations.parts/`), then
the whole table, scores and guards.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from seqdpo.behaviour import generate as G
from seqdpo.behaviour.guards import KEYS, guard_table
from seqdpo.behaviour.metrics import METRICS, stage_metrics
from seqdpo.behaviour.prompts import generation_prompts
from seqdpo.behaviour.scorers import SCORERS, ScoringContext, make_scorer

if TYPE_CHECKING:
    from seqdpo.config import GenerationSettings

log = logging.getLogger("seqdpo")
SAMPLES_PER_CELL = 3  # sample generations per stage and objective in the report and W&B


class BehaviourEval:
    def __init__(self, scoring: ScoringContext, generation: GenerationSettings, out: Path, *, bootstrap: int,
                 adapter_rank: int, tracker=None):
        """`adapter_rank`: of the adapters vLLM loads; `bootstrap`: replicates of the metrics' intervals."""
        self.ctx, self.settings, self.out, self.tracker = scoring, generation, Path(out), tracker
        self.tok, self.model, self.fingerprint = scoring.tokenizer, scoring.model, scoring.fingerprint
        self.seed = scoring.settings.seed if generation.seed is None else generation.seed
        self.cache_dir, self.bootstrap = scoring.cache_dir, bootstrap
        objectives, model_settings = scoring.objectives, scoring.settings.model
        # vLLM reads each stage's adapter from disk; the runner saves it before evaluating the stage
        self.backend = G.VLLMBackend(model_settings, adapter_rank) if G.use_vllm(generation, model_settings.name) else None
        log.info("behaviour: generation with %s", "vLLM" if self.backend else "transformers")
        self.scorer = make_scorer(self.ctx)
        self.spec = SCORERS[scoring.settings.scorer.name]
        self.unscored = [o for o in objectives if not self.scorer.supports(o)]
        if self.unscored:
            log.warning("behaviour: scorer %s cannot score %s; they are not generated", scoring.settings.scorer.name,
                        self.unscored)
        self.prompts, self.prompt_check = generation_prompts(
            {o: obj.train for o, obj in objectives.items()},
            {o: obj.eval for o, obj in objectives.items() if o not in self.unscored}, self.settings.prompts, self.seed)
        log.info("behaviour: generation prompts held out from training: %s", self.prompt_check)
        short = {o: len(p) for o, p in self.prompts.items() if len(p) < self.settings.prompts}
        if short:
            log.warning("behaviour: fewer held-out eval prompts than eval.generation.prompts=%d, all of them used: %s",
                        self.settings.prompts, short)

    def on_stage(self, k: int, sd: Path) -> dict:
        sd.mkdir(parents=True, exist_ok=True)
        gen_path, score_path, parts = sd / "generations.parquet", sd / "scores.parquet", sd / "generations.parts"
        guard_path = sd / "guards.parquet"
        t0 = time.time()
        if gen_path.exists():
            gens = pd.read_parquet(gen_path)
        else:
            args = dict(seed=self.seed, parts_dir=parts, backend=self.backend)
            if self.backend is not None:
                self.backend.adapter_dir, self.backend.adapter_id = (sd / "adapter" if k else None), k
            if k == 0:
                gens = G.base_generations(self.model, self.tok, self.prompts, self.settings, fingerprint=self.fingerprint,
                                          cache_dir=self.cache_dir, **args)
            else:
                gens = G.generate_objectives(self.model, self.tok, self.prompts, self.settings, **args)
            G.write_parquet(gen_path, gens)
            shutil.rmtree(parts, ignore_errors=True)
        t1 = time.time()
        if score_path.exists():
            scores = pd.read_parquet(score_path)
        else:
            scores = self._score(gens)
            G.write_parquet(score_path, scores)
        if not guard_path.exists():
            G.write_parquet(guard_path, guard_table(self.ctx, gens, {o: dict(p) for o, p in self.prompts.items()}))
        t2 = time.time()
        info = {"behaviour/generate_s": t1 - t0, "behaviour/score_s": t2 - t1,
                "behaviour/length_capped": int((gens.finish_reason == "length").sum())}
        log.info("stage %d behaviour: generation %.1f s, scoring %.1f s, %d of %d cut at max_new_tokens",
                 k, t1 - t0, t2 - t1, info["behaviour/length_capped"], len(gens))
        if self.tracker is not None:
            metrics = self._metrics(k)
            self.tracker.log({f"stage{k}/{key}": v for key, v in info.items()}
                             | {f"stage{k}/behaviour/{o}/{m}": v[0] for o, ms in metrics.items() for m, v in ms.items()})
        return info

    def _score(self, gens: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for objective, g in gens.groupby("objective", sort=False):
            prompts = dict(self.prompts[objective])
            values = self.scorer.score(objective, [prompts[p] for p in g.prompt_id], list(g.text))
            frames.append(g[["objective", "prompt_id", "sample"]].assign(score=values))
        return pd.concat(frames, ignore_index=True)

    def scored(self, k: int) -> pd.DataFrame:
        return scored_generations(self.out / f"stage_{k}")

    def _metrics(self, k: int) -> dict:
        return stage_metrics(self.scored(k), self.scored(0), n_boot=self.bootstrap, seed=self.seed,
                             win_rate=not self.spec.objective_blind)

    def summary(self, stage_names: list[str]) -> dict:
        """The `behaviour` block: per metric a stage x objective matrix of values and of [low, high]."""
        objectives = list(self.prompts)
        values, intervals = {}, {}
        capped, timing = [], {"generate_s": [], "score_s": []}
        for k in range(len(stage_names)):
            per = self._metrics(k)
            for m in (m for m in METRICS if m in per[objectives[0]]):
                values.setdefault(m, []).append([per[o][m][0] for o in objectives])
                intervals.setdefault(m, []).append([per[o][m][1:] for o in objectives])
            capped.append(int((self.scored(k).finish_reason == "length").sum()))
            done = _done_info(self.out / f"stage_{k}")
            for key in timing:
                timing[key].append(done.get(f"behaviour/{key}"))
        s = self.settings
        block = {
            "scorer": self.ctx.settings.scorer.name, "scorer_measures": self.spec.description,
            "objective_blind": self.spec.objective_blind, "stages": stage_names, "objectives": objectives,
            "backend": "transformers" if self.backend is None else "vllm", "prompts": s.prompts,
            "prompts_used": {o: len(p) for o, p in self.prompts.items()}, "prompt_check": self.prompt_check,
            "samples": s.samples, "greedy": s.greedy, "bootstrap": self.bootstrap,
            "metrics": values, "intervals": intervals, "unscored_objectives": self.unscored,
            "length_capped": capped, "generations_per_stage": int(len(self.scored(0))), "time": timing,
            "base_generations": G.base_generation_counts(),
        }
        if hasattr(self.scorer, "accuracy"):  # trained_rm: how well its reward models rank the job's pairs
            block["scorer_accuracy"] = self.scorer.accuracy(objectives)
        return block

    def sample_table(self, stage_names: list[str]) -> pd.DataFrame:
        """A few generations per stage and objective (the first prompts, first sample) with their scores."""
        rows = []
        for k, name in enumerate(stage_names):
            df = self.scored(k).sort_values(["objective", "prompt_id", "sample"])
            for _, g in df.groupby("objective", sort=False):
                rows.append(g.drop_duplicates("prompt_id").head(SAMPLES_PER_CELL).assign(stage=k, stage_objective=name))
        return pd.concat(rows, ignore_index=True)[["stage", "stage_objective", "objective", "prompt_id", "sample", "text", "n_tokens", "score"]]

    def log_job(self, block: dict, stage_names: list[str]) -> None:
        if self.tracker is None:
            return
        flat = {}
        for m, rows in block["metrics"].items():
            for k, row in enumerate(rows):
                for o, v in zip(block["objectives"], row):
                    flat[f"behaviour/{m}/{k}:{stage_names[k]}/{o}"] = v
        for rm, per in block.get("scorer_accuracy", {}).items():
            for o, splits in per.items():
                flat.update({f"behaviour/scorer_accuracy/{rm}/{o}/{split}": a["accuracy"] for split, a in splits.items()})
        for o, check in block["prompt_check"].items():
            flat.update({f"behaviour/prompts/{o}/{key}": n for key, n in check.items()})
        flat["behaviour/unscored_objectives"] = len(block["unscored_objectives"])
        flat.update({f"behaviour/length_capped/{k}:{s}": n for k, (s, n) in enumerate(zip(stage_names, block["length_capped"]))})
        self.tracker.summary(flat)
        self.tracker.log_tables({"behaviour_samples": self.sample_table(stage_names)})


def scored_generations(sd: Path) -> pd.DataFrame:
    """A stage directory's generations with their scores and, where written, their guards."""
    df = pd.read_parquet(sd / "generations.parquet").merge(pd.read_parquet(sd / "scores.parquet"), on=KEYS)
    if (sd / "guards.parquet").exists():  # jobs run before the guards have none
        df = df.merge(pd.read_parquet(sd / "guards.parquet"), on=KEYS)
    return df


def _done_info(sd: Path) -> dict:
    import json

    p = sd / "DONE"
    return json.loads(p.read_text()) if p.exists() else {}
