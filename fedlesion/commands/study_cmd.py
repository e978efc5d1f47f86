"""`fedlesion study`: the receiving node's studies table (list, and the explicit completion trigger)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("study", help="list received studies or mark one complete")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    complete = actions.add_parser("complete", help="the study has been sent in full: hand it to the job queue")
    complete.add_argument("study_uid", metavar="UID", help="Study Instance UID")
    complete.set_defaults(func=run_complete)
    listing = actions.add_parser("list", help="studies with their state, revision and instance count")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_list)


def run_complete(args: argparse.Namespace) -> int:
    from dicom_gateway.studies import complete_study_command

    return complete_study_command(_settings(args), args.study_uid)


def run_list(args: argparse.Namespace) -> int:
    from dicom_gateway.studies import list_studies_command

    return list_studies_command(_settings(args), as_json=args.json)


def _settings(args: argparse.Namespace):
    from fedlesion.settings import load_settings

    return load_settings(Path(args.config) if args.config else None)
