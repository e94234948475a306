"""Pair accounting: every row read is kept or dropped for a named reason, and the job says so.

The HH-RLHF fixture's harmless-base rows 20.. (train) and 6.. (test) are the edge cases of
`tests/fixtures/make_fixtures.py::hh_edge_rows`: markers inside responses and prompt turns, an empty
response, a many-turn dialogue, a prompt too long for model.max_length=128 and a pair whose
truncation at 128 tokens leaves chosen == rejected. A job on them must account for each one.
"""

import json
import logging
import os
from pathlib import Path

import pytest

from conftest import REPO, run_config
from real_data import needs, read_lines, shared_file, write_lines
from seqdpo.config import DatasetConfig
from seqdpo.data import DataError, build_objectives
from seqdpo.data.accounting import prepare_pairs

FIXTURE_HH = REPO / "tests" / "fixtures" / "hh_rlhf"
EDGE_ROWS = ["marker_in_response", "human_in_response", "marker_in_prompt_turn", "empty", "many_turns", "long_prompt",
             "truncation_tie"]
EDGE_START = {"train": 20, "eval": 6}  # first edge row of harmless-base train / test
HUB_SPLIT = {"train": "train", "eval": "test"}
REAL_HH = Path(os.environ.get("SEQDPO_REAL_HH", shared_file("hh-rlhf/harmless-base/test.jsonl.gz")))
NEEDS_REAL_HH = needs(REAL_HH, "set SEQDPO_REAL_HH to the file's path (or SEQDPO_SHARED_DATA to a directory that holds it)")


def edge_id(split: str, name: str) -> str:
    return f"{HUB_SPLIT[split]}-{EDGE_START[split] + EDGE_ROWS.index(name)}"


@pytest.fixture(scope="module")
def tok():
    from seqdpo.modeling import build_tiny_tokenizer

    return build_tiny_tokenizer(1024)


def hh_cfg(path=FIXTURE_HH, objectives=("harmless",), **kw) -> DatasetConfig:
    # The fixture's rows cycle through a few topics, so its splits share pairs (counted, not refused here)
    kw.setdefault("max_overlap", 1.0)
    return DatasetConfig(name="hh_rlhf", objectives=list(objectives), path=str(path), **kw)


def assert_adds_up(account: dict) -> None:
    """built + builder drops == kept + every drop + unused; for HH the left side is the rows read."""
    assert account["rows"] == account["kept"] + sum(account["dropped"].values()) + account["unused"], account


# --- HH-RLHF parsing ------------------------------------------------------------------------------


def test_hh_markers_inside_responses_keep_the_pair():
    """Were dropped as prefix_mismatch: the prompt is the longest common prefix ending at an Assistant marker."""
    obj = build_objectives(hh_cfg(), seed=0)["harmless"]
    for split in ("train", "eval"):
        rows = {r["pair_id"]: r for r in getattr(obj, split)}
        topic = "bread" if split == "train" else "kites"
        ask = [{"role": "user", "content": f"How can I get back at my neighbour by ruining their {topic}?"}]
        row = rows[edge_id(split, "marker_in_response")]
        assert row["prompt"] == ask
        assert row["chosen"][0]["content"] == f"Here is what I would say:\n\nAssistant: please leave their {topic} alone."
        assert row["rejected"][0]["content"] == f"Wait until night, then ruin their {topic}."
        row = rows[edge_id(split, "human_in_response")]
        assert row["rejected"][0]["content"] == f"Human: what if I do it anyway? Then ruin their {topic} at night."
        row = rows[edge_id(split, "marker_in_prompt_turn")]
        assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
        assert row["prompt"][1]["content"] == "Let me think.\n\nAssistant: Why do you want to?"
        assert len(rows[edge_id(split, "many_turns")]["prompt"]) == 9
        assert edge_id(split, "empty") not in rows
        assert obj.stats[split]["dropped_empty_response"] == 1
        assert obj.stats[split]["marker_in_response"] == 2 and obj.stats[split]["marker_in_prompt_turn"] == 1


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: Bye", ("\n\nHuman: Hi", "Hello", "Bye")),
        # the common prefix runs into the responses: the cut is still at the marker
        ("\n\nHuman: Hi\n\nAssistant: Hello there", "\n\nHuman: Hi\n\nAssistant: Hello you", ("\n\nHuman: Hi", "Hello there", "Hello you")),
        # a marker inside one response
        ("\n\nHuman: Hi\n\nAssistant: A\n\nAssistant: B", "\n\nHuman: Hi\n\nAssistant: C", ("\n\nHuman: Hi", "A\n\nAssistant: B", "C")),
        # the dialogues differ before any assistant marker
        ("\n\nHuman: Hi\n\nAssistant: A", "\n\nHuman: Yo\n\nAssistant: A", None),
    ],
)
def test_hh_split_pair(chosen, rejected, expected):
    from seqdpo.data.hh_rlhf import split_pair

    assert split_pair(chosen, rejected) == expected


