"""`fedlesion receive`: run the DICOM receiver alone (store studies, mark them ready; no inference)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "receive",
        help="run the DICOM storage SCP only: spool studies and queue them as ready (no inference)",
        description="Uses [node] ae_title/dicom_port, [dicom] and [storage] data_dir from the settings.",
    )
    parser.add_argument("--port", type=int, metavar="N", help="override node.dicom_port (0: any free port)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.receiver import run_receiver
    from fedlesion.settings import load_settings

    settings = load_settings(Path(args.config) if args.config else None)
    port = settings.node.dicom_port if args.port is None else args.port
    return run_receiver(
        settings.storage.data_dir, settings.node.ae_title, settings.dicom, port, log_level=settings.logging.level
    )
