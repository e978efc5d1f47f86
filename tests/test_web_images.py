"""The viewer's edge letters (inference/web/images.py): which patient direction each edge of a displayed slice
faces, from the volume's NIfTI (RAS+) affine, for the layouts scanners write."""

from __future__ import annotations

import numpy as np
import pytest

from inference.web.images import Volume, edge_letters


def nifti_affine(i_direction_ras: list[float], j_direction_ras: list[float], spacing: list[float]) -> np.ndarray:
    """A NIfTI affine whose first two voxel axes run along the given RAS directions, with a slice normal completing
    them and anisotropic voxels (the letters must not depend on the spacing)."""
    i, j = np.asarray(i_direction_ras, float), np.asarray(j_direction_ras, float)
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([i, j, np.cross(i, j)]) @ np.diag(spacing)
    affine[:3, 3] = (90.0, -120.0, 40.0)
    return affine


TILT = np.radians(20.0)


@pytest.mark.parametrize(
    ("i_ras", "j_ras", "expected"),
    [
        # A DICOM axial (rows run to the patient's left, columns to posterior): radiological view.
        pytest.param([-1, 0, 0], [0, -1, 0], {"left": "R", "right": "L", "top": "A", "bottom": "P"}, id="axial"),
        # The same with its rows stored from posterior to anterior.
        pytest.param([-1, 0, 0], [0, 1, 0], {"left": "R", "right": "L", "top": "P", "bottom": "A"}, id="flipped"),
        # A DICOM sagittal (rows run posterior, columns to the feet).
        pytest.param([0, -1, 0], [0, 0, -1], {"left": "A", "right": "P", "top": "H", "bottom": "F"}, id="sagittal"),
        # An axial tilted 20° about the left-right axis: columns run mostly posterior, partly to the feet.
        pytest.param([-1, 0, 0], [0, -np.cos(TILT), -np.sin(TILT)],
                     {"left": "R", "right": "L", "top": "AH", "bottom": "PF"}, id="oblique"),
    ],
)
def test_edge_letters(i_ras: list[float], j_ras: list[float], expected: dict[str, str]) -> None:
    affine = nifti_affine(i_ras, j_ras, [0.9, 1.1, 5.0])
    assert edge_letters(affine) == expected
    volume = Volume(np.zeros((4, 3, 2), np.float32), affine)
    assert volume.describe()["edge_letters"] == expected  # what the viewer's JSON carries
