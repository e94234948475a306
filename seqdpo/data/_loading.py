"""Shared loading for the hub-backed builders: hub or local copy, row references, schema checks.

A builder describes where its splits live in the hub repository (`Layout`) and reads them with
`read_split`. With `dataset.path` unset the split comes from `datasets.load_dataset(hub_id,
revision=...)`; with `dataset.path` set it comes from the same files the hub repository holds, in the
same directory layout, read line by line so that an error can name the file and the line. Either
way the builder sees one stream of `(RowRef, row dict)` and validates the columns it uses with
`column()`, which raises `DataError` naming the file, split, row and column and what was expected.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from seqdpo.data.registry import PAIR_COLUMNS, DataError, Objective

log = logging.getLogger(__name__)

_MISSING = object()


@dataclass(frozen=True)
class Layout:
    """Where one set of splits lives in a hub dataset repository.

    `files` maps each hub split name to glob patterns relative to the repository root joined with
    `data_dir`: the card's `data_files`, which a local copy must reproduce.
    """

    hub_id: str
    files: dict[str, tuple[str, ...]]
    name: str | None = None  # load_dataset config name
    data_dir: str | None = None  # load_dataset data_dir (a subdirectory of the repository)


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: `source` is a file or a hub split, `row` counts from 0 in that source."""

    source: str
    row: int
    index: int  # position in the whole split (all of its files in order): the basis of pair ids
    line: int | None = None  # 1-based line in a local file

    def __str__(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.source} row {self.row}{line}"


def read_split(path: str | None, revision: str | None, layout: Layout, split: str) -> Iterator[tuple[RowRef, dict]]:
    """Yields every row of one split, from the hub (path None) or from a local copy in the hub layout.

    Raises:
        DataError: the local layout lacks the split's files, a line is not JSON, or the split is empty.
    """
    if path is None:
        where = f"{_hub_label(revision, layout)} split '{split}'"
        rows = _hub_rows(revision, layout, split, where)
    else:
        files = split_files(path, layout, split)
        where = " + ".join(files)
        rows = _local_rows(files)
    empty = True
    for ref, row in rows:
        empty = False
        if not isinstance(row, dict):
            raise DataError(f"{ref}: expected a JSON object, got {type(row).__name__}")
        yield ref, row
    if empty:
        raise DataError(f"{where}: split '{split}' has no rows")


def _hub_rows(revision: str | None, layout: Layout, split: str, source: str) -> Iterator[tuple[RowRef, dict]]:
    import datasets
    from huggingface_hub import is_offline_mode

    if not is_offline_mode():
        _check_hub_reachable(revision, layout)
    try:
        ds = datasets.load_dataset(
            layout.hub_id, name=layout.name, data_dir=layout.data_dir, revision=revision, split=split
        )
    except ConnectionError as e:  # offline mode, and the dataset is not in the local Hugging Face cache
        raise DataError(_unreachable(revision, layout, e)) from None
    for i, row in enumerate(ds):
        yield RowRef(source, i, i), row


def _check_hub_reachable(revision: str | None, layout: Layout) -> None:
    """One quick request before load_dataset, whose retries take ~25 s to give up on an unreachable hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(layout.hub_id, revision=revision, timeout=10)
    except HfHubHTTPError:
        return  # the hub answered (e.g. a gated dataset): load_dataset says what is wrong
    except Exception as e:  # no network, DNS, proxy, timeout: httpx and OS errors share no base class
        raise DataError(_unreachable(revision, layout, e)) from None


def _unreachable(revision: str | None, layout: Layout, error: BaseException) -> str:
    """One paragraph: what could not be read, why, and the way out (a local copy via dataset.path)."""
    from huggingface_hub import is_offline_mode

    online = "unset HF_HUB_OFFLINE" if is_offline_mode() else "check the network or proxy"
    return (
        f"cannot load {_hub_label(revision, layout)} from the Hugging Face hub ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no detail'}). dataset.path is not set, so the data "
        f"must come from the hub. Way out: on a machine with hub access run `huggingface-cli download "
        f"{layout.hub_id} --repo-type dataset --revision {revision or 'main'} --local-dir DIR`, copy DIR here "
        f"and run with dataset.path=DIR (layout under DIR: {_expected_files(layout)}); or {online} if this "
        "machine should reach the hub."
    )


def _local_rows(files: list[str]) -> Iterator[tuple[RowRef, dict]]:
    index = 0
    for file in files:
        for row, (line, record) in enumerate(_read_jsonl(file)):
            yield RowRef(file, row, index, line), record
            index += 1


def split_files(path: str, layout: Layout, split: str) -> list[str]:
    """The local files of one split, sorted as the hub resolves `data_files` patterns.

    A single file stands for the only split of a one-split dataset; otherwise `path` must be a
    directory laid out like the hub repository.
    """
    if not os.path.exists(path):
        raise DataError(f"dataset.path '{path}' does not exist (expected a local copy of {layout.hub_id})")
    if os.path.isfile(path):
        if len(layout.files) != 1:
            raise DataError(
                f"dataset.path '{path}' is a file, but {layout.hub_id} has splits {list(layout.files)} in "
                f"separate files: point dataset.path at a directory laid out like the hub repository "
                f"({_expected_files(layout)})"
            )
        return [path]
    root = os.path.join(path, layout.data_dir) if layout.data_dir else path
    files = []
    for pattern in layout.files[split]:
        matched = sorted(glob.glob(os.path.join(root, pattern)))
        if not matched:
            raise DataError(
                f"dataset.path '{path}': no file matches '{os.path.join(root, pattern)}' for split '{split}'; "
                f"a local copy of {layout.hub_id} needs the hub layout: {_expected_files(layout)}"
            )
        files.extend(matched)
    return files


def _read_jsonl(file: str) -> Iterator[tuple[int, Any]]:
    """Yields (1-based line number, parsed object) for every non-blank line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if file.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        row = 0
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file} row {row} (line {line_no}): not valid JSON ({e.msg})") from None
            row += 1


