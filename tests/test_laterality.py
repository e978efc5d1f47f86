"""A lesion in the patient's LEFT hemisphere stays on the left in every output, in every slice geometry.

Synthetic stroke studies (training.synthetic) with one infarct in the left hemisphere (RAS x < 0), acquired axial,
row-flipped, oblique and sagittal, are written as DICOM; their ground-truth mask becomes SEG, SC and SR through
`write_outputs` on the b=1000 volume. The SEG is read back with highdicom and mapped to patient coordinates (LPS:
left = +x); every SC frame is compared, pixel block by pixel block, with the lesion pixels of the source instance it
references, found through the case's own geometry (not the writer's).
"""

from __future__ import annotations

import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_gateway.writers import write_outputs
from dicom_gateway.writers.overlay import upscale_factor
from models.geometry import swap_ras_lps
from models.manifest import Task
from models.postprocessing import label_components
from tests.test_writers import (
    MODEL,
    SITE,
    labels_on_volume_grid,
    lesions_from_labels,
    overlay_mask,
)
from training.synthetic import generate_case
from training.synthetic.dicom_writer import write_dicom_study

SEED = 4  # procedural anatomy, small single infarct: left hemisphere in every geometry (asserted below)
CENTROID_TOLERANCE_MM = 2.0


@pytest.mark.parametrize("geometry", ["axial", "flipped", "oblique", "sagittal"])
def test_left_lesion_is_left_in_seg_and_on_every_overlay_frame(tmp_path: Path, geometry: str) -> None:
    case = generate_case(
        "stroke",
        SEED,
        geometry=geometry,
        site=SITE,
        size="small",
        pattern="single",
        anatomy="procedural",
    )
    (truth_lesion,) = case.lesions
    assert truth_lesion.side == "left" and truth_lesion.centroid_ras_mm[0] < 0
    paths = write_dicom_study(case, tmp_path / "study")
    b1000 = [
        ds
        for ds in (pydicom.dcmread(p) for p in paths if p.parent.name.endswith("_dwi"))
        if float(ds.DiffusionBValue) == 1000.0
    ]
    volume = hd.get_volume_from_series(b1000)
    labels, count = label_components(labels_on_volume_grid(case.lesion_labels, case.affine, volume) > 0)
    assert count == 1
    lesions = lesions_from_labels(labels, volume)
    total = math.fsum(lesion.volume_ml for lesion in lesions)
    outputs = write_outputs(b1000, labels, lesions, MODEL, Task.STROKE_DWI_ADC, 1, [2, 4, 5], total, 0.0)

    seg_path = tmp_path / "seg.dcm"
    outputs.seg.save_as(seg_path, enforce_file_format=True)
    seg_volume = hd.seg.segread(seg_path).get_volume(combine_segments=True)
    voxels = np.argwhere(seg_volume.array > 0)
    assert len(voxels) == lesions[0].voxel_count
    centroid_lps = seg_volume.affine[:3, :3] @ voxels.mean(axis=0) + seg_volume.affine[:3, 3]
    truth_lps = swap_ras_lps(truth_lesion.centroid_ras_mm)
    assert centroid_lps[0] > 0, f"{geometry}: SEG lesion on the patient's right"
    assert np.linalg.norm(centroid_lps - truth_lps) <= CENTROID_TOLERANCE_MM

    to_case = np.linalg.inv(case.affine)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in b1000}
    rows, columns = int(b1000[0].Rows), int(b1000[0].Columns)
    factor = upscale_factor(rows, columns)
    frames_with_lesion = 0
    for sc in outputs.overlay:
        source = by_uid[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        ras = swap_ras_lps([float(x) for x in source.ImagePositionPatient])
        i, j, k = to_case[:3, :3] @ ras + to_case[:3, 3]
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3
        expected = case.lesion_labels[:, :, round(k)].T > 0  # the writer convention
        np.testing.assert_array_equal(overlay_mask(sc.pixel_array, rows, columns, factor), expected)
        frames_with_lesion += int(expected.any())
    assert frames_with_lesion >= 1
