"""Analysis of sequential preference training: what a later stage does to what an earlier one taught.

transfer     BWT/FWT/forgetting from the stage x objective matrix
pairs        quartile decomposition of pair-level changes, flips, redistribution flag
gradients    gradient cosine between objectives over the LoRA parameters
gradient_probes  block gradients: cosines with their split-half reliability and jackknife interval
movement     adapter movement (raw and effective B A) and the angle between stages' movements
likelihood   3D-properties: chosen/rejected likelihood shifts, suppression, dispersion
diagnostics  DiagnosticsRecorder (the runner's hooks), job_analysis, wandb_payload, report_tables

Formulas: docs/metrics.md.
"""
