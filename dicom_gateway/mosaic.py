"""Siemens mosaics and UIH grids: one stored image holding tiled slices, unpacked before any volume is built.

Why: a mosaic's ImagePositionPatient is the top-left corner of the whole tiled image, not of a slice, and its
pixel matrix holds a grid of slices. Unpacking (design.md §4) gives one 2-D slice per tile with its own position,
so the rest of the node treats mosaic data like any other stack of slices. Tiles fill the grid row by row,
ceil(√n) tiles per grid row.

Siemens geometry, as in nibabel.nicom (MosaicWrapper, "dicom_mosaic" theory note) and dcm2niix: the position of
tile 0 is the stored position shifted by half the difference between the mosaic size and the tile size, along the
row and column cosines; tile i lies i slice steps further along the slice normal. The normal is the CSA header's
SliceNormalVector when present (it encodes the slice order), else the cross product of the cosines; the step is
the distance between the protocol's slice centres (`sSliceArray.asSlice[i].sPosition`) when the CSA series header
lists them, else SpacingBetweenSlices. SliceThickness is never used: with a gap it is smaller than the step.

UIH grids (GDCM's SplitUihGridFilter): the slice count is (0065,xx50) and each tile's own ImagePositionPatient is
an item of the sequence (0065,xx51), both under "Image Private Header"; the grid has ceil(n / ceil(√n)) rows. Such
an image may carry no ImagePositionPatient of its own (nor orientation): dcm2niix then reads the first item's, and
so does this module. A mosaic whose tiles cannot be placed (no grid items, no position) is a ValueError.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_gateway.attributes import (
    CSA_IMAGE_HEADER,
    CSA_SERIES_HEADER,
    SIEMENS_MR_HEADER,
    UIH_IMAGE_HEADER,
    PrivateTags,
    csa_values,
    first_number,
    image_type_tokens,
    number_of_frames,
    siemens_csa,
)
from models.geometry import slice_normal

__all__ = ["MosaicSlices", "is_mosaic", "mosaic_grid", "mosaic_image_count", "unpack_mosaic"]

_SIEMENS_IMAGES_IN_MOSAIC_OFFSET = 0x0A  # (0019,xx0A) NumberOfImagesInMosaic, US
_UIH_IMAGES_IN_GRID_OFFSET = 0x50  # (0065,xx50) number of slices in the grid, DS
_UIH_FRAME_SEQUENCE_OFFSET = 0x51  # (0065,xx51) one item per slice, with its ImagePositionPatient
_ASCCONV_SLICE = re.compile(r"^sSliceArray\.asSlice\[(\d+)\]\.sPosition\.d(Sag|Cor|Tra)\s*=\s*(\S+)", re.MULTILINE)
_LPS_AXIS = {"Sag": 0, "Cor": 1, "Tra": 2}


@dataclass(frozen=True)
class MosaicSlices:
    """The tiles of one mosaic image as slices: stored values, and each tile's top-left voxel centre in LPS mm."""

    pixels: np.ndarray  # (n, rows, columns), stored values in tile order
    positions: np.ndarray  # (n, 3) ImagePositionPatient of each tile
    orientation: np.ndarray  # (6,) ImageOrientationPatient of every tile
    pixel_spacing: tuple[float, float]  # (row, column) spacing of every tile
    slice_step_mm: float  # distance between adjacent tiles along the normal


def is_mosaic(dataset: Dataset) -> bool:
    """True for a single-frame image with the whole ImageType token MOSAIC (Siemens), or a UIH grid."""
    if number_of_frames(dataset) != 1:
        return False
    return "MOSAIC" in image_type_tokens(dataset) or _uih_grid_positions(dataset) is not None


def mosaic_image_count(dataset: Dataset) -> int:
    """Slices in the mosaic: UIH (0065,xx50), (0019,xx0A) under SIEMENS MR HEADER, or the CSA image header."""
    uih = _uih_grid_positions(dataset)
    if uih is not None:
        return len(uih)
    count = _unsigned_short(PrivateTags(dataset).value(0x0019, SIEMENS_MR_HEADER, _SIEMENS_IMAGES_IN_MOSAIC_OFFSET))
    if count is None:
        count = next(iter(csa_values(siemens_csa(dataset, CSA_IMAGE_HEADER), "NumberOfImagesInMosaic")), None)
    if count is None:
        raise ValueError("mosaic image without NumberOfImagesInMosaic (Siemens MR or CSA image header)")
    count = int(float(count))
    if count <= 0:
        raise ValueError(f"mosaic announces {count} images")
    return count


def mosaic_grid(dataset: Dataset, count: int) -> tuple[int, int]:
    """(grid rows, tiles per grid row) of a mosaic of `count` slices: Siemens grids are square, UIH grids end
    after the last full row."""
    tiles_per_row = math.ceil(math.sqrt(count))
    grid_rows = math.ceil(count / tiles_per_row) if _uih_grid_positions(dataset) is not None else tiles_per_row
    return grid_rows, tiles_per_row


