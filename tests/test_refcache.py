"""Reference log-prob cache: hits, misses, key sensitivity, concurrent writers, counters."""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import numpy as np
import pytest
import torch

from seqdpo import logprobs as lp
from seqdpo import refcache
from seqdpo.config import LoraSettings, ModelConfig, TinyModelShape
from seqdpo.modeling import load_model_and_tokenizer, make_lora_config, model_fingerprint


def _ds(n: int, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    words = ["apples", "rivers", "tea", "please", "thanks", "it", "is", "a", "thing"]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return Dataset.from_dict(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": [[{"role": "user", "content": say(rng.randint(1, 5))}] for _ in range(n)],
            "chosen": [[{"role": "assistant", "content": say(rng.randint(1, 9))}] for _ in range(n)],
            "rejected": [[{"role": "assistant", "content": say(rng.randint(1, 9))}] for _ in range(n)],
        }
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(name="tiny")
    model, tok = load_model_and_tokenizer(cfg)
    from peft import get_peft_model

    peft_model = get_peft_model(model, make_lora_config(LoraSettings(dropout=0.0)))
    with torch.no_grad():  # a non-zero adapter, so that "adapter disabled" is observable
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return cfg, peft_model, tok, model_fingerprint(cfg, tok)


@pytest.fixture(autouse=True)
def _fresh_counts():
    refcache.reset_ref_forward_counts()


def test_hit_miss_counts_and_base_values(tiny, tmp_path):
    cfg, model, tok, fp = tiny
    tds = lp.tokenize_pairs(_ds(9), tok, 32)
    first = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4, max_length=32)
    assert refcache.ref_forward_counts() == {"computed": 9, "cached": 0}
    second = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4, max_length=32)
    assert refcache.ref_forward_counts() == {"computed": 9, "cached": 9}
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    with model.disable_adapter():
        base = lp.dataset_logps(model, tds, 4, "base", show_progress=False)
    np.testing.assert_allclose(first["chosen_logps"], base["chosen_logps"], rtol=0, atol=1e-5)
    policy = lp.dataset_logps(model, tds, 4, "policy", show_progress=False)
    assert np.abs(policy["chosen_logps"] - first["chosen_logps"]).max() > 1e-3
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp"))

    # a re-ordered split is the same content: served from the cache, in its own row order
    shuffled = tds.shuffle(seed=3)
    third = refcache.reference_logps(model, shuffled, fingerprint=fp, cache_dir=tmp_path, batch_size=4, max_length=32)
    assert refcache.ref_forward_counts() == {"computed": 9, "cached": 18}
    order = [tds["pair_id"].index(p) for p in shuffled["pair_id"]]
    np.testing.assert_array_equal(third["chosen_logps"], first["chosen_logps"][order])

    with_cols = refcache.with_reference_columns(tds, first)
    assert with_cols["ref_chosen_logps"] == pytest.approx(first["chosen_logps"].tolist())


def test_key_changes_with_length_data_and_model(tiny, tmp_path):
    cfg, model, tok, fp = tiny
    ds = _ds(6)
    base = lp.tokenize_pairs(ds, tok, 32)
    digests = refcache.row_digests(base)
    key = lambda **kw: refcache.cache_key(  # noqa: E731
        **{"fingerprint": fp, "digests": digests, "max_length": 32, "param_dtype": "float32", "device_type": "cpu", **kw}
    )
    k0 = key()
    assert key() == k0
    assert key(max_length=16) != k0
    assert key(digests=refcache.row_digests(lp.tokenize_pairs(ds, tok, 12))) != k0  # truncation changes tokens
    assert key(digests=refcache.row_digests(lp.tokenize_pairs(_ds(6, seed=1), tok, 32))) != k0
    assert key(digests=refcache.row_digests(base.select(range(5)))) != k0
    other_fp = model_fingerprint(ModelConfig(name="tiny", tiny=TinyModelShape(init_seed=1)), tok)
    assert other_fp != fp and key(fingerprint=other_fp) != k0
    assert key(param_dtype="bfloat16") != k0 and key(device_type="cuda") != k0

    refcache.reference_logps(model, base, fingerprint=fp, cache_dir=tmp_path, batch_size=8, max_length=32)
    refcache.reference_logps(model, base, fingerprint=fp, cache_dir=tmp_path, batch_size=8, max_length=16)
    refcache.reference_logps(model, base, fingerprint=other_fp, cache_dir=tmp_path, batch_size=8, max_length=32)
    assert refcache.ref_forward_counts() == {"computed": 18, "cached": 0}
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_batch_layout_is_not_in_the_key(tiny, tmp_path):
    """Every layout gives the same log-probs, so an entry computed under one serves the others."""
    cfg, model, tok, fp = tiny
    tds = lp.tokenize_pairs(_ds(7), tok, 32)
    first = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, max_length=32, packing="pair")
    for packing in ("shared_prompt", "padded"):
        served = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, max_length=32, packing=packing)
        np.testing.assert_array_equal(served["chosen_logps"], first["chosen_logps"])
        with model.disable_adapter():
            fresh = lp.dataset_logps(model, tds, 4, "fresh", packing=packing, show_progress=False)
        for k in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(fresh[k], first[k], rtol=0, atol=1e-4)
    assert refcache.ref_forward_counts() == {"computed": 7, "cached": 14}


