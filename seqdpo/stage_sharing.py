"""How a job shares its stages: the store it uses (or none), its stages' signatures, and the account of
which stages it trained and which it took from the store (matrix.json "stage_store", the log, W&B, the
sweep's end). The store itself is seqdpo/stage_store.py; the signatures seqdpo/stage_signature.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from seqdpo.config import RunConfig
from seqdpo.stage_signature import current_environment, describe, stage_signatures
from seqdpo.stage_store import StageStore, default_store_dir

log = logging.getLogger("seqdpo")
SOURCE_WORDS = {"store": "from the store", "trained": "trained", "merged": "merged"}


@dataclass
class StageSharing:
    store: StageStore | None  # None: stage_store=false, or a DDP job
    signatures: list[str | None]  # one per matrix row after base; None: a row that trains nothing
    job: dict  # what a published entry says of the job that trained it

    @classmethod
    def for_job(cls, cfg: RunConfig) -> StageSharing:
        store = None
        if cfg.stage_store and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # every rank would have to agree on each stage's source; rank 0 alone writes
            log.info("stage store off: a DDP job trains every stage itself")
        elif cfg.stage_store:
            store = StageStore(cfg.stage_store_dir or default_store_dir(cfg.ref_cache_dir))
        return cls(store, stage_signatures(cfg, current_environment()), describe(cfg))

    def run(self, k: int, name: str, stage_dir: Path, what: str, train_and_evaluate: Callable[[], None]) -> bool:
        """Stage k into `stage_dir`: True when taken from the store, False when `train_and_evaluate()` made it."""
        sig = self.signatures[k - 1]
        if self.store is None or sig is None:
            train_and_evaluate()
            return False
        return self.store.run_or_take(sig, stage_dir, what, train_and_evaluate, {"stage": k, "name": name, "job": self.job})

    def accounting(self, done: list[dict]) -> dict:
        """matrix.json "stage_store", from each stage's DONE (a stage taken from the store records it there)."""
        rows = []
        for k, (sig, d) in enumerate(zip(self.signatures, done), start=1):
            taken = d.get("stage_store")
            row = {"stage": k, "signature": sig, "source": "merged" if sig is None else "store" if taken else "trained"}
            rows.append({**row, "trained_by": taken["trained_by"]} if taken else row)
        return {"enabled": self.store is not None, "dir": None if self.store is None else str(self.store.root.resolve()),
                "stages": rows}


def sources_line(accounting: dict) -> str:
    """'stage 1 from the store, stage 2 trained' (the job's log)."""
    by_source: dict[str, list[str]] = {}
    for row in accounting["stages"]:
        by_source.setdefault(row["source"], []).append(str(row["stage"]))
    line = ", ".join(f"stage{'s' if len(ks) > 1 else ''} {','.join(ks)} {SOURCE_WORDS[s]}" for s, ks in by_source.items())
    return line if accounting["enabled"] else f"off ({line})"


def summary_keys(accounting: dict) -> dict:
    """The W&B summary keys of the account."""
    sources = [row["source"] for row in accounting["stages"]]
    return {"stage_store/trained": sources.count("trained"), "stage_store/from_store": sources.count("store"),
            **{f"stage_store/stage{row['stage']}": row["source"] for row in accounting["stages"]}}
