"""`fedlesion report`: render a study folder's report again from its files (training/study/report.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="render the report.md and plots of a `fedlesion simulate` folder")
    parser.add_argument("out", type=Path, metavar="DIR", help="the folder `fedlesion simulate --out` wrote")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return print_report(args.out)


def print_report(out: Path) -> int:
    """Write DIR/report.md and its plots, and print the comparison it opens with."""
    from training.study.report import write_report

    report, comparison = write_report(out)
    print("\n".join(comparison))
    print(f"report: {report}")
    return 0
