"""`python -m seqdpo.sync`: finds a sweep's offline W&B runs, leaves out synced ones and builds one
`wandb sync` command. Nothing here leaves this machine: the runs are real offline runs made by wandb
itself, the upload step is exercised with a recording stand-in for the `wandb` executable (the real
one would contact api.wandb.ai), and the W&B server it checks first is a plain HTTP server on loopback."""

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from seqdpo.sync import find_offline_runs, main

REPO = Path(__file__).resolve().parents[1]

MAKE_RUNS = textwrap.dedent("""
    import sys, wandb
    for job_dir, run_id in [a.rsplit("@", 1) for a in sys.argv[1:]]:
        run = wandb.init(project="seqdpo-test", id=run_id, resume="allow", dir=job_dir, mode="offline",
                         reinit="create_new")
        run.log({"x": 1.0})
        run.finish()
""")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep dir with three jobs: a, b (run twice with the same id, as after a requeue) and c (synced)."""
    root = tmp_path_factory.mktemp("sync") / "multirun" / "2026-01-01_00-00-00"
    jobs = {name: root / f"order={name}" for name in ("a", "b", "c")}
    for d in jobs.values():
        (d / ".submitit").mkdir(parents=True)
    args = [f"{jobs['a']}@seqdpo-aaa", f"{jobs['b']}@seqdpo-bbb", f"{jobs['b']}@seqdpo-bbb", f"{jobs['c']}@seqdpo-ccc"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    r = subprocess.run([sys.executable, "-c", MAKE_RUNS, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # what `wandb sync` leaves after a successful upload: run-<id>.wandb.synced next to the run file
    (c_file,) = (jobs["c"] / "wandb").glob("offline-run-*/run-seqdpo-ccc.wandb")
    c_file.with_suffix(".wandb.synced").write_text("")
    for name in ("a", "b", "c"):
        (jobs[name] / "status.json").write_text(json.dumps({"state": "done"}))
    return root, jobs


def test_finds_offline_runs_and_synced_state(sweep):
    root, jobs = sweep
    runs = find_offline_runs([root.parent])  # searching from the parent (all sweeps) finds them too
    assert sorted(r.run_id for r in runs) == ["seqdpo-aaa", "seqdpo-bbb", "seqdpo-bbb", "seqdpo-ccc"]
    assert {r.run_id: r.synced for r in runs} == {"seqdpo-aaa": False, "seqdpo-bbb": False, "seqdpo-ccc": True}
    assert all(r.run_dir.name.startswith("offline-run-") and r.job_state == "done" for r in runs)
    # the same directory given twice is listed once
    assert len(find_offline_runs([root, root / "order=a"])) == 4


def test_dry_run_prints_command_and_uploads_nothing(sweep, capsys, monkeypatch, tmp_path):
    root, jobs = sweep
    marker = tmp_path / "called"
    _fake_wandb(monkeypatch, tmp_path, marker, rc=0)
    assert main([str(root), "--dry-run", "--project", "p1"]) == 0
    out = capsys.readouterr().out
    assert "already synced: 1" in out and "to upload: 3" in out
    assert "command: " in out and " sync --project p1 " in out
    assert "seqdpo-ccc" not in out.split("command: ")[1]  # the synced run is not in the command
    assert not marker.exists()


@pytest.fixture
def wandb_server(monkeypatch):
    """WANDB_BASE_URL pointing at an HTTP server on loopback that answers 404 to everything."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def test_unreachable_wandb_gives_up_with_a_message(sweep, monkeypatch, tmp_path, capsys):
    # The real `wandb sync` would wait at "setting up run" for as long as the server stays away.
    root, _ = sweep
    marker = tmp_path / "called"
    _fake_wandb(monkeypatch, tmp_path, marker, rc=0)
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    assert main([str(root), "--connect-timeout", "5"]) == 75
    err = capsys.readouterr().err
    assert f"cannot reach W&B at {url}" in err and "nothing was uploaded" in err
    assert not marker.exists()