def unpack_mosaic(dataset: Dataset, pixels: np.ndarray | None = None) -> MosaicSlices:
    """Tiles of `dataset` (its stored pixel array unless `pixels` is given) with per-tile positions."""
    count = mosaic_image_count(dataset)
    stored = dataset.pixel_array if pixels is None else pixels
    if stored.ndim != 2:
        raise ValueError(f"mosaic pixel data must be 2-D, got shape {stored.shape}")
    uih_positions = _uih_grid_positions(dataset)
    grid_rows, tiles_per_row = mosaic_grid(dataset, count)
    rows, columns = stored.shape
    if rows % grid_rows or columns % tiles_per_row:
        raise ValueError(f"mosaic of {rows}×{columns} pixels cannot hold {grid_rows}×{tiles_per_row} equal tiles")
    tile_rows, tile_columns = rows // grid_rows, columns // tiles_per_row
    tiles = (
        stored.reshape(grid_rows, tile_rows, tiles_per_row, tile_columns)
        .transpose(0, 2, 1, 3)
        .reshape(grid_rows * tiles_per_row, tile_rows, tile_columns)[:count]
    )
    orientation = _placement(dataset, "ImageOrientationPatient", 6)
    row_spacing, column_spacing = _placement(dataset, "PixelSpacing", 2)
    spacing = (float(row_spacing), float(column_spacing))
    if uih_positions is not None:
        steps = np.linalg.norm(np.diff(uih_positions, axis=0), axis=1)
        step = float(steps.mean()) if steps.size else 1.0
        return MosaicSlices(np.ascontiguousarray(tiles), uih_positions, orientation, spacing, step)

    row_cosine, column_cosine = orientation[:3], orientation[3:]
    shift_rows = (rows - tile_rows) / 2.0
    shift_columns = (columns - tile_columns) / 2.0
    first = (
        _placement(dataset, "ImagePositionPatient", 3)
        + row_cosine * column_spacing * shift_columns
        + column_cosine * row_spacing * shift_rows
    )
    normal = _slice_normal(dataset, slice_normal(orientation))
    step = _slice_step(dataset, normal, count)
    positions = first + np.arange(count)[:, None] * step * normal[None, :]
    return MosaicSlices(np.ascontiguousarray(tiles), positions, orientation, spacing, step)


def _placement(dataset: Dataset, keyword: str, length: int) -> np.ndarray:
    """A geometry attribute of the image, else of a UIH grid's first slice item (where dcm2niix finds it)."""
    value = dataset.get(keyword)
    if value is None:
        items = _uih_grid_items(dataset)
        value = items[0].get(keyword) if items else None
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        numbers = np.empty(0)
    if numbers.shape != (length,):
        raise ValueError(f"mosaic without {keyword}: its tiles cannot be placed")
    return numbers


def _uih_grid_positions(dataset: Dataset) -> np.ndarray | None:
    """(n, 3) tile positions of a UIH grid; None when the image is no UIH grid of two or more slices."""
    count = PrivateTags(dataset).value(0x0065, UIH_IMAGE_HEADER, _UIH_IMAGES_IN_GRID_OFFSET)
    items = _uih_grid_items(dataset)
    if count is None or items is None:
        return None
    try:
        count = int(first_number(count))  # type: ignore[arg-type]
        positions = np.asarray([[float(v) for v in item.ImagePositionPatient] for item in items], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if count < 2 or positions.shape != (count, 3):
        return None
    return positions


def _uih_grid_items(dataset: Dataset) -> Sequence | None:
    """The UIH grid's per-slice items (0065,xx51), None when the image has none."""
    items = PrivateTags(dataset).value(0x0065, UIH_IMAGE_HEADER, _UIH_FRAME_SEQUENCE_OFFSET)
    return items if isinstance(items, Sequence) and len(items) else None


def _slice_normal(dataset: Dataset, from_orientation: np.ndarray) -> np.ndarray:
    """The CSA header's normal where it agrees with the orientation's (it carries the sign), else the latter."""
    vector = [first_number(v) for v in csa_values(siemens_csa(dataset, CSA_IMAGE_HEADER), "SliceNormalVector")]
    if len(vector) == 3 and None not in vector:
        normal = np.asarray(vector, dtype=np.float64)
        length = float(np.linalg.norm(normal))
        if length > 0 and abs(abs(float(normal @ from_orientation)) / length - 1.0) < 1e-3:
            return normal / length
    return from_orientation


def _slice_step(dataset: Dataset, normal: np.ndarray, count: int) -> float:
    centres = _protocol_slice_centres(dataset)
    if centres is not None and len(centres) == count and count > 1:
        distances = np.sort(centres @ normal)
        steps = np.diff(distances)
        if np.all(steps > 0) and np.allclose(steps, steps.mean(), rtol=1e-3, atol=1e-3):
            return float(steps.mean())
    spacing = dataset.get("SpacingBetweenSlices")
    if spacing is not None and float(spacing) > 0:
        return float(spacing)
    if count == 1:
        return 1.0
    raise ValueError("mosaic slice spacing unknown: no protocol slice positions and no SpacingBetweenSlices")


def _protocol_slice_centres(dataset: Dataset) -> np.ndarray | None:
    """Slice centres from the CSA series header's ASCCONV protocol, in LPS mm (Siemens Sag/Cor/Tra = L/P/S)."""
    protocol = csa_values(siemens_csa(dataset, CSA_SERIES_HEADER), "MrPhoenixProtocol")
    if not protocol or not isinstance(protocol[0], str):
        return None
    centres: dict[int, np.ndarray] = {}
    for index, axis, value in _ASCCONV_SLICE.findall(protocol[0]):
        try:
            centres.setdefault(int(index), np.zeros(3))[_LPS_AXIS[axis]] = float(value)
        except ValueError:
            return None
    if not centres or sorted(centres) != list(range(len(centres))):
        return None
    return np.stack([centres[i] for i in range(len(centres))])


def _unsigned_short(value: object) -> object | None:
    """NumberOfImagesInMosaic (US) as read: a number, or 2 raw bytes where implicit VR left it UN."""
    if isinstance(value, bytes):
        if len(value) == 2:
            return int.from_bytes(value, "little")
        try:
            return value.decode("ascii").strip("\0 ")
        except UnicodeDecodeError:
            return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str):
        return value[0] if len(value) else None  # type: ignore[index, arg-type]
    return value
