"""`fedlesion fingerprint`: the aggregates a site may share about a dataset (design.md §7), computed locally."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from models.manifest import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fingerprint",
        help="summarise a training dataset with shareable aggregates only (no case IDs, no per-case values)",
        description="SPEC is a CSV manifest (case_id, one column per channel, mask), an ISLES'22 folder "
        "(rawdata/ + derivatives/, or flat) or a folder of MS cases (one per sub-folder). "
        "Cases that cannot be loaded are skipped and logged locally; the fingerprint only counts them.",
    )
    parser.add_argument("--task", required=True, choices=[task.value for task in Task])
    parser.add_argument("--data", required=True, metavar="SPEC", help="CSV manifest or dataset folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of indented text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.datasets import load_cases, open_dataset
    from training.fingerprint import fingerprint

    cases, skipped = load_cases(open_dataset(args.data, args.task))
    if not cases:
        raise ValueError(f"no loadable case in {args.data} ({len(skipped)} skipped, see the warnings above)")
    result = fingerprint(cases)
    if skipped:
        print(f"fingerprint: {len(skipped)} case(s) skipped (see the warnings above)", file=sys.stderr)
    print(json.dumps(result, allow_nan=False) if args.json else "\n".join(_lines(result)))
    return 0


def _lines(value: Any, indent: str = "") -> list[str]:
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_lines(item, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {item}")
    return lines
