#!/usr/bin/env bash
# A two-job sweep of the embedded tiny model on CPU (no GPU, no download, ~1 minute) with the small-partition
# preset (conf/hydra/launcher/slurm_cpu.yaml): checks that a cluster account, partition and the venv work
# before a real sweep is submitted.
#   bash launchers/smoke_slurm.sh hydra.launcher.partition=cpu
exec "${PYTHON:-python}" -m seqdpo -m hydra/launcher=slurm_cpu order=ab,ba train.max_steps=4 \
  dataset.n_train=16 dataset.n_eval=8 hydra.launcher.timeout_min=20 "$@"
