"""`fedlesion segment`: one study through the node's pipeline without the network (mask.nii.gz + report.json).

The study's path is `inference.folder_study.segment_folder`: the node's model choice and series roles; this module
parses the arguments and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.manifest import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment one study (DICOM folder or NIfTI folder) and write mask.nii.gz and report.json",
        description=(
            "PATH is a DICOM folder (or DICOMDIR), or a folder with dwi.nii.gz + adc.nii.gz and/or flair.nii.gz "
            "(plus study.json from 'fedlesion convert'). Model: --model, else the one the node serves from its "
            "registry (newest verified version), else the embedded default (demo mode)."
        ),
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="DICOM folder or DICOMDIR, or a NIfTI folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--json", action="store_true", help="print report.json")
    parser.add_argument("--model", type=Path, metavar="PACKAGE_DIR", help="a signed model package to use")
    parser.add_argument("--task", choices=[task.value for task in Task], help="default: stroke when a DWI is present, else MS")
    parser.add_argument(
        "--b0", type=Path, metavar="B0.nii.gz", help="NIfTI input without ADC: compute it from this b0 and the DWI"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedlesion.settings import load_settings
    from inference.folder_study import segment_folder

    settings = load_settings(Path(args.config) if args.config else None)
    result = segment_folder(
        args.path,
        args.out,
        registry_dir=settings.registry_dir,
        enrollment_bundle=settings.models.enrollment_bundle,
        inference=settings.inference,
        task=Task(args.task) if args.task else None,
        model=args.model,
        b0=args.b0,
    )
    if args.json:
        print(json.dumps(result.report, indent=2, ensure_ascii=False))
    else:
        print(
            f"{result.task.value}: {result.lesion_count} lesion(s), {result.total_volume_ml:.2f} ml"
            + (f", ADC core {result.adc_core_volume_ml:.2f} ml" if result.adc_core_volume_ml is not None else "")
            + f" (model v{result.model.version}{', demo' if result.model.demo else ''}) → {args.out}"
        )
        for warning in result.warnings:
            print(f"warning: {warning}")
    return 0
