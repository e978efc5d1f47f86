"""`fedlesion evaluate`: score predictions against ground truth with the ISLES'22 metrics (design.md §9)."""

from __future__ import annotations

import argparse
import json
import math

from models.metrics import (
    DEFAULT_CASE_REGEX,
    LARGE_ABOVE_ML,
    SMALL_BELOW_ML,
    CaseMetrics,
    DatasetResult,
    evaluate_dataset,
    evaluate_files,
)

# The columns of the per-case table; the JSON output carries every metric.
TABLE_COLUMNS = ("dice", "avd_ml", "ald", "lf1", "gt_volume_ml", "pred_volume_ml", "size_category")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, AVD, ALD, lesion F1 of one prediction or a folder of them (ISLES'22 definitions)",
        description="Masks are binarized as value > 0; lesions are 26-connected components. "
        "Use --pred with --gt for one case, --pred-dir with --gt-dir for a dataset (mean ± SD).",
    )
    # Not `required=True`: argparse would then report a missing group before an unknown flag; run() checks instead.
    pred = parser.add_mutually_exclusive_group()
    pred.add_argument("--pred", metavar="NIFTI", help="predicted mask of one case")
    pred.add_argument("--pred-dir", metavar="DIR", help="folder of predicted masks (.nii/.nii.gz)")
    gt = parser.add_mutually_exclusive_group()
    gt.add_argument("--gt", metavar="NIFTI", help="ground-truth mask of one case")
    gt.add_argument("--gt-dir", metavar="DIR", help="folder of ground-truth masks (.nii/.nii.gz)")
    parser.add_argument("--case-regex", metavar="REGEX",
                        help=f"dataset mode: case ID = first group of this regex in the file name "
                        f"(default {DEFAULT_CASE_REGEX!r})")
    parser.add_argument("--allow-unpaired", action="store_true",
                        help="dataset mode: skip files without a partner and list them (default: error)")
    parser.add_argument("--small-below-ml", type=float, default=SMALL_BELOW_ML, metavar="ML",
                        help=f"GT volume below which a case is 'small' (default {SMALL_BELOW_ML})")
    parser.add_argument("--large-above-ml", type=float, default=LARGE_ABOVE_ML, metavar="ML",
                        help=f"GT volume above which a case is 'large' (default {LARGE_ABOVE_ML})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.pred is None and args.pred_dir is None:
        raise ValueError("evaluate needs --pred with --gt (one case) or --pred-dir with --gt-dir (a dataset)")
    sizes = {"small_below_ml": args.small_below_ml, "large_above_ml": args.large_above_ml}
    if args.pred is not None:
        if args.gt is None:
            raise ValueError("--pred goes with --gt (use --pred-dir with --gt-dir for a dataset)")
        if args.case_regex is not None or args.allow_unpaired:
            raise ValueError("--case-regex and --allow-unpaired only apply to --pred-dir/--gt-dir")
        metrics = evaluate_files(args.pred, args.gt, **sizes)
        print(json.dumps(metrics.as_dict(), allow_nan=False) if args.json else _case_table(metrics))
        return 0
    if args.gt_dir is None:
        raise ValueError("--pred-dir goes with --gt-dir (use --pred with --gt for one case)")
    result = evaluate_dataset(args.pred_dir, args.gt_dir, args.case_regex or DEFAULT_CASE_REGEX,
                              allow_unpaired=args.allow_unpaired, **sizes)
    print(json.dumps(result.as_dict(), allow_nan=False) if args.json else _dataset_table(result))
    return 0


def _case_table(metrics: CaseMetrics) -> str:
    rows = metrics.as_dict()
    width = max(map(len, rows))
    return "\n".join(f"{name:<{width}}  {_cell(value)}" for name, value in rows.items())


def _dataset_table(result: DatasetResult) -> str:
    header = ["case", *TABLE_COLUMNS]
    body = [[case.case_id, *(_cell(getattr(case.metrics, name)) for name in TABLE_COLUMNS)] for case in result.cases]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *body]]
    lines.append("")
    lines.append(f"summary over {len(result.cases)} case(s): mean ± SD (n cases where defined)")
    width = max(map(len, result.summary))
    for name, stats in result.summary.items():
        lines.append(f"{name:<{width}}  {_cell(stats.mean)} ± {_cell(stats.sd)} (n={stats.n})")
    for item in result.unpaired:
        lines.append(f"warning: skipped unpaired {item}")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
