"""Behavioural evaluation: what the model generates after every stage, scored per objective.

On with `eval.generate=true` (docs/behaviour.md). Modules:
`generate` (prompts, batched generation, the base model's generation cache), `scorers` (the SCORERS
registry), `warmstart` (SFT warm start of the tiny model), `metrics` (bootstrap intervals),
`stage` (`BehaviourEval`: the runner's per-stage hook and the `behaviour` block of matrix.json).
"""
