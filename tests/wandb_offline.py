"""Reads an offline W&B run file (run-<id>.wandb) back: history rows and summary, no network.

The file is a LevelDB-style log (7-byte header b":W&B" + magic 0xBEE1, then 32 KiB blocks of records
with a 7-byte header: crc32, length, type) of `wandb_internal_pb2.Record` protobufs. In offline mode
it is the only place metrics are written (no wandb-summary.json).
"""

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    pos, buf = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < HEADER:
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk, pos = data[pos : pos + length], pos + length
        if rtype == FULL:
            yield chunk
        elif rtype == FIRST:
            buf = chunk
        elif rtype == MIDDLE:
            buf += chunk
        elif rtype == LAST:
            yield buf + chunk
            buf = b""
        elif rtype == 0 and length == 0:
            break


def _config(out: dict, items) -> None:
    for it in items:
        out["config_keys"].append(it.key)
        out["config"][it.key] = json.loads(it.value_json)


def read_closed_run(run_file: Path, timeout_s: float = 30.0) -> dict:
    """`read_run` of a run this process closed: W&B's service may still be writing the file after
    `run.finish()` returns (seen once in a full suite, where one service had served many runs)."""
    import time

    deadline = time.monotonic() + timeout_s
    while (out := read_run(run_file))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return out


def read_run(run_file: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"history": [], "summary": {}, "config_keys": [], "config": {}, "run_id": None, "tags": [], "group": None,
           "exit_code": None}
    for raw in _records(run_file):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "summary":
            for it in rec.summary.update:
                out["summary"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif kind == "config":
            _config(out, rec.config.update)
        elif kind == "exit":  # written by run.finish(): the run was closed, not cut off
            out["exit_code"] = rec.exit.exit_code
        elif kind == "run":  # the config given to wandb.init travels in the run record
            out["run_id"], out["group"], out["tags"] = rec.run.run_id, rec.run.run_group, list(rec.run.tags)
            _config(out, rec.run.config.update)
    return out
