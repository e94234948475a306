"""Content-addressed on-disk cache of base-model reference log-probs.

Every job of a sweep, every stage and every evaluation scores the same pairs under the same frozen base
model; this cache makes that forward happen once per (model, data, length) and serves it from disk
afterwards, across processes and SLURM jobs.

Key (sha256, see `cache_key`): the base-model fingerprint (`seqdpo.modeling.model_fingerprint`: model
identity, dtype, tokenizer class and chat template; weights are never hashed), `max_length`, the
parameter dtype and device type the values were computed with, a format version, and the dataset
content: the sorted per-row digests of (pair_id, prompt_ids, chosen_ids, rejected_ids). The token ids
are those after tokenisation and truncation, so a changed tokenizer, template or max_length also
changes the key. Row order is not part of the key: a shuffled or re-ordered split hits the same entry
and gets its values back in its own order. Neither are the batch layout (`model.packing`) nor the
batch size: they change only the rounding of the same sums (tests/test_logprobs.py checks every
layout against TRL), so jobs that differ in them share one entry.

Files: `<cache_dir>/<key>.npz` (default cache_dir `outputs/.refcache`), holding `row_digest`,
`chosen_logps`, `rejected_logps`, `chosen_len`, `rejected_len` and a JSON `meta` string. Writes go to
a temporary file in the same directory, are fsynced, then `os.replace`d onto the final name: readers
see either no file or a whole one, and when several jobs compute the same key at once the last rename
wins with identical content. A file that fails to load (e.g. a disk that filled up), or whose arrays
do not all have one value per row, is treated as a miss and rewritten, with a warning naming it.
Files are created with the process's umask (like any other file), so a cache directory shared by a
group works when the umask lets the group read and write.

Use:

    from seqdpo.refcache import reference_logps, with_reference_columns, ref_forward_counts
    ref = reference_logps(peft_model, tokenized_ds, fingerprint=fp, cache_dir=d, batch_size=16,
                          max_length=cfg.model.max_length)
    train_ds = with_reference_columns(tokenized_ds, ref)   # adds ref_chosen_logps / ref_rejected_logps
    log.info("reference forwards: %s", ref_forward_counts())  # {"computed": pairs, "cached": pairs}

The adapter of a PeftModel is disabled for the pass (the reference is the base model). The counter is
process-wide: `computed` counts pairs that went through a forward, `cached` pairs served from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from seqdpo.cachecounts import CacheCounts

FORMAT_VERSION = 2  # bump when the log-prob computation changes values (2: the CPU LM head, rounding-level)
DEFAULT_CACHE_DIR = os.path.join("outputs", ".refcache")
_KEYS = ("chosen_logps", "rejected_logps", "chosen_len", "rejected_len")

log = logging.getLogger(__name__)
_counts = CacheCounts()


def ref_forward_counts() -> dict[str, int]:
    """Pairs whose reference log-probs this process computed, and pairs served from the cache."""
    return _counts.snapshot()


def reset_ref_forward_counts() -> None:
    _counts.reset()


def row_digests(tokenized_ds) -> np.ndarray:
    """One 32-hex-char digest per row over pair_id and the token ids (the content a log-prob depends on)."""
    cols = tokenized_ds.select_columns(["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    out = []
    for pid, p, c, r in zip(cols["pair_id"], cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"]):
        h = hashlib.sha256()
        h.update(str(pid).encode())
        for ids in (p, c, r):
            h.update(b"|")
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
        out.append(h.hexdigest()[:32])
    return np.asarray(out, dtype="U32")


def cache_key(
    *, fingerprint: str, digests: np.ndarray, max_length: int | None, param_dtype: str, device_type: str
) -> str:
    h = hashlib.sha256()
    head = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "max_length": max_length,
        "param_dtype": param_dtype,
        "device_type": device_type,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for d in np.sort(digests):
        h.update(d.encode())
    return h.hexdigest()[:32]


def _model_identity(model) -> tuple[str, str]:
    p = next(model.parameters())
    return str(p.dtype).replace("torch.", ""), p.device.type


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """The entry's arrays, or None (with a warning) when the file is unreadable or inconsistent."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            entry = {k: z[k] for k in ("row_digest", *_KEYS)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("reference cache entry %s is unreadable (%s: %s): recomputing it", path, type(e).__name__, e)
        return None
    lengths = {k: len(v) for k, v in entry.items()}
    if len(set(lengths.values())) != 1:
        log.warning("reference cache entry %s holds arrays of different lengths %s: recomputing it", path, lengths)
        return None
    return entry


