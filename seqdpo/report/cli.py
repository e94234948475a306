"""`python -m seqdpo.report <multirun dir> [--out DIR] [--html]`, also installed as `seqdpo-report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seqdpo.report.build import build_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seqdpo-report", description="Sweep report over a multirun directory (see seqdpo/report/__init__.py).")
    ap.add_argument("multirun_dir", type=Path, help="a Hydra multirun directory (or any directory holding job dirs)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <multirun_dir>/report)")
    ap.add_argument("--html", action="store_true", help="also write summary.html")
    args = ap.parse_args(argv)
    if not args.multirun_dir.is_dir():
        print(f"seqdpo-report: {args.multirun_dir} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.multirun_dir / "report"
    w = build_report(args.multirun_dir, out, html_too=args.html)
    print(f"seqdpo-report: {w['jobs']} job(s) read; summary {w['summary']}; {len(w['plots'])} plot(s) in {out}")
    return 0

