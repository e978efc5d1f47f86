"""models.geometry: slice normal, spacing and voxel volume from an affine, and the RAS↔LPS swap, each checked
against an independent source (hand-made grids, highdicom's NIfTI conversion, a real oblique DICOM series)."""

from __future__ import annotations

import gzip
import math

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA, require

from models.geometry import affine_spacing, slice_normal, swap_ras_lps, voxel_volume_ml


def _rotation(angle: float, axis: int) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    others = [i for i in range(3) if i != axis]
    rotation = np.eye(3)
    rotation[np.ix_(others, others)] = [[cos, -sin], [sin, cos]]
    return rotation


@pytest.mark.parametrize(
    ("orientation", "normal"),
    [([1, 0, 0, 0, 1, 0], [0, 0, 1]), ([0, 1, 0, 0, 0, -1], [-1, 0, 0]), ([1, 0, 0, 0, 0, -1], [0, 1, 0])],
)
def test_slice_normal_of_the_three_planes(orientation: list[float], normal: list[float]) -> None:
    assert slice_normal(orientation).tolist() == normal


def test_slice_normal_of_an_oblique_plane_is_unit_right_handed_and_perpendicular() -> None:
    rotation = _rotation(0.3, 0) @ _rotation(-0.2, 2)
    row, column = rotation[:, 0] * 1.0001, rotation[:, 1]  # DICOM rounds cosines: length a little off 1
    normal = slice_normal(np.concatenate([row, column]))
    assert np.linalg.norm(normal) == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(normal, rotation[:, 2], atol=1e-9)
    assert np.linalg.det(np.stack([row, column, normal])) > 0


def test_slice_normal_refuses_what_is_no_orientation() -> None:
    with pytest.raises(ValueError, match="parallel"):
        slice_normal([1, 0, 0, 1, 0, 0])
    with pytest.raises(ValueError, match="six finite"):
        slice_normal([1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="six finite"):
        slice_normal([1, 0, 0, 0, float("nan"), 0])


def test_slice_normal_of_a_real_oblique_series_is_where_its_slices_step() -> None:
    """XA30's ADC (39 oblique slices): each slice's position steps along the normal by the slice spacing."""
    folder = SHARED_DATA / "dicom/dcm_qa_xa30i/dicom/12001_DWI_dir80_AP"
    require(folder)
    datasets = [pydicom.dcmread(gzip.open(path), stop_before_pixels=True) for path in sorted(folder.glob("*.gz"))]
    (orientation,) = {tuple(float(v) for v in ds.ImageOrientationPatient) for ds in datasets}
    normal = slice_normal(orientation)
    assert abs(normal @ orientation[:3]) < 1e-5 and abs(normal @ orientation[3:]) < 1e-5
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    steps = np.diff(positions[np.argsort(positions @ normal)], axis=0)
    spacing = float(datasets[0].SpacingBetweenSlices)
    assert len(datasets) == 39 and np.allclose(steps, spacing * normal, atol=1e-3)


def test_affine_spacing_of_a_flipped_oblique_grid() -> None:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.4, 1) @ np.diag([-0.9, 1.2, 5.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    assert affine_spacing(affine) == pytest.approx([0.9, 1.2, 5.0])
    with pytest.raises(ValueError, match="4x4"):
        affine_spacing(np.eye(3))


def test_voxel_volume_from_the_affine_including_obliques() -> None:
    assert voxel_volume_ml(np.diag([2.0, 2.0, 2.0, 1.0])) == pytest.approx(0.008)
    angle = 0.3
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, 1.0, 3.0])
    assert voxel_volume_ml(affine) == pytest.approx(0.003)
    with pytest.raises(ValueError, match="singular"):
        voxel_volume_ml(np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="4x4"):
        voxel_volume_ml(np.eye(3))


def test_swap_ras_lps_agrees_with_highdicom_and_is_its_own_inverse() -> None:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.25, 2) @ np.diag([1.8, 1.8, 6.0])
    affine[:3, 3] = [-90.0, 120.0, -40.0]
    lps = swap_ras_lps(affine)
    volume = hd.Volume.from_nibabel(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine))
    assert np.allclose(lps, volume.affine)
    assert np.array_equal(swap_ras_lps(lps), affine)
    voxels = np.array([[0.0, 0.0, 0.0, 1.0], [3.0, 4.0, 5.0, 1.0]])
    assert np.allclose(swap_ras_lps((voxels @ affine.T)[:, :3]), (voxels @ lps.T)[:, :3])
    assert swap_ras_lps([1.0, 2.0, 3.0]).tolist() == [-1.0, -2.0, 3.0]
    with pytest.raises(ValueError, match="4x4 affine or points"):
        swap_ras_lps(np.eye(4)[:3])
