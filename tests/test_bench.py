"""The benchmark script runs end to end on a minuscule CPU shape (its figures are not checked)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest


@pytest.mark.slow
def test_bench_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_dpo.py")
    spec = importlib.util.spec_from_file_location("bench_dpo", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    bench.main(
        ["--device", "cpu", "--shape", "mini", "--steps", "3", "--warmup", "1", "--bs", "2", "--plen", "8",
         "--clen", "8", "--hh-scale", "0.1", "--eval-pairs", "4", "--eval-bs", "2", "--out", str(out),
         "--modes", "trl,trl_pre,seqdpo_chunked,seqdpo,seqdpo_shared,eval,eval_shared"]
    )
    report = json.loads(out.read_text())
    modes = ("trl", "trl_pre", "seqdpo_chunked", "seqdpo", "seqdpo_shared", "eval", "eval_shared")
    rows = {(r["lendist"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(d, m) for d in ("equal", "hh") for m in modes}
    assert all("error" not in r for r in rows.values())
    for d in ("equal", "hh"):
        for mode, packing in (("seqdpo_chunked", "pair"), ("seqdpo", "pair"), ("seqdpo_shared", "shared_prompt")):
            r = rows[(d, mode)]
            assert r["packing"] == packing and r["pairs_per_s"] > 0 and r["x_trl"] > 0
            assert r["vs_padded_max_abs"] < 1e-3
        assert rows[(d, "seqdpo_shared")]["x_seqdpo"] > 0 and rows[(d, "eval_shared")]["x_eval"] > 0
        assert rows[(d, "seqdpo")]["x_seqdpo_chunked"] > 0
    # the tokens each layout runs through the decoder: the prompt once per pair in shared_prompt, twice
    # in pair, and TRL pads every sequence to the longest of its batch
    hh = {m: rows[("hh", m)]["computed_tokens_per_step"] for m in ("trl", "seqdpo", "seqdpo_shared")}
    assert hh["seqdpo_shared"] < hh["seqdpo"] < hh["trl"]
    assert rows[("hh", "seqdpo_shared")]["computed_vs_trl"] == pytest.approx(hh["seqdpo_shared"] / hh["trl"], abs=1e-3)