def _expected_files(layout: Layout) -> str:
    prefix = f"{layout.data_dir}/" if layout.data_dir else ""
    return ", ".join(f"{split}: {prefix}{' + '.join(p)}" for split, p in layout.files.items())


def _hub_label(revision: str | None, layout: Layout) -> str:
    parts = [f"{layout.hub_id}@{revision or 'default branch'}"]
    parts += [f"{k}={v}" for k, v in (("name", layout.name), ("data_dir", layout.data_dir)) if v]
    return " ".join(parts)


def resolve_revision(path: str | None, revision: str | None, pinned: str | None, dataset: str) -> str | None:
    """The hub revision to load: dataset.revision if set, else the registry's pin; unused with a local path."""
    if path is not None:
        if revision is not None:
            log.warning("dataset '%s': dataset.revision=%s is ignored because dataset.path is set", dataset, revision)
        return None
    return revision if revision is not None else pinned


def column(
    row: dict, ref: RowRef, name: str, check: Callable[[Any], bool], expected: str, label: str | None = None
) -> Any:
    """Returns row[name] after checking it; a missing column or a failed check raises DataError.

    A None value counts as missing: the hub's Arrow tables fill absent keys with None. `label` names
    a nested column in messages (e.g. 'completions[2].response').
    """
    label = label or name
    value = row.get(name, _MISSING)
    if value is _MISSING or value is None:
        raise DataError(f"{ref}: missing column '{label}' (expected {expected}; found columns {sorted(row)})")
    if not check(value):
        raise DataError(f"{ref}: column '{label}' must be {expected}, got {_short(value)}")
    return value


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def is_int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    """Check for an int in [lo, hi]; bool is rejected although Python counts it as an int."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_options(dataset: str, options: dict, defaults: dict[str, Any]) -> dict[str, Any]:
    """Merges `dataset.options` over the builder's defaults, checking names and types.

    Raises:
        DataError: an unknown option (the message lists the valid ones) or a value of the wrong type.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items()) or "none"
        raise DataError(f"dataset '{dataset}': unknown option(s) {unknown}; valid options: {valid}")
    out = dict(defaults)
    for key, value in options.items():
        want = type(defaults[key])
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise DataError(f"dataset '{dataset}': option '{key}' must be a {want.__name__}, got {value!r}")
        out[key] = value
    return out


def is_alternating(turns: list[tuple[str, str]]) -> bool:
    """True when (role, content) turns alternate user, assistant, ..., end with a user turn, and none is empty.

    That is what the row contract asks of a prompt, and what every chat template accepts.
    """
    roles = [role for role, _ in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    return bool(turns) and roles == expected and roles[-1] == "user" and all(content for _, content in turns)


def to_messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(role, content) pairs to the chat-message dicts of the row contract."""
    return [{"role": role, "content": content} for role, content in turns]


class PairSet:
    """One objective split under construction: its contract rows and counts of what was read and dropped."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.stats: Counter = Counter()

    def add(self, pair_id: str, prompt: list[dict[str, str]], chosen: str, rejected: str) -> bool:
        """Adds a pair unless a response is empty or both are the same text (no preference to learn).

        Returns whether the pair was added.
        """
        if not chosen.strip() or not rejected.strip():
            self.drop("empty_response")
            return False
        if chosen == rejected:
            self.drop("identical")
            return False
        self.rows.append(
            {
                "pair_id": pair_id,
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
        return True

    def drop(self, reason: str) -> None:
        self.stats[f"dropped_{reason}"] += 1

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({c: [r[c] for r in self.rows] for c in PAIR_COLUMNS})

    def summary(self) -> dict[str, Any]:
        return {"pairs": len(self.rows), **dict(sorted(self.stats.items()))}


def make_objective(name: str, description: str, train: PairSet, eval_: PairSet) -> Objective:
    """The Objective of two finished PairSets; stats holds each split's counts under 'train' and 'eval'."""
    return Objective(
        name,
        train.dataset(),
        eval_.dataset(),
        description=description,
        stats={"train": train.summary(), "eval": eval_.summary()},
    )
