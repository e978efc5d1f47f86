"""`fedlesion synth`: write seeded synthetic studies (NIfTI, optionally DICOM) for demos, tests and training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

GEOMETRIES = ("axial", "flipped", "oblique", "sagittal")
# A patient name per character set that only survives if the set is declared and encoded right.
PATIENT_NAMES = {"ISO_IR 100": "Müller^Jürgen", "ISO_IR 192": "山田^太郎"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="generate synthetic stroke or MS studies")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (one case-NNN sub-folder per case)")
    parser.add_argument("--kind", required=True, choices=("stroke", "ms"))
    parser.add_argument("--cases", type=int, default=1, metavar="N", help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="run seed; case i uses a seed derived from (S, i)")
    parser.add_argument("--geometry", choices=GEOMETRIES, default="axial")
    parser.add_argument("--skull-stripped", action="store_true", help="brain only, zero background")
    parser.add_argument("--site-seed", type=int, metavar="S", help="draw one random site profile for all cases")
    parser.add_argument("--dicom", action="store_true", help="also write a DICOM study under case-NNN/dicom/")
    parser.add_argument(
        "--charset", choices=tuple(PATIENT_NAMES), default="ISO_IR 192",
        help="DICOM SpecificCharacterSet, with a patient name that needs it (default ISO_IR 192)",
    )
    parser.add_argument(
        "--negatives", action="store_true",
        help="with --dicom, also write the series that must get no role: T1-FLAIR, post-contrast FLAIR, eADC",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: `training` is heavy-ish and only this command needs it.
    from training.synthetic import derived_seed, generate_case, generate_site, write_nifti_case

    if args.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {args.cases}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if args.negatives and not args.dicom:
        raise ValueError("--negatives needs --dicom")
    if args.site_seed is not None and args.site_seed < 0:
        raise ValueError(f"--site-seed must be non-negative, got {args.site_seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    site = generate_site(args.site_seed) if args.site_seed is not None else None
    for index in tqdm(range(args.cases), disable=args.cases <= 1, file=sys.stderr, desc="synth", unit="case"):
        case_dir = out / f"case-{index:03d}"
        case = generate_case(
            args.kind,
            derived_seed(args.seed, index),
            site=site,
            geometry=args.geometry,
            skull_stripped=args.skull_stripped,
            case_id=f"case-{index:03d}",
        )
        write_nifti_case(case, case_dir)
        if args.dicom:
            from training.synthetic.dicom_writer import write_dicom_study

            write_dicom_study(
                case, case_dir / "dicom", patient_name=PATIENT_NAMES[args.charset], patient_id=case.case_id,
                charset=args.charset, negatives=args.negatives,
            )
    return 0
