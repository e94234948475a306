"""The docs: the generated config table matches the schema, every page is in the site, nothing points outside.

`mkdocs build --strict` (in .ci/run) checks links and anchors between pages; these tests check what it
cannot see or what should fail without mkdocs installed.
"""

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import yaml

from seqdpo.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("docs_hook", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def test_config_table_has_every_schema_key_with_its_default():
    rows = {key: (default, meaning) for key, _, default, meaning in _hook().rows()}
    leaves = dict(_leaves(RunConfig))
    assert set(rows) == set(leaves)
    assert rows["beta"][0] == "`0.3`"
    assert rows["eval.tie_tolerance"][0] == "`1e-06`"
    assert rows["lora.target_modules"][0].startswith('`["q_proj"')
    assert rows["model.name"][0] == "set by the group file"
    for key, f in leaves.items():
        if f.default is not dataclasses.MISSING and not isinstance(f.default, str):
            assert str(f.default).lower() in rows[key][0].lower() or f.default is None, key


def test_config_table_carries_the_comment_above_a_field_and_the_one_beside_it():
    rows = {key: meaning for key, _, _, meaning in _hook().rows()}
    assert rows["dataset.max_overlap"].startswith("Eval pairs that are also training pairs")
    assert rows["eval.generation.min_p"].startswith("drop tokens below min_p")


def test_every_page_is_in_the_site_navigation_and_every_nav_entry_exists():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entries):
        for entry in entries:
            for value in entry.values():
                yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(nav))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == on_disk


def _markdown_files():
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *DOCS.rglob("*.md")]


def test_no_page_points_outside_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)")
    for page in _markdown_files():
        text = page.read_text()
        assert "/work/" not in text and "../shared" not in text, page
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.exists() and ROOT in resolved.parents, f"{page}: {target}"


def test_readme_is_short_and_states_the_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci
    assert "python -m pytest -q" in readme
