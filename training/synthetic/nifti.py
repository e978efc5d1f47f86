"""NIfTI export of a synthetic case: one file per image, the mask, the label map and a JSON sidecar."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from training.synthetic.case import SyntheticCase

# Image key → file stem; `dwi` is the b1000 trace, the image a stroke model reads as its DWI channel.
FILE_STEMS = {"dwi_b1000": "dwi", "dwi_b0": "dwi_b0", "adc": "adc", "flair": "flair", "t1_flair": "t1_flair"}


def write_nifti_case(case: SyntheticCase, out_dir: Path) -> dict[str, Path]:
    """Write every present image (float32; ADC in 10⁻⁶ mm²/s), `mask`, `labels` and `lesions.json`; return paths."""
    if not case.images:
        raise ValueError(f"case {case.case_id!r} has no images to write")
    if case.affine.shape != (4, 4):
        raise ValueError(f"case {case.case_id!r}: affine must be 4×4, got {case.affine.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, stem in FILE_STEMS.items():
        if key in case.images:
            paths[stem] = _save(np.asarray(case.images[key], dtype=np.float32), case.affine, out / f"{stem}.nii.gz")
    paths["mask"] = _save(case.mask, case.affine, out / "mask.nii.gz")
    paths["labels"] = _save(case.lesion_labels.astype(np.int16), case.affine, out / "labels.nii.gz")
    paths["lesions"] = out / "lesions.json"
    paths["lesions"].write_text(json.dumps(case_metadata(case), indent=2) + "\n", encoding="utf-8")
    return paths


def case_metadata(case: SyntheticCase) -> dict:
    """What a reader needs to reproduce or audit the case; lesion labels refer to `labels.nii.gz`."""
    return {
        "case_id": case.case_id,
        "kind": case.kind,
        "seed": int(case.seed),
        "geometry": case.geometry,
        "anatomy": case.anatomy_source,
        "skull_stripped": case.skull_stripped,
        "shape": list(case.lesion_labels.shape),
        "spacing_mm": list(case.spacing_mm),
        "slice_thickness_mm": case.slice_thickness_mm,
        "affine": np.round(case.affine, 6).tolist(),
        "adc_unit": "1e-6 mm2/s",
        "site": dataclasses.asdict(case.site),
        "total_volume_ml": round(sum(lesion.volume_ml for lesion in case.lesions), 6),
        "lesions": [dataclasses.asdict(lesion) for lesion in case.lesions],
    }


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
    return path
