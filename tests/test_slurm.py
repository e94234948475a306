"""A Hydra multirun of two tiny jobs through hydra/launcher=slurm on a live single-node SLURM
(launchers/slurm/setup_slurm.sh): both jobs run as one SLURM job array, write their outputs, and the
submitting process returns once they are done. They run `strategy=replay`: a strategy goes through the
same entry point under every launcher, with nothing launcher-specific."""

import json
import re

import pytest
import yaml

from cluster_helpers import SLURM_TEST, TINY, explain, run, sacct_states, seqdpo_cmd, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1800)]  # sweeps wait up to 900 s for SLURM

PAIR_COLUMNS = {"stage", "stage_objective", "objective", "pair_id", "policy_chosen_logps", "policy_rejected_logps",
                "ref_chosen_logps", "ref_rejected_logps", "chosen_len", "rejected_len", "reward_chosen",
                "reward_rejected", "margin", "norm_margin", "accuracy", "policy_accuracy"}


def test_two_job_multirun_on_slurm(slurm_cluster, tmp_path):
    import pandas as pd

    sweep = tmp_path / "sweep"
    cmd = seqdpo_cmd(*SLURM_TEST, "order=ab,ba", "strategy=replay", *TINY, "logger=none", f"hydra.sweep.dir={sweep}",
                     multirun=True)
    proc = run(cmd, cwd=tmp_path, timeout=900)  # returns only once both jobs ended (the launcher blocks)
    assert proc.returncode == 0, explain(proc)
    assert "SLURM pre-flight ok" in proc.stdout + proc.stderr

    def order_of(d):
        return yaml.safe_load((d / "config.yaml").read_text())["order"]["name"]

    job_dirs = sorted((p.parent for p in sweep.glob("*/matrix.json")), key=order_of)
    assert [order_of(d) for d in job_dirs] == ["ab", "ba"], list(sweep.iterdir())
    stage_orders = {}
    array_ids = set()
    for d in job_dirs:
        assert json.loads((d / "status.json").read_text())["state"] == "done"
        for name in ("config.yaml", "signature.txt", "seqdpo.log", "pairs.parquet", "adapter_init"):
            assert (d / name).exists(), f"{d} lacks {name}"
        for k in range(3):
            assert (d / f"stage_{k}" / "DONE").exists() and (d / f"stage_{k}" / "pairs.parquet").exists()
        assert (d / "stage_2" / "adapter" / "adapter_model.safetensors").exists()
        matrix = json.loads((d / "matrix.json").read_text())
        assert matrix["strategy"]["name"] == "replay" and (d / "replay.parquet").exists()
        stage_orders[order_of(d)] = matrix["stages"]
        pairs = pd.read_parquet(d / "pairs.parquet")
        assert PAIR_COLUMNS <= set(pairs.columns)
        assert len(pairs) == 3 * 2 * 8  # stages x objectives x n_eval
        # The job really ran as a SLURM array task: Hydra records submitit's job id, <array>_<index>
        hydra_cfg = yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())
        job_id = str(hydra_cfg["hydra"]["job"]["id"])
        assert "_" in job_id, job_id
        array_ids.add(job_id.split("_")[0])
    assert stage_orders["ab"][1:] == stage_orders["ba"][1:][::-1]  # the two orders trained in opposite order
    assert len(array_ids) == 1, array_ids  # one job array for the sweep
    array_id = array_ids.pop()
    # accounting lags a moment behind job completion right after it ends
    states = wait_for(lambda: (s := sacct_states(array_id)) and all(v == "COMPLETED" for v in s.values()) and len(s) == 2 and s,
                      timeout=60, interval=1, what=f"sacct to show both tasks of {array_id} COMPLETED")
    assert set(states) == {f"{array_id}_0", f"{array_id}_1"}
    # submitit's own per-task logs sit in the sweep's .submitit folder
    assert (sweep / ".submitit" / f"{array_id}_0" / f"{array_id}_0_0_log.out").exists()



@pytest.mark.timeout(1200)
def test_a_cancelled_job_ends_the_sweep_in_a_few_lines(slurm_cluster, tmp_path):
    """`scancel` of a running sweep job: the submitter said how the jobs stood while they waited, and reports
    the cancelled job in one paragraph (submitit's error used to carry the job's whole error stream, 268
    lines) and as `lost` for as long as it ran (it read `lost 0:00:00` for a job that ran ~8 s: the duration
    ended at the first 30-s heartbeat)."""
    import subprocess

    from cluster_helpers import PY, job_env

    sweep = tmp_path / "sweep"
    cmd = seqdpo_cmd("hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=15",
                     *TINY, "train.max_steps=400", "logger=none", f"hydra.sweep.dir={sweep}", multirun=True)
    assert cmd[0] == PY
    with open(tmp_path / "submitter.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            job_dir = wait_for(lambda: next(sweep.glob("*/stage_1"), None), timeout=600, interval=1,
                               what="the job to reach stage 1").parent
            # submitit's folder also holds its submission files (.submission_file_*.sh): take a task folder, <array>_<index>
            array = next(p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[:1].isdigit())
            subprocess.run(["scancel", array], check=True)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = (tmp_path / "submitter.log").read_text()
    assert proc.returncode != 0, out[-3000:]
    # squeue is polled every 10 s, so a short wait may be seen as pending only, or as running only
    assert re.search(r"1 job: 1 (pending|running)", out) and "1 job: 1 ended" in out, out[-3000:]
    assert "ended without a result (state: CANCELLED" in out, out[-3000:]
    assert len(out.splitlines()) < 60, out  # was hundreds: the job's whole error stream
    line = next(x for x in out.splitlines() if x.startswith("  lost"))
    assert line.split()[1] != "0:00:00" and job_dir.name in line, line
