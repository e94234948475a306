"""Dataset builders on fixtures laid out like the hub repositories (tests/fixtures/<dataset>/).

Only the hub is mocked (`datasets.load_dataset`, to check the id, revision and data_dir a builder
asks for); everything else reads the fixture files for real. Hand-checked rows are described in
tests/fixtures/README.md.
"""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seqdpo.config import DatasetConfig
from seqdpo.data import DATASETS, PAIR_COLUMNS, DataError, build_objectives

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DATASET_CONFS = sorted((REPO / "conf" / "dataset").glob("*.yaml"))
HUB_DATASETS = ("hh_rlhf", "helpsteer2", "pku_saferlhf", "ultrafeedback")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def conf_dataset(yaml_path: Path, **overrides) -> DatasetConfig:
    """conf/dataset/<name>.yaml merged into the typed schema, as Hydra does, with overrides."""
    merged = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(yaml_path), overrides)
    return OmegaConf.to_object(merged)


def fixture_cfg(name: str, objectives=None, path=None, **options) -> DatasetConfig:
    return DatasetConfig(
        name=name,
        objectives=list(objectives or DATASETS[name].objectives),
        path=str(path or FIXTURES / name),
        options=options,
        max_overlap=1.0,  # the fixtures' rows cycle through a few topics, so their splits share pairs
    )


def by_id(ds) -> dict[str, dict]:
    return {row["pair_id"]: row for row in ds}


def text(messages: list[dict]) -> str:
    (message,) = messages
    assert message["role"] == "assistant"
    return message["content"]


@pytest.fixture
def copy_fixture(tmp_path):
    """Copies one dataset's fixture tree to tmp_path, so a test can break one of its files."""

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(FIXTURES / name, dest)
        return dest

    return copy


# --- every builder, through its conf/dataset file -------------------------------------------------


def test_every_dataset_has_a_conf_file():
    assert DATASET_CONFS, "conf/dataset/*.yaml not found"
    assert {p.stem for p in DATASET_CONFS} == set(DATASETS)


@pytest.mark.parametrize("yaml_path", DATASET_CONFS, ids=lambda p: p.stem)
def test_conf_lists_the_builders_options_at_their_defaults(yaml_path):
    # Listed so that a plain override (dataset.options.relation=...) may set them; the values are the builder's.
    import importlib

    builder = importlib.import_module(f"seqdpo.data.{yaml_path.stem}")
    assert dict(conf_dataset(yaml_path).options) == getattr(builder, "DEFAULTS", {})


@pytest.mark.parametrize("yaml_path", DATASET_CONFS, ids=lambda p: p.stem)
def test_conf_builds_contract_rows(yaml_path):
    name = yaml_path.stem
    path = str(FIXTURES / name) if name in HUB_DATASETS else None
    cfg = conf_dataset(yaml_path, path=path, n_train=None, n_eval=None)
    assert cfg.name == name and len(cfg.objectives) >= 2
    objectives = build_objectives(cfg, seed=0)
    assert list(objectives) == cfg.objectives
    for obj in objectives.values():
        for split in (obj.train, obj.eval):
            assert len(split) > 0
            assert set(PAIR_COLUMNS) <= set(split.column_names)
            assert len(set(split["pair_id"])) == len(split), "pair_id must be unique per objective and split"
            for row in split:
                assert row["prompt"] and row["prompt"][-1]["role"] == "user"
                assert [m["role"] for m in row["prompt"]] == ["user", "assistant"] * (len(row["prompt"]) // 2) + [
                    "user"
                ]
                assert text(row["chosen"]) != text(row["rejected"])


@pytest.mark.parametrize("name", HUB_DATASETS)
def test_registry_pins_a_full_commit_sha(name):
    spec = DATASETS[name]
    assert spec.hub_id and len(spec.revision) == 40 and int(spec.revision, 16) >= 0


def test_subsampling_is_seeded():
    from seqdpo.data.accounting import prepare_pairs
    from seqdpo.modeling import build_tiny_tokenizer

    cfg = fixture_cfg("pku_saferlhf")
    cfg.n_train, cfg.n_eval = 5, 2
    tok = build_tiny_tokenizer(1024)
    a, b = (prepare_pairs(build_objectives(cfg, seed=3), tok, cfg, 256, seed=3) for _ in range(2))
    assert len(a.train["safety"]) == 5 and len(a.eval["safety"]) == 2
    assert a.train["safety"]["pair_id"] == b.train["safety"]["pair_id"]