# --- tokenization ---------------------------------------------------------------------------------


def test_truncation_to_identical_tokens_drops_the_pair(tok):
    """Was kept as a permanent tie (margin 0 at every stage, accuracy 0.5)."""
    from datasets import Dataset

    from seqdpo.logprobs import tokenize_pairs, tokenize_pairs_counted

    same = "please thanks kindly " * 10
    ds = Dataset.from_dict({
        "pair_id": ["tie", "fine"],
        "prompt": [[{"role": "user", "content": "tell me about tea ."}]] * 2,
        "chosen": [[{"role": "assistant", "content": same + "yes"}], [{"role": "assistant", "content": "yes"}]],
        "rejected": [[{"role": "assistant", "content": same + "no"}], [{"role": "assistant", "content": "no"}]],
    })
    assert tokenize_pairs(ds, tok, 24)["pair_id"] == ["fine"]
    _, counts = tokenize_pairs_counted(ds, tok, 24)
    assert counts["dropped_truncated_to_identical"] == 1 and counts["truncated"] == 0
    _, counts = tokenize_pairs_counted(ds, tok, 1000)
    assert counts == {"dropped_prompt_too_long": 0, "dropped_truncated_to_identical": 0, "dropped_identical_tokens": 0,
                      "truncated": 0, "tokens_lost": 0}


def test_fixture_accounting_adds_up_with_every_reason(tok):
    objectives = build_objectives(hh_cfg(objectives=("helpful", "harmless")), seed=0)
    prepared = prepare_pairs(objectives, tok, hh_cfg(warn_fraction=1.0), 128, seed=0)
    table = prepared.table()
    for objective, splits in table.items():
        for split, account in splits.items():
            assert_adds_up(account)
            assert account["kept"] == len(getattr(prepared, split)[objective])
    for split in ("train", "eval"):
        a = table["harmless"][split]
        assert {k: v for k, v in a["dropped"].items() if v} == {
            "empty_response": 1, "prompt_too_long": 1, "truncated_to_identical": 1
        }
        assert a["truncated"] == 1 and a["tokens_lost"] > 0 and a["unused"] == 0
        ids = set(getattr(prepared, split)["harmless"]["pair_id"])
        assert edge_id(split, "many_turns") in ids
        assert not {edge_id(split, n) for n in ("empty", "long_prompt", "truncation_tie")} & ids
    assert table["helpful"]["train"]["dropped"] == {"identical": 1, "malformed": 1, "prefix_mismatch": 1,
                                                     "prompt_too_long": 0, "truncated_to_identical": 0,
                                                     "identical_tokens": 0}


def test_a_draw_replaces_dropped_pairs_and_a_cap_is_logged(tok, caplog):
    """n_train counts pairs used: a pair that tokenization drops is replaced by the next one of the draw."""
    objectives = build_objectives(hh_cfg(), seed=0)
    cfg = hh_cfg(n_train=24, n_eval=100, warn_fraction=1.0)
    with caplog.at_level(logging.INFO, logger="seqdpo"):
        prepared = prepare_pairs(objectives, tok, cfg, 128, seed=0)
    train, eval_ = prepared.table()["harmless"]["train"], prepared.table()["harmless"]["eval"]
    assert len(prepared.train["harmless"]) == 24 == train["kept"]
    assert train["unused"] == 26 - 24 - train["dropped"]["prompt_too_long"] - train["dropped"]["truncated_to_identical"]
    assert_adds_up(train)
    assert eval_["kept"] == 10 and eval_["capped"] and eval_["unused"] == 0
    assert_adds_up(eval_)
    assert "dataset.n_eval=100 asks for more pairs than the split has; using all 10" in caplog.text
    assert "pairs harmless: train: 24 kept of 24 requested (27 rows read, 26 pairs built; dropped: " in caplog.text
    again = prepare_pairs(objectives, tok, cfg, 128, seed=0)
    assert again.train["harmless"]["pair_id"] == prepared.train["harmless"]["pair_id"]  # seeded
    assert prepare_pairs(objectives, tok, cfg, 128, seed=1).train["harmless"]["pair_id"] != again.train["harmless"]["pair_id"]


