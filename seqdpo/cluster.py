"""Pre-flight checks before a sweep is submitted to SLURM, so a wrong setup fails at once with a clear
message instead of a submitit traceback, an sbatch error per job array, or a long hang.

`conf/hydra/launcher/slurm.yaml` registers `SlurmPreflight` under `hydra.callbacks` (only that preset
and those built on it do). Before the first job is submitted it checks, in this order:
  1. `sbatch` is on PATH (we are on a machine that can submit);
  2. the controller answers (`scontrol ping`), else sbatch would retry for minutes and then fail;
  3. the requested partition exists (`sinfo -h -p X`), or there is a default partition when none is named;
  4. the request fits a node of the partition: CPUs (cpus_per_task x tasks_per_node), memory, GPUs
     and the time limit against `sinfo -N -p X` (else the array waits forever in `PD
     (PartitionConfig)` or sbatch rejects it with "Requested node configuration is not available").
Each failure raises `ClusterError` naming the problem, both sets of numbers and the override that fixes it.
`check_slurm()` is the same check as a function (tests, notebooks).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SLURM_LAUNCHER_TARGET = "hydra_plugins.seqdpo_launcher.SlurmLauncher"


class ClusterError(RuntimeError):
    """The SLURM setup cannot run this sweep; the message says why and how to fix it."""


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, stdout="", stderr=f"no answer within {e.timeout:.0f} s")


def _said(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stdout + proc.stderr).strip()
    return text if text else f"(no output, exit status {proc.returncode})"


@dataclass(frozen=True)
class Request:
    """What one job of the sweep asks for (the launcher's keys of the same names)."""

    cpus_per_task: int = 1
    tasks_per_node: int = 1
    mem_gb: Optional[float] = None
    gpus_per_node: int = 0
    timeout_min: Optional[int] = None
    nodes: int = 1

    @property
    def cpus(self) -> int:
        return self.cpus_per_task * self.tasks_per_node


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


def parse_gpus(gres: str) -> int:
    """GPUs in a `sinfo %G` entry: 'gpu:4', 'gpu:a100:4(S:0-1)', 'gpu:2,shard:8' -> 4, 4, 2; '(null)' -> 0."""
    return sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def parse_time_limit(text: str) -> Optional[int]:
    """Minutes in a `sinfo %l` time limit ('infinite', '30:00', '12:00:00', '2-00:00:00'); None = no limit."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + (1 if sec else 0)


def fit_request(partition: str, nodes: list[Node], limit_min: Optional[int], req: Request, check_gpus: bool = True) -> None:
    """Raise ClusterError unless `req.nodes` nodes of the partition each hold one job of `req`."""
    mem_mb = None if req.mem_gb is None else int(req.mem_gb * 1024)  # submitit asks --mem=<mem_gb>GB, GB = 1024 MB
    gpus = req.gpus_per_node if check_gpus else 0
    fitting = [n for n in nodes if n.cpus >= req.cpus and (mem_mb is None or n.mem_mb >= mem_mb) and n.gpus >= gpus]
    too_long = limit_min is not None and req.timeout_min is not None and req.timeout_min > limit_min
    if len(fitting) >= req.nodes and not too_long:
        return
    best = Node("", max(n.cpus for n in nodes), max(n.mem_mb for n in nodes), max(n.gpus for n in nodes))
    fixes = []
    if req.cpus > best.cpus:
        fixes.append(f"hydra.launcher.cpus_per_task={max(1, best.cpus // req.tasks_per_node)}")
    if mem_mb is not None and mem_mb > best.mem_mb:
        fixes.append(f"hydra.launcher.mem_gb={max(1, best.mem_mb // 1024)}")
    if gpus > best.gpus:
        fixes.append(f"hydra.launcher.gpus_per_node={best.gpus}")
    if too_long:
        fixes.append(f"hydra.launcher.timeout_min={limit_min}")
    if not fixes and fitting:
        fixes.append(f"hydra.launcher.nodes={len(fitting)}")
    elif not fixes:  # every number fits some node, but no node has them all at once
        fixes.append("sizes one node holds (" + "; ".join(f"{n.name}: {n.cpus} CPUs, {n.mem_mb} MB, {n.gpus} GPUs"
                                                        for n in nodes[:5]) + ")")
    asked = (f"{req.cpus} CPUs ({req.cpus_per_task} per task x {req.tasks_per_node} tasks), "
             f"{'no memory limit' if mem_mb is None else f'{mem_mb} MB'}, {gpus} GPUs per node on {req.nodes} node(s), "
             f"{'no time limit' if req.timeout_min is None else f'{req.timeout_min} min'}")
    has = (f"{len(nodes)} node(s), the largest with {best.cpus} CPUs, {best.mem_mb} MB, {best.gpus} GPUs "
           f"({len(fitting)} fit); time limit {'none' if limit_min is None else f'{limit_min} min'}")
    no_gres = " (if the nodes do have GPUs, hydra.callbacks.slurm_preflight.check_gpus=false)" if gpus > best.gpus else ""
    raise ClusterError(
        f"no node of partition '{partition}' can run one job of this sweep, so it would wait forever "
        f"(squeue: PD (PartitionConfig)). Each job asks {asked}; the partition has {has}. "
        f"Override: {' '.join(fixes)}{no_gres}, or use the small-partition preset hydra/launcher=slurm_cpu."
    )


def partition_nodes(partition: str, timeout: float) -> tuple[list[Node], Optional[int]]:
    """The partition's nodes (CPUs, memory, GPUs) and its time limit in minutes, from `sinfo`."""
    cmd = ["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G|%l"]
    proc = _run(cmd, timeout)
    if proc.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {_said(proc)}")
    nodes, limits = {}, set()
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, mem, gres, limit = fields
        nodes[name] = Node(name, int(cpus.rstrip("+")), int(mem.rstrip("+")), parse_gpus(gres))
        limits.add(parse_time_limit(limit))
    if not nodes:
        raise ClusterError(f"partition '{partition}' has no nodes (`{' '.join(cmd)}` listed none)")
    return list(nodes.values()), next(iter(limits)) if len(limits) == 1 else None


def check_slurm(partition: Optional[str] = None, request: Request = Request(), *, timeout: float = 30.0,
                check_gpus: bool = True) -> str:
    """Raise ClusterError unless a job of size `request` can be submitted to `partition` and fits one of its nodes.

    Returns the partition the jobs will go to (the default one when `partition` is None).
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ClusterError(
            "`sbatch` is not on PATH, so this machine cannot submit SLURM jobs. Run the sweep on a login "
            "node (or load the cluster's slurm module), or use hydra/launcher=local_submitit or "
            "hydra/launcher=local to run it here."
        )
    for tool in ("scontrol", "sinfo"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`sbatch` is at {sbatch} but `{tool}` is not on PATH; the SLURM client install is incomplete.")

    ping = _run(["scontrol", "ping"], timeout)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        raise ClusterError(
            "the SLURM controller (slurmctld) is not reachable, so nothing can be submitted. "
            f"`scontrol ping` says: {_said(ping)}. Check that slurmctld runs and that SLURM_CONF / "
            "/etc/slurm/slurm.conf on this machine names it (on the local test setup: "
            "`bash launchers/slurm/setup_slurm.sh`)."
        )

    listing = _run(["sinfo", "-h", "-o", "%P"], timeout)
    if listing.returncode != 0:
        raise ClusterError(f"`sinfo -h -o %P` failed: {_said(listing)}")
    names = [p.strip() for p in listing.stdout.split() if p.strip()]
    default = next((p[:-1] for p in names if p.endswith("*")), None)
    known = [p.rstrip("*") for p in names]
    if partition is None:
        if default is None:
            raise ClusterError(
                "no partition was given and the cluster has no default partition. Pass one, e.g. "
                f"hydra.launcher.partition={known[0] if known else '<name>'} (partitions: {', '.join(known) or 'none'})."
            )
        partition = default
    else:
        found = _run(["sinfo", "-h", "-p", partition, "-o", "%P"], timeout)
        if found.returncode != 0 or not found.stdout.strip():
            raise ClusterError(
                f"unknown SLURM partition '{partition}' (hydra.launcher.partition). "
                f"Partitions on this cluster: {', '.join(known) or 'none'}."
            )

    nodes, limit_min = partition_nodes(partition, timeout)
    fit_request(partition, nodes, limit_min, request, check_gpus=check_gpus)
    return partition


def launcher_request(launcher) -> Request:
    """The per-job request of a `hydra/launcher=slurm` config."""
    keys = {k: launcher.get(k) for k in ("cpus_per_task", "tasks_per_node", "mem_gb", "gpus_per_node", "timeout_min", "nodes")}
    return Request(**{k: v for k, v in keys.items() if v is not None})


class SlurmPreflight(Callback):
    """Hydra callback: `check_slurm()` on the launcher's settings before a multirun submits anything."""

    def __init__(self, timeout_s: float = 30.0, check_gpus: bool = True) -> None:
        # check_gpus=false (hydra.callbacks.slurm_preflight.check_gpus=false) for clusters whose GPUs
        # are not visible as GRES in `sinfo %G`
        self.timeout_s = timeout_s
        self.check_gpus = check_gpus

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if launcher.get("_target_") != SLURM_LAUNCHER_TARGET:
            return  # registered by hand next to another launcher: nothing to check
        try:
            request = launcher_request(launcher)
            partition = check_slurm(launcher.get("partition"), request, timeout=self.timeout_s, check_gpus=self.check_gpus)
        except ClusterError as e:
            # Hydra turns an exception raised by a callback into a warning and goes on submitting;
            # SystemExit is not an Exception, so it stops the sweep here with exit status 1.
            raise SystemExit(f"seqdpo: SLURM pre-flight check failed: {e}") from e
        print(f"[seqdpo] SLURM pre-flight ok: controller up, partition '{partition}', each job fits a node "
              f"({request.cpus} CPUs, {request.mem_gb} GB, {request.gpus_per_node} GPUs, {request.timeout_min} min)",
              flush=True)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A single run (no -m) never goes through the launcher: say so instead of silently running here.
        if config.hydra.launcher.get("_target_") == SLURM_LAUNCHER_TARGET:
            print("[seqdpo] note: hydra/launcher=slurm only applies to multiruns; add -m to submit "
                  "this job to SLURM (running it here instead)", flush=True)


def export_ddp_env() -> bool:
    """Under submitit with several tasks per job (hydra.launcher.tasks_per_node > 1, conf slurm_ddp),
    each task is one DDP rank: export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the
    SLURM/submitit environment, which torch.distributed and the HF Trainer read. A job of one task
    (a plain run, or torchrun / accelerate launch, which set them themselves) is left alone. A RANK
    already in the environment is overwritten: sbatch passes the submitting shell's environment to
    every task, so an inherited RANK would give all tasks the same rank and no rendezvous host.
    Returns True when it exported them.
    """
    try:
        import submitit

        env = submitit.JobEnvironment()
        num_tasks = env.num_tasks
    except Exception:  # not inside a submitit job (plain run, basic launcher)
        return False
    if num_tasks <= 1:
        return False
    # CUDA_VISIBLE_DEVICES is left alone: with gpus_per_node every task sees all the node's GPUs and the
    # Trainer picks cuda:LOCAL_RANK.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True
