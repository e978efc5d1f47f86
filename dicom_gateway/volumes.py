"""Series → 3-D volumes with their geometry, stored and real values, and the source of every slice.

Why this order (design.md §4): a diffusion series holds many volumes at the same positions, so it is split first
(by `diffusion.volume_keys`: rounded b, direction, repeat; and per instance for multi-frame instances), mosaics are
unpacked into slices, and only then is each group sorted in space and given an affine by highdicom. Slice spacing
is the distance between adjacent slice positions, never SliceThickness (a gap makes them differ), and a group whose
positions are not evenly spaced is refused with the gap positions in the reason instead of being stretched.

Stored values (no modality or real-world transform) are kept for the geometry oracle (dcm2niix writes stored
values); real values (Real World Value Mapping when present, else Rescale Slope/Intercept) are what the node uses.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from dicom_gateway.attributes import frame_value, functional_sequence, is_enhanced, number_of_frames
from dicom_gateway.diffusion import VolumeKey, ordered_volume_keys, volume_keys
from dicom_gateway.mosaic import MosaicSlices, is_mosaic, unpack_mosaic
from dicom_gateway.study_files import open_dicom
from models.geometry import slice_normal

__all__ = [
    "SeriesVolume",
    "SliceSource",
    "ValueSource",
    "VolumeNotProcessed",
    "series_volumes",
    "volume_to_nifti",
]

SPACING_RTOL = 0.01  # adjacent slice distances may differ by 1 % of the spacing (highdicom's default)
ORIENTATION_ATOL = 1e-4  # direction cosines of slices of one volume


class VolumeNotProcessed(ValueError):
    """A series that cannot become a regular volume; the message is the 'not processed' reason."""


class ValueSource(StrEnum):
    REAL_WORLD_VALUE_MAPPING = "real world value mapping"
    RESCALE = "rescale"
    STORED = "stored"


@dataclass(frozen=True)
class SliceSource:
    """Where one slice came from: the instance, its 1-based frame (multi-frame only) and mosaic tile (0-based)."""

    sop_instance_uid: str
    frame_number: int | None = None
    mosaic_tile: int | None = None


@dataclass(frozen=True)
class SeriesVolume:
    """One 3-D volume of a series: arrays are (slices, rows, columns) as highdicom.Volume holds them."""

    series_instance_uid: str
    key: VolumeKey
    stored: hd.Volume  # stored pixel values, decoded dtype
    real: hd.Volume  # float32 real values (see value_source)
    value_source: ValueSource
    unit: str | None  # UCUM code value of the Real World Value Mapping's units, None without one
    sources: tuple[SliceSource, ...]  # per slice, in slice order
    reference_datasets: tuple[Dataset, ...]  # per slice, in slice order (repeated for frames of one instance)
    multiframe_instance_uid: str | None = None  # set when the volume is one multi-frame instance of several

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing: slice distance from positions, then PixelSpacing."""
        return tuple(float(s) for s in self.stored.spacing)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def label(self) -> str:
        return self.key.label()


@dataclass
class _Slice:
    """One 2-D slice before assembly."""

    group: Hashable
    key: VolumeKey
    order: tuple
    pixels: np.ndarray
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    value_source: ValueSource
    unit: str | None
    source: SliceSource
    dataset: Dataset
    multiframe_instance_uid: str | None


