"""Real dataset rows kept outside the project, in ../shared/data (its README: source, licence, schema).

Tests that read one skip, naming the file, when it is absent. SEQDPO_SHARED_DATA points at another
copy of that directory.
"""

import gzip
import os
from pathlib import Path

import pytest

from conftest import REPO

SHARED_DATA = Path(os.environ.get("SEQDPO_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    return SHARED_DATA / relative


def needs(path: Path, override: str = "set SEQDPO_SHARED_DATA to a directory that holds it") -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=(
        f"real rows not found: {path} is absent. Place the file listed in ../shared/data/README.md there, "
        f"or {override}"))


def read_lines(path: Path) -> list[str]:
    """The file's non-blank lines, as written (a .gz is decompressed), so copies keep the source's bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # level 1: a test's temp copy is read once, and level 9 costs seconds on the 2,312 HH rows
    with (gzip.open(path, "wt", encoding="utf-8", compresslevel=1) if path.suffix == ".gz"
          else open(path, "w", encoding="utf-8")) as f:
        f.writelines(lines)