# --- hand-checked rows ---------------------------------------------------------------------------


def test_hh_rlhf_parses_the_dialogue():
    objectives = build_objectives(fixture_cfg("hh_rlhf"), seed=0)
    helpful = objectives["helpful"]
    row = by_id(helpful.train)["train-0"]
    assert row["prompt"] == [
        {"role": "user", "content": "What is a good way to learn to bake bread?"},
        {"role": "assistant", "content": "Start with a simple recipe and bake it a few times."},
        {"role": "user", "content": "Which recipe do you suggest?"},
    ]
    assert text(row["chosen"]) == "A basic no-knead loaf: flour, water, salt and yeast, left to rise overnight."
    assert text(row["rejected"]) == "Any recipe is fine."
    # rows 5 (different prefixes), 6 (chosen == rejected) and 7 (two human turns in a row) are dropped
    assert {"train-5", "train-6", "train-7"}.isdisjoint(helpful.train["pair_id"])
    assert helpful.stats["train"] == {
        "pairs": 17,
        "rows": 20,
        "dropped_prefix_mismatch": 1,
        "dropped_identical": 1,
        "dropped_malformed": 1,
        "marker_in_prompt_turn": 0,
        "marker_in_response": 0,
    }
    assert all(pid.startswith("test-") for pid in helpful.eval["pair_id"])
    harmless = by_id(objectives["harmless"].train)["train-0"]
    assert text(harmless["chosen"]).startswith("I won't help")


@pytest.mark.parametrize(
    "dialogue, expected",
    [
        ("\n\nHuman: Hi\n\nAssistant: Hello", ([("user", "Hi")], "Hello")),
        ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye", None),  # ends with the human
        ("\n\nHuman: Hi", None),  # no assistant turn
        ("Hi\n\nAssistant: Hello", None),  # text before the first speaker marker
        ("\n\nAssistant: Hi\n\nAssistant: Hello", None),  # the prompt would start with the assistant
    ],
)
def test_hh_dialogue_parsing(dialogue, expected):
    from seqdpo.data.hh_rlhf import ends_with_human, parse_turns, split_pair

    split = None if ends_with_human(dialogue) else split_pair(dialogue, dialogue + "!")
    parsed = None if split is None or parse_turns(split[0]) is None else (parse_turns(split[0]), split[1])
    assert parsed == expected


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("Hi", [("user", "Hi")]),
        (
            "Hi\n<extra_id_1>Assistant\nHello\n<extra_id_1>User\nBye",
            [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")],
        ),
        ("Hi\n<extra_id_1>Assistant\nHello", None),  # ends with the assistant
        ("Hi\n<extra_id_1>User\nAgain", None),  # two user turns in a row
    ],
)
def test_helpsteer2_prompt_parsing(prompt, expected):
    from seqdpo.data.helpsteer2 import parse_prompt

    assert parse_prompt(prompt) == expected


def test_pku_chosen_follows_each_label():
    rows = read_jsonl(FIXTURES / "pku_saferlhf" / "data" / "Alpaca-7B" / "train.jsonl")
    assert (rows[0]["better_response_id"], rows[0]["safer_response_id"]) == (1, 0)
    objectives = build_objectives(fixture_cfg("pku_saferlhf"), seed=0)
    helpful = by_id(objectives["helpfulness"].train)["train-0"]
    safe = by_id(objectives["safety"].train)["train-0"]
    assert text(helpful["chosen"]) == rows[0]["response_1"] and text(helpful["rejected"]) == rows[0]["response_0"]
    assert text(safe["chosen"]) == rows[0]["response_0"] and text(safe["rejected"]) == rows[0]["response_1"]
    # ids run across the three model folders in sorted order, as the hub concatenates them
    n_first = len(rows)
    second = read_jsonl(FIXTURES / "pku_saferlhf" / "data" / "Alpaca2-7B" / "train.jsonl")[0]
    assert (
        text(by_id(objectives["helpfulness"].train)[f"train-{n_first}"]["chosen"])
        == (second[f"response_{second['better_response_id']}"])
    )


