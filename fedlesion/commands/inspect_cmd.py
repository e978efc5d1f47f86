"""`fedlesion inspect`: what the node would make of a study (series, roles and why, b-values, geometry, warnings)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list a DICOM study's series with the role the node gives each and why",
        description="PATH is a folder of DICOM files (gzip-compressed ones too) or a DICOMDIR.",
    )
    parser.add_argument("path", metavar="PATH", help="DICOM folder or DICOMDIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.inspection import format_table, inspect_path

    inspection = inspect_path(Path(args.path))
    print(json.dumps(inspection, indent=2) if args.json else format_table(inspection))
    return 0
