"""MkDocs hook: pages whose text lives elsewhere, filled in at build time so that it lives in one place.

- `<!-- config-reference -->`: the table of every config key, made from the dataclasses of
  `seqdpo/config.py`, the one place that holds each key's type, default and comment.
- `<!-- readme -->`: the repository's README.md, the site's home page, with its `docs/` links made
  relative to the site. Strict builds then check the README's links too.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import re
import tokenize
import typing
from pathlib import Path

CONFIG_MARKER = "<!-- config-reference -->"
README_MARKER = "<!-- readme -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines right above it plus its trailing comment, in source order."""
    source = inspect.getsource(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    pending: list[str] = []
    field_line: dict[int, str] = {}
    for line_no, line in enumerate(source.splitlines(), start=1):
        head = line.strip().split(":", 1)[0]
        if head in names and line.startswith("    ") and not line.startswith("     "):
            field_line[line_no] = head
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    trailing: dict[int, str] = {}
    own_line: dict[int, str] = {}
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (own_line if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
    for line_no in range(1, len(source.splitlines()) + 1):
        if line_no in own_line:
            pending.append(own_line[line_no])
        elif line_no in field_line:
            parts = pending + ([trailing[line_no]] if line_no in trailing else [])
            comments[field_line[line_no]] = " ".join(parts)
            pending = []
        else:
            pending = []
    return comments


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _type_name(tp: object) -> str:
    name = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return name or str(tp).replace("typing.", "")


def rows(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf key of the schema, depth first."""
    from omegaconf import MISSING as OMEGA_MISSING

    from seqdpo.config import RunConfig

    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(rows(tp, key + "."))
            continue
        default = _default(f)
        shown = "set by the group file" if default in (dataclasses.MISSING, OMEGA_MISSING) else f"`{_show(default)}`"
        out.append((key, _type_name(tp), shown, comments.get(f.name, "")))
    return out


def table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, meaning in rows():
        lines.append(f"| `{key}` | `{tp}` | {default} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def readme() -> str:
    return re.sub(r"\]\(docs/", "](", README.read_text())


def on_page_markdown(markdown: str, **_) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, table())
    if README_MARKER in markdown:
        markdown = markdown.replace(README_MARKER, readme())
    return markdown
