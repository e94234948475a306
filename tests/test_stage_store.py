"""Stage signatures (seqdpo/stage_signature.py) and the stage store (seqdpo/stage_store.py), without training:
which jobs share which stages, and the store's publish / take / lock / damage discipline on real files."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cluster_helpers import wait_for
from conftest import REPO, run_config
from seqdpo.stage_signature import StageEnvironment, stage_signatures
from seqdpo.stage_store import StageStore, default_store_dir

ENV = StageEnvironment("cpu", 1, "code")


def sigs(*overrides, env=ENV):
    return stage_signatures(run_config(list(overrides)), env)


# --- signatures ------------------------------------------------------------------------------------


def test_a_job_shares_the_stages_of_its_prefix():
    a, ab, aba, ba = sigs("order=a"), sigs("order=ab"), sigs("order=aba"), sigs("order=ba")
    assert len(set(aba)) == 3  # stage 3 trains a again, from another state: not stage 1
    assert a == ab[:1] and ab == aba[:2]
    assert ba[0] != ab[0] and ba[1] != ab[1]


def test_the_strategies_share_stage_1_and_differ_where_they_act():
    seq, replay, anchor, merge, joint = (sigs(f"strategy={s}") for s in ("sequential", "replay", "anchor", "merge", "joint"))
    assert seq[0] == replay[0] == anchor[0] == merge[0]
    assert len({seq[1], replay[1], anchor[1], merge[1]}) == 4
    assert merge[2] is None  # the merged row trains nothing: nothing to store
    assert len(joint) == 1 and joint[0] not in seq
    # anchor at strength 0 is sequential, bit for bit: it shares stage 2 too
    assert sigs("strategy=anchor", "strategy.strength=0") == seq
    # a replay ratio acts from stage 2 on
    assert sigs("strategy=replay", "strategy.ratio=0.5")[0] == replay[0] != seq[1]


def test_a_stage_2_override_keeps_stage_1_and_a_stage_1_setting_changes_every_stage():
    ab = sigs("order=ab")
    stage2 = sigs("order=ab", "+order.stage_overrides.2.beta=0.1")
    assert stage2[0] == ab[0] and stage2[1] != ab[1]
    for changed in (["+order.stage_overrides.1.lr=1e-3"], ["lr=1e-3"], ["seed=1"], ["lora=r8"], ["loss=ipo"],
                    ["model.packing=pair"], ["dataset.n_train=16"], ["eval.batch_size=4"], ["reference=previous"],
                    ["diagnostics.grad_cosine=false"], ["beta=0.1"]):
        other = sigs("order=ab", *changed)
        assert other[0] != ab[0] and other[1] != ab[1], changed


def test_what_changes_no_stage_leaves_the_signatures_alone():
    ab = sigs("order=ab")
    for same in (["logger=none"], ["ref_cache_dir=/x"], ["stage_store=off"], ["stage_store_dir=/y"],
                 ["eval.bootstrap=10"], ["diagnostics.stay_threshold=0.2"]):
        assert sigs("order=ab", *same) == ab, same


def test_the_environment_and_a_partitioned_order_are_part_of_a_stage():
    ab = sigs("order=ab")
    for env in (StageEnvironment("cuda", 1, "code"), StageEnvironment("cpu", 2, "code"), StageEnvironment("cpu", 1, "other")):
        assert sigs("order=ab", env=env)[0] != ab[0]
    # sDPO chunks: stage 1 of a 2-chunk split is not stage 1 of a 3-chunk split
    assert sigs("order=sdpo2")[0] != sigs("order=sdpo3")[0]


# --- the store -------------------------------------------------------------------------------------


def _stage_dir(root, k=1, text="trained"):
    sd = root / "job" / f"stage_{k}"
    (sd / "adapter").mkdir(parents=True)
    (sd / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (sd / "adapter" / "adapter_model.safetensors").chmod(0o600)  # as safetensors writes it
    (sd / "pairs.parquet").write_text(text)
    (sd / "DONE").write_text(json.dumps({"eval/stage": k, "eval/polite/accuracy": 0.75, "train_steps": 4}))
    (sd / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    return sd


@pytest.fixture
def group_umask():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_publish_then_take_copies_the_stage_records_its_source_and_restores_the_rng(tmp_path, group_umask):
    store = StageStore(tmp_path / "store")
    sd = _stage_dir(tmp_path)
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    entry = store.publish("sig1", sd, {"stage": 1, "name": "polite"})
    after = (torch.rand(2), np.random.rand(), random.random())
    assert store.entry("sig1") == entry
    assert not (entry / "stage" / "checkpoints").exists()  # only an interrupted stage needs them
    meta = json.loads((entry / "entry.json").read_text())
    assert meta["signature"] == "sig1" and meta["job"] == str(sd.parent) and "adapter/adapter_model.safetensors" in meta["files"]
    # group-shareable: the adapter that safetensors wrote 0600 follows the umask (002) in the store
    assert (entry / "stage" / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o664
    assert not list(store.root.glob(".*.tmp"))

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    target = tmp_path / "other" / "stage_1"
    (target / "checkpoints").mkdir(parents=True)  # what an interrupted run of the taking job left
    store.take(entry, target)
    got = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(got[0], after[0]) and got[1:] == after[1:]
    assert (target / "adapter" / "adapter_model.safetensors").read_bytes() == (sd / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (target / "checkpoints").exists() and not (target.parent / "stage_1.incoming").exists()
    done = json.loads((target / "DONE").read_text())
    assert done["eval/polite/accuracy"] == 0.75 and done["stage_store"] == {"from": "sig1", "trained_by": str(sd.parent)}
    # publishing the same signature again keeps the entry that is there
    assert store.publish("sig1", _stage_dir(tmp_path / "again", text="other"), {}) == entry
    assert (entry / "stage" / "pairs.parquet").read_text() == "trained"


def test_the_rng_state_taken_is_the_one_published(tmp_path):
    store = StageStore(tmp_path)
    torch.manual_seed(5)
    torch.rand(3)
    entry = store.publish("s", _stage_dir(tmp_path), {})
    expected = torch.rand(4)
    torch.manual_seed(6)
    store.take(entry, tmp_path / "t" / "stage_1")
    assert torch.equal(torch.rand(4), expected)


def test_a_damaged_entry_is_set_aside_and_is_a_miss(tmp_path, caplog):
    store = StageStore(tmp_path / "store")
    entry = store.publish("sig", _stage_dir(tmp_path), {})
    (entry / "stage" / "pairs.parquet").write_text("torn")  # another size than entry.json says
    assert store.entry("sig") is None
    assert "is damaged" in caplog.text and not (store.root / "sig").exists()
    assert len(list(store.root.glob(".damaged-sig-*"))) == 1
    assert store.entry("sig") is None  # and the name is free for a new publication
    assert store.publish("sig", _stage_dir(tmp_path / "2"), {}) == store.root / "sig"


def test_the_store_lives_beside_the_reference_cache():
    assert default_store_dir(None) == default_store_dir("outputs/.refcache")
    assert str(default_store_dir(None)) == os.path.join("outputs", ".stagestore")
    assert default_store_dir("/scratch/cache/refs") == default_store_dir("/scratch/cache/refs").parent / ".stagestore"


WAITER = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from seqdpo.stage_store import StageStore
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sd = Path(sys.argv[2]) / "stage_1"
    took = StageStore(sys.argv[1]).run_or_take("sig", sd, "stage 1", lambda: sys.exit("trained although published"), {})
    print("took" if took else "trained", flush=True)
""")