def test_pku_conflict_fraction_and_strong_signal():
    rows = [r for d in sorted((FIXTURES / "pku_saferlhf" / "data").iterdir()) for r in read_jsonl(d / "train.jsonl")]
    conflicting = sum(r["better_response_id"] != r["safer_response_id"] for r in rows)
    strong = [
        r
        for r in rows
        if r["is_response_0_safe"] != r["is_response_1_safe"] and r[f"is_response_{r['safer_response_id']}_safe"]
    ]
    objectives = build_objectives(fixture_cfg("pku_saferlhf", strong_signal=True), seed=0)
    stats = objectives["safety"].stats["train"]
    assert stats["conflict_fraction"] == pytest.approx(conflicting / len(rows))
    assert objectives["helpfulness"].stats["train"]["conflict_fraction"] == stats["conflict_fraction"]
    assert len(objectives["safety"].train) == len(strong) < len(rows)
    assert len(objectives["helpfulness"].train) == len(rows)
    assert stats["dropped_not_strong_signal"] + stats["dropped_safety_label_contradicts_flags"] == len(rows) - len(
        strong
    )


def test_helpsteer2_pairs_ties_and_multi_turn():
    objectives = build_objectives(fixture_cfg("helpsteer2", ["helpfulness", "verbosity"]), seed=0)
    helpful, verbose = by_id(objectives["helpfulness"].train), by_id(objectives["verbosity"].train)
    # rows 0-1: helpfulness 4 vs 2 picks row 0, verbosity 1 vs 3 picks row 1
    assert text(helpful["train-0"]["chosen"]) == "Sleep restores the body and consolidates memory."
    assert text(verbose["train-0"]["rejected"]) == "Sleep restores the body and consolidates memory."
    # rows 2-3 tie on helpfulness: dropped there, kept for verbosity
    assert "train-2" not in helpful and "train-2" in verbose
    assert objectives["helpfulness"].stats["train"]["dropped_tie"] == 1
    # rows 4-5: the multi-turn prompt becomes three messages
    assert [m["role"] for m in helpful["train-4"]["prompt"]] == ["user", "assistant", "user"]
    assert helpful["train-4"]["prompt"][1]["content"] == "A three-line poem of 5, 7 and 5 syllables."
    assert helpful["train-4"]["prompt"][2]["content"] == "Write one about rain."
    # three consecutive rows share a prompt at the end (helpfulness 4, 1, 2): every two of them are a pair
    assert text(helpful["train-24-25"]["chosen"]) == text(helpful["train-24-26"]["chosen"])
    assert text(helpful["train-25-26"]["chosen"]) == text(helpful["train-24-26"]["rejected"])
    assert "train-24" not in helpful and "train-25" not in helpful
    stats = objectives["helpfulness"].stats["train"]
    assert (stats["unpaired_rows"], stats["same_prompt_pairs"]) == (0, 12 + 3)
    assert stats["same_prompt_pairs"] == stats["pairs"] + stats["dropped_tie"]
    assert all(pid.startswith("validation-") for pid in objectives["helpfulness"].eval["pair_id"])


def test_helpsteer2_min_margin_drops_close_pairs():
    loose = build_objectives(fixture_cfg("helpsteer2", ["helpfulness"]), seed=0)["helpfulness"]
    strict = build_objectives(fixture_cfg("helpsteer2", ["helpfulness"], min_margin=2), seed=0)["helpfulness"]
    assert 0 < len(strict.train) < len(loose.train)
    assert strict.stats["train"]["dropped_small_margin"] == len(loose.train) - len(strict.train)