def series_volumes(datasets: Sequence[Dataset], wanted: Collection[VolumeKey] | None = None) -> list[SeriesVolume]:
    """All volumes of one series in acquisition order (`diffusion.ordered_volume_keys`, as dcm2niix orders them);
    raises VolumeNotProcessed with the reason when one fails.

    `wanted` limits the work to those volumes (a trace needs neither the b0 nor the other b-values of its series).
    Datasets read without pixel data (stop_before_pixels) are re-read from their `filename` (gzip allowed).
    """
    if not datasets:
        raise ValueError("no datasets given")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise ValueError(f"datasets belong to {len(series_uids)} series; assemble one series at a time")
    series_uid = series_uids.pop()
    keys = volume_keys(datasets)
    _check_slices_present(datasets, keys, set(wanted) if wanted is not None else {k for ks in keys for k in ks})
    multiframe_count = sum(1 for ds in datasets if number_of_frames(ds) > 1)
    slices: list[_Slice] = []
    for index, (dataset, frame_keys) in enumerate(zip(datasets, keys, strict=True)):
        if wanted is not None and not set(frame_keys) & set(wanted):
            continue
        slices += _slices_of(dataset, index, frame_keys, split_per_instance=multiframe_count > 1)
    if wanted is not None:
        slices = [item for item in slices if item.key in wanted]
        missing = set(wanted) - {item.key for item in slices}
        if missing:
            labels = ", ".join(sorted(key.label() for key in missing))
            raise VolumeNotProcessed(f"series {series_uid} holds no volume {labels}")

    groups: dict[Hashable, list[_Slice]] = {}
    for item in slices:
        groups.setdefault(item.group, []).append(item)
    rank = {key: place for place, key in enumerate(ordered_volume_keys(datasets, keys))}
    ordered = sorted(groups.values(), key=lambda members: (rank[members[0].key], min(m.order for m in members)))
    single = len(rank) == 1
    return [_assemble(series_uid, members, "the volume" if single else f"volume {members[0].key.label()}") for members in ordered]


