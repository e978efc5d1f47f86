"""One reading of DICOM attributes: where the value of an image, or of one frame of it, lives.

Precedence, as PS3.3 C.7.6.16 (Multi-frame Functional Groups) lays it out: a functional group macro lies either in
the frame's item of the Per-Frame Functional Groups Sequence or in the Shared Functional Groups Sequence, so the
frame's per-frame item is read first, then the shared item, then the top level of the dataset (classic images, and
attributes outside any macro). The first place that holds the attribute wins. `frame_index` is 0-based; None reads
no per-frame item (classic images, or a value of the whole instance).

Private elements are found through their private creators, because the block (xx in (gggg,xxee)) is assigned per
file (design.md §4): never at a fixed element number.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any

from pydicom.dataset import Dataset

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its DICOM *readers* are experimental; only its CSA parser is used here.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

__all__ = [
    "CSA_IMAGE_HEADER",
    "CSA_SERIES_HEADER",
    "SIEMENS_CSA_HEADER",
    "SIEMENS_MR_HEADER",
    "UIH_IMAGE_HEADER",
    "PrivateTags",
    "first_number",
    "frame_value",
    "functional_item",
    "functional_sequence",
    "image_type_tokens",
    "is_enhanced",
    "number_of_frames",
    "csa_values",
    "siemens_csa",
]

SIEMENS_MR_HEADER = "SIEMENS MR HEADER"  # (0019,xxee): b-value, gradient, NumberOfImagesInMosaic
SIEMENS_CSA_HEADER = "SIEMENS CSA HEADER"  # (0029,xx10) CSA image header, (0029,xx20) CSA series header
CSA_IMAGE_HEADER = 0x10
CSA_SERIES_HEADER = 0x20
UIH_IMAGE_HEADER = "Image Private Header"  # United Imaging (0065,xxee): b-value, gradient, grid slices

_PER_FRAME = "PerFrameFunctionalGroupsSequence"
_SHARED = "SharedFunctionalGroupsSequence"


def is_enhanced(dataset: Dataset) -> bool:
    """True for a multi-frame image with functional groups (Enhanced MR and its kin)."""
    return _PER_FRAME in dataset or _SHARED in dataset


def number_of_frames(dataset: Dataset) -> int:
    """NumberOfFrames, 1 for single-frame images and for absent or unreadable values."""
    value = dataset.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def _groups(dataset: Dataset, frame_index: int | None) -> list[Dataset]:
    """The frame's per-frame functional group item, then the shared one (empty for classic images)."""
    groups: list[Dataset] = []
    if frame_index is not None:
        per_frame = dataset.get(_PER_FRAME)
        if per_frame and 0 <= frame_index < len(per_frame):
            groups.append(per_frame[frame_index])
    shared = dataset.get(_SHARED)
    if shared:
        groups.append(shared[0])
    return groups


def functional_sequence(dataset: Dataset, frame_index: int | None, sequence: str) -> list[Dataset]:
    """The items of `sequence` for one frame: per-frame group, then shared group, then top level; [] if none."""
    for source in (*_groups(dataset, frame_index), dataset):
        items = source.get(sequence)
        if items:
            return list(items)
    return []


def functional_item(dataset: Dataset, frame_index: int | None, sequence: str) -> Dataset | None:
    """The first item of `sequence` for one frame (the precedence of `functional_sequence`), None if none."""
    items = functional_sequence(dataset, frame_index, sequence)
    return items[0] if items else None


def frame_value(dataset: Dataset, frame_index: int | None, sequence: str, keyword: str) -> Any | None:
    """`keyword` of one frame: in the per-frame group's `sequence` item, then the shared one's, then top level."""
    for group in _groups(dataset, frame_index):
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return dataset.get(keyword)


def image_type_tokens(dataset: Dataset, frame_index: int | None = None) -> frozenset[str]:
    """Upper-case value tokens of a frame's FrameType (per-frame, then shared), else of the image's ImageType."""
    value = None
    for group in _groups(dataset, frame_index):
        items = group.get("MRImageFrameTypeSequence")
        if items and items[0].get("FrameType"):
            value = items[0].FrameType
            break
    if value is None:
        value = dataset.get("ImageType")
    if value is None or value == "":
        return frozenset()
    tokens = [value] if isinstance(value, str) else list(value)
    return frozenset(str(token).strip().upper() for token in tokens if str(token).strip())


def first_number(value: object) -> float | None:
    """A finite float from a DS/IS/FD/FL value (the first of several, ASCII bytes too), else None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        values = list(value)  # type: ignore[call-overload]
        if not values:
            return None
        value = values[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class PrivateTags:
    """The private blocks of one dataset, keyed by (group, creator): read once, then looked up per element.

    Same lookup as `Dataset.private_block`, which scans the whole dataset on every call: far too slow for
    per-frame reads over thousands of images.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.blocks: dict[tuple[int, str], int] = {}
        for tag in dataset.keys():
            group, element = tag >> 16, tag & 0xFFFF
            if group % 2 == 1 and 0x10 <= element <= 0xFF:
                creator = dataset[tag].value
                if isinstance(creator, bytes):
                    creator = creator.decode("latin-1")
                if isinstance(creator, str):
                    self.blocks.setdefault((group, creator.strip()), element)

    def value(self, group: int, creator: str, offset: int) -> Any | None:
        """The value of (group, xx offset) in the block reserved by `creator`; None when either is absent."""
        block = self.blocks.get((group, creator))
        if block is None:
            return None
        element = self.dataset.get((group << 16) | (block << 8) | offset)
        return None if element is None else element.value


def siemens_csa(dataset: Dataset, offset: int = CSA_IMAGE_HEADER, private: PrivateTags | None = None) -> dict | None:
    """A Siemens CSA header ((0029,xx10) image, (0029,xx20) series) parsed by nibabel; None when absent or damaged.

    Never raises on damage: the CSA header is a fallback for values the standard or MR header lacks.
    """
    raw = (private or PrivateTags(dataset)).value(0x0029, SIEMENS_CSA_HEADER, offset)
    if not isinstance(raw, (bytes, bytearray)):
        return None
    try:
        return csareader.read(bytes(raw))
    except (csareader.CSAError, struct.error, ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError):
        return None


def csa_values(csa: dict | None, name: str) -> list[Any]:
    """The items of one element of a parsed CSA header (`siemens_csa`); [] when the header or element is absent."""
    if csa is None:
        return []
    element = csa.get("tags", {}).get(name)
    return list(element.get("items") or []) if isinstance(element, dict) else []