def test_ultrafeedback_ratings_na_and_ties():
    cfg = fixture_cfg("ultrafeedback", eval_fraction=0.25)
    objectives = build_objectives(cfg, seed=0)
    row = read_jsonl(FIXTURES / "ultrafeedback" / "evol_instruct.jsonl")[0]
    responses = [c["response"] for c in row["completions"]]
    split = "train" if "train-0" in objectives["helpfulness"].train["pair_id"] else "eval"
    pairs = {a: by_id(getattr(o, split)) for a, o in objectives.items()}
    # helpfulness 4, N/A, 2, 4: the first of the tied 4s wins, the N/A completion is skipped
    assert text(pairs["helpfulness"]["train-0"]["chosen"]) == responses[0]
    assert text(pairs["helpfulness"]["train-0"]["rejected"]) == responses[2]
    # instruction_following 3, 5, 1, 5
    assert text(pairs["instruction_following"]["train-0"]["chosen"]) == responses[1]
    assert text(pairs["instruction_following"]["train-0"]["rejected"]) == responses[2]
    # honesty 3, 3, N/A, 3: all equal; truthfulness N/A, N/A, 5, N/A: one rated
    assert "train-0" not in pairs["honesty"] and "train-0" not in pairs["truthfulness"]
    stats = objectives["truthfulness"].stats[split]
    assert stats["dropped_fewer_than_two_rated"] == 1 and stats["unrated_completions"] == 3
    assert objectives["honesty"].stats[split]["dropped_all_equal"] == 1
    assert pairs["helpfulness"]["train-0"]["prompt"] == [{"role": "user", "content": row["instruction"]}]


def test_ultrafeedback_eval_prompts_are_held_out():
    objectives = build_objectives(fixture_cfg("ultrafeedback", eval_fraction=0.25), seed=0)
    for obj in objectives.values():
        train = {r["prompt"][0]["content"] for r in obj.train}
        held_out = {r["prompt"][0]["content"] for r in obj.eval}
        assert train and held_out and train.isdisjoint(held_out)
    # the fixture repeats one instruction in flan.jsonl and sharegpt.jsonl: both copies land on one side
    flan = read_jsonl(FIXTURES / "ultrafeedback" / "flan.jsonl")[3]["instruction"]
    prompts = [r["prompt"][0]["content"] for r in objectives["helpfulness"].train]
    held = [r["prompt"][0]["content"] for r in objectives["helpfulness"].eval]
    assert prompts.count(flan) + held.count(flan) == 2 and (flan in prompts) != (flan in held)


def test_revision_is_ignored_for_a_local_copy(caplog):
    cfg = fixture_cfg("helpsteer2")
    cfg.revision = "main"
    with caplog.at_level("WARNING", logger="seqdpo.data._loading"):
        assert build_objectives(cfg, seed=0)
    assert "dataset.revision=main is ignored because dataset.path is set" in caplog.text


def test_ultrafeedback_single_file_path():
    file = FIXTURES / "ultrafeedback" / "flan.jsonl"
    objectives = build_objectives(fixture_cfg("ultrafeedback", path=file, eval_fraction=0.5), seed=0)
    assert len(objectives["honesty"].train) + len(objectives["honesty"].eval) == len(read_jsonl(file))


# --- the hub code path (the only mock) -------------------------------------------------------------

HUB_CALLS = {
    "hh_rlhf": [
        ("Anthropic/hh-rlhf", None, d, s) for d in ("helpful-base", "harmless-base") for s in ("train", "test")
    ],
    "pku_saferlhf": [("PKU-Alignment/PKU-SafeRLHF", "default", None, s) for s in ("train", "test")],
    "helpsteer2": [("nvidia/HelpSteer2", None, None, s) for s in ("train", "validation")],
    "ultrafeedback": [("openbmb/UltraFeedback", None, None, "train")],
}


def _fixture_split(name: str, data_dir: str | None, split: str):
    """What the hub would serve: the fixture's files for the split, concatenated, as an Arrow table."""
    from datasets import Dataset

    root = FIXTURES / name / (data_dir or "")
    pattern = {"pku_saferlhf": f"data/*/{split}.jsonl", "ultrafeedback": "*.jsonl"}.get(name, f"{split}.jsonl.gz")
    return Dataset.from_list([r for f in sorted(root.glob(pattern)) for r in read_jsonl(f)])


