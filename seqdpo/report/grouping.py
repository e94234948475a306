"""Names for groups of jobs: a setting's label naming only what varies, a job's label, file-safe slugs."""

from __future__ import annotations

import hashlib
import json
import re

from seqdpo.report.jobs import SETTING, Job


def slug(s: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")
    # Long settings are cut for the file system; the hash keeps cut names of different settings apart.
    return out if len(out) <= 120 else out[:100] + "-" + hashlib.sha256(s.encode()).hexdigest()[:10]


def _options(text) -> dict:
    return dict(kv.split("=", 1) for kv in (text or "").split(",") if kv)


def varying_label(setting: dict, seen: dict[str, set]) -> str:
    """`setting` (factor -> value) named by the factors, and dataset options, that take several values in
    `seen` (factor -> the values it takes across the jobs compared)."""
    parts = []
    for name, value in setting.items():
        if len(seen[name]) < 2:
            continue
        if name == "data_options":
            split = [_options(v) for v in seen[name]]
            mine = _options(value)
            parts += [f"{k}={mine.get(k)}" for k in sorted(mine) if len({d.get(k) for d in split}) > 1]
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts) or "all jobs"


def setting_label(key: tuple, jobs: list[Job]) -> str:
    """The setting of a group of jobs, naming only the factors (and dataset options) that vary across `jobs`."""
    return varying_label(dict(zip(SETTING, key)), {name: {j.factors[name] for j in jobs} for name in SETTING})


def job_label(job: Job, group: list[Job]) -> str:
    """'order ab', or the job directory too when several jobs of that order share the setting."""
    o = job.factors["order"]
    same = [j for j in group if j.factors["order"] == o]
    return f"order {o}" if len(same) == 1 else f"order {o} ({job.rel}, {job.state})"


def signature(job: Job) -> str:
    """The job's config signature (signature.txt, seqdpo.config.signature; seed included), or for a directory
    without one a hash of its config less the keys that change no result."""
    try:
        return (job.path / "signature.txt").read_text().strip()
    except OSError:
        config = {k: v for k, v in job.config.items() if k not in ("logger", "ref_cache_dir")}
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def duplicates(jobs: list[Job]) -> dict[str, str]:
    """Job -> the job it repeats (same signature, so same seed too): a finished job is kept before an unfinished
    one, then the first by directory. A sweep that ran a config twice has one result of it, not two seeds."""
    first: dict[str, Job] = {}
    out = {}
    for job in sorted(jobs, key=lambda j: (j.state != "done", j.rel)):
        kept = first.setdefault(signature(job), job)
        if kept is not job:
            out[job.rel] = kept.rel
    return out
