"""seqdpo's submitit launchers (conf/hydra/launcher/slurm.yaml, local_submitit.yaml): hydra-submitit-launcher's,
with a submitting process that says how the jobs stand while it waits, a short error for a job that ended
without a result, and each job's torch/OpenMP threads set to its CPU allotment (seqdpo/submitter.py).

Hydra instantiates launchers only from the `hydra_plugins` package, hence this module beside `seqdpo/`;
the plugin scan imports it at every start, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from seqdpo import submitter
from seqdpo.submitter import thread_allotment, use_threads

log = logging.getLogger(__name__)


class _Seqdpo:
    jobs_at_once = 1  # set before submission; travels with the pickled launcher into every job

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:  # runs inside the job
        use_threads(thread_allotment(self.params.get("cpus_per_task"), self.jobs_at_once))
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """The base launcher's submission (same executor, parameters and job arguments), then
        `submitter.watch` and `submitter.collect` instead of its silent `job.results()` per job."""
        import submitit

        specific_init_keys = {"max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific_init_keys})
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in specific_init_keys | {"submitit_folder"}})
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        args = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        # local jobs all start at once and share this machine's cores
        self.jobs_at_once = len(args) if self._EXECUTOR == "local" else 1
        jobs = executor.map_array(self, *zip(*args))
        submitter.watch(jobs, on_slurm=self._EXECUTOR == "slurm")
        return [submitter.collect(job, filter_overrides(overrides)) for job, overrides in zip(jobs, job_overrides)]


class SlurmLauncher(_Seqdpo, base.SlurmLauncher):
    pass


class LocalLauncher(_Seqdpo, base.LocalLauncher):
    pass