@pytest.mark.parametrize("name", HUB_DATASETS)
@pytest.mark.parametrize("revision", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_hub_path_loads_the_pinned_revision(monkeypatch, name, revision):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, data_dir=None, revision=None, split=None, **kwargs):
        calls.append((path, name, data_dir, split, revision))
        return _fixture_split(path_to_dataset[path], data_dir, split)

    path_to_dataset = {DATASETS[n].hub_id: n for n in HUB_DATASETS}
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub_cfg = fixture_cfg(name)
    hub_cfg.path, hub_cfg.revision = None, revision
    from_hub = build_objectives(hub_cfg, seed=0)

    expected_revision = revision or DATASETS[name].revision
    assert sorted(calls) == sorted(c + (expected_revision,) for c in HUB_CALLS[name])
    # the hub and the local copy give the same pairs
    from_disk = build_objectives(fixture_cfg(name), seed=0)
    for objective, obj in from_hub.items():
        assert obj.train.to_list() == from_disk[objective].train.to_list()
        assert obj.eval.to_list() == from_disk[objective].eval.to_list()


def test_hub_errors_name_the_hub_split(monkeypatch):
    import datasets
    from datasets import Dataset

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_list([{"chosen": "x"}]))
    cfg = fixture_cfg("hh_rlhf", ["helpful"])
    cfg.path = None
    with pytest.raises(
        DataError,
        match=r"Anthropic/hh-rlhf@09be8c5\w+ data_dir=helpful-base split 'train' row 0: missing column 'rejected'",
    ):
        build_objectives(cfg, seed=0)


def test_offline_hub_is_one_paragraph_naming_dataset_path():
    """Was datasets' ConnectionError under a chain of tracebacks, with no word of dataset.path."""
    cfg = fixture_cfg("hh_rlhf", ["harmless"])
    cfg.path = None  # the tests run with HF_HUB_OFFLINE=1 (conftest): the real datasets code path refuses
    with pytest.raises(DataError) as e:
        build_objectives(cfg, seed=0)
    message = str(e.value)
    assert "Anthropic/hh-rlhf@09be8c5" in message and "dataset.path=DIR" in message
    assert "unset HF_HUB_OFFLINE" in message and "\n" not in message
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_unreachable_hub_fails_at_once_without_load_dataset_retries(monkeypatch):
    """Online mode without network: load_dataset's retries took ~25 s; one probe of the hub decides."""
    import datasets
    import huggingface_hub

    def refused(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")  # what a failed DNS lookup raises

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refused)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset retries for ~25 s"))
    cfg = fixture_cfg("pku_saferlhf")
    cfg.path = None
    with pytest.raises(DataError, match=r"PKU-Alignment/PKU-SafeRLHF@d79b19b\w+ name=default from the Hugging Face "
                       r"hub \(OSError: \[Errno -2\] Name or service not known\).*dataset.path=DIR.*network"):
        build_objectives(cfg, seed=0)


# --- bad input gives a clear error ------------------------------------------------------------------


def test_unknown_dataset():
    with pytest.raises(DataError, match=r"unknown dataset 'hh'; known: \[.*'hh_rlhf'"):
        build_objectives(DatasetConfig(name="hh", objectives=["helpful"]), seed=0)


def test_unknown_objective():
    with pytest.raises(DataError, match=r"no objective\(s\) \['honest'\]; it offers"):
        build_objectives(fixture_cfg("helpsteer2", ["honest"]), seed=0)


@pytest.mark.parametrize("name", HUB_DATASETS)
def test_unknown_option_lists_the_valid_ones(name):
    valid = {
        "hh_rlhf": "none",
        "pku_saferlhf": "strong_signal",
        "helpsteer2": "min_margin",
        "ultrafeedback": "eval_fraction",
    }
    with pytest.raises(DataError, match=rf"unknown option\(s\) \['bogus'\]; valid options: {valid[name]}"):
        build_objectives(fixture_cfg(name, bogus=1), seed=0)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("pku_saferlhf", {"strong_signal": "yes"}, "option 'strong_signal' must be a bool, got 'yes'"),
        ("helpsteer2", {"min_margin": 0}, "option 'min_margin' must be >= 1, got 0"),
        ("ultrafeedback", {"eval_fraction": 1.5}, r"option 'eval_fraction' must be in \(0, 1\), got 1.5"),
    ],
)
def test_bad_option_value(name, options, message):
    with pytest.raises(DataError, match=message):
        build_objectives(fixture_cfg(name, **options), seed=0)


