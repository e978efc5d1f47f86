"""report.json per study and task, and writing it with the mask.

Why its own module: report.json is what the web page, `fedlesion segment --json` and a site's scripts read, so its
keys are a contract. Every number in it is taken from the `SegmentationResult` the DICOM writers also get (the
lesions, total and core volumes are rounded once, in the pipeline), so report and SR cannot disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib

from models.durable import write_atomic, write_text_atomic

if TYPE_CHECKING:
    from inference.pipeline import SegmentationResult

__all__ = ["DISCLAIMER", "MASK_FILE", "REPORT_FILE", "REPORT_VERSION", "build_report", "write_result"]

REPORT_VERSION = 1
DISCLAIMER = "AI result — not for primary diagnosis"
MASK_FILE = "mask.nii.gz"
REPORT_FILE = "report.json"


def build_report(result: SegmentationResult) -> dict[str, Any]:
    """The report of one (study, task): model, series used, inputs, volumes, lesions, timings, warnings."""
    model, source = result.model, result.source
    return {
        "report_version": REPORT_VERSION,
        "disclaimer": DISCLAIMER,
        "created": result.created.isoformat().replace("+00:00", "Z"),
        "study_uid": source.study_uid,
        "task": result.task.value,
        "model_version": model.version,
        "model": {
            "name": model.name,
            "version": model.version,
            "federated_round": model.federated_round,
            "manifest_sha256": model.manifest_sha256,
            "demo": model.demo,
            "providers": list(model.providers),
        },
        "series": [
            {
                "role": series.role,
                "series_uid": series.series_uid,
                "series_number": series.series_number,
                "description": series.description,
            }
            for series in source.series
        ],
        "dwi_b_value": source.dwi_b_value,
        "adc_unit_detected": source.adc_unit_detected,
        "voxel_volume_ml": result.voxel_volume_ml,
        "total_volume_ml": result.total_volume_ml,
        "lesion_count": result.lesion_count,
        "lesions": [
            {
                "id": lesion.id,
                "volume_ml": lesion.volume_ml,
                "voxel_count": lesion.voxel_count,
                "centroid_mm_lps": list(lesion.centroid_mm),
            }
            for lesion in result.lesions
        ],
        "adc_core_volume_ml": result.adc_core_volume_ml,
        "adc_core_threshold_um2_s": result.adc_core_threshold,
        "timings": dict(result.timings),  # seconds per stage
        "warnings": list(result.warnings),
    }


def write_result(result: SegmentationResult, out_dir: Path) -> tuple[Path, Path]:
    """Write mask.nii.gz and report.json into `out_dir`, each atomically and durably, readable by the node only
    (they hold patient data)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, report_path = out_dir / MASK_FILE, out_dir / REPORT_FILE
    write_atomic(mask_path, lambda temp: nib.save(result.mask, temp), mode=0o600)
    text = json.dumps(result.report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_atomic(report_path, text, mode=0o600)
    return mask_path, report_path
