"""Siemens and UIH mosaics: one stored image holding a tiled grid of slices, unpacked before any volume is built.

Why: a mosaic's ImagePositionPatient is the top-left corner of the whole tiled image, not of a slice, and its
pixel matrix is `tiles × tiles` slices. Unpacking (design.md §4) gives one 2-D slice per tile with its own
position, so the rest of the node treats mosaic data like any other stack of slices.

Geometry, as in nibabel.nicom (MosaicWrapper, "dicom_mosaic" theory note) and dcm2niix: the position of tile 0 is
the stored position shifted by half the difference between the mosaic size and the tile size, along the row and
column cosines; tile i lies i slice steps further along the slice normal. The normal is the CSA header's
SliceNormalVector when present (it encodes the slice order), else the cross product of the cosines; the step is
the distance between the protocol's slice centres (`sSliceArray.asSlice[i].sPosition`) when the CSA series header
lists them, else SpacingBetweenSlices. SliceThickness is never used: with a gap it is smaller than the step.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its DICOM *readers* are experimental; only its CSA parser is used here.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

__all__ = ["MosaicSlices", "is_mosaic", "mosaic_image_count", "unpack_mosaic"]

_SIEMENS_MR_HEADER = "SIEMENS MR HEADER"
_SIEMENS_CSA_HEADER = "SIEMENS CSA HEADER"
_UIH_HEADER = "Image Private Header"
_CSA_IMAGE_OFFSET = 0x10
_CSA_SERIES_OFFSET = 0x20
_SIEMENS_IMAGES_IN_MOSAIC_OFFSET = 0x0A  # (0019,xx0A) NumberOfImagesInMosaic, US
_UIH_IMAGES_IN_GRID_OFFSET = 0x50  # (0065,xx50) NumberOfImagesInGrid, DS (dcm2niix)
_ASCCONV_SLICE = re.compile(r"^sSliceArray\.asSlice\[(\d+)\]\.sPosition\.d(Sag|Cor|Tra)\s*=\s*(\S+)", re.MULTILINE)
_LPS_AXIS = {"Sag": 0, "Cor": 1, "Tra": 2}


@dataclass(frozen=True)
class MosaicSlices:
    """The tiles of one mosaic image as slices: stored values, and each tile's top-left voxel centre in LPS mm."""

    pixels: np.ndarray  # (n, rows, columns), stored values in tile order
    positions: np.ndarray  # (n, 3) ImagePositionPatient of each tile
    slice_step_mm: float  # distance between adjacent tiles along the normal


def is_mosaic(dataset: Dataset) -> bool:
    """True for a single-frame image whose ImageType carries the whole token MOSAIC."""
    image_type = [str(token).upper() for token in dataset.get("ImageType", [])]
    return "MOSAIC" in image_type and int(dataset.get("NumberOfFrames", 1) or 1) == 1


def mosaic_image_count(dataset: Dataset) -> int:
    """Slices in the mosaic: (0019,xx0A) under SIEMENS MR HEADER, the CSA image header, or UIH (0065,xx50)."""
    count = _private_value(dataset, 0x0019, _SIEMENS_MR_HEADER, _SIEMENS_IMAGES_IN_MOSAIC_OFFSET)
    if count is None:
        csa = _csa_header(dataset, _CSA_IMAGE_OFFSET)
        if csa is not None:
            try:
                count = csareader.get_n_mosaic(csa)
            except KeyError:
                count = None
    if count is None:
        count = _private_value(dataset, 0x0065, _UIH_HEADER, _UIH_IMAGES_IN_GRID_OFFSET)
    if count is None:
        raise ValueError("mosaic image without NumberOfImagesInMosaic (Siemens MR/CSA header, UIH grid count)")
    count = int(float(count))
    if count <= 0:
        raise ValueError(f"mosaic announces {count} images")
    return count


def unpack_mosaic(dataset: Dataset, pixels: np.ndarray | None = None) -> MosaicSlices:
    """Tiles of `dataset` (its stored pixel array unless `pixels` is given) with per-tile positions."""
    count = mosaic_image_count(dataset)
    stored = dataset.pixel_array if pixels is None else pixels
    if stored.ndim != 2:
        raise ValueError(f"mosaic pixel data must be 2-D, got shape {stored.shape}")
    tiles_per_side = int(np.ceil(np.sqrt(count)))
    rows, columns = stored.shape
    if rows % tiles_per_side or columns % tiles_per_side:
        raise ValueError(f"mosaic of {rows}×{columns} pixels cannot hold {tiles_per_side}² equal tiles")
    tile_rows, tile_columns = rows // tiles_per_side, columns // tiles_per_side
    tiles = (
        stored.reshape(tiles_per_side, tile_rows, tiles_per_side, tile_columns)
        .transpose(0, 2, 1, 3)
        .reshape(tiles_per_side * tiles_per_side, tile_rows, tile_columns)[:count]
    )

    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    shift_rows = (rows - tile_rows) / 2.0
    shift_columns = (columns - tile_columns) / 2.0
    first = (
        np.asarray(dataset.ImagePositionPatient, dtype=np.float64)
        + row_cosine * column_spacing * shift_columns
        + column_cosine * row_spacing * shift_rows
    )
    normal = _slice_normal(dataset, np.cross(row_cosine, column_cosine))
    step = _slice_step(dataset, normal, count)
    positions = first + np.arange(count)[:, None] * step * normal[None, :]
    return MosaicSlices(pixels=np.ascontiguousarray(tiles), positions=positions, slice_step_mm=step)


def _slice_normal(dataset: Dataset, cross: np.ndarray) -> np.ndarray:
    csa = _csa_header(dataset, _CSA_IMAGE_OFFSET)
    if csa is not None:
        try:
            vector = csareader.get_slice_normal(csa)
        except KeyError:
            vector = None
        if vector is not None and len(vector) == 3:
            normal = np.asarray(vector, dtype=np.float64)
            length = float(np.linalg.norm(normal))
            if length > 0 and abs(abs(float(normal @ cross)) / length - 1.0) < 1e-3:
                return normal / length
    return cross / np.linalg.norm(cross)


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
    csa = _csa_header(dataset, _CSA_SERIES_OFFSET)
    if csa is None:
        return None
    protocol = csa.get("tags", {}).get("MrPhoenixProtocol", {}).get("items") or []
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


def _private_value(dataset: Dataset, group: int, creator: str, offset: int) -> object | None:
    """A private element found through its creator (design.md §4), None when the block or element is absent."""
    try:
        block = dataset.private_block(group, creator)
        element = block[offset]
    except KeyError:
        return None
    value = element.value
    if isinstance(value, bytes):
        if len(value) == 2:  # US read as UN (implicit VR without a private dictionary entry)
            return int.from_bytes(value, "little")
        try:
            return value.decode("ascii").strip("\0 ")
        except UnicodeDecodeError:
            return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str):
        return value[0] if len(value) else None
    return value


def _csa_header(dataset: Dataset, offset: int) -> dict | None:
    try:
        element = dataset.private_block(0x0029, _SIEMENS_CSA_HEADER)[offset]
    except KeyError:
        return None
    try:
        return csareader.read(element.value)
    except (csareader.CSAError, ValueError, TypeError, IndexError):
        return None