def test_warning_above_the_lost_fraction(tok, caplog):
    objectives = build_objectives(hh_cfg(), seed=0)
    with caplog.at_level(logging.WARNING, logger="seqdpo"):
        prepare_pairs(objectives, tok, hh_cfg(warn_fraction=0.25), 128, seed=0)
    assert "model.max_length" not in caplog.text  # 3 of 26 train pairs, 3 of 12 eval pairs: not above 0.25
    with caplog.at_level(logging.WARNING, logger="seqdpo"):
        prepare_pairs(objectives, tok, hh_cfg(), 128, seed=0)  # default dataset.warn_fraction=0.05
    assert "pairs harmless/eval: model.max_length=128 dropped or truncated 25.0% of the pairs (3 of 12" in caplog.text


def test_eval_pairs_also_in_train_are_counted_and_refused(tok, tmp_path):
    """The test split copied to train (what a user does when train is missing) trains on the eval pairs."""
    import shutil

    shutil.copytree(FIXTURE_HH, tmp_path / "hh")
    shutil.copy(tmp_path / "hh" / "harmless-base" / "test.jsonl.gz", tmp_path / "hh" / "harmless-base" / "train.jsonl.gz")
    objectives = build_objectives(hh_cfg(tmp_path / "hh"), seed=0)
    with pytest.raises(DataError) as refused:
        prepare_pairs(objectives, tok, hh_cfg(tmp_path / "hh", warn_fraction=1.0, max_overlap=0.01), 128, seed=0)
    assert ("objective 'harmless': 10 of its 10 eval pairs (100.0%) are also training pairs (same prompt, chosen "
            "and rejected), more than dataset.max_overlap=0.01") in str(refused.value)
    assert f"Check the splits of {tmp_path / 'hh'}" in str(refused.value)
    allowed = prepare_pairs(objectives, tok, hh_cfg(tmp_path / "hh", warn_fraction=1.0, max_overlap=1.0), 128, seed=0)
    table = allowed.table()["harmless"]
    assert table["eval"]["in_both_splits"] == 10 and table["eval"]["overlap_fraction"] == 1.0
    assert table["train"]["in_both_splits"] == 10 and table["train"]["kept"] == 10
    assert allowed.summary_keys()["pairs/harmless/eval/in_both_splits"] == 10


def test_synthetic_splits_share_no_pair_at_default_sizes(tok):
    cfg = run_config().dataset
    prepared = prepare_pairs(build_objectives(cfg, seed=0), tok, cfg, 256, seed=0)
    assert all(a.in_both_splits == 0 and a.kept for a in prepared.accounts)


def test_too_few_pairs_is_an_error_naming_objective_split_and_max_length(tok):
    objectives = build_objectives(hh_cfg(), seed=0)
    with pytest.raises(DataError, match=r"objective 'harmless', train split: 0 pairs left.*model.max_length=8"):
        prepare_pairs(objectives, tok, hh_cfg(), 8, seed=0)
    with pytest.raises(DataError, match=r"objective 'harmless', eval split: 10 pairs left, fewer than dataset.min_pairs=11"):
        prepare_pairs(objectives, tok, hh_cfg(min_pairs=11, warn_fraction=1.0), 128, seed=0)


# --- config ---------------------------------------------------------------------------------------


def test_accounting_keys_compose():
    cfg = run_config(["dataset=hh_rlhf", "dataset.min_pairs=5", "dataset.warn_fraction=0.2", "dataset.max_overlap=1"])
    assert (cfg.dataset.min_pairs, cfg.dataset.warn_fraction, cfg.dataset.max_overlap) == (5, 0.2, 1.0)
    default = run_config().dataset
    assert (default.min_pairs, default.warn_fraction, default.max_overlap) == (1, 0.05, 0.01)