def _check_slices_present(datasets: Sequence[Dataset], keys: list[list[VolumeKey]], targets: set[VolumeKey]) -> None:
    """Refuse a volume whose slice positions are a strict subset of another volume's in its series.

    Why: a slice lost at either end of a stack leaves no gap between positions, but the series' other volumes (b0
    and b, or other directions) still hold that position. Mosaics carry a whole volume per image: nothing to compare.
    """
    positions: dict[VolumeKey, set[tuple[float, float, float]]] = {}
    normal: np.ndarray | None = None
    for dataset, frame_keys in zip(datasets, keys, strict=True):
        if is_mosaic(dataset):
            return
        enhanced = is_enhanced(dataset)
        for frame, key in enumerate(frame_keys):
            frame_index = frame if enhanced else None
            position = frame_value(dataset, frame_index, "PlanePositionSequence", "ImagePositionPatient")
            orientation = frame_value(dataset, frame_index, "PlaneOrientationSequence", "ImageOrientationPatient")
            if position is None or orientation is None:
                continue
            if normal is None:
                normal = slice_normal([float(v) for v in orientation])
            positions.setdefault(key, set()).add(tuple(round(float(v), 2) for v in position))  # type: ignore[arg-type]
    if normal is None:
        return
    for key in sorted(targets & positions.keys(), key=VolumeKey.label):  # a trace (no direction) sorts by text
        own = positions[key]
        fuller = [other for other, held in positions.items() if own < held]
        if fuller:
            lost = sorted(float(np.asarray(p) @ normal) for p in positions[fuller[0]] - own)
            where = ", ".join(f"{d:.2f} mm" for d in lost[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
            raise VolumeNotProcessed(
                f"volume {key.label()}: {len(lost)} slice(s) missing at {where} along the slice normal "
                f"(present in volume {fuller[0].label()} of the series)"
            )


def volume_to_nifti(volume: hd.Volume) -> nib.Nifti1Image:
    """A Nifti1Image with axes (column, row, slice) and a RAS affine, the usual dcm2niix-like layout."""
    return volume.permute_spatial_axes([2, 1, 0]).to_nibabel()


def _pixel_array(dataset: Dataset) -> np.ndarray:
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        filename = getattr(dataset, "filename", None)
        if not isinstance(filename, str) or not filename:
            raise VolumeNotProcessed(f"instance {dataset.get('SOPInstanceUID', '?')} has no pixel data")
        dataset = open_dicom(Path(filename))
    try:
        return dataset.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as error:
        # a transfer syntax without an installed decoder, or damaged pixel data
        raise VolumeNotProcessed(
            f"instance {dataset.get('SOPInstanceUID', '?')}: pixel data cannot be decoded ({error})"
        ) from error


def _slices_of(
    dataset: Dataset, index: int, frame_keys: list[VolumeKey], *, split_per_instance: bool
) -> list[_Slice]:
    sop_uid = str(dataset.SOPInstanceUID)
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeNotProcessed(f"instance {sop_uid}: colour images ({dataset.SamplesPerPixel} samples) are not used")
    frames = number_of_frames(dataset)
    instance_number = _float(dataset.get("InstanceNumber"), 0.0)
    pixels = _pixel_array(dataset)
    if frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != frames:
        raise VolumeNotProcessed(f"instance {sop_uid}: pixel data of shape {pixels.shape} is not {frames} frame(s)")
    enhanced = is_enhanced(dataset)
    mosaic = is_mosaic(dataset)
    per_instance = sop_uid if split_per_instance and frames > 1 else None
    out: list[_Slice] = []
    for frame in range(frames):
        frame_index = frame if enhanced else None
        key = frame_keys[frame]
        if mosaic:  # tile positions, orientation and spacing come from the mosaic's own geometry
            tiles = _mosaic_tiles(dataset, pixels[frame])
            position, orientation, spacing = tiles.positions[0], tiles.orientation, tiles.pixel_spacing
        else:
            position = frame_value(dataset, frame_index, "PlanePositionSequence", "ImagePositionPatient")
            orientation = frame_value(dataset, frame_index, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = frame_value(dataset, frame_index, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise VolumeNotProcessed(f"instance {sop_uid}: frame {frame + 1} lacks position, orientation or spacing")
        slope, intercept, source, unit = _value_mapping(dataset, frame_index)
        common = {
            "key": key,
            "group": (per_instance, key),
            "orientation": np.asarray([float(v) for v in orientation], dtype=np.float64),
            "pixel_spacing": (float(spacing[0]), float(spacing[1])),
            "slope": slope,
            "intercept": intercept,
            "value_source": source,
            "unit": unit,
            "dataset": dataset,
            "multiframe_instance_uid": per_instance,
        }
        order = (_float(dataset.get("AcquisitionNumber"), 0.0), instance_number, index, frame)
        if mosaic:
            for tile in range(tiles.pixels.shape[0]):
                out.append(
                    _Slice(
                        order=order,
                        pixels=tiles.pixels[tile],
                        position=tiles.positions[tile],
                        source=SliceSource(sop_uid, None, tile),
                        **common,
                    )
                )
            continue
        out.append(
            _Slice(
                order=order,
                pixels=pixels[frame],
                position=np.asarray([float(v) for v in position], dtype=np.float64),
                source=SliceSource(sop_uid, frame + 1 if frames > 1 or enhanced else None),
                **common,
            )
        )
    return out


def _mosaic_tiles(dataset: Dataset, pixels: np.ndarray) -> MosaicSlices:
    try:
        return unpack_mosaic(dataset, pixels)
    except ValueError as error:
        raise VolumeNotProcessed(f"instance {dataset.get('SOPInstanceUID', '?')}: {error}") from error


def _value_mapping(dataset: Dataset, frame_index: int | None) -> tuple[float, float, ValueSource, str | None]:
    """(slope, intercept, source, unit): a linear Real World Value Mapping first (one with a unit preferred),
    else Rescale Slope/Intercept; LUT-only mappings are skipped."""
    linear = [
        item
        for item in functional_sequence(dataset, frame_index, "RealWorldValueMappingSequence")
        if "RealWorldValueSlope" in item and item.RealWorldValueSlope is not None
    ]
    if linear:
        with_unit = [item for item in linear if _unit(item) not in (None, "1")]
        item = (with_unit or linear)[0]
        return (
            float(item.RealWorldValueSlope),
            _float(item.get("RealWorldValueIntercept"), 0.0),
            ValueSource.REAL_WORLD_VALUE_MAPPING,
            _unit(item),
        )
    slope = frame_value(dataset, frame_index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_value(dataset, frame_index, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None and intercept is None:
        return 1.0, 0.0, ValueSource.STORED, None
    return _float(slope, 1.0), _float(intercept, 0.0), ValueSource.RESCALE, None


def _unit(item: Dataset) -> str | None:
    units = item.get("MeasurementUnitsCodeSequence")
    if not units:
        return None
    value = units[0].get("CodeValue")
    return str(value) if value else None


def _float(value: object, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _assemble(series_uid: str, members: list[_Slice], label: str) -> SeriesVolume:
    """One group of slices as a volume; `label` names it in reasons ("the volume", "volume b=1000 dir=...")."""
    first = members[0]
    if len(members) < 2:
        raise VolumeNotProcessed(f"{label}: a single slice is not a volume")
    shapes = {m.pixels.shape for m in members}
    if len(shapes) != 1:
        raise VolumeNotProcessed(f"{label}: slices differ in size {sorted(shapes)}")
    if any(not np.allclose(m.orientation, first.orientation, atol=ORIENTATION_ATOL) for m in members):
        raise VolumeNotProcessed(f"{label}: slices differ in orientation")
    if any(not np.allclose(m.pixel_spacing, first.pixel_spacing, rtol=1e-5) for m in members):
        raise VolumeNotProcessed(f"{label}: slices differ in pixel spacing")
    positions = np.stack([m.position for m in members])
    orientation = first.orientation.tolist()
    spacing, indices = hd.spatial.get_volume_positions(positions, orientation, rtol=SPACING_RTOL)
    if spacing is None or indices is None:
        raise VolumeNotProcessed(f"{label}: {_spacing_problem(positions, first.orientation)}")
    ordered = [members[i] for i in np.argsort(indices)]
    stored = np.stack([m.pixels for m in ordered])
    real = np.stack(
        [(m.pixels.astype(np.float64) * m.slope + m.intercept).astype(np.float32) for m in ordered]
    )
    units = {m.unit for m in ordered}
    sources = {m.value_source for m in ordered}
    if len(units) > 1 or len(sources) > 1:
        raise VolumeNotProcessed(f"{label}: slices carry different value mappings {sorted(map(str, units))}")

    def make(array: np.ndarray) -> hd.Volume:
        return hd.Volume.from_attributes(
            array=array,
            image_position=ordered[0].position.tolist(),
            image_orientation=orientation,
            pixel_spacing=list(first.pixel_spacing),
            spacing_between_slices=float(spacing),
            coordinate_system="PATIENT",
            frame_of_reference_uid=first.dataset.get("FrameOfReferenceUID"),
        )

    return SeriesVolume(
        series_instance_uid=series_uid,
        key=first.key,
        stored=make(stored),
        real=make(real),
        value_source=first.value_source,
        unit=first.unit,
        sources=tuple(m.source for m in ordered),
        reference_datasets=tuple(m.dataset for m in ordered),
        multiframe_instance_uid=first.multiframe_instance_uid,
    )


def _spacing_problem(positions: np.ndarray, orientation: np.ndarray) -> str:
    """Why positions are no regular stack: duplicates, off-normal steps, or gaps listed in mm along the normal."""
    distances = np.sort(positions @ slice_normal(orientation))
    steps = np.diff(distances)
    if np.any(np.isclose(steps, 0.0, atol=1e-3)):
        duplicate = distances[1:][np.isclose(steps, 0.0, atol=1e-3)]
        return "duplicate slice positions at " + ", ".join(f"{d:.2f} mm" for d in duplicate[:5])
    nominal = float(np.min(steps))
    irregular = np.flatnonzero(~np.isclose(steps, nominal, rtol=SPACING_RTOL))
    if irregular.size == 0:
        return "slice positions do not stack along the slice normal"
    gaps = ", ".join(
        f"{distances[i]:.2f}→{distances[i + 1]:.2f} mm ({steps[i]:.2f} mm)" for i in irregular[:10]
    )
    more = f" and {irregular.size - 10} more" if irregular.size > 10 else ""
    return (
        f"missing or unevenly spaced slices: expected {nominal:.2f} mm between slices along the normal, "
        f"gaps at {gaps}{more}"
    )
