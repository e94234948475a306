"""Pre-flight checks of hydra/launcher=slurm (seqdpo/cluster.py): a missing sbatch, an unreachable
slurmctld, an unknown partition and GPUs on a GPU-less partition each stop the sweep before anything is
submitted, with a message that says what is wrong. The end-to-end cases run the real CLI."""

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cluster_helpers import SLURM_TEST, TINY, job_env, run, seqdpo_cmd
from seqdpo.cluster import (SLURM_LAUNCHER_TARGET, ClusterError, Node, Request, SlurmPreflight, check_slurm, export_ddp_env,
                            fit_request, launcher_request, parse_gpus, parse_time_limit)


def _path_without(*tools: str) -> str:
    """PATH with every directory holding one of `tools` replaced by a copy without it (python stays)."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not any(os.path.exists(os.path.join(d, t)) for t in tools))


def test_missing_sbatch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", _path_without("sbatch"))
    with pytest.raises(ClusterError, match="`sbatch` is not on PATH"):
        check_slurm("debug")


def test_missing_sbatch_stops_the_cli_before_submitting(tmp_path):
    env = job_env(PATH=_path_without("sbatch"))
    proc = run(seqdpo_cmd(*SLURM_TEST, *TINY, "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}", multirun=True),
               cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1
    assert "SLURM pre-flight check failed: `sbatch` is not on PATH" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "sweep" / ".submitit").exists()  # nothing was submitted


def test_callback_ignores_other_launchers(monkeypatch):
    from conftest import compose

    monkeypatch.setenv("PATH", _path_without("sbatch"))  # here a check fails, so a check that runs is seen
    with pytest.raises(SystemExit, match="`sbatch` is not on PATH"):
        SlurmPreflight().on_multirun_start(compose(["hydra/launcher=slurm"], hydra_cfg=True))
    for launcher in ("local", "local_submitit"):  # registered by hand beside another launcher: nothing to check
        SlurmPreflight().on_multirun_start(compose([f"hydra/launcher={launcher}"], hydra_cfg=True))


def test_only_slurm_presets_register_the_check():
    from conftest import compose

    for launcher, expected in (("slurm", True), ("slurm_ddp", True), ("slurm_cpu", True), ("local", False),
                               ("local_submitit", False)):
        cfg = compose([f"hydra/launcher={launcher}"], hydra_cfg=True)
        callbacks = OmegaConf.select(cfg, "hydra.callbacks") or {}
        has = any(c.get("_target_") == "seqdpo.cluster.SlurmPreflight" for c in callbacks.values())
        assert has == expected, launcher
    slurm = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2"],
                    hydra_cfg=True).hydra.launcher
    assert slurm._target_ == SLURM_LAUNCHER_TARGET
    assert (slurm.partition, slurm.gpus_per_node, slurm.max_num_timeout) == ("gpu", 2, 3)
    ddp = compose(["hydra/launcher=slurm_ddp"], hydra_cfg=True).hydra.launcher
    assert ddp.tasks_per_node == ddp.gpus_per_node > 1
    small = compose(["hydra/launcher=slurm_cpu"], hydra_cfg=True).hydra.launcher
    assert small._target_ == SLURM_LAUNCHER_TARGET
    assert launcher_request(small) == Request(cpus_per_task=1, tasks_per_node=1, mem_gb=2, gpus_per_node=0, timeout_min=60)


def test_sinfo_fields_are_parsed():
    assert [parse_gpus(g) for g in ("(null)", "gpu:4", "gpu:a100:4(S:0-1)", "gpu:2,shard:8", "mps:100")] == [0, 4, 4, 2, 0]
    assert [parse_time_limit(t) for t in ("infinite", "30:00", "12:00:00", "2-00:00:00", "1-12:30:00")] == [
        None, 30, 720, 2880, 2190]


SMALL_NODE = [Node("vm", cpus=2, mem_mb=20489, gpus=0)]


def test_a_request_no_node_holds_is_refused_with_both_sets_of_numbers():
    big = Request(cpus_per_task=8, mem_gb=64, gpus_per_node=0, timeout_min=720)
    with pytest.raises(ClusterError) as e:
        fit_request("debug", SMALL_NODE, None, big)
    msg = str(e.value)
    assert "8 CPUs" in msg and "65536 MB" in msg  # what each job asks
    assert "2 CPUs, 20489 MB" in msg  # what the partition has
    assert "hydra.launcher.cpus_per_task=2 hydra.launcher.mem_gb=20" in msg and "hydra/launcher=slurm_cpu" in msg
    fit_request("debug", SMALL_NODE, None, Request(cpus_per_task=2, mem_gb=20))  # the suggested override fits
    with pytest.raises(ClusterError, match="720 min.*time limit 60 min.*hydra.launcher.timeout_min=60"):
        fit_request("debug", SMALL_NODE, 60, Request(timeout_min=720))
    with pytest.raises(ClusterError, match="CPUs \\(4 per task x 2 tasks\\).*cpus_per_task=1"):
        fit_request("debug", SMALL_NODE, None, Request(cpus_per_task=4, tasks_per_node=2))
    mixed = [Node("cpu1", cpus=64, mem_mb=256000, gpus=0), Node("gpu1", cpus=8, mem_mb=64000, gpus=4)]
    fit_request("gpu", mixed, None, Request(cpus_per_task=8, mem_gb=32, gpus_per_node=4))
    with pytest.raises(ClusterError, match="0 fit.*Override: sizes one node holds \\(cpu1: 64 CPUs.*gpu1: 8 CPUs"):
        fit_request("gpu", mixed, None, Request(cpus_per_task=16, gpus_per_node=1))
    with pytest.raises(ClusterError, match="1 fit.*Override: hydra.launcher.nodes=1"):
        fit_request("gpu", mixed, None, Request(cpus_per_task=32, nodes=2))


@pytest.mark.slurm
def test_unreachable_controller_is_a_clear_error(slurm_cluster, tmp_path, monkeypatch):
    # The real client against a slurm.conf naming a controller port where nothing listens.
    conf = Path("/etc/slurm/slurm.conf").read_text()
    (tmp_path / "slurm.conf").write_text(conf + "\nSlurmctldPort=6899\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    with pytest.raises(ClusterError, match="controller \\(slurmctld\\) is not reachable"):
        check_slurm("debug", timeout=60)


@pytest.mark.slurm
def test_unknown_partition_is_a_clear_error(slurm_cluster, tmp_path):
    with pytest.raises(ClusterError, match="unknown SLURM partition 'nope'.*Partitions on this cluster: debug"):
        check_slurm("nope")
    overrides = [o for o in SLURM_TEST if not o.startswith("hydra.launcher.partition=")]
    proc = run(seqdpo_cmd(*overrides, "hydra.launcher.partition=nope", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                          multirun=True), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "unknown SLURM partition 'nope'" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "sweep" / ".submitit").exists()


@pytest.mark.slurm
def test_gpus_on_a_gpu_less_partition_is_a_clear_error(slurm_cluster):
    # the test cluster's node has no GPU GRES; sbatch would reject the array with a cryptic message
    with pytest.raises(ClusterError, match="0 GPUs.*hydra.launcher.gpus_per_node=0.*check_gpus=false"):
        check_slurm("debug", Request(gpus_per_node=1))
    assert check_slurm("debug") == "debug"
    assert check_slurm("debug", Request(gpus_per_node=1), check_gpus=False) == "debug"  # the documented escape hatch
    assert check_slurm(None) == "debug"  # the default partition


def test_ddp_env_overrides_an_inherited_rank(monkeypatch):
    """A RANK inherited from the submitting shell must not stop a two-task job from getting its own ranks."""
    monkeypatch.setenv("RANK", "1")
    _two_task_job(monkeypatch, task=0)
    assert export_ddp_env() is True and os.environ["RANK"] == "0"


def test_ddp_env_is_left_alone_outside_submitit(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert export_ddp_env() is False and "RANK" not in os.environ


def _two_task_job(monkeypatch, task: int) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", str(task))
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", str(task))
    monkeypatch.setenv("SUBMITIT_LOCAL_NODEID", "0")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_NUM_NODES", "1")
    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded, so the values export_ddp_env writes are undone after the test
        monkeypatch.delenv(k)


def test_ddp_env_from_a_two_task_submitit_job(monkeypatch):
    # What submitit's LocalExecutor sets for task 1 of a tasks_per_node=2 job (the SLURM variables
    # SLURM_PROCID/SLURM_NTASKS play the same role on a cluster).
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        # setenv first: delenv of an absent variable records nothing, and export_ddp_env's values would
        # leak into every later subprocess of the session (a SLURM job inheriting RANK=1 on every task).
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    _two_task_job(monkeypatch, task=1)
    assert export_ddp_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) > 0
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "1"


@pytest.mark.slurm
def test_a_preset_bigger_than_the_node_is_refused_before_submission(slurm_cluster, tmp_path):
    """The first attempt on the local SLURM in docs/cluster.md: `slurm` (8 CPUs, 64 GB) on the 2-CPU node used to pass the
    pre-flight and sit in PD (PartitionConfig) in silence; the small-partition preset fits."""
    sweep = tmp_path / "sweep"
    proc = run(seqdpo_cmd("hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
                          *TINY, f"hydra.sweep.dir={sweep}", multirun=True), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "no node of partition 'debug' can run one job" in proc.stderr, proc.stderr[-3000:]
    assert "hydra.launcher.cpus_per_task=2" in proc.stderr and "hydra.launcher.mem_gb=" in proc.stderr
    assert not (sweep / ".submitit").exists()  # nothing was submitted
    from conftest import compose

    small = compose(["hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug"], hydra_cfg=True).hydra.launcher
    assert check_slurm("debug", launcher_request(small)) == "debug"
