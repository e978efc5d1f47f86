"""Post-processing pieces shared by the node and the metrics: connected components and voxel volumes.

One definition of "a lesion" (a 26-connected component, design.md §4/§9) so that the lesion count a node reports and
the count the evaluation scores can never disagree.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

# Full 3x3x3 neighbourhood: voxels sharing a face, an edge or only a corner belong to the same lesion.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def label_components(mask: ArrayLike) -> tuple[NDArray[np.int32], int]:
    """Label the 26-connected components of a 3-D mask (nonzero = foreground); returns (labels, count)."""
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"label_components needs a 3-D mask, got shape {array.shape}")
    labels, count = ndimage.label(array != 0, structure=CONNECTIVITY_26)
    return labels.astype(np.int32, copy=False), int(count)


def voxel_volume_ml(affine: ArrayLike) -> float:
    """Volume of one voxel in ml from a 4x4 voxel-to-mm affine (|det| of the 3x3 part, mm³ → ml).

    Taken from the affine rather than header zooms so shears and obliques are measured as the grid really is.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    volume = abs(float(np.linalg.det(matrix[:3, :3]))) / 1000.0
    if volume == 0.0:
        raise ValueError("affine is singular: voxel volume is 0")
    return volume
