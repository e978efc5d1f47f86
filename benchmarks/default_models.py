"""Each default model on every real case in ../shared/data, through `fedlesion segment`'s path, beside two rules.

Why: a model that loses to a threshold on real scans is switched off by the first radiologist who compares them,
so every shipped model is scored here against two rules a radiologist could apply by hand (issue 12):
- stroke (ISLES'22 case 0001, 0002, 0003): rule A "DWI z > 2 in brain and ADC < 620 µm²/s", rule B "DWI > 99th
  percentile in brain";
- MS (open_ms_data patient 07): rule A "FLAIR z > 2 in brain", rule B "FLAIR > 99th percentile in brain".
The z-score and the percentile are taken over the rule's brain mask: the non-zero voxels of a skull-stripped scan
(all these cases are, data/README.md), else preprocessing's head mask. The ADC goes to µm²/s by
`models.adc.adc_in_micrometres`, the rule the node applies (case 0001 is stored in 10⁻³ mm²/s, 0002 and 0003 in
mm²/s).

The model runs as a user runs it: `inference.folder_study.segment_folder` on a NIfTI folder (dwi.nii.gz + adc.nii.gz
or flair.nii.gz, links to the shared files) with `--model` set to the package, so the ADC unit detection, the
engine's preprocessing (head mask, normalisation), the threshold and the minimum lesion size are the node's own.
Packages are demo-signed (`make default-models`); with no enrollment bundle the path trusts the demo key, as
`fedlesion segment` does.

The real cases are a development set, not a test set: look at them to understand failures, never train on them,
never choose checkpoints, thresholds or generator settings by their score (with 3 + 1 cases, anything tuned on them
would only fit them). Seconds per case are the pipeline's own stages (load, preprocess, inference, postprocess) with
the model already loaded, as on a running node.

Run: `.venv/bin/python benchmarks/default_models.py [--models DIR] [--json | --markdown]`; DIR holds
`stroke-dwi-adc/` and/or `ms-flair/` packages (default: models/defaults). --markdown prints the README's rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.folder_study import segment_folder  # noqa: E402
from inference.settings import InferenceSettings  # noqa: E402
from models.adc import adc_in_micrometres  # noqa: E402
from models.geometry import voxel_volume_ml  # noqa: E402
from models.manifest import Task, default_inputs  # noqa: E402
from models.metrics import compute_metrics  # noqa: E402
from models.package import TrustPolicy, load_package  # noqa: E402
from models.preprocessing import head_mask  # noqa: E402
from training.datasets import CaseFiles, open_dataset  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "nifti"
DEFAULTS = REPO / "models" / "defaults"
ADC_RULE_MAX = 620.0  # µm²/s
Z_RULE_MIN = 2.0
PERCENTILE_RULE = 99.0
METRICS = ("dice", "avd_ml", "lf1", "pred_volume_ml", "gt_volume_ml")
RULES = {
    Task.STROKE_DWI_ADC: ("DWI z > 2 in brain and ADC < 620 µm²/s", "DWI > 99th percentile in brain"),
    Task.MS_FLAIR: ("FLAIR z > 2 in brain", "FLAIR > 99th percentile in brain"),
}
MARKDOWN_HEADER = (
    "| model | scored | case | truth (ml) | Dice | AVD (ml) | lesion F1 | predicted (ml) | s per case | ONNX (MB) "
    "| rule A Dice | rule B Dice |"
)


@dataclass(frozen=True)
class RealCase:
    """One real development case; `skull_stripped` picks the rules' brain mask (non-zero voxels, else head_mask)."""

    task: Task
    name: str
    folder: Path
    skull_stripped: bool  # data/README.md: the ISLES and MS NIfTIs are


REAL_CASES = (
    *(
        RealCase(
            Task.STROKE_DWI_ADC, f"ISLES'22 case {n:04d}", SHARED / "isles22" / f"case{n:04d}_dwi_adc_plus_gt", True
        )
        for n in (1, 2, 3)
    ),
    RealCase(Task.MS_FLAIR, "open_ms_data patient 07", SHARED / "open_ms_data" / "patient07", True),
)


