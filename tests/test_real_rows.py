"""The PKU-SafeRLHF, HelpSteer2 and HelpSteer (v1) builders on real rows from ../shared/data.

Each test lays the shared file out as the hub repository does, in a temp dir, and points
`dataset.path` at it, as a user with a local copy would; it skips, naming the file, when the file is
absent (tests/real_data.py). The real HH-RLHF split is read by tests/test_pair_accounting.py.
"""

import itertools
import json
import logging
import re
from collections import Counter

import pytest

from conftest import run_config
from real_data import needs, read_lines, shared_file, write_lines
from seqdpo.config import DatasetConfig
from seqdpo.data import DATASETS, DataError, build_objectives
from seqdpo.data.accounting import prepare_pairs
from seqdpo.data.helpsteer2 import ATTRIBUTES
from test_data import text
from test_pair_accounting import assert_adds_up

PKU = shared_file("pku-saferlhf/PKU-Alignment_PKU-SafeRLHF_sample.jsonl.gz")
HELPSTEER2 = shared_file("helpsteer2/helpsteer2_sample_10.jsonl")
NEMO_RM = shared_file("helpsteer2/nemo-aligner_test-rm.jsonl")
HELPSTEER_V1 = shared_file("helpsteer/nvidia_HelpSteer_sample.jsonl.gz")
PKU_TRAIN_ROWS = 400  # the first 400 rows are the train split, the other 100 the test split: disjoint


@pytest.fixture(scope="module")
def tok():
    from seqdpo.modeling import build_tiny_tokenizer

    return build_tiny_tokenizer(1024)


# --- PKU-SafeRLHF ---------------------------------------------------------------------------------


@pytest.fixture
def pku_root(tmp_path):
    """The 500 rows (all Alpaca-7B responses of the hub's train split) in the hub layout, split 400 / 100."""
    lines = read_lines(PKU)
    root = tmp_path / "PKU-SafeRLHF"
    write_lines(root / "data" / "Alpaca-7B" / "train.jsonl", lines[:PKU_TRAIN_ROWS])
    write_lines(root / "data" / "Alpaca-7B" / "test.jsonl", lines[PKU_TRAIN_ROWS:])
    return root, [json.loads(line) for line in lines]


def pku_cfg(root, **options) -> DatasetConfig:
    return DatasetConfig(name="pku_saferlhf", objectives=["helpfulness", "safety"], path=str(root), options=options)


@needs(PKU)
def test_pku_real_rows_pairs_labels_and_conflict(pku_root, tok, caplog):
    root, rows = pku_root
    objectives = build_objectives(pku_cfg(root), seed=0)
    splits = {"train": rows[:PKU_TRAIN_ROWS], "eval": rows[PKU_TRAIN_ROWS:]}
    for split, split_rows in splits.items():
        for name, label in (("helpfulness", "better_response_id"), ("safety", "safer_response_id")):
            stats = objectives[name].stats[split]
            assert stats["rows"] == len(split_rows) == stats["pairs"]  # no real row is dropped without an option
            for pair, row in zip(getattr(objectives[name], split), split_rows, strict=True):
                assert text(pair["chosen"]) == row[f"response_{row[label]}"]
                assert text(pair["rejected"]) == row[f"response_{1 - row[label]}"]
                assert pair["prompt"] == [{"role": "user", "content": row["prompt"]}]
    # helpfulness and safety prefer different responses on 117 of the 500 rows
    conflicting = {s: objectives["safety"].stats[s]["conflicting"] for s in splits}
    assert conflicting == {"train": 90, "eval": 27}
    assert sum(conflicting.values()) / len(rows) == pytest.approx(0.234)
    assert objectives["helpfulness"].stats["eval"]["conflict_fraction"] == pytest.approx(0.27)

    with caplog.at_level(logging.INFO, logger="seqdpo"):
        prepared = prepare_pairs(objectives, tok, pku_cfg(root, warn_fraction=1.0), 256, seed=0)
    for splits_table in prepared.table().values():
        for account in splits_table.values():
            assert_adds_up(account)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pairs safety: "))
    assert "train: 399 kept of all requested (400 rows read, 400 pairs built; dropped: prompt_too_long 1;" in line
    assert "builder: conflict_fraction 0.225, conflicting 90" in line and "conflict_fraction 0.27, conflicting 27" in line


@needs(PKU)
def test_pku_real_rows_strong_signal_accounts_for_every_row(pku_root):
    root, rows = pku_root
    safety = build_objectives(pku_cfg(root, strong_signal=True), seed=0)["safety"]
    train = rows[:PKU_TRAIN_ROWS]
    one_safe = [r for r in train if r["is_response_0_safe"] != r["is_response_1_safe"]]
    kept = [r for r in one_safe if r[f"is_response_{r['safer_response_id']}_safe"]]
    stats = safety.stats["train"]
    assert len(safety.train) == stats["pairs"] == len(kept) > 0
    assert stats["dropped_not_strong_signal"] == len(train) - len(one_safe) > 0
    assert stats.get("dropped_safety_label_contradicts_flags", 0) == len(one_safe) - len(kept)
    assert stats["rows"] == stats["pairs"] + sum(v for k, v in stats.items() if k.startswith("dropped_"))


