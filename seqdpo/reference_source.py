"""Reference log-probs for a job's training rows and evaluation: the base model's (from the shared disk
cache, seqdpo.refcache) or the current model's (reference=previous, saved beside the stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqdpo.logprobs import dataset_logps
from seqdpo.refcache import ref_forward_counts, reference_logps, with_reference_columns


class ReferenceSource:
    def __init__(self, peft_model, fingerprint: str, *, cache_dir: str | None, max_length: int, packing: str,
                 main: bool = True):
        self.model, self.fingerprint = peft_model, fingerprint
        self.cache_dir = cache_dir  # None: refcache's default, outputs/.refcache
        self.max_length, self.packing = max_length, packing
        self.main = main  # this process writes (DDP rank 0)
        self.current_pairs = 0

    def with_base(self, ds, *, batch_size: int):
        lp = reference_logps(
            self.model, ds, fingerprint=self.fingerprint, cache_dir=self.cache_dir, batch_size=batch_size,
            max_length=self.max_length, packing=self.packing,
        )
        return with_reference_columns(ds, lp)

    def with_current(self, ds, path: Path, *, batch_size: int):
        """The model as it stands now; saved beside the stage so a requeued stage reuses the same numbers."""
        if path.exists():
            lp = dict(np.load(path))
        else:
            lp = dataset_logps(self.model, ds, batch_size, desc="reference log-probs (previous stage)", packing=self.packing)
            self.current_pairs += len(ds)
            if self.main:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **lp)
        return with_reference_columns(ds, lp)

    def counter(self) -> dict:
        return {**ref_forward_counts(), "previous_stage_pairs": self.current_pairs}
