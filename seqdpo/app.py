"""Hydra entry point: compose `conf/`, turn it into a typed `RunConfig`, run the job.

Run: `python -m seqdpo` (defaults: tiny model, synthetic data), or a sweep:
`python -m seqdpo -m dataset=hh_rlhf,pku_saferlhf order=ab,ba beta=0.1,0.3 lora=r16,r32`.
This is the only module that touches Hydra; everything it calls takes plain dataclasses.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seqdpo.cluster import export_ddp_env
from seqdpo.config import ConfigError, RunConfig, signature
from seqdpo.data import DataError
from seqdpo.diskfull import disk_full, disk_full_message
from seqdpo.distributed import is_main_process
from seqdpo.job.directory import OutputDirTaken, check_output_dir, claim_output_dir
from seqdpo.job.lock import OutputDirBusy, job_lock
from seqdpo.job.log import config_summary, log_result, quiet_libraries

log = logging.getLogger("seqdpo")

# The schema is the first entry of conf/config.yaml's defaults list, so every key starts at its dataclass
# default and a group file merged over it (lora/r8.yaml: `r: 8`) fills only what it states: the defaults
# live in seqdpo/config.py alone, and conf/ says what differs from them.
ConfigStore.instance().store(name="run_schema", node=RunConfig)
# TRL 1.16 still sets the option name that transformers 5 deprecates: nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
# A job never needs the hub's telemetry; the hub itself stays reachable for real models and datasets.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# An absolute path: Hydra resolves a relative one against the *package* seqdpo when run with -m,
# where the repository's conf/ (beside the package, fixed layout) is not found.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _dirname(override_dirname: str) -> str:
    """Directory name of a job from its overrides: 'default' when there are none, safe characters only."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", override_dirname)
    if len(name) > 200:  # file systems cap names at 255 bytes; keep it readable and unique
        name = name[:180] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


OmegaConf.register_new_resolver("seqdpo_dirname", _dirname, replace=True)


def _refuse_sweep_without_multirun(hc) -> None:
    """An experiment's grid (hydra.sweeper.params) only runs with -m; without it the job would silently
    run the experiment's base settings with the default dataset and order."""
    axes = hc.sweeper.get("params") or {}
    if hc.mode != RunMode.MULTIRUN and axes:
        experiment = hc.runtime.choices.get("experiment")
        raise ConfigError(
            "experiment",
            f"'{experiment}' defines sweep axes ({', '.join(f'{k}={v}' for k, v in axes.items())}); it runs only "
            f"as a sweep: add -m, e.g. python -m seqdpo -m experiment={experiment}",
        )


