"""`fedlesion convert`: a DICOM study to the NIfTI files the node would segment, plus study.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="write dwi/adc/flair.nii.gz (ADC in 10⁻⁶ mm²/s) and study.json for the roles found in a DICOM study",
        description="PATH is a folder of DICOM files (gzip-compressed ones too) or a DICOMDIR.",
    )
    parser.add_argument("path", metavar="PATH", help="DICOM folder or DICOMDIR")
    parser.add_argument("outdir", metavar="OUTDIR", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.convert import convert_study

    written = convert_study(Path(args.path), Path(args.outdir))
    for path in written:
        print(path)
    return 0
