"""`fedlesion reprocess STUDY_UID`: new jobs for a study's latest revision, run with the model serving now.

A new model version never reprocesses old studies by itself (design.md §5); this command (or the web page) does.
It writes to the job queue directly, so the running node's workers pick the jobs up whether or not it restarts.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reprocess", help="queue new jobs for a study's latest revision")
    parser.add_argument("study_uid", metavar="STUDY_UID", help="Study Instance UID")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.studies import StudyIndex, database_path, spool_root
    from fedlesion.settings import load_settings
    from inference.jobs import JobQueue, JobState, registry_tasks

    settings = load_settings(Path(args.config) if args.config else None)
    data_dir = settings.storage.data_dir
    if not database_path(data_dir).exists():
        raise ValueError(f"unknown study {args.study_uid}: no studies database at {database_path(data_dir)}")
    index = StudyIndex(database_path(data_dir), spool_root(data_dir), settings.dicom)
    queue = JobQueue(
        data_dir, tasks=settings.tasks, inference=settings.inference, dicom=settings.dicom,
        installed=lambda: registry_tasks(data_dir, settings.models),
    )
    try:
        jobs = queue.reprocess(args.study_uid, index)
    finally:
        queue.close()
        index.close()
    if not jobs:
        print(f"study {args.study_uid}: its latest revision already has queued or running jobs; nothing added")
    for job in jobs:
        if job.state is JobState.NOT_PROCESSED:
            print(f"study {job.study_uid}: revision {job.revision} not processed: {job.reason}")
        else:
            print(f"study {job.study_uid}: revision {job.revision}, job {job.id} ({job.task.short_name}) queued")
    return 0
