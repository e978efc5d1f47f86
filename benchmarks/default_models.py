"""The embedded default models on the real shared test cases (n = 1 per task), next to an intensity baseline.

The real cases (ISLES'22 case 0001, open_ms_data patient 07) are a test set: evaluated once per published model,
never used for tuning. The baseline thresholds the first channel at its 99th percentile inside the non-zero
voxels (design.md §9's oracle rule). Run: `.venv/bin/python benchmarks/default_models.py [--json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.engine import Engine  # noqa: E402
from models.geometry import voxel_volume_ml  # noqa: E402
from models.manifest import Task  # noqa: E402
from models.metrics import compute_metrics  # noqa: E402
from models.package import TrustPolicy, load_package  # noqa: E402
from training.datasets import load_cases, open_dataset  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "nifti"
TEST_CASES = {
    Task.STROKE_DWI_ADC: SHARED / "isles22" / "case0001_dwi_adc_plus_gt",
    Task.MS_FLAIR: SHARED / "open_ms_data" / "patient07",
}
DEFAULTS = REPO / "models" / "defaults"


def evaluate(task: Task) -> dict:
    package = load_package(DEFAULTS / task.value, TrustPolicy.demo())
    cases, skipped = load_cases(open_dataset(TEST_CASES[task], task))
    if skipped or len(cases) != 1:
        raise SystemExit(f"{task.value}: test case not loadable: {skipped}")
    case = cases[0]
    voxel_ml = voxel_volume_ml(case.channels[0].affine)
    started = time.perf_counter()
    prediction = Engine(package).predict(case.channels)
    seconds = time.perf_counter() - started
    model = compute_metrics(prediction.probabilities >= package.manifest.output.threshold, case.mask, voxel_ml)
    first = case.channels[0].data.astype(np.float64)
    baseline = compute_metrics(first > np.percentile(first[first > 0], 99), case.mask, voxel_ml)
    return {
        "task": task.value,
        "model_version": package.manifest.version,
        "onnx_mb": round(len(package.onnx_bytes) / 2**20, 2),
        "seconds": round(seconds, 2),
        "model": {k: model.as_dict()[k] for k in ("dice", "avd_ml", "lf1", "pred_volume_ml", "gt_volume_ml")},
        "baseline_p99": {k: baseline.as_dict()[k] for k in ("dice", "avd_ml", "lf1", "pred_volume_ml")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [evaluate(task) for task in Task if (DEFAULTS / task.value).exists()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'task':16} {'version':>7} {'Dice':>6} {'AVD ml':>7} {'LF1':>6} {'pred ml':>8} {'GT ml':>6} "
          f"{'p99 Dice':>8} {'s':>5}  (n = 1 per task)")
    for row in rows:
        m, b = row["model"], row["baseline_p99"]
        print(f"{row['task']:16} {row['model_version']:>7} {m['dice']:6.3f} {m['avd_ml']:7.2f} {m['lf1']:6.3f} "
              f"{m['pred_volume_ml']:8.2f} {m['gt_volume_ml']:6.2f} {b['dice']:8.3f} {row['seconds']:5.1f}")


if __name__ == "__main__":
    main()