def case_files(case: RealCase) -> CaseFiles:
    """The case's image and mask files, found as training's dataset readers find them."""
    index = open_dataset(case.folder, case.task)
    if index.skipped or len(index.cases) != 1 or index.cases[0].mask is None:
        raise SystemExit(f"{case.name}: expected one case with a mask in {case.folder}: {index.skipped}")
    return index.cases[0]


def read(path: Path) -> nib.Nifti1Image:
    return nib.funcs.squeeze_image(nib.load(path))


def rule_masks(first: np.ndarray, brain: np.ndarray, adc: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rule A's and rule B's masks on `first`'s grid: z > 2 over `brain` (and, given an ADC in µm²/s, ADC < 620),
    and above the 99th percentile over `brain`."""
    values = first[brain]
    rule_a = brain & ((first - values.mean()) / values.std() > Z_RULE_MIN)
    if adc is not None:
        rule_a &= adc < ADC_RULE_MAX
    return rule_a, brain & (first > np.percentile(values, PERCENTILE_RULE))


def case_rule_masks(case: RealCase, files: CaseFiles) -> tuple[np.ndarray, np.ndarray]:
    """The rules on a real case, read in float64 as stored (float32 merges voxels at the 99th percentile)."""
    first = read(files.channels[default_inputs(case.task)[0].name]).get_fdata()
    brain = first != 0 if case.skull_stripped else head_mask(first)
    adc = None
    if case.task is Task.STROKE_DWI_ADC:
        adc = read(files.channels["adc"]).get_fdata()
        if adc.shape != first.shape:
            raise SystemExit(f"{case.name}: ADC grid {adc.shape} differs from the DWI's {first.shape}")
        adc = adc_in_micrometres(adc).values
    return rule_masks(first, brain, adc)


def score(case: RealCase, package_dir: Path, version: int, onnx_mb: float) -> dict:
    """One case through `fedlesion segment --model package_dir`, and the two rules on the same case."""
    files = case_files(case)
    roles = {spec.name: spec.role.value for spec in default_inputs(case.task)}
    with tempfile.TemporaryDirectory(prefix="default-models-") as tmp:
        study = Path(tmp) / "study"
        study.mkdir()
        for name, path in files.channels.items():
            (study / f"{roles[name]}.nii.gz").symlink_to(path.resolve())
        result = segment_folder(
            study, Path(tmp) / "out", registry_dir=Path(tmp) / "registry", enrollment_bundle=None,
            inference=InferenceSettings(), task=case.task, model=package_dir,
        )
    if result.model.version != version:
        raise SystemExit(f"{package_dir}: segment used model v{result.model.version}, the package is v{version}")
    truth_image = read(files.mask)
    if truth_image.shape != result.mask.shape or not np.allclose(truth_image.affine, result.mask.affine, atol=1e-3):
        raise SystemExit(f"{case.name}: the truth mask is not on the first channel's grid")
    truth = np.asarray(truth_image.dataobj) > 0
    voxel_ml = voxel_volume_ml(truth_image.affine)
    rule_a, rule_b = case_rule_masks(case, files)
    return {
        "task": case.task.value,
        "model_version": version,
        "onnx_mb": onnx_mb,
        "case": case.name,
        "seconds": round(sum(result.timings.values()), 2),
        "adc_unit_detected": result.source.adc_unit_detected,
        "model": metrics(np.asarray(result.mask.dataobj) > 0, truth, voxel_ml),
        "rule_a": metrics(rule_a, truth, voxel_ml),
        "rule_b": metrics(rule_b, truth, voxel_ml),
    }


def metrics(prediction: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict[str, float]:
    measured = compute_metrics(prediction, truth, voxel_ml).as_dict()
    return {key: measured[key] for key in METRICS}


def evaluate(models_dir: Path) -> list[dict]:
    """A row per (default model, real case of its task), the tasks in `Task` order."""
    rows = []
    for task in Task:
        package_dir = models_dir / task.value
        if not package_dir.exists():
            continue
        package = load_package(package_dir, TrustPolicy.demo())
        onnx_mb = round(len(package.onnx_bytes) / 2**20, 2)
        version = package.manifest.version
        rows += [score(case, package_dir, version, onnx_mb) for case in REAL_CASES if case.task is task]
    return rows


def by_task(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["task"], []).append(row)
    return grouped


def mean_of(rows: list[dict], source: str, key: str) -> float:
    return statistics.fmean(row[source][key] for row in rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'case':24} {'truth ml':>8} | {'Dice':>6} {'AVD ml':>7} {'LF1':>6} {'pred ml':>8} {'s':>6} | "
          f"{'A Dice':>6} {'A ml':>7} | {'B Dice':>6} {'B ml':>7}")
    for task, task_rows in by_task(rows).items():
        first = task_rows[0]
        rule_a, rule_b = RULES[Task(task)]
        print(f"{task} v{first['model_version']} ({first['onnx_mb']} MB ONNX); rule A: {rule_a}; rule B: {rule_b}")
        for row in task_rows:
            m, a, b = row["model"], row["rule_a"], row["rule_b"]
            print(f"{row['case']:24} {m['gt_volume_ml']:8.2f} | {m['dice']:6.3f} {m['avd_ml']:7.2f} {m['lf1']:6.3f} "
                  f"{m['pred_volume_ml']:8.2f} {row['seconds']:6.1f} | {a['dice']:6.3f} {a['pred_volume_ml']:7.2f} | "
                  f"{b['dice']:6.3f} {b['pred_volume_ml']:7.2f}")
        print(f"{'mean (n = ' + str(len(task_rows)) + ')':24} {'':8} | {mean_of(task_rows, 'model', 'dice'):6.3f} "
              f"{'':7} {'':6} {'':8} {statistics.fmean(r['seconds'] for r in task_rows):6.1f} | "
              f"{mean_of(task_rows, 'rule_a', 'dice'):6.3f} {'':7} | {mean_of(task_rows, 'rule_b', 'dice'):6.3f}")


def print_markdown(rows: list[dict]) -> None:
    """Per task, the README table's header and today's rows (the README keeps every earlier row above them)."""
    today = datetime.date.today().isoformat()
    for task, task_rows in by_task(rows).items():
        rule_a, rule_b = RULES[Task(task)]
        separator = "|---" * (MARKDOWN_HEADER.count(" | ") + 1) + "|"
        print(f"\nrule A: {rule_a}; rule B: {rule_b}\n\n{MARKDOWN_HEADER}\n{separator}")
        label = f"`{task}` v{task_rows[0]['model_version']}"
        for row in task_rows:
            m = row["model"]
            print(f"| {label} | {today} | {row['case']} | {m['gt_volume_ml']:.2f} | {m['dice']:.3f} | "
                  f"{m['avd_ml']:.2f} | {m['lf1']:.3f} | {m['pred_volume_ml']:.2f} | {row['seconds']:.1f} | "
                  f"{row['onnx_mb']:.2f} | {row['rule_a']['dice']:.3f} | {row['rule_b']['dice']:.3f} |")
        if len(task_rows) > 1:
            print(f"| {label} | {today} | **mean (n = {len(task_rows)})** | | "
                  f"**{mean_of(task_rows, 'model', 'dice'):.3f}** | | | | | | "
                  f"**{mean_of(task_rows, 'rule_a', 'dice'):.3f}** | **{mean_of(task_rows, 'rule_b', 'dice'):.3f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULTS, metavar="DIR",
                        help="folder with stroke-dwi-adc/ and/or ms-flair/ packages (default: models/defaults)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON row per (model, case)")
    output.add_argument("--markdown", action="store_true", help="the README table's rows")
    args = parser.parse_args()
    rows = evaluate(args.models)
    if not rows:
        raise SystemExit(f"no stroke-dwi-adc/ or ms-flair/ package in {args.models}")
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print_markdown(rows)
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
