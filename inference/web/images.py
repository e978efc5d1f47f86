"""Slices for the viewer: raw float32 values of one slice of a NIfTI volume, the lesion mask on that slice, and
the patient directions its four edges face.

Why raw values and not PNGs: window/level is a drag in the browser, so the page needs the real intensities. Slices
are taken along the volume's third voxel axis (the acquisition's slice order). The mask is on the first channel's
grid (DWI or FLAIR, design.md §3); it is shown on another volume (ADC, or FLAIR beside DWI) by nearest-neighbour
lookup through both affines, one slice at a time, so no whole-volume resampling happens per request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dicom_gateway.writers.overlay import patient_orientation
from models.geometry import swap_ras_lps

_CACHED_VOLUMES = 6
_OPPOSITE_DIRECTION = str.maketrans("RLAPHF", "LRPAFH")


@dataclass(frozen=True)
class Volume:
    data: np.ndarray  # float32, 3-D (a 4-D file keeps its first volume)
    affine: np.ndarray

    @property
    def slices(self) -> int:
        return int(self.data.shape[2])

    def describe(self) -> dict[str, object]:
        """Shape and a default window (0.5-99.5 percentiles of the non-zero voxels) for the viewer."""
        values = self.data[self.data != 0]
        low, high = (np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0))
        high = max(float(high), float(low) + 1e-3)
        return {
            "columns": int(self.data.shape[0]),
            "rows": int(self.data.shape[1]),
            "slices": self.slices,
            "window_center": (float(low) + high) / 2,
            "window_width": high - float(low),
            "spacing_mm": [float(v) for v in nib.affines.voxel_sizes(self.affine)[:3]],
            "edge_letters": edge_letters(self.affine),
        }

    def slice_bytes(self, index: int) -> bytes:
        """Slice `index` as little-endian float32, row-major: the NIfTI's (column, row, slice) axes give back the
        rows and columns as the scanner stored them, the orientation a PACS viewer shows."""
        return np.ascontiguousarray(self.data[:, :, self._check(index)].T, dtype="<f4").tobytes()

    def _check(self, index: int) -> int:
        if not 0 <= index < self.slices:
            raise IndexError(f"slice {index} outside 0..{self.slices - 1}")
        return index


def edge_letters(affine: np.ndarray) -> dict[str, str]:
    """The patient direction each edge of a slice faces, laid out as `Volume.slice_bytes` lays it out (first voxel
    axis left to right, second top to bottom), so the reader can tell left from right on screen. The letters are
    those the SC overlay writes as PatientOrientation (R/L, A/P, H/F; an oblique direction's letters largest
    first)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :2].T  # the first two voxel axes' directions in RAS+
    lps = swap_ras_lps(axes / np.linalg.norm(axes, axis=1, keepdims=True))
    right, bottom = patient_orientation(lps.ravel().tolist())
    return {
        "left": right.translate(_OPPOSITE_DIRECTION),
        "right": right,
        "top": bottom.translate(_OPPOSITE_DIRECTION),
        "bottom": bottom,
    }


def mask_slice_bytes(mask: Volume, target: Volume, index: int) -> bytes:
    """The mask on slice `index` of `target` (uint8 0/1, same layout as `Volume.slice_bytes`)."""
    target._check(index)
    columns, rows = target.data.shape[:2]
    i, j = np.meshgrid(np.arange(columns), np.arange(rows), indexing="ij")
    voxels = np.stack([i.ravel(), j.ravel(), np.full(i.size, index), np.ones(i.size)])
    to_mask = np.linalg.inv(mask.affine) @ target.affine
    found = np.rint(to_mask @ voxels)[:3].astype(np.int64)
    inside = np.all((found >= 0) & (found < np.array(mask.data.shape[:3])[:, None]), axis=0)
    values = np.zeros(i.size, dtype=np.uint8)
    values[inside] = mask.data[found[0, inside], found[1, inside], found[2, inside]] > 0
    return np.ascontiguousarray(values.reshape(columns, rows).T).tobytes()


def best_slice(mask: Volume, target: Volume) -> int:
    """The slice of `target` showing the most lesion (the viewer opens there); the middle one without lesion."""
    counts = [np.count_nonzero(np.frombuffer(mask_slice_bytes(mask, target, k), np.uint8)) for k in range(target.slices)]
    return int(np.argmax(counts)) if max(counts, default=0) else target.slices // 2


class VolumeCache:
    """The last few volumes read, keyed by path and modification time (a reprocessed result is a new file)."""

    def __init__(self, size: int = _CACHED_VOLUMES) -> None:
        self._size = size
        self._volumes: OrderedDict[tuple[str, int], Volume] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: Path) -> Volume:
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._volumes:
                self._volumes.move_to_end(key)
                return self._volumes[key]
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"{path.name} is {data.ndim}-D, the viewer shows 3-D volumes")
        volume = Volume(data, np.asarray(image.affine, dtype=np.float64))
        with self._lock:
            self._volumes[key] = volume
            while len(self._volumes) > self._size:
                self._volumes.popitem(last=False)
        return volume