def test_corrupt_file_is_a_miss(tiny, tmp_path):
    cfg, model, tok, fp = tiny
    tds = lp.tokenize_pairs(_ds(4), tok, 32)
    refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:50])
    again = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4)
    assert refcache.ref_forward_counts() == {"computed": 8, "cached": 0}
    assert np.isfinite(again["chosen_logps"]).all()


def test_entry_with_arrays_of_the_wrong_length_is_recomputed(tiny, tmp_path, caplog):
    """A well-formed file whose arrays are shorter than its rows raised IndexError on every run."""
    cfg, model, tok, fp = tiny
    tds = lp.tokenize_pairs(_ds(5), tok, 32)
    first = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4)
    (path,) = tmp_path.glob("*.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["chosen_logps"] = arrays["chosen_logps"][:3]
    np.savez(path, **arrays)
    with caplog.at_level("WARNING", logger="seqdpo.refcache"):
        again = refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4)
    assert str(path) in caplog.text and "different lengths" in caplog.text
    assert refcache.ref_forward_counts() == {"computed": 10, "cached": 0}
    np.testing.assert_allclose(again["chosen_logps"], first["chosen_logps"], rtol=1e-6)
    refcache.reference_logps(model, tds, fingerprint=fp, cache_dir=tmp_path, batch_size=4)
    assert refcache.ref_forward_counts()["cached"] == 5  # rewritten whole


def test_cache_files_follow_the_umask(tiny, tmp_path):
    """Files were created 0600, unreadable to the group sharing the cache directory."""
    cfg, model, tok, fp = tiny
    old = os.umask(0o002)
    try:
        refcache.reference_logps(model, lp.tokenize_pairs(_ds(3), tok, 32), fingerprint=fp, cache_dir=tmp_path)
    finally:
        os.umask(old)
    (path,) = tmp_path.glob("*.npz")
    assert path.stat().st_mode & 0o777 == 0o664


def _writer(path: str, seed: int, rounds: int, q) -> None:
    rng = np.random.default_rng(seed)
    arrays = {"row_digest": np.asarray([f"{i:032x}" for i in range(2000)]), "chosen_logps": rng.normal(size=2000)}
    for k in ("rejected_logps", "chosen_len", "rejected_len"):
        arrays[k] = np.full(2000, seed, dtype=np.float64)
    for _ in range(rounds):
        refcache._atomic_save(__import__("pathlib").Path(path), arrays)
    q.put(seed)


def _reader(path: str, stop, q) -> None:
    import pathlib

    seen, torn = 0, 0
    while not stop.is_set():
        if os.path.exists(path):
            entry = refcache._load(pathlib.Path(path))
            if entry is None:
                torn += 1
            else:
                # one writer's whole file: every column from the same writer
                assert len(set(entry["rejected_logps"].tolist())) == 1
                assert entry["rejected_logps"][0] == entry["chosen_len"][0]
                seen += 1
    q.put((seen, torn))


def test_concurrent_writers_never_tear(tmp_path):
    ctx = mp.get_context("spawn")
    q, rq, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    path = str(tmp_path / "same-key.npz")
    reader = ctx.Process(target=_reader, args=(path, stop, rq))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(path, s, 15, q)) for s in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    stop.set()
    reader.join(60)
    seen, torn = rq.get(timeout=10)
    assert reader.exitcode == 0 and torn == 0 and seen > 0
    assert sorted(q.get(timeout=10) for _ in writers) == [0, 1, 2, 3]
    assert refcache._load(tmp_path / "same-key.npz") is not None
    assert not list(tmp_path.glob("*.tmp"))