def test_bad_value_names_file_row_and_column(copy_fixture):
    root = copy_fixture("pku_saferlhf")
    file = root / "data" / "Alpaca-7B" / "train.jsonl"
    rows = read_jsonl(file)
    rows[7]["safer_response_id"] = 2
    write_jsonl(file, rows)
    with pytest.raises(DataError, match=rf"{file} row 7 \(line 8\): column 'safer_response_id' must be 0 or 1, got 2"):
        build_objectives(fixture_cfg("pku_saferlhf", path=root), seed=0)


def test_missing_column(copy_fixture):
    root = copy_fixture("hh_rlhf")
    file = root / "harmless-base" / "test.jsonl.gz"
    rows = read_jsonl(file)
    del rows[2]["rejected"]
    write_jsonl(file, rows)
    with pytest.raises(DataError, match=rf"{file} row 2 \(line 3\): missing column 'rejected'"):
        build_objectives(fixture_cfg("hh_rlhf", path=root), seed=0)


@pytest.mark.parametrize(
    "name, file, column, value, message",
    [
        ("helpsteer2", "train.jsonl.gz", "verbosity", 7, "column 'verbosity' must be an integer score in 0..4, got 7"),
        (
            "helpsteer2",
            "train.jsonl.gz",
            "helpfulness",
            True,
            "column 'helpfulness' must be an integer score in 0..4, got True",
        ),
        (
            "pku_saferlhf",
            "data/Alpaca3-8B/test.jsonl",
            "is_response_1_safe",
            "no",
            "column 'is_response_1_safe' must be true or false",
        ),
    ],
)
def test_bad_value_in_a_row(copy_fixture, name, file, column, value, message):
    root = copy_fixture(name)
    rows = read_jsonl(root / file)
    rows[1][column] = value
    write_jsonl(root / file, rows)
    with pytest.raises(DataError, match=rf"{root / file} row 1 \(line 2\): {message}"):
        build_objectives(fixture_cfg(name, path=root), seed=0)


def test_bad_ultrafeedback_rating(copy_fixture):
    root = copy_fixture("ultrafeedback")
    rows = read_jsonl(root / "ultrachat.jsonl")
    rows[4]["completions"][2]["annotations"]["honesty"]["Rating"] = "6"
    write_jsonl(root / "ultrachat.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"ultrachat.jsonl row 4 \(line 5\): column 'completions\[2\].annotations.honesty.Rating' must be one of",
    ):
        build_objectives(fixture_cfg("ultrafeedback", path=root), seed=0)


def test_empty_split(copy_fixture):
    root = copy_fixture("helpsteer2")
    write_jsonl(root / "validation.jsonl.gz", [])
    with pytest.raises(DataError, match=r"split 'validation' has no rows"):
        build_objectives(fixture_cfg("helpsteer2", path=root), seed=0)


def test_empty_after_filtering(copy_fixture):
    root = copy_fixture("helpsteer2")
    rows = read_jsonl(root / "validation.jsonl.gz")
    write_jsonl(root / "validation.jsonl.gz", [{**r, "coherence": 2} for r in rows])
    with pytest.raises(
        DataError, match=r"objective 'coherence': the eval split is empty after filtering .*dropped_tie"
    ):
        build_objectives(fixture_cfg("helpsteer2", ["coherence"], path=root), seed=0)


def test_invalid_json_line(copy_fixture):
    root = copy_fixture("ultrafeedback")
    with open(root / "flan.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"flan.jsonl row 8 \(line 9\): not valid JSON"):
        build_objectives(fixture_cfg("ultrafeedback", path=root), seed=0)


def test_wrong_layout_names_the_expected_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"no file matches .*helpful-base/train.jsonl.gz.*needs the hub layout"):
        build_objectives(fixture_cfg("hh_rlhf", path=tmp_path), seed=0)
    with pytest.raises(DataError, match=r"is a file, but PKU-Alignment/PKU-SafeRLHF has splits \['train', 'test'\]"):
        build_objectives(fixture_cfg("pku_saferlhf", path=tmp_path / "train.jsonl"), seed=0)
    with pytest.raises(DataError, match=r"does not exist"):
        build_objectives(fixture_cfg("helpsteer2", path=tmp_path / "nowhere"), seed=0)