def test_lost_jobs_are_uploaded(sweep, capsys):
    root, jobs = sweep
    status = jobs["a"] / "status.json"
    # a job that said it runs, on another host, and went silent an hour ago (its node died)
    status.write_text(json.dumps({"state": "running", "stage": 1, "pid": 1, "host": "node-gone",
                                  "heartbeat": time.time() - 3600, "heartbeat_every_s": 30}))
    try:
        assert main([str(root), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "job still running: 0; job lost: 1; to upload: 3" in out
        assert "seqdpo-aaa" in out.split("command: ")[1]
        assert "(job lost: no heartbeat for 36" in out and "s (host node-gone, pid 1); uploading what it logged)" in out
    finally:
        status.write_text(json.dumps({"state": "done"}))


def test_upload_runs_one_wandb_sync_over_unsynced_runs(sweep, monkeypatch, tmp_path, wandb_server):
    root, jobs = sweep
    marker = tmp_path / "called"
    _fake_wandb(monkeypatch, tmp_path, marker, rc=0)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(root), "--entity", "me", "--", "--verbose"]) == 0
    calls = [json.loads(line) for line in marker.read_text().splitlines()]
    assert len(calls) == 1, calls  # one wandb sync for all runs, not one per run
    argv, mode = calls[0]["argv"], calls[0]["WANDB_MODE"]
    assert argv[:4] == ["sync", "--entity", "me", "--verbose"]
    uploaded = argv[4:]
    assert len(uploaded) == 3 and all(Path(p).name.startswith("offline-run-") for p in uploaded)
    assert sum("seqdpo-bbb" in p for p in uploaded) == 2 and not any("seqdpo-ccc" in p for p in uploaded)
    assert mode is None  # the jobs' WANDB_MODE=offline must not reach the upload


def test_failed_upload_is_reported(sweep, monkeypatch, tmp_path, wandb_server):
    root, _ = sweep
    _fake_wandb(monkeypatch, tmp_path, tmp_path / "called", rc=3)
    assert main([str(root)]) == 3


def test_running_jobs_are_left_for_later(sweep, monkeypatch, tmp_path, capsys):
    root, jobs = sweep
    status = jobs["a"] / "status.json"
    # on another host, with a fresh heartbeat: running as far as anyone here can tell
    status.write_text(json.dumps({"state": "running", "pid": 1, "host": "node-x", "heartbeat": time.time(),
                                  "heartbeat_every_s": 30}))
    try:
        assert main([str(root), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "job still running: 1; job lost: 0; to upload: 2" in out
        assert main([str(root), "--dry-run", "--include-running"]) == 0
        assert "to upload: 3" in capsys.readouterr().out
    finally:
        status.write_text(json.dumps({"state": "done"}))


def test_bad_directory_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_real_wandb_sync_dry_run_selects_our_runs(sweep, capfd):
    # The installed wandb CLI parses the command we build; its own --dry-run (passed through after
    # `--`) lists what it would upload without any network use.
    root, _ = sweep
    assert main([str(root), "--project", "p1", "--", "--dry-run"]) == 0
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Would sync 3 run(s)" in text, text
    assert text.count("run-seqdpo-bbb.wandb") == 2 and "run-seqdpo-aaa.wandb" in text
    assert "run-seqdpo-ccc.wandb" not in text


def _fake_wandb(monkeypatch, tmp_path, marker, rc):
    """A `wandb` first on PATH that records its argv and WANDB_MODE, then exits with `rc`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "wandb"
    exe.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(marker)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'WANDB_MODE': os.environ.get('WANDB_MODE')}}) + '\\n')\n"
        f"sys.exit({rc})\n"
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_run_id_in_two_job_directories_is_refused(tmp_path, capsys, monkeypatch, wandb_server):
    """Two jobs that share an id (copied directories, or ids from before they were drawn per directory)
    would merge into one W&B run: nothing is uploaded unless --allow-duplicate-ids."""
    root = tmp_path / "multirun"
    jobs = [root / "order=ab", root / "order=ba"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    r = subprocess.run([sys.executable, "-c", MAKE_RUNS, *(f"{j}@seqdpo-same" for j in jobs)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    marker = tmp_path / "called"
    _fake_wandb(monkeypatch, tmp_path, marker, rc=0)
    assert main([str(root)]) == 2
    err = capsys.readouterr().err
    assert "seqdpo-same" in err and all(str(j) in err for j in jobs) and not marker.exists()
    assert main([str(root), "--allow-duplicate-ids"]) == 0 and marker.exists()