@pytest.mark.slow
@needs(PKU)
def test_pku_real_rows_two_stage_job(pku_root, tmp_path, caplog):
    """helpfulness -> safety on the tiny model, dataset.path at the hub-layout copy."""
    from seqdpo.runner import run_job

    root, _ = pku_root
    cfg = run_config([
        "dataset=pku_saferlhf", f"dataset.path={root}", "order=ab", "dataset.n_train=16", "dataset.n_eval=16",
        "dataset.warn_fraction=1.0", "train.max_steps=2", "train.batch_size=4", "eval.batch_size=32",
        "diagnostics.grad_cosine=false", "diagnostics.adapter_movement=false", "logger=none",
        f"ref_cache_dir={tmp_path / 'cache'}",
    ])
    with caplog.at_level(logging.INFO, logger="seqdpo"):
        matrix = run_job(cfg, str(tmp_path / "run"))
    assert matrix["stages"][1:] == ["helpfulness", "safety"]
    for objective in ("helpfulness", "safety"):
        for split in ("train", "eval"):
            account = matrix["pairs"][objective][split]
            assert_adds_up(account)
            assert account["kept"] == 16
        assert any(r.getMessage().startswith(f"pairs {objective}: train: 16 kept") for r in caplog.records)
    pairs = __import__("pandas").read_parquet(tmp_path / "run" / "pairs.parquet")
    assert pairs.groupby(["stage", "objective"]).pair_id.nunique().to_dict() == {
        (stage, objective): 16 for stage in range(3) for objective in ("helpfulness", "safety")
    }


# --- HelpSteer2 -----------------------------------------------------------------------------------

_NEMO_SYSTEM = re.compile(r"<extra_id_0>System\n.*?\n(?=<extra_id_1>User\n)", re.S)
_NEMO_TURN = re.compile(r"<extra_id_1>(User|Assistant)\n")


def nemo_to_hub(record: dict) -> dict:
    """A row of NeMo-Aligner's regression format back in the hub schema.

    `text` is `<extra_id_0>System\\n{system}\\n` then `<extra_id_1>{User|Assistant}\\n{turn}\\n` per turn
    then `<extra_id_2>`; the hub's prompt holds the turns before the last (the response) as
    `first turn\\n<extra_id_1>Assistant\\n...`. `label` ends with the five HelpSteer attributes.
    """
    system = _NEMO_SYSTEM.match(record["text"])
    assert system and record["text"].endswith("\n<extra_id_2>"), record["text"][:80]
    parts = _NEMO_TURN.split(record["text"][system.end():].removesuffix("<extra_id_2>"))
    assert parts[0] == "", parts[0][:80]
    turns = [(parts[i], parts[i + 1].removesuffix("\n")) for i in range(1, len(parts), 2)]
    assert turns[0][0] == "User" and turns[-1][0] == "Assistant"
    assert record["label"][:4] == [-100.0] * 4  # the OASST attributes NeMo-Aligner leaves unset
    return {
        "prompt": turns[0][1] + "".join(f"\n<extra_id_1>{role}\n{turn}" for role, turn in turns[1:-1]),
        "response": turns[-1][1],
        **{a: int(score) for a, score in zip(ATTRIBUTES, record["label"][4:], strict=True)},
    }


def helpsteer_cfg(root) -> DatasetConfig:
    return DatasetConfig(name="helpsteer2", objectives=list(ATTRIBUTES), path=str(root))


@needs(HELPSTEER2)
def test_helpsteer2_real_rows_of_ten_prompts_are_valid_and_unpaired(tmp_path):
    """Ten rows of ten prompts: every row passes validation, none has a second response to pair with."""
    lines = read_lines(HELPSTEER2)
    for split in ("train", "validation"):  # the builder's test only: the same rows in both splits
        write_lines(tmp_path / f"{split}.jsonl.gz", lines)
    built = DATASETS["helpsteer2"].build(helpsteer_cfg(tmp_path), 0)
    for objective in built.values():
        for split in ("train", "eval"):
            assert objective.stats[split] == {"pairs": 0, "rows": 10, "same_prompt_pairs": 0, "unpaired_rows": 10}
    with pytest.raises(DataError, match=r"objective 'helpfulness': the train split is empty after filtering .*"
                                        r"'unpaired_rows': 10"):
        build_objectives(helpsteer_cfg(tmp_path), seed=0)


