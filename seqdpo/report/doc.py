"""One description of the summary rendered to markdown (images linked) and to self-contained HTML
(images embedded as base64 data URIs, so the file can be mailed on its own)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


class Doc:
    """Blocks rendered to markdown and HTML from one description."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame):
        if df is not None and len(df):
            self.blocks.append(("table", df))

    def img(self, path: Path | None, rel_to: Path):
        if path is not None:
            self.blocks.append(("img", str(path.relative_to(rel_to)), Path(path)))

    @property
    def images(self) -> list[str]:
        return [b[1] for b in self.blocks if b[0] == "img"]

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "img":
                out.append(f"![{b[1]}]({b[1]})")
            else:
                df = b[1]
                cols = [str(c) for c in df.columns]
                lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
                for row in df.itertuples(index=False):
                    lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
                out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
               "font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
               "img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "img":
                data = base64.b64encode(b[2].read_bytes()).decode("ascii")
                out.append(f"<img alt='{html.escape(b[1])}' src='data:image/png;base64,{data}'>")
            else:
                out.append(b[1].map(_fmt).to_html(index=False, escape=True))
        out.append("</body></html>")
        return "\n".join(out)
