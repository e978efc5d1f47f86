"""Grid geometry in one place: the slice normal, voxel spacing and volume, and the NIfTI↔DICOM axis swap.

NIfTI affines map voxel indices to RAS+ millimetres, DICOM patient coordinates are LPS+: the two differ by the
sign of x and y. The gateway, the pipeline, training and the synthetic studies all measure grids; one definition
keeps a lesion's volume or position from depending on which part measured it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["affine_spacing", "slice_normal", "swap_ras_lps", "voxel_volume_ml"]

_SWAP_POINT = np.array([-1.0, -1.0, 1.0])
_SWAP_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_normal(image_orientation: Sequence[float] | ArrayLike) -> NDArray[np.float64]:
    """Unit normal of a DICOM ImageOrientationPatient (row cosine × column cosine), in its own (LPS) frame.

    Positions projected on it give each slice's distance along the stack, the order DICOM slices are sorted in.
    """
    cosines = np.asarray(image_orientation, dtype=np.float64).ravel()
    if cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
        raise ValueError(f"ImageOrientationPatient must be six finite numbers, got {cosines.tolist()}")
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise ValueError(f"ImageOrientationPatient {cosines.tolist()}: row and column directions are parallel")
    return normal / length


def affine_spacing(affine: ArrayLike) -> NDArray[np.float64]:
    """Millimetres between voxel centres along each array axis: the lengths of the affine's first three columns."""
    matrix = _affine(affine)
    return np.linalg.norm(matrix[:3, :3], axis=0)


def voxel_volume_ml(affine: ArrayLike) -> float:
    """Volume of one voxel in ml from a 4x4 voxel-to-mm affine (|det| of the 3x3 part, mm³ → ml).

    Taken from the affine rather than header zooms so shears and obliques are measured as the grid really is.
    """
    volume = abs(float(np.linalg.det(_affine(affine)[:3, :3]))) / 1000.0
    if volume == 0.0:
        raise ValueError("affine is singular: voxel volume is 0")
    return volume


def swap_ras_lps(values: ArrayLike) -> NDArray[np.float64]:
    """RAS+ ↔ LPS+ (the swap is its own inverse): a 4x4 voxel→RAS affine becomes voxel→LPS, and points or
    directions (…, 3) change the sign of x and y."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape == (4, 4):
        return _SWAP_AFFINE @ array
    if array.shape[-1:] == (3,):
        return array * _SWAP_POINT
    raise ValueError(f"expected a 4x4 affine or points (…, 3), got shape {array.shape}")


def _affine(affine: ArrayLike) -> NDArray[np.float64]:
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    return matrix
