"""`fedlesion node`: the clinical node — DICOM receiver, inference workers, sender and web page, until SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help="run the node: receive studies over DICOM, segment them, send SEG/SC/SR back, serve the web page",
        description="Everything comes from the settings ([node], [dicom], [tasks], [inference], [storage], "
        "[models]); without models.enrollment_bundle the node runs the embedded demo models in demo mode, with it "
        "it pulls released models from the bundle's coordinator.",
    )
    parser.add_argument("--dicom-port", type=int, metavar="N", help="override node.dicom_port (0: any free port)")
    parser.add_argument("--web-port", type=int, metavar="N", help="override node.web_port (0: any free port)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedlesion.settings import load_settings
    from inference.node import Node, run_node

    settings = load_settings(Path(args.config) if args.config else None)
    node = Node(
        settings.storage.data_dir,
        node=settings.node,
        dicom=settings.dicom,
        tasks=settings.tasks,
        inference=settings.inference,
        model_settings=settings.models,
        log_level=settings.logging.level,
        dicom_port=args.dicom_port,
        web_port=args.web_port,
    )
    return run_node(node)
