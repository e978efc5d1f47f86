"""Diffusion b-value and gradient direction of an image or frame, and the key that splits a series into volumes.

Vendors store these in different places (design.md §4); the standard tags come first (read with `attributes`'
functional-group precedence), then each vendor's private element, found through its private creator. The split
key is shared with the volume assembler so that a series is cut into volumes exactly as the role rules counted them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_gateway.attributes import (
    SIEMENS_MR_HEADER,
    UIH_IMAGE_HEADER,
    PrivateTags,
    csa_values,
    first_number,
    frame_value,
    functional_item,
    is_enhanced,
    number_of_frames,
    siemens_csa,
)

B0_THRESHOLD = 50.0  # below this a b-value counts as b0 (scanners store 0, 0.001, 5, ... for their b0 images)
B_ROUNDING = 5.0  # b-values are rounded to a multiple of this
DIRECTION_DECIMALS = 4
GE_B_OFFSET = 1e9  # GE adds 1e9 (or multiples) to the b-value in (0043,xx39) for some sequences

_GE_PARM = "GEMS_PARM_01"
_GE_ACQU = "GEMS_ACQU_01"
_PHILIPS_IMAGING = "Philips Imaging DD 001"
_PHILIPS_MR_IMAGING = "Philips MR Imaging DD 001"


@dataclass(frozen=True)
class DiffusionInfo:
    """b-value (rounded, 0.0 for b0, None when no tag says) and unit gradient direction (None when it has none).

    `isotropic` marks a scanner-made trace image (DiffusionDirectionality ISOTROPIC, Philips direction "I");
    `stored_b_value` is the value as written, which tells apart repeated b0 volumes (Philips 0, 0.001 … 0.004).
    """

    b_value: float | None
    direction: tuple[float, float, float] | None
    isotropic: bool = False
    stored_b_value: float | None = None


@dataclass(frozen=True, order=True)
class VolumeKey:
    """Which volume of its series a frame belongs to: (b, direction) plus a repeat index for equal pairs."""

    b_value: float
    direction: tuple[float, float, float] | None
    repeat: int = 0

    def label(self) -> str:
        """Short human form for logs and inspect output."""
        if self.direction is None:
            text = f"b={self.b_value:g}"
        else:
            text = f"b={self.b_value:g} dir=({self.direction[0]:.3f},{self.direction[1]:.3f},{self.direction[2]:.3f})"
        return text if self.repeat == 0 else f"{text} #{self.repeat + 1}"


def round_b_value(stored: float) -> float:
    """Round to a multiple of B_ROUNDING; anything below B0_THRESHOLD is b0."""
    if stored < B0_THRESHOLD:
        return 0.0
    return float(round(stored / B_ROUNDING) * B_ROUNDING)


def diffusion_info(dataset: Dataset, frame_index: int | None = None) -> DiffusionInfo:
    """b-value and direction of a classic image, or of frame `frame_index` (0-based) of an enhanced image."""
    if frame_index is not None and frame_index < 0:
        raise ValueError(f"frame_index must be >= 0, got {frame_index}")
    diffusion_item = _enhanced_diffusion_item(dataset, frame_index)
    private = PrivateTags(dataset)
    stored_b = _stored_b_value(dataset, private, diffusion_item)
    direction = _direction(dataset, private, diffusion_item)
    isotropic = _is_isotropic(dataset, private, diffusion_item)
    if stored_b is None:
        return DiffusionInfo(None, direction, isotropic, None)
    b_value = round_b_value(stored_b)
    if b_value == 0.0:
        direction = None  # a b0 image has no meaningful gradient direction (Philips writes one anyway)
    return DiffusionInfo(b_value, direction, isotropic, stored_b)


def frame_diffusion_infos(datasets: Sequence[Dataset]) -> list[list[DiffusionInfo]]:
    """`diffusion_info` of every frame of every dataset (frame_index None for classic single-frame images)."""
    return [
        [diffusion_info(dataset, _frame_argument(dataset, frame)) for frame in range(number_of_frames(dataset))]
        for dataset in datasets
    ]


def _frame_argument(dataset: Dataset, frame: int) -> int | None:
    return frame if number_of_frames(dataset) > 1 or is_enhanced(dataset) else None


def volume_keys(
    datasets: Sequence[Dataset], infos: list[list[DiffusionInfo]] | None = None
) -> list[list[VolumeKey]]:
    """For each dataset of one series, the VolumeKey of each of its frames (`infos`: frame_diffusion_infos).

    Frames are first grouped by (rounded b, direction). Where one group holds several frames at the same image
    position (repeated b0s, b-values without directions, mosaics or one volume per multi-frame instance) they are
    numbered apart by acquisition order: stored b, then acquisition number and time, then file and frame order.
    Images without any b-value count as b=0.
    """
    infos = frame_diffusion_infos(datasets) if infos is None else infos
    frames: list[tuple[int, int, DiffusionInfo, tuple[float, ...] | None, tuple]] = []
    for dataset_index, dataset in enumerate(datasets):
        for frame, info in enumerate(infos[dataset_index]):
            frame_index = _frame_argument(dataset, frame)
            position = _frame_position(dataset, frame_index)
            order = (
                info.stored_b_value if info.stored_b_value is not None else 0.0,
                _acquisition_number(dataset, frame_index),
                _acquisition_time(dataset, frame_index),
                dataset_index,
                frame,
            )
            frames.append((dataset_index, frame, info, position, order))

    groups: dict[tuple, list[int]] = defaultdict(list)
    for number, (_, _, info, position, _) in enumerate(frames):
        groups[(info.b_value or 0.0, info.direction, position)].append(number)
    repeat_of: dict[int, int] = {}
    for members in groups.values():
        for repeat, number in enumerate(sorted(members, key=lambda n: frames[n][4])):
            repeat_of[number] = repeat

    keys: list[list[VolumeKey]] = [[] for _ in datasets]
    for number, (dataset_index, _, info, _, _) in enumerate(frames):
        keys[dataset_index].append(VolumeKey(info.b_value or 0.0, info.direction, repeat_of[number]))
    return keys


def ordered_volume_keys(datasets: Sequence[Dataset], keys: list[list[VolumeKey]] | None = None) -> list[VolumeKey]:
    """The series' volumes in acquisition order, as dcm2niix writes them (and the shared `ref/*.bval` list them).

    A volume's place is its earliest frame by (acquisition date/time, instance number, file and frame order):
    Philips gives every image the same AcquisitionTime but numbers instances volume-interleaved, so the instance
    number decides there.
    """
    keys = volume_keys(datasets) if keys is None else keys
    first: dict[VolumeKey, tuple] = {}
    for dataset_index, (dataset, frame_keys) in enumerate(zip(datasets, keys, strict=True)):
        instance = first_number(dataset.get("InstanceNumber"))
        for frame, key in enumerate(frame_keys):
            frame_index = _frame_argument(dataset, frame)
            rank = (
                _acquisition_time(dataset, frame_index),
                instance if instance is not None else math.inf,
                dataset_index,
                frame,
            )
            if key not in first or rank < first[key]:
                first[key] = rank
    return sorted(first, key=lambda key: first[key])


def volume_key(dataset: Dataset, frame_index: int | None = None, repeat: int = 0) -> VolumeKey:
    """The key of one frame when its repeat index is already known (0 for the first frame at its position)."""
    info = diffusion_info(dataset, frame_index)
    return VolumeKey(info.b_value or 0.0, info.direction, repeat)


# --- where the values live ---------------------------------------------------------------------------------------


def _enhanced_diffusion_item(dataset: Dataset, frame_index: int | None) -> Dataset | None:
    if not is_enhanced(dataset):
        return None
    return functional_item(dataset, frame_index or 0, "MRDiffusionSequence")


def _stored_b_value(
    dataset: Dataset, private: PrivateTags, diffusion_item: Dataset | None
) -> float | None:
    if diffusion_item is not None:
        value = first_number(diffusion_item.get("DiffusionBValue"))
        if value is not None:
            return value
    value = first_number(dataset.get("DiffusionBValue"))
    if value is not None:
        return value
    value = first_number(private.value(0x0019, SIEMENS_MR_HEADER, 0x0C))
    if value is not None:
        return value
    value = _siemens_csa_b_value(dataset, private)
    if value is not None:
        return value
    value = first_number(private.value(0x0043, _GE_PARM, 0x39))
    if value is not None:
        while value >= GE_B_OFFSET:
            value -= GE_B_OFFSET
        return value
    value = first_number(private.value(0x2001, _PHILIPS_IMAGING, 0x03))
    if value is not None:
        return value
    return first_number(private.value(0x0065, UIH_IMAGE_HEADER, 0x09))


def _unit_direction(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    """Rounded unit vector, None when missing or (near) zero."""
    if len(values) != 3 or any(value is None for value in values):
        return None
    x, y, z = (float(value) for value in values)  # type: ignore[arg-type]
    norm = math.sqrt(x * x + y * y + z * z)
    if norm < 1e-3:
        return None
    return (
        round(x / norm, DIRECTION_DECIMALS) + 0.0,
        round(y / norm, DIRECTION_DECIMALS) + 0.0,
        round(z / norm, DIRECTION_DECIMALS) + 0.0,
    )


def _triple(value: object) -> list[float | None]:
    if value is None:
        return []
    try:
        return [first_number(item) for item in value]  # type: ignore[union-attr]
    except TypeError:
        return []


def _direction(
    dataset: Dataset, private: PrivateTags, diffusion_item: Dataset | None
) -> tuple[float, float, float] | None:
    if diffusion_item is not None:
        gradient = diffusion_item.get("DiffusionGradientDirectionSequence")
        if gradient:
            direction = _unit_direction(_triple(gradient[0].get("DiffusionGradientOrientation")))
            if direction is not None:
                return direction
    candidates = [
        _triple(dataset.get("DiffusionGradientOrientation")),
        _triple(private.value(0x0019, SIEMENS_MR_HEADER, 0x0E)),
        [first_number(private.value(0x0019, _GE_ACQU, offset)) for offset in (0xBB, 0xBC, 0xBD)],
        [
            first_number(private.value(0x2005, _PHILIPS_MR_IMAGING, offset))
            for offset in (0xB0, 0xB1, 0xB2)
        ],
        _triple(private.value(0x0065, UIH_IMAGE_HEADER, 0x37)),
    ]
    for values in candidates:
        direction = _unit_direction(values)
        if direction is not None:
            return direction
    return None


def _is_isotropic(dataset: Dataset, private: PrivateTags, diffusion_item: Dataset | None) -> bool:
    for source in (diffusion_item, dataset):
        if source is not None and str(source.get("DiffusionDirectionality", "")).upper() == "ISOTROPIC":
            return True
    philips_direction = private.value(0x2001, _PHILIPS_IMAGING, 0x04)
    return str(philips_direction or "").strip().upper() == "I"


def _frame_position(dataset: Dataset, frame_index: int | None) -> tuple[float, ...] | None:
    values = _triple(frame_value(dataset, frame_index, "PlanePositionSequence", "ImagePositionPatient"))
    if len(values) != 3 or any(value is None for value in values):
        return None
    return tuple(round(float(value), 3) for value in values)  # type: ignore[arg-type]


def _acquisition_number(dataset: Dataset, frame_index: int | None) -> float:
    content = functional_item(dataset, frame_index, "FrameContentSequence") if frame_index is not None else None
    number = first_number(content.get("FrameAcquisitionNumber")) if content is not None else None
    if number is None:
        number = first_number(dataset.get("AcquisitionNumber"))
    return number if number is not None else 0.0


def _acquisition_time(dataset: Dataset, frame_index: int | None) -> str:
    content = functional_item(dataset, frame_index, "FrameContentSequence") if frame_index is not None else None
    if content is not None and content.get("FrameAcquisitionDateTime"):
        return str(content.FrameAcquisitionDateTime)
    return f"{dataset.get('AcquisitionDate', '')}{dataset.get('AcquisitionTime', '')}"


# --- Siemens CSA image header ------------------------------------------------------------------------------------


def _siemens_csa_b_value(dataset: Dataset, private: PrivateTags) -> float | None:
    items = csa_values(siemens_csa(dataset, private=private), "B_value")
    return first_number(items[0]) if items else None
