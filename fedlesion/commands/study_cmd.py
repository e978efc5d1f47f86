"""`fedlesion study`: the receiving node's studies table (list, and the explicit completion trigger)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_gateway.studies import StudyIndex
    from fedlesion.settings import Settings


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
    return complete_study(_settings(args), args.study_uid)


def run_list(args: argparse.Namespace) -> int:
    return list_studies(_settings(args), as_json=args.json)


def complete_study(settings: Settings, study_uid: str) -> int:
    """Completes in the database directly, whether or not the receiver runs."""
    from dicom_gateway.studies import CompletionOutcome, CompletionTrigger, database_path
    from dicom_gateway.uids import is_valid_uid

    if not is_valid_uid(study_uid):
        raise ValueError(f"not a valid Study Instance UID: {study_uid!r} (digits and dots, at most 64 characters)")
    index = _open_existing(settings)
    if index is None:
        raise ValueError(
            f"unknown study {study_uid}: no studies database at {database_path(settings.storage.data_dir)}"
        )
    try:
        result = index.complete(study_uid, CompletionTrigger.EXPLICIT)
    finally:
        index.close()
    messages = {
        CompletionOutcome.NEW_REVISION: f"study {study_uid}: revision {result.revision} is ready",
        CompletionOutcome.UNCHANGED: f"study {study_uid}: usable series unchanged, stays at revision {result.revision}",
        CompletionOutcome.NOT_RECEIVING: f"study {study_uid}: already complete at revision {result.revision}",
        CompletionOutcome.DEFERRED: f"study {study_uid}: instances are still arriving; it completes when they stop",
    }
    print(messages[result.outcome])
    return 0


def list_studies(settings: Settings, as_json: bool = False) -> int:
    index = _open_existing(settings)
    studies = []
    if index is not None:
        try:
            studies = index.list_studies()
        finally:
            index.close()
    if as_json:
        json.dump([asdict(study) for study in studies], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'STUDY INSTANCE UID':<64}  {'STATE':<10}  {'REV':>3}  {'INSTANCES':>9}  {'LAST ACTIVITY (UTC)':<19}")
    for study in studies:
        count = f"{study.instance_count}" + (f"/{study.announced_count}" if study.announced_count else "")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(study.last_activity))
        print(f"{study.study_uid:<64}  {study.state:<10}  {study.revision:>3}  {count:>9}  {when:<19}")
    return 0


def _open_existing(settings: Settings) -> StudyIndex | None:
    """The node's studies table when it exists; a listing or completion never creates one."""
    from dicom_gateway.studies import StudyIndex, database_path, spool_root

    path = database_path(settings.storage.data_dir)
    if not path.exists():
        return None
    return StudyIndex(path, spool_root(settings.storage.data_dir), settings.dicom)


def _settings(args: argparse.Namespace) -> Settings:
    from fedlesion.settings import load_settings

    return load_settings(Path(args.config) if args.config else None)
