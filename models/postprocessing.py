"""Post-processing shared by the node and the metrics: connected components (voxel volumes: models.geometry).

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
