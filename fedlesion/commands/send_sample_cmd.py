"""`fedlesion send-sample`: send a seeded synthetic study to a node, as a PACS would, and mark it complete.

Why: a new node can be tried end to end without patient data. The study comes from `training.synthetic` (numpy,
scipy and pydicom only, so the torch-free install has it). After the last C-STORE the study is completed with the
explicit trigger in the node's studies database when it is on this machine (`--data-dir`, default the settings'
data directory); otherwise the node completes it itself after `dicom.inactivity_timeout_s`, or at once when the
calling AE title is in the node's `dicom.complete_on_release`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlesion.settings import Settings

SEND_AE_TITLE = "FEDLESION_SEND"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "send-sample",
        help="send a synthetic stroke or MS study to a node over DICOM (C-STORE) and mark it complete",
        description="Defaults come from the settings: [node] ae_title and dicom_port, [storage] data_dir.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the node's host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, metavar="N", help="the node's DICOM port (default node.dicom_port)")
    parser.add_argument("--aet", metavar="AE", help="the node's AE title (default node.ae_title)")
    parser.add_argument("--calling-aet", default=SEND_AE_TITLE, metavar="AE", help=f"ours (default {SEND_AE_TITLE})")
    parser.add_argument("--kind", choices=("stroke", "ms"), default="stroke", help="which synthetic study")
    parser.add_argument("--seed", type=int, default=1, help="the same seed sends the same study (default 1)")
    parser.add_argument(
        "--data-dir", type=Path, metavar="DIR",
        help="the node's data directory, for the explicit completion (default storage.data_dir)",
    )
    parser.add_argument("--no-complete", action="store_true", help="only send; let the node's timeout complete it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.scu import send_study
    from fedlesion.settings import load_settings
    from training.synthetic import generate_case
    from training.synthetic.dicom_writer import write_dicom_study

    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    settings = load_settings(Path(args.config) if args.config else None)
    port = settings.node.dicom_port if args.port is None else args.port
    aet = args.aet or settings.node.ae_title
    options = {"size": "medium", "pattern": "single"} if args.kind == "stroke" else {}
    case = generate_case(args.kind, args.seed, **options)
    with tempfile.TemporaryDirectory(prefix="fedlesion-sample-") as tmp:
        files = write_dicom_study(case, Path(tmp), patient_name=f"Synthetic^{args.kind.title()}")
        study_uid = send_study(files, args.host, port, aet, args.calling_aet)
    for lesion in case.lesions:
        print(f"  truth: lesion {lesion.label} {lesion.volume_ml:.2f} ml, patient {lesion.side}")
    print(f"sent {len(files)} instances of study {study_uid} to {aet}@{args.host}:{port}")
    if args.no_complete:
        return 0
    return complete_locally(settings, args.data_dir, study_uid)


def complete_locally(settings: Settings, data_dir: Path | None, study_uid: str) -> int:
    """The explicit trigger in the node's own studies database, when that database is on this machine."""
    from dataclasses import replace

    from dicom_gateway.studies import database_path
    from fedlesion.commands.study_cmd import complete_study

    if data_dir is not None:
        settings = replace(settings, storage=replace(settings.storage, data_dir=data_dir))
    if not database_path(settings.storage.data_dir).exists():
        print(
            f"no node database at {database_path(settings.storage.data_dir)}: the node completes the study after "
            f"dicom.inactivity_timeout_s ({settings.dicom.inactivity_timeout_s:g} s) of silence"
        )
        return 0
    return complete_study(settings, study_uid)
