"""Specificity of the default stroke model on the healthy Canon and Philips brains of the shared data.

Both are real clinical DTI acquisitions of healthy volunteers, not skull-stripped, with no ADC series: they go the
node's whole DICOM path (read_path → classify → load_study_inputs, which builds the trace DWI and computes the ADC
→ segment_study), so every lesion found is a false positive. Goal: < 1 ml per brain.
`--adc-scale 0.7 1.3 1.6` also segments each brain with its ADC multiplied by each factor, a diagnostic: where the
false positives vanish as the ADC rises, the model's line between infarct and normal tissue sits at these scanners'
normal ADC, not at restricted diffusion.
Run: `.venv/bin/python benchmarks/specificity.py [--models DIR] [--json] [--adc-scale F ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_gateway.roles import classify_headers
from dicom_gateway.study_files import read_path
from dicom_gateway.study_inputs import load_study_inputs
from inference.engine import Engine
from inference.pipeline import segment_study
from models.manifest import Role, Task
from models.package import TrustPolicy, load_package

SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
HEALTHY_BRAINS = {
    "canon": SHARED_DICOM / "dcm_qa_canon_61" / "dicom" / "cl_3000_DTI_PA-ortho",  # classic copy only
    "philips": SHARED_DICOM / "dcm_qa_philips_dwi" / "dicom" / "cl" / "DICOMDIR",
}
GOAL_ML = 1.0


def false_positives(name: str, path: Path, engine: Engine, flip_tta: bool, adc_scales: list[float]) -> dict:
    started = time.perf_counter()
    study = read_path(path).only_study()
    dwi = next(channel for channel in engine.manifest.inputs if channel.role is Role.DWI)
    roles = classify_headers(study, dwi.b_value, dwi.b_value_range)
    inputs = load_study_inputs(roles, study)
    result = segment_study(inputs, engine, flip_tta=flip_tta, load_seconds=time.perf_counter() - started)
    seconds = round(time.perf_counter() - started, 1)
    scaled_ml = {}
    measured = inputs.adc.volume.array.copy() if adc_scales else None
    for factor in adc_scales:
        inputs.adc.volume.array[...] = measured * factor
        scaled_ml[factor] = segment_study(inputs, engine, flip_tta=flip_tta).total_volume_ml
    return {
        "study": name,
        "dwi": f"series {roles.dwi.series_number} b={roles.dwi.b_value:g} ({roles.dwi.kind.value})",
        "adc": inputs.adc_unit_detected,
        "grid": list(result.mask.shape),
        "false_positive_ml": result.total_volume_ml,
        "false_positive_lesions": result.lesion_count,
        "largest_ml": result.lesions[0].volume_ml if result.lesions else 0.0,
        "adc_core_ml": result.adc_core_volume_ml,
        "seconds": seconds,
        "warnings": list(result.warnings),
        "false_positive_ml_by_adc_scale": {f"{factor:g}": ml for factor, ml in scaled_ml.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models" / "defaults", metavar="DIR",
                        help="folder with a stroke-dwi-adc/ package (default: models/defaults): check a candidate "
                             "before it ships")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--flip-tta", action="store_true", help="average the eight mirrorings (8× the inference)")
    parser.add_argument("--adc-scale", type=float, nargs="+", default=[], metavar="F",
                        help="also segment with the ADC multiplied by each F (a diagnostic, see above)")
    args = parser.parse_args()
    if any(factor <= 0 for factor in args.adc_scale):
        parser.error("--adc-scale factors must be positive")
    missing = [str(path) for path in HEALTHY_BRAINS.values() if not path.exists()]
    if missing:
        raise SystemExit(f"shared data missing: {', '.join(missing)}")
    package = load_package(args.models / Task.STROKE_DWI_ADC.value, TrustPolicy.demo())
    engine = Engine(package)
    rows = [false_positives(name, path, engine, args.flip_tta, args.adc_scale) for name, path in HEALTHY_BRAINS.items()]
    if args.json:
        summary = {"model_version": package.manifest.version, "flip_tta": args.flip_tta, "goal_ml": GOAL_ML}
        print(json.dumps({**summary, "studies": rows}, indent=2))
        return
    print(
        f"stroke model v{package.manifest.version} ({args.models}){' with flip TTA' if args.flip_tta else ''}, "
        f"healthy brains (goal < {GOAL_ML:g} ml false positive)"
    )
    for row in rows:
        verdict = "ok" if row["false_positive_ml"] < GOAL_ML else "ABOVE GOAL"
        print(
            f"{row['study']:8s} {row['dwi']}, ADC {row['adc']}: {row['false_positive_ml']:.3f} ml in "
            f"{row['false_positive_lesions']} lesion(s), largest {row['largest_ml']:.3f} ml, ADC-confirmed "
            f"(< 620 µm²/s) {row['adc_core_ml']:.3f} ml [{verdict}] ({row['seconds']} s)"
        )
        if row["false_positive_ml_by_adc_scale"]:
            print("         with the ADC × " + ", × ".join(
                f"{factor}: {ml:.3f} ml" for factor, ml in row["false_positive_ml_by_adc_scale"].items()))
        for warning in row["warnings"]:
            print(f"         warning: {warning}")


if __name__ == "__main__":
    main()
