"""World-to-world resampling between voxel grids, the one interpolation both preprocessing directions use.

Conventions (NIfTI): an affine maps voxel *centre* indices to RAS+ millimetres, and a grid's field of view is the
box spanned by its voxel corners (index -0.5 … n-0.5). Using the same convention forward and back keeps a round
trip unbiased; defining the field of view by corners makes a target grid cover every source voxel entirely.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from scipy import ndimage

from models.geometry import affine_spacing

__all__ = ["ras_grid", "resample"]


def _check_affine(affine: np.ndarray, name: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{name} must be a finite 4x4 matrix, got shape {affine.shape}")
    if not np.allclose(affine[3], (0.0, 0.0, 0.0, 1.0)):
        raise ValueError(f"{name} must have (0, 0, 0, 1) as its last row")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{name} is singular")
    return affine


def _check_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(n) != n or n < 1 for n in shape):
        raise ValueError(f"{name} must be three positive integers, got {shape}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _corner_indices(shape: tuple[int, int, int]) -> np.ndarray:
    """The 8 voxel-corner points of a grid in homogeneous index coordinates, shape (4, 8)."""
    axes = [(-0.5, n - 0.5) for n in shape]
    corners = np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    return np.vstack([corners, np.ones((1, 8))])


def _inside_field_of_view(
    index_map: np.ndarray, target_shape: tuple[int, int, int], source_shape: tuple[int, ...]
) -> np.ndarray:
    """Which target voxel centres map into the source's [-0.5, n - 0.5) box; separable sums, no coordinate array."""
    inside = np.ones(target_shape, dtype=bool)
    ramps = [np.arange(n, dtype=np.float32) for n in target_shape]
    for k, n in enumerate(source_shape):
        row = index_map[k].astype(np.float32)
        coordinate = (
            (row[0] * ramps[0] + row[3])[:, None, None]
            + (row[1] * ramps[1])[None, :, None]
            + (row[2] * ramps[2])[None, None, :]
        )
        inside &= (coordinate >= -0.5) & (coordinate < n - 0.5)
    return inside


SPACING_TOLERANCE = 0.02


def ras_grid(
    source_affine: np.ndarray,
    source_shape: tuple[int, ...],
    spacing_mm: tuple[float, float, float],
    spacing_tolerance: float = SPACING_TOLERANCE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The source's grid reoriented to RAS (nibabel's closest canonical axis order) at `spacing_mm`.

    Reorienting only permutes and flips axes; the source's own rotation is kept, so a tilted 2 mm source at a 2 mm
    target maps onto itself voxel for voxel and a thick oblique stack is not smeared across world axes. The grid
    shares the source's field-of-view centre and covers all of it (count = ceil(extent / spacing)). An axis whose
    source spacing is within `spacing_tolerance` (relative) of the target keeps the source spacing: a 1.997 mm
    scan is not worth an interpolation blur to become 2 mm.
    """
    source_affine = _check_affine(source_affine, "source_affine")
    source_shape = _check_shape(tuple(source_shape), "source_shape")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm}")
    orientation = nib.orientations.io_orientation(source_affine)
    canonical = source_affine @ nib.orientations.inv_ornt_aff(orientation, source_shape)
    canonical_shape = np.asarray(source_shape)[orientation[:, 0].argsort()]
    source_spacing = affine_spacing(canonical)
    directions = canonical[:3, :3] / source_spacing
    spacing = np.where(np.abs(source_spacing - spacing) <= spacing_tolerance * spacing, source_spacing, spacing)
    # The tolerance keeps an extent that is an exact multiple of the spacing from gaining a voxel through rounding.
    shape = tuple(
        max(1, math.ceil(n * s / t - 1e-6)) for n, s, t in zip(canonical_shape, source_spacing, spacing)
    )
    centre = canonical @ np.append((canonical_shape - 1) / 2, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine, shape


def resample(
    data: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, ...],
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample `data` (on `source_affine`) at the voxel centres of the target grid; float32 out.

    A target voxel whose centre lies inside the source's field of view gets an interpolated value (the edge voxels
    extend over the half-voxel rim, as they cover it); outside it gets `cval`.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must be 3-D, got shape {data.shape}")
    if not 0 <= order <= 5:
        raise ValueError(f"order must be 0..5, got {order}")
    source_affine = _check_affine(source_affine, "source_affine")
    target_affine = _check_affine(target_affine, "target_affine")
    target_shape = _check_shape(tuple(target_shape), "target_shape")

    index_map = np.linalg.solve(source_affine, target_affine)  # target index -> source index
    matrix, offset = index_map[:3, :3], index_map[:3, 3]
    if np.allclose(matrix - np.diag(np.diag(matrix)), 0.0, atol=1e-9):
        matrix = np.diag(matrix)  # scipy's separable zoom/shift path: several times faster
    out = ndimage.affine_transform(
        data.astype(np.float32, copy=False), matrix, offset, output_shape=target_shape,
        output=np.float32, order=order, mode="nearest",
    )

    mapped = (index_map @ _corner_indices(target_shape))[:3]
    # Corners inside the field of view put every target centre inside it (the tolerance only absorbs rounding).
    if mapped.min() < -0.5 - 1e-6 or np.any(mapped.max(axis=1) > np.asarray(data.shape) - 0.5 + 1e-6):
        out[~_inside_field_of_view(index_map, target_shape, data.shape)] = cval
    return out