def test_synthetic_honours_dataset_n_train_and_n_eval(tok):
    """dataset.n_train was capped at options.n_train (256) silently; it now sets the pairs generated."""
    cfg = run_config(["dataset.n_train=300", "dataset.n_eval=5"]).dataset
    prepared = prepare_pairs(build_objectives(cfg, seed=0), tok, cfg, 256, seed=0)
    assert {n: len(ds) for n, ds in prepared.train.items()} == {"polite": 300, "factual": 300}
    assert {n: len(ds) for n, ds in prepared.eval.items()} == {"polite": 5, "factual": 5}


# --- jobs -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_hub_is_one_error_line_naming_dataset_path(tmp_path):
    """Was a chain of tracebacks (after ~25 s of retries without HF_HUB_OFFLINE), with no word of dataset.path."""
    import subprocess

    from cluster_helpers import PY, job_env

    proc = subprocess.run(
        [PY, "-m", "seqdpo", "dataset=hh_rlhf", "logger=none", f"hydra.run.dir={tmp_path / 'job'}"], cwd=REPO,
        env=job_env(HYDRA_FULL_ERROR="0", HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300,
    )
    errors = [line for line in proc.stdout.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 1 and len(errors) == 1, proc.stdout
    assert "Anthropic/hh-rlhf@09be8c5" in errors[0] and "dataset.path=DIR" in errors[0]
    assert "Traceback" not in proc.stdout, proc.stdout


@pytest.mark.slow
def test_data_errors_come_before_the_model_loads(tmp_path, monkeypatch):
    """model.max_length=8 empties every split: was a bare StopIteration in stage 2, after the model loaded."""
    import seqdpo.runner
    from seqdpo.runner import run_job

    loaded = []
    real = seqdpo.runner.load_model
    monkeypatch.setattr(seqdpo.runner, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    cfg = run_config(["model.max_length=8", "logger=none", f"ref_cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match=r"objective 'polite', train split: 0 pairs left.*model.max_length=8"):
        run_job(cfg, str(tmp_path / "run"))
    assert loaded == []
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "model.max_length=8" in status["error"]


def _hh_job(tmp_path, path: Path, *overrides):
    from seqdpo.runner import run_job

    cfg = run_config([
        "dataset=hh_rlhf", f"dataset.path={path}", "dataset.n_train=null", "dataset.n_eval=null", "order=ab",
        "train.max_steps=2", "train.batch_size=4", "eval.batch_size=32", "diagnostics.grad_cosine=false",
        "diagnostics.adapter_movement=false", f"ref_cache_dir={tmp_path / 'cache'}", "dataset.max_overlap=1", *overrides,
    ])
    out = tmp_path / "run"
    return out, run_job(cfg, str(out))


@pytest.mark.slow
def test_job_on_hh_fixtures_stores_its_pair_accounting(tmp_path, caplog):
    from wandb_offline import read_run

    with caplog.at_level(logging.INFO, logger="seqdpo"):
        out, matrix = _hh_job(tmp_path, FIXTURE_HH, "model.max_length=128", "dataset.warn_fraction=0.5", "logger=wandb")
    table = json.loads((out / "matrix.json").read_text())["pairs"]
    assert table == matrix["pairs"] == json.loads((out / "diagnostics.json").read_text())["pairs"]
    summary = read_run(next((out / "wandb").glob("offline-run-*/run-*.wandb")))["summary"]
    pairs = __import__("pandas").read_parquet(out / "pairs.parquet")
    for objective in ("helpful", "harmless"):
        for split in ("train", "eval"):
            a = table[objective][split]
            assert_adds_up(a)
            assert summary[f"pairs/{objective}/{split}/kept"] == a["kept"]
            assert f"{split}: {a['kept']} kept of all requested ({a['rows']} rows read, {a['built']} pairs built" in caplog.text
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"pairs {objective}: "))
        assert " | eval: " in line  # one line per objective
        assert (pairs[(pairs.stage == 2) & (pairs.objective == objective)].pair_id.nunique()) == table[objective]["eval"]["kept"]
    harmless = table["harmless"]["eval"]
    assert (harmless["rows"], harmless["kept"], harmless["truncated"]) == (13, 10, 1)
    assert harmless["in_both_splits"] == 6  # the fixture cycles through topics: counted, allowed by the override
    assert {k: v for k, v in harmless["dropped"].items() if v} == {"empty_response": 1, "prompt_too_long": 1,
                                                                    "truncated_to_identical": 1}
    kept = set(pairs[pairs.objective == "harmless"].pair_id)
    assert {edge_id("eval", n) for n in ("marker_in_response", "human_in_response", "marker_in_prompt_turn",
                                         "many_turns")} <= kept

    from seqdpo.report import build_report

    written = build_report(tmp_path, tmp_path / "report")
    report = __import__("pandas").read_csv(written["pairs_csv"]).set_index(["objective", "split"])
    assert report.loc[("harmless", "eval"), "kept"] == 10
    assert report.loc[("harmless", "eval"), "dropped_truncated_to_identical"] == 1
    assert "## Pairs kept and dropped" in (tmp_path / "report" / "summary.md").read_text()


def hh_root(tmp_path, harmless_train: list[str], harmless_test: list[str]) -> Path:
    """A hub layout with these harmless-base lines; helpful-base is the fixture's (no real helpful-base
    rows are at hand)."""
    root = tmp_path / "hh"
    write_lines(root / "harmless-base" / "train.jsonl.gz", harmless_train)
    write_lines(root / "harmless-base" / "test.jsonl.gz", harmless_test)
    (root / "helpful-base").symlink_to(FIXTURE_HH / "helpful-base")
    return root


@pytest.mark.slow
@NEEDS_REAL_HH
def test_real_hh_rows_are_all_accounted_for(tmp_path, tok):
    """The 2,312 rows of the real split as objective `harmless`: all accounted at the tiny model's
    max_length (256) (docs/datasets.md, "What gets dropped, and why")."""
    root = hh_root(tmp_path, read_lines(FIXTURE_HH / "harmless-base" / "train.jsonl.gz"), read_lines(REAL_HH))
    objective = build_objectives(hh_cfg(root), seed=0)["harmless"]
    a = prepare_pairs({"harmless": objective}, tok, hh_cfg(root, warn_fraction=1.0), 256, seed=0).table()["harmless"]["eval"]
    assert_adds_up(a)
    assert (a["rows"], a["kept"], a["truncated"]) == (2312, 1451, 527)
    assert {k: v for k, v in a["dropped"].items() if v} == {"empty_response": 4, "prompt_too_long": 854,
                                                             "truncated_to_identical": 3}
    # the rows whose response holds "\n\nAssistant:" / "Human:" text (dropped as prefix_mismatch before)
    rows = {r["pair_id"]: r for r in objective.eval}
    assert {f"test-{i}" for i in (1254, 1688, 1950, 1952, 2036)} <= set(rows)
    assert "\n\nAssistant:" in rows["test-1952"]["chosen"][0]["content"]
    assert rows["test-2036"]["chosen"][0]["content"].startswith("Human: Okay, so once")
    assert rows["test-2036"]["prompt"][-1] == {"role": "user", "content": "Yes, I have that."}


@pytest.mark.slow
@NEEDS_REAL_HH
def test_job_on_real_hh_harmless_rows_from_disjoint_halves(tmp_path, caplog):
    """The paper's HH pair, helpful -> harmless, with harmless on real rows: train from the split's first
    half, eval from its second (no pair in both), and the job's pair accounting in its log."""
    half = 1156
    lines = read_lines(REAL_HH)
    assert not set(lines[:half]) & set(lines[half:])  # no row of the file is in both halves
    root = hh_root(tmp_path, lines[:half], lines[half:])
    with caplog.at_level(logging.INFO, logger="seqdpo"):
        out, matrix = _hh_job(tmp_path, root, "dataset.n_train=16", "dataset.n_eval=16", "dataset.warn_fraction=1.0",
                              "logger=none")
    assert matrix["stages"][1:] == ["helpful", "harmless"]
    harmless = matrix["pairs"]["harmless"]
    for split, rows in (("train", half), ("eval", 2312 - half)):
        assert_adds_up(harmless[split])
        assert (harmless[split]["rows"], harmless[split]["kept"]) == (rows, 16)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pairs harmless: "))
    assert line.startswith(f"pairs harmless: train: 16 kept of 16 requested ({half} rows read, ")
    pairs = __import__("pandas").read_parquet(out / "pairs.parquet")
    assert pairs[pairs.objective == "harmless"].groupby("stage").pair_id.nunique().to_list() == [16, 16, 16]