# Read off the NeMo-Aligner labels: attribute -> {pair's first row: row preferred}; pairs not listed tie.
NEMO_PREFERRED = {
    "helpfulness": {0: 0, 2: 2, 4: 4},  # 4 vs 2, 4 vs 1, 2 vs 0, 4 vs 4
    "correctness": {0: 0, 2: 2, 4: 4},  # 4 vs 3, 4 vs 1, 2 vs 0, 4 vs 4
    "coherence": {0: 0, 2: 2, 4: 4},  # 4 vs 3, 4 vs 3, 3 vs 2, 4 vs 4
    "complexity": {2: 3},  # 3 vs 3, 1 vs 2, 2 vs 2, 0 vs 0
    "verbosity": {0: 1, 2: 3},  # 2 vs 3, 1 vs 4, 3 vs 3, 2 vs 2
}


@needs(NEMO_RM)
def test_helpsteer2_real_pairs_from_nemo_aligner_rows(tmp_path):
    rows = [nemo_to_hub(json.loads(line)) for line in read_lines(NEMO_RM)]
    assert [r["prompt"] == rows[i ^ 1]["prompt"] for i, r in enumerate(rows)] == [True] * 8
    assert rows[0]["prompt"] == "explain master slave replication nsql"
    lines = [json.dumps(r) + "\n" for r in rows]
    for split in ("train", "validation"):  # the builder's test only: the same rows in both splits
        write_lines(tmp_path / f"{split}.jsonl.gz", lines)
    objectives = build_objectives(helpsteer_cfg(tmp_path), seed=0)
    for attribute, preferred in NEMO_PREFERRED.items():
        pairs = {p["pair_id"]: p for p in objectives[attribute].train}
        assert set(pairs) == {f"train-{first}" for first in preferred}, attribute
        for first, winner in preferred.items():
            pair = pairs[f"train-{first}"]
            assert pair["prompt"] == [{"role": "user", "content": rows[first]["prompt"]}]
            assert text(pair["chosen"]) == rows[winner]["response"]
            assert text(pair["rejected"]) == rows[(first + 1) if winner == first else first]["response"]
        assert objectives[attribute].stats["train"]["dropped_tie"] == 4 - len(preferred)


# --- HelpSteer (v1) through the HelpSteer2 builder ------------------------------------------------


def pair_rows(pair_id: str) -> tuple[int, int]:
    """The two row indices a helpsteer2 pair_id names: `train-<i>` is rows i and i+1, `train-<i>-<j>` rows i and j."""
    i, *j = map(int, pair_id.split("-")[1:])
    return i, (j[0] if j else i + 1)


@needs(HELPSTEER_V1)
def test_helpsteer_v1_pairs_every_two_responses_to_one_prompt(tmp_path):
    """1-4 consecutive responses per prompt: each prompt's responses are compared two by two, never across prompts."""
    rows = [json.loads(line) for line in read_lines(HELPSTEER_V1)]
    runs = Counter(len(list(run)) for _, run in itertools.groupby(rows, key=lambda r: r["prompt"]))
    assert runs == {4: 105, 3: 21, 2: 4, 1: 9}
    for split in ("train", "validation"):  # the builder's test only: the same rows in both splits
        (tmp_path / f"{split}.jsonl.gz").symlink_to(HELPSTEER_V1.resolve())
    objectives = build_objectives(helpsteer_cfg(tmp_path), seed=0)
    for attribute, objective in objectives.items():
        stats = objective.stats["train"]
        assert (stats["rows"], stats["unpaired_rows"], stats["same_prompt_pairs"]) == (500, 9, 105 * 6 + 21 * 3 + 4)
        drops = sum(v for k, v in stats.items() if k.startswith("dropped_"))
        assert stats["same_prompt_pairs"] == stats["pairs"] + drops, stats
        assert stats["pairs"] > 0
        for pair in objective.train:
            a, b = (rows[i] for i in pair_rows(pair["pair_id"]))
            assert a["prompt"] == b["prompt"], pair["pair_id"]
            assert a[attribute] != b[attribute], pair["pair_id"]
            chosen, rejected = (a, b) if a[attribute] > b[attribute] else (b, a)
            assert (text(pair["chosen"]), text(pair["rejected"])) == (chosen["response"], rejected["response"])
            assert pair["prompt"][-1]["content"] == a["prompt"].strip()
    # a prompt of four responses: all six comparisons that a score separates
    first_of_four = next(i for i, r in enumerate(rows) if [x["prompt"] for x in rows[i:i + 4]] == [r["prompt"]] * 4)
    ids = set(objectives["helpfulness"].train["pair_id"])
    expected = {f"train-{i}-{j}" for i, j in itertools.combinations(range(first_of_four, first_of_four + 4), 2)
                if rows[i]["helpfulness"] != rows[j]["helpfulness"]}
    assert expected and expected <= ids
