"""Real lesion shapes (masks only) from the shared shape libraries, placed on the MNI152 template's 1 mm grid.

Both libraries are MNI 1 mm on grids other than the template's, with voxel centres on whole millimetres, so an
integer shift plus an x flip maps a mask onto the template exactly (data/README.md and each library's README):
- stroke, `nifti/soop_lesions/bwsrsub-*_lesion.nii.gz` (1,448 acute infarcts, SPM box 157×189×136):
  template index = (176 − i, j + 22, k + 22);
- MS, `nifti/ms_lesion_shapes/open_ms_data/patient*/*.nii.gz` (27 consensus masks, FSL grid 182×218×182):
  template index = (188 − i, j + 8, k).
A mask is read when drawn (≈ 20 ms), never all at once, and kept as its bounding box on the template grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from training.synthetic.anatomy import shared_data_dir


class ShapeLibrary(StrEnum):
    STROKE = "stroke"
    MS = "ms"


@dataclass(frozen=True)
class _Layout:
    folder: str
    pattern: str
    shape: tuple[int, int, int]
    x_flip_to: int  # template i = x_flip_to − i
    offset_yz: tuple[int, int]  # template (j, k) = (j, k) + offset


_LAYOUTS = {
    ShapeLibrary.STROKE: _Layout("nifti/soop_lesions", "bwsrsub-*_lesion.nii.gz", (157, 189, 136), 176, (22, 22)),
    ShapeLibrary.MS: _Layout("nifti/ms_lesion_shapes/open_ms_data", "patient*/*.nii.gz", (182, 218, 182), 188, (8, 0)),
}


@dataclass(frozen=True)
class LesionShape:
    """One library mask on the template's 1 mm grid: `mask[a, b, c]` is template voxel `origin + (a, b, c)`."""

    name: str
    mask: np.ndarray  # bool, the mask's bounding box
    origin: tuple[int, int, int]

    @property
    def volume_ml(self) -> float:
        return float(self.mask.sum()) / 1000.0


@functools.lru_cache(maxsize=2)
def shape_paths(library: ShapeLibrary | str) -> tuple[Path, ...]:
    """Every mask file of `library`, sorted (so an index drawn from a seed names the same file everywhere)."""
    layout = _LAYOUTS[ShapeLibrary(library)]
    folder = shared_data_dir() / layout.folder
    paths = tuple(sorted(folder.glob(layout.pattern)))
    if not paths:
        raise ValueError(f"no {ShapeLibrary(library).value} lesion shapes under {folder} (data/README.md lists them)")
    return paths


def load_shape(library: ShapeLibrary | str, index: int) -> LesionShape:
    """Mask number `index` of `library` on the template grid; a wrong grid is a ValueError naming the file."""
    import nibabel as nib

    library = ShapeLibrary(library)
    layout = _LAYOUTS[library]
    paths = shape_paths(library)
    if not 0 <= index < len(paths):
        raise ValueError(f"{library.value} shape index {index} is outside 0…{len(paths) - 1}")
    path = paths[index]
    image = nib.load(path)
    if tuple(image.shape[:3]) != layout.shape or image.affine[0, 0] != -1.0:
        raise ValueError(f"{path}: expected a {layout.shape} grid stored right to left, got {image.shape}")
    data = np.asarray(image.dataobj).reshape(layout.shape) > 0
    on_template = data[::-1]  # template i increases with x; the library stores x right to left
    occupied = np.argwhere(on_template)
    if len(occupied) == 0:
        raise ValueError(f"{path}: the mask is empty")
    low, high = occupied.min(0), occupied.max(0) + 1
    mask = on_template[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    first_i = layout.x_flip_to - (layout.shape[0] - 1)  # where flipped index 0 lands on the template
    origin = (int(low[0]) + first_i, int(low[1]) + layout.offset_yz[0], int(low[2]) + layout.offset_yz[1])
    return LesionShape(path.name if library is ShapeLibrary.STROKE else path.parent.name, mask.copy(), origin)


__all__ = ["LesionShape", "ShapeLibrary", "load_shape", "shape_paths"]