def atomic_write(path: Path, write) -> None:
    """Calls `write(binary file)` on a temporary file beside `path`, fsyncs it, then renames it onto `path`:
    readers see no file or a whole one, and concurrent writers of the same content are harmless."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex}.tmp"
    # os.open with 0o666 lets the umask decide the mode, as for any file (mkstemp would force 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _reorder(entry: dict[str, np.ndarray], digests: np.ndarray) -> dict[str, np.ndarray] | None:
    where = {d: i for i, d in enumerate(entry["row_digest"])}
    try:
        idx = np.asarray([where[d] for d in digests], dtype=np.int64)
    except KeyError:
        return None  # a truncated key collision is astronomically unlikely; recompute rather than trust it
    return {k: entry[k][idx] for k in _KEYS}


def reference_logps(
    model,
    tokenized_ds,
    *,
    fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    max_tokens: int | None = None,
    packing: str | None = None,
    desc: str = "reference log-probs",
) -> dict[str, np.ndarray]:
    """Base-model log-probs of every row of `tokenized_ds`, in its row order, from the cache or computed.

    `model` is the base model or a PeftModel on it (its adapter is disabled for the pass); `fingerprint`
    must identify that base model and tokenizer (`seqdpo.modeling.model_fingerprint`). Returns the
    `dataset_logps` keys: chosen_logps, rejected_logps, chosen_len, rejected_len. `packing` is the batch
    layout of a pass (None: the default); it is not part of the key (see above).
    """
    # imported here so that processes that only read or write cache files do not import torch
    from seqdpo.logprobs import dataset_logps
    from seqdpo.packing import DEFAULT_PACKING

    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    digests = row_digests(tokenized_ds)
    param_dtype, device_type = _model_identity(model)
    key = cache_key(
        fingerprint=fingerprint, digests=digests, max_length=max_length, param_dtype=param_dtype, device_type=device_type
    )
    path = cache_dir / f"{key}.npz"
    entry = _load(path) if path.exists() else None
    if entry is not None:
        values = _reorder(entry, digests)
        if values is not None:
            _counts.add("cached", len(digests))
            return values
        log.warning("reference cache entry %s does not hold this data's rows: recomputing it", path)

    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else None
    with ctx if ctx is not None else contextlib.nullcontext():
        values = dataset_logps(model, tokenized_ds, batch_size, desc, max_tokens=max_tokens, packing=packing or DEFAULT_PACKING)
    _counts.add("computed", len(digests))
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "max_length": max_length,
        "param_dtype": param_dtype,
        "device_type": device_type,
        "packing": packing or DEFAULT_PACKING,  # informative only: not in the key
        "rows": int(len(digests)),
    }
    _atomic_save(path, {"row_digest": digests, **values, "meta": np.asarray(json.dumps(meta))})
    return values


def with_reference_columns(tokenized_ds, ref: dict[str, np.ndarray]):
    """`tokenized_ds` plus `ref_chosen_logps` / `ref_rejected_logps` columns (what PairCollator passes on)."""
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        if col in tokenized_ds.column_names:
            tokenized_ds = tokenized_ds.remove_columns(col)
    tokenized_ds = tokenized_ds.add_column("ref_chosen_logps", ref["chosen_logps"].astype(np.float64).tolist())
    return tokenized_ds.add_column("ref_rejected_logps", ref["rejected_logps"].astype(np.float64).tolist())
