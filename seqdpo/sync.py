"""Upload a sweep's offline W&B runs: `python -m seqdpo.sync <multirun or outputs dir> [...]`.

Compute nodes rarely reach the internet, so jobs log to W&B offline (conf/logger/wandb.yaml): each job
writes `<job dir>/wandb/offline-run-<time>-<run id>/run-<run id>.wandb`. Run this on a machine with
network access (a login node) once jobs have finished. It finds every offline run below the given
directories, leaves out those already uploaded (W&B writes `run-<id>.wandb.synced` next to the file
after a successful sync) and runs ONE `wandb sync` over the rest (looping `wandb sync` per run is slow,
wandb/wandb#2887). A requeued job has several offline directories with the same run id; `wandb sync`
uploads them in start-time order into that one run.

    python -m seqdpo.sync outputs/multirun/2026-11-24_10-00-00 --dry-run   # list what would be uploaded
    python -m seqdpo.sync outputs/multirun                                   # upload
    python -m seqdpo.sync outputs --project myproj --entity me               # override project/entity

A run id belongs to one job directory (`wandb_run_id.txt`, drawn once per directory). Offline runs of
one id found in two different job directories (copied directories, or jobs from before ids were drawn
per directory, when the id was the config hash) would be merged into one W&B run: they are refused,
listed, and nothing is uploaded, unless `--allow-duplicate-ids`.

Runs whose job is still running (status.json says "running") are left for a later call unless
`--include-running`, because a partial upload cannot be completed later by the same call. A job whose
status says running but that is gone (killed without a word: its heartbeat is stale, or its process
is gone on this host; seqdpo/job/status.py) is `lost`: what it logged is uploaded.

Before uploading, the W&B server (`WANDB_BASE_URL` or wandb's settings) must answer within
`--connect-timeout` seconds; `wandb sync` itself would otherwise wait at "setting up run" for as long as
the network is down.
Exit status: 0 when nothing was to be done or `wandb sync` succeeded, 75 when W&B cannot be reached
(nothing uploaded; try again later), 2 for a bad argument or run ids shared by several job
directories, else `wandb sync`'s status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from seqdpo.job.status import lost_reason, read_status

UNREACHABLE = 75  # EX_TEMPFAIL: nothing was uploaded, a later call may succeed


@dataclass(frozen=True)
class OfflineRun:
    run_dir: Path  # .../wandb/offline-run-<time>-<id>
    run_id: str
    synced: bool
    job_state: str | None  # state of the job that owns the run ("lost" included; None when there is no status)
    lost: str | None = None  # why a job that says it runs is taken as gone


def _job_state(run_dir: Path) -> tuple[str | None, str | None]:
    """(state, lost reason) of the seqdpo job owning the run: <job dir>/wandb/offline-run-*/ -> <job dir>/status.json."""
    status = read_status(run_dir.parent.parent)
    if status is None:
        return None, None
    lost = lost_reason(status)
    return ("lost" if lost else status.get("state")), lost


def find_offline_runs(roots: list[Path]) -> list[OfflineRun]:
    """Every offline W&B run directory below `roots` (sorted by path, so by job then start time)."""
    runs: dict[Path, OfflineRun] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here.name.startswith("offline-run-"):
                dirnames[:] = []  # nothing to find inside a run directory
                wandb_files = sorted(f for f in filenames if f.startswith("run-") and f.endswith(".wandb"))
                if not wandb_files:
                    continue  # the run never got as far as writing its data file
                run_id = wandb_files[0][len("run-") : -len(".wandb")]
                synced = all(f + ".synced" in filenames for f in wandb_files)
                runs[here.resolve()] = OfflineRun(here, run_id, synced, *_job_state(here))
            else:
                # .submitit/ (pickles, logs) and checkpoints/ never hold W&B runs; skip big trees early
                dirnames[:] = [d for d in dirnames if d not in (".submitit", "checkpoints", "adapter", "adapter_init")]
    return sorted(runs.values(), key=lambda r: str(r.run_dir))


def shared_ids(runs: list[OfflineRun]) -> dict[str, list[Path]]:
    """Run id -> the job directories holding it, for ids found in more than one job directory."""
    dirs: dict[str, set[Path]] = {}
    for r in runs:
        dirs.setdefault(r.run_id, set()).add(r.run_dir.parent.parent.resolve())
    return {run_id: sorted(d) for run_id, d in sorted(dirs.items()) if len(d) > 1}


def wandb_executable() -> str:
    """The `wandb` CLI: the one on PATH, else the one next to this interpreter (a venv not on PATH)."""
    found = shutil.which("wandb") or shutil.which("wandb", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("the `wandb` command is not on PATH nor next to " + sys.executable)
    return found


def wandb_base_url() -> str:
    """The server `wandb sync` would talk to, resolved as wandb itself does (environment, settings files)."""
    import wandb

    settings = wandb.Settings()
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings.base_url


def unreachable(url: str, timeout: float) -> str | None:
    """Why `url` gives no HTTP answer within `timeout` seconds, or None when it answers (any status)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered, with an error page: it is there
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def build_command(runs: list[OfflineRun], *, project: str | None = None, entity: str | None = None,
                  extra: list[str] | None = None, executable: str | None = None) -> list[str]:
    cmd = [executable or wandb_executable(), "sync"]
    if project:
        cmd += ["--project", project]
    if entity:
        cmd += ["--entity", entity]
    cmd += list(extra or [])
    cmd += [str(r.run_dir) for r in runs]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqdpo.sync", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="multirun, job or outputs directories to search")
    p.add_argument("--dry-run", action="store_true", help="print the runs and the wandb command, upload nothing")
    p.add_argument("--include-running", action="store_true", help="also upload runs of jobs still running")
    p.add_argument("--project", help="override the W&B project of every uploaded run")
    p.add_argument("--entity", help="override the W&B entity of every uploaded run")
    p.add_argument("--allow-duplicate-ids", action="store_true",
                   help="upload even when one run id is in several job directories (they merge into one W&B run)")
    p.add_argument("--connect-timeout", type=float, default=20.0, metavar="S",
                   help="give up when the W&B server does not answer within S seconds (default 20)")
    p.epilog = "Arguments after `--` go to `wandb sync` as they are, e.g. `-- --verbose`."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"seqdpo.sync: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = find_offline_runs(args.dirs)
    todo, skipped_synced, skipped_running = [], [], []
    for r in runs:
        if r.synced:
            skipped_synced.append(r)
        elif r.job_state == "running" and not args.include_running:
            skipped_running.append(r)
        else:
            todo.append(r)
    lost = [r for r in todo if r.lost]
    print(f"offline W&B runs found: {len(runs)}; already synced: {len(skipped_synced)}; "
          f"job still running: {len(skipped_running)}; job lost: {len(lost)}; to upload: {len(todo)}")
    for r in skipped_running:
        print(f"  running, left for later: {r.run_dir}")
    for r in todo:
        print(f"  {r.run_id}: {r.run_dir}" + (f"  (job lost: {r.lost}; uploading what it logged)" if r.lost else ""))
    if not todo:
        return 0
    shared = shared_ids(todo)
    if shared:
        for run_id, dirs in shared.items():
            print(f"  run id {run_id} is in {len(dirs)} job directories: " + ", ".join(map(str, dirs)), file=sys.stderr)
        if not args.allow_duplicate_ids:
            print(f"seqdpo.sync: {len(shared)} run id(s) shared by several job directories would merge into one "
                  "W&B run; nothing uploaded. Give each job its own id (delete its wandb_run_id.txt and wandb/ and "
                  "rerun it) or pass --allow-duplicate-ids", file=sys.stderr)
            return 2
        print(f"seqdpo.sync: warning: uploading {len(shared)} shared run id(s) anyway (--allow-duplicate-ids)", file=sys.stderr)
    try:
        exe = wandb_executable()
    except FileNotFoundError as e:
        if not args.dry_run:
            print(f"seqdpo.sync: {e}; install wandb (pip install wandb)", file=sys.stderr)
            return 2
        exe = "wandb"
    cmd = build_command(todo, project=args.project, entity=args.entity, extra=extra, executable=exe)
    print("command: " + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    if "--dry-run" not in extra:  # wandb's own dry run needs no server
        url = wandb_base_url()
        why = unreachable(url, args.connect_timeout)
        if why is not None:
            print(f"seqdpo.sync: cannot reach W&B at {url} ({why}; waited up to {args.connect_timeout:g} s), so "
                  "nothing was uploaded. Run this where the network reaches it (a login node), check proxy "
                  "settings and WANDB_BASE_URL, then run the same command again.", file=sys.stderr)
            return UNREACHABLE
    env = dict(os.environ)
    if env.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        # the jobs' WANDB_MODE=offline must not leak into the upload; sync needs the online API
        env.pop("WANDB_MODE")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
