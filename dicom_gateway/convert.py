"""`fedlesion convert`: a DICOM study to the NIfTI files the node would segment, plus study.json.

Why: a site checks what the node makes of its studies (which series, which b, which ADC unit) without running a
model, and gets the exact arrays the model would see: the same reader, roles and volume assembly as the jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib

from dicom_gateway.role_decisions import StudyRoles
from dicom_gateway.roles import classify_headers
from dicom_gateway.study_files import read_path
from dicom_gateway.study_inputs import RoleVolume, StudyInputs, load_study_inputs
from models.manifest import ADC_UNIT

__all__ = ["STUDY_JSON_VERSION", "convert_study"]

STUDY_JSON_VERSION = 1
DEFAULT_DWI_B_VALUE = 1000  # the default stroke model's nominal b and trained range (models/manifest.py)
DEFAULT_DWI_B_RANGE = (700, 1500)


def convert_study(
    path: Path,
    outdir: Path,
    *,
    dwi_b_value: int = DEFAULT_DWI_B_VALUE,
    dwi_b_range: tuple[int, int] = DEFAULT_DWI_B_RANGE,
) -> list[Path]:
    """Write dwi/adc/flair.nii.gz for the roles found (ADC in 10⁻⁶ mm²/s) and study.json; return the paths.

    ValueError (one line) when PATH holds no DICOM study or no role could be built.
    """
    path, outdir = Path(path), Path(outdir)
    study = read_path(path).only_study()
    roles = classify_headers(study, dwi_b_value, dwi_b_range)
    if roles.dwi is None and roles.adc is None and roles.flair is None:
        reasons = "; ".join(f"series {d.number}: {d.reason}" for d in roles.series[:6])
        raise ValueError(f"no usable role (DWI, ADC or FLAIR) in study {study.study_uid}: {reasons}")
    inputs = load_study_inputs(roles, study)
    built = {role: volume for role, volume in _role_volumes(inputs).items() if volume is not None}
    if not built:
        reasons = "; ".join(f"{role} not processed: {reason}" for role, reason in inputs.not_processed.items())
        raise ValueError(f"no role of study {study.study_uid} could be processed: {reasons}")

    outdir.mkdir(parents=True, exist_ok=True)
    for role in _role_volumes(inputs).keys() - built.keys():  # a file from an earlier run would pass for this one's
        (outdir / f"{role}.nii.gz").unlink(missing_ok=True)
    written: list[Path] = []
    for role, volume in built.items():
        target = outdir / f"{role}.nii.gz"
        nib.save(volume.to_nifti(), target)
        written.append(target)
    summary = outdir / "study.json"
    summary.write_text(json.dumps(_summary(roles, inputs, written), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written.append(summary)
    return written


def _role_volumes(inputs: StudyInputs) -> dict[str, RoleVolume | None]:
    return {"dwi": inputs.dwi, "adc": inputs.adc, "flair": inputs.flair}


def _volume_facts(volume: RoleVolume) -> dict[str, Any]:
    """Shape and voxel size in the NIfTI's axis order (column, row, slice); slice spacing is from positions."""
    spacing = [round(float(s), 6) for s in reversed(volume.volume.spacing)]
    return {
        "shape": list(reversed(volume.volume.spatial_shape)),
        "voxel_size_mm": spacing,
        "voxel_volume_mm3": round(float(spacing[0] * spacing[1] * spacing[2]), 6),
        "slices": len(volume.sources),
    }


def _summary(roles: StudyRoles, inputs: StudyInputs, written: list[Path]) -> dict[str, Any]:
    """study.json: what each role became, from which series, with b-values, units, warnings and reasons."""
    role_facts: dict[str, Any] = {}
    if roles.dwi is not None:
        role_facts["dwi"] = {
            "series_uid": roles.dwi.series_uid,
            "series_number": roles.dwi.series_number,
            "kind": roles.dwi.kind.value,
            "b_value": roles.dwi.b_value,
            "volumes": [key.label() for key in roles.dwi.volumes],
        }
    if roles.adc is not None:
        role_facts["adc"] = {
            "series_uid": roles.adc.series_uid,
            "series_number": roles.adc.series_number,
            "source": roles.adc.source.value,
            "unit": ADC_UNIT,
            "unit_detected": inputs.adc_unit_detected,
            "b_value": roles.adc.b_value,
            "b0_volumes": [key.label() for key in roles.adc.b0_volumes],
            "b_volumes": [key.label() for key in roles.adc.b_volumes],
        }
    if roles.flair is not None:
        role_facts["flair"] = {
            "series_uid": roles.flair.series_uid,
            "series_number": roles.flair.series_number,
            "acquisition_type": roles.flair.acquisition_type,
        }
    for role, volume in _role_volumes(inputs).items():
        if volume is not None:
            role_facts[role].update(_volume_facts(volume))
    return {
        "version": STUDY_JSON_VERSION,
        "study_uid": roles.study_uid,
        "roles": role_facts,
        "files": [path.name for path in written],
        "not_processed": dict(inputs.not_processed),
        "warnings": list(inputs.warnings),
        "dwi_b_value_nominal": roles.dwi_b_value,
        "dwi_b_range": list(roles.dwi_b_range),
        "series": [
            {
                "series_uid": decision.series_uid,
                "series_number": decision.number,
                "description": decision.description,
                "role": decision.role.value,
                "reason": decision.reason,
                "b_values": decision.b_values,
                "volumes": len(decision.volumes),
            }
            for decision in roles.series
        ],
    }