def test_a_job_wanting_a_stage_that_another_trains_waits_and_takes_it(tmp_path):
    """The second job blocks on the signature's lock while the first trains, then takes what it published."""
    store = StageStore(tmp_path / "store")
    sd = _stage_dir(tmp_path)
    with store.claim("sig", "stage 1", sd.parent) as entry:
        assert entry is None
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(store.root), str(tmp_path / "second")],
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                  stderr=open(tmp_path / "waiter.log", "w"), text=True)
        try:
            wait_for(lambda: "waiting for it to publish" in (tmp_path / "waiter.log").read_text() or waiter.poll() is not None,
                     timeout=300, what="the second job to wait on the lock")
            assert waiter.poll() is None, (tmp_path / "waiter.log").read_text()
            holder = (tmp_path / "waiter.log").read_text()
            assert f"pid {os.getpid()}" in holder and str(sd.parent) in holder
            store.publish("sig", sd, {"stage": 1})
        except BaseException:
            waiter.kill()
            raise
    out, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0 and out.strip() == "took", (tmp_path / "waiter.log").read_text()
    assert json.loads((tmp_path / "second" / "stage_1" / "DONE").read_text())["stage_store"]["from"] == "sig"


def test_a_job_that_fails_in_its_stage_publishes_nothing_and_frees_the_lock(tmp_path):
    store = StageStore(tmp_path / "store")
    sd = _stage_dir(tmp_path)

    def fails():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        store.run_or_take("sig", sd, "stage 1", fails, {})
    assert store.entry("sig") is None
    ran = []
    assert store.run_or_take("sig", sd, "stage 1", lambda: ran.append(1), {}) is False and ran == [1]
    assert store.entry("sig") is not None


# --- the account -----------------------------------------------------------------------------------


def test_the_account_says_which_stages_were_trained_and_which_taken(tmp_path):
    from seqdpo.stage_sharing import StageSharing, sources_line, summary_keys
    from seqdpo.sweep_end import sweep_summary

    sharing = StageSharing(StageStore(tmp_path / "store"), ["s1", "s2", None], {})
    done = [{"stage_store": {"from": "s1", "trained_by": "/jobs/a"}}, {}, {}]
    account = sharing.accounting(done)
    assert [(r["source"], r.get("trained_by")) for r in account["stages"]] == [("store", "/jobs/a"), ("trained", None), ("merged", None)]
    assert sources_line(account) == "stage 1 from the store, stage 2 trained, stage 3 merged"
    assert summary_keys(account) == {"stage_store/trained": 1, "stage_store/from_store": 1, "stage_store/stage1": "store",
                                     "stage_store/stage2": "trained", "stage_store/stage3": "merged"}
    off = StageSharing(None, ["s1", "s2"], {}).accounting([{}, {}])
    assert off["enabled"] is False and sources_line(off) == "off (stages 1,2 trained)"
    # the sweep's end: one count in its head, the stages taken on each job's line
    for name, acc in (("ab", account), ("a", off)):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "status.json").write_text(json.dumps({"state": "done", "started": 0, "updated": 1}))
        (tmp_path / "sweep" / name / "matrix.json").write_text(json.dumps({"stage_store": acc}))
    text = sweep_summary(tmp_path / "sweep")
    assert "2 job(s): 2 done; 3 stage(s) trained, 1 taken from the stage store" in text.splitlines()[0], text
    assert "  ab  (from the stage store: stage 1 = s1; trained: 2)" in text and "  a\n" in text, text


def test_a_store_that_cannot_be_written_leaves_the_job_to_train_its_stage(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    store = StageStore(tmp_path / "file" / "store")
    sd = _stage_dir(tmp_path)
    ran = []
    assert store.run_or_take("sig", sd, "stage 1", lambda: ran.append(1), {}) is False and ran == [1]
    assert "cannot be used" in caplog.text and "could not be published" in caplog.text
