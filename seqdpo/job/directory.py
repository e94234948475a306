"""Whose output directory this is: a job claims it before writing anything there.

`signature.txt` holds the hash of the config whose results the directory holds (`config.signature`).
A job with another config is refused with `OutputDirTaken` before it writes a byte there, so the
directory stays exactly as it was (seqdpo.app writes Hydra's `.hydra/` files only after the claim).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from seqdpo.config import RunConfig, to_dict
from seqdpo.job.log import flat_items


class OutputDirTaken(RuntimeError):
    """The output directory holds another config's results."""


def check_output_dir(out: Path, cfg: RunConfig, sig: str) -> None:
    """Raises `OutputDirTaken` when the directory holds another config's results; reads only."""
    sig_file = out / "signature.txt"
    if sig_file.exists() and sig_file.read_text().strip() != sig:
        raise OutputDirTaken(
            f"{out} holds results of a different config (signature {sig_file.read_text().strip()}, this job {sig}); "
            f"{_differences(out / 'config.yaml', cfg)}. Delete the directory or choose another output directory "
            "(hydra.run.dir=...)"
        )


def claim_output_dir(out: Path, cfg: RunConfig, sig: str) -> None:
    """Writes the config and its signature, or checks that a rerun here is the same job."""
    check_output_dir(out, cfg, sig)
    out.mkdir(parents=True, exist_ok=True)
    (out / "signature.txt").write_text(sig + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _differences(saved: Path, cfg: RunConfig) -> str:
    """'differing keys: beta 0.3 (there) vs 0.1 (this job), ...' from the directory's config.yaml."""
    try:
        there = dict(flat_items(OmegaConf.to_container(OmegaConf.load(saved))))
    except (OSError, ValueError) as e:
        return f"its {saved.name} cannot be read ({e}) to say which keys differ"
    here = dict(flat_items(to_dict(cfg)))
    # The keys that never change a job's identity (config.signature) would only be noise here.
    keys = [k for k in sorted(set(there) | set(here)) if there.get(k, _ABSENT) != here.get(k, _ABSENT)
            and not k.startswith(("logger.", "ref_cache_dir"))]
    if not keys:
        return f"no key of {saved} differs from this job's, so the signature's definition changed (another seqdpo version)"
    return "differing keys: " + ", ".join(
        f"{k} {there.get(k, _ABSENT)!r} (there) vs {here.get(k, _ABSENT)!r} (this job)" for k in keys
    )


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def clear_job_results(out: Path) -> None:
    """The job-level results of an earlier run go: this run writes them anew from the stages' files at
    its end, and until then they could show stages that this run has not (re)done."""
    for name in ("matrix.json", "pairs.parquet", "diagnostics.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