_task_started = False  # Hydra composed the config and called main: a failure is the job's, not an override's


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    t0 = time.time()
    try:
        _refuse_sweep_without_multirun(hc)
        run_cfg: RunConfig = OmegaConf.to_object(cfg)
        # validation reads the loss and packing registries, which import torch: loaded once a config is composed
        from seqdpo.validation import validate

        validate(run_cfg)
        group = None
        if hc.mode == RunMode.MULTIRUN:
            group = os.path.basename(os.path.normpath(hc.sweep.dir))
        quiet_libraries()  # first: TRL, which the runner imports, prints a line when it loads W&B's integration
        from seqdpo.runner import run_job  # heavy imports (torch, trl) only once the config is valid

        export_ddp_env()  # SLURM job with tasks_per_node > 1: one DDP rank per task (conf/hydra/launcher/slurm_ddp.yaml)
        out = Path(hc.runtime.output_dir)
        with contextlib.ExitStack() as held:
            if is_main_process():
                # A refused rerun (another config, or a live job here) stops before any write.
                check_output_dir(out, run_cfg, signature(run_cfg))
                lock = held.enter_context(job_lock(out))  # run_job holds it on; released when the job ends
                claim_output_dir(out, run_cfg, signature(run_cfg))
                lock.record_holder()
                _save_hydra_files(out / ".hydra", cfg, hc)
            log.info("%s", config_summary(run_cfg, signature(run_cfg), str(out)))
            import torch  # already loaded by seqdpo.runner

            # a submitit job's threads follow its CPU allotment (hydra_plugins/seqdpo_launcher.py); a plain run keeps torch's default
            log.info("torch threads: %d", torch.get_num_threads())
            matrix = run_job(run_cfg, str(out), group=group)
        log_result(matrix, str(out), time.time() - t0)  # after W&B's footer: the last thing printed
        return matrix
    except (OutputDirTaken, OutputDirBusy) as e:
        # Another config's or a live job's directory: not a line into its seqdpo.log, which is not ours.
        print(f"seqdpo: {e}", file=sys.stderr, flush=True)
        if hc.mode == RunMode.RUN:
            raise SystemExit(1) from None
        raise
    except (ConfigError, DataError) as e:
        # A user error (config, or data that cannot be read or leaves too few pairs): one paragraph on the
        # console, the traceback only in seqdpo.log.
        log.error("%s", e, exc_info=True)
        if hc.mode == RunMode.RUN:
            if isinstance(e, ConfigError):
                _drop_unclaimed_dir(Path(hc.runtime.output_dir))
            raise SystemExit(1) from None  # Hydra would print the traceback again
        raise
    except Exception as e:
        if disk_full(e):
            # One paragraph instead of chained tracebacks: the fix is free space, not code.
            log.error("%s", disk_full_message(Path(hc.runtime.output_dir), e), exc_info=True)
            if hc.mode == RunMode.RUN:
                raise SystemExit(1) from None
            raise
        log.exception("job failed: %s: %s", type(e).__name__, e)  # traceback into seqdpo.log; Hydra prints it on the console
        raise


def _drop_unclaimed_dir(out: Path) -> None:
    """A refused config leaves no directory behind: Hydra made it (with seqdpo.log) before the config was
    checked, and no job ever claimed it (a claimed one keeps its log)."""
    if (out / "signature.txt").exists():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == out:
            handler.close()
            root.removeHandler(handler)
    (out / "seqdpo.log").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: someone else's files, which stay
        out.rmdir()


def cli() -> None:
    """`python -m seqdpo`: Hydra's main, and seqdpo's did-you-mean when Hydra refuses an override."""
    try:
        main()
    except BaseException as e:
        if not _task_started and not (isinstance(e, SystemExit) and e.code in (0, None)):
            for hint in unknown_override_hints(sys.argv[1:]):
                print(f"seqdpo: {hint}", file=sys.stderr, flush=True)
        raise


def unknown_override_hints(args: list[str]) -> list[str]:
    """Hydra answers `lrr=1e-3` with "Key 'lrr' is not in struct" and suggests `+lrr`, which seqdpo refuses
    as well: this names the key that was probably meant."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from seqdpo.validation import is_schema_key, key_hint  # imports torch (see main): only on this error path

    # Hydra's own keys and the config groups that are not schema keys (experiment=...) are Hydra's to judge
    elsewhere = {"hydra", *(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and not is_schema_key(p.name))}
    parser = OverridesParser.create()
    hints = []
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # not an override (a flag's value); Hydra reports what it makes of it
            continue
        key = override.key_or_group
        if (override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None
                or re.split(r"[./]", key)[0] in elsewhere
                or is_schema_key(key)):
            continue
        hints.append(f"'{key}' is not a key of seqdpo's config: {key_hint(key)} (adding it with +{key} is refused too)")
    return hints


def _save_hydra_files(folder: Path, cfg: DictConfig, hc) -> None:
    """What Hydra writes into `.hydra/` before the job runs; conf/config.yaml turns that off
    (hydra.output_subdir: null) so that it happens only once the directory is the job's (claim_output_dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hc}))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(hc.overrides.task))


if __name__ == "__main__":
    main()
