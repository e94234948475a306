"""Whose output directory this is: a job claims it before writing anything there.

`signature.txt` holds the hash of the config whose results the directory holds (`config.signature`).
A job with another config is refused with `OutputDirTaken` before it writes a byte there, so the
directory stays exactly as it was (seqdpo.app writes Hydra's `.hydra/` files only after the claim).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from seqdpo.config import RunConfig


class OutputDirTaken(RuntimeError):
    """The output directory holds another config's results."""


def claim_output_dir(out: Path, cfg: RunConfig, sig: str) -> None:
    """Writes the config and its signature, or checks that a rerun here is the same job."""
    sig_file = out / "signature.txt"
    if sig_file.exists() and sig_file.read_text().strip() != sig:
        raise OutputDirTaken(
            f"{out} holds results of a different config (signature {sig_file.read_text().strip()}, this job {sig}); "
            f"compare {out / 'config.yaml'} with this job's config, then delete the directory or choose another "
            "output directory (hydra.run.dir=...)"
        )
    out.mkdir(parents=True, exist_ok=True)
    sig_file.write_text(sig + "\n")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def clear_job_results(out: Path) -> None:
    """The job-level results of an earlier run go: this run writes them anew from the stages' files at
    its end, and until then they could show stages that this run has not (re)done."""
    for name in ("matrix.json", "pairs.parquet", "diagnostics.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
