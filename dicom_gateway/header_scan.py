"""The receiver's binary header scanner: the few attributes the SCP's policy needs, read from an encoded dataset.

Building a pydicom Dataset per instance costs more than the rest of a C-STORE; this walks the top-level elements up
to (0028,0100) Bits Allocated and stops there, so private blocks and pixel data are never parsed. Every length is
checked against the data, so a damaged or hostile dataset is an UnreadableHeader, never a read past the end.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_gateway.uids import is_valid_uid

# Everything the SCP's policy needs lies at or before (0028,0100) Bits Allocated; the scan stops at the first tag after it.
_LAST_NEEDED_TAG = 0x00280100
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_MANUFACTURER = 0x00080070
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_NUMBER_OF_STUDY_RELATED_INSTANCES = 0x00201208
_SAMPLES_PER_PIXEL = 0x00280002
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_NEEDED_TAGS = frozenset(
    {
        _SOP_CLASS_UID,
        _SOP_INSTANCE_UID,
        _MANUFACTURER,
        _STUDY_INSTANCE_UID,
        _SERIES_INSTANCE_UID,
        _NUMBER_OF_STUDY_RELATED_INSTANCES,
        _SAMPLES_PER_PIXEL,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
        _BITS_ALLOCATED,
    }
)
# Explicit VR: these VRs have a reserved 2 bytes and a 4-byte length; all others a 2-byte length.
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_MAX_NESTING = 16


@dataclass(frozen=True)
class _Layout:
    """Precompiled structs for one byte order: tag + 4-byte length, a 4-byte length, a 2-byte length."""

    implicit: struct.Struct
    length: struct.Struct
    short_length: struct.Struct


_LAYOUTS = {order: _Layout(struct.Struct(order + "HHI"), struct.Struct(order + "I"), struct.Struct(order + "H")) for order in "<>"}


class UnreadableHeader(ValueError):
    """A dataset whose header cannot be read, or lacks a valid UID: the SCP answers 0xC000 with this reason."""


@dataclass(frozen=True)
class Header:
    """The few attributes the SCP reads from an instance, before it stores it."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    manufacturer: str
    announced_study_instances: int | None
    decoded_bytes: int  # Rows × Columns × Samples per Pixel × Bits Allocated × Number of Frames, in bytes
    frame_pixels: int
    frames: int


def parse_header(dataset: bytes, transfer_syntax: str, command_sop_class: str, command_sop_instance: str) -> Header:
    """Read the policy's attributes from an encoded dataset, stopping before private blocks and pixel data.

    SOP Class and Instance UIDs fall back to the C-STORE command's when the dataset lacks them. Raises
    UnreadableHeader for an unreadable header, a missing or invalid UID or a negative frame count.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        dataset = _inflate(dataset)
    little_endian = transfer_syntax != ExplicitVRBigEndian
    scanner = _HeaderScanner(dataset, implicit=transfer_syntax == ImplicitVRLittleEndian, little_endian=little_endian)
    try:
        raw = scanner.needed_values()
        sop_class = _uid(raw.get(_SOP_CLASS_UID)) or command_sop_class
        sop_instance = _uid(raw.get(_SOP_INSTANCE_UID)) or command_sop_instance
        study = _uid(raw.get(_STUDY_INSTANCE_UID))
        series = _uid(raw.get(_SERIES_INSTANCE_UID))
        manufacturer = raw.get(_MANUFACTURER, b"").decode("latin-1").strip(" \x00")
        announced = _integer_string(raw.get(_NUMBER_OF_STUDY_RELATED_INSTANCES))
        frames = _integer_string(raw.get(_NUMBER_OF_FRAMES))
        samples, rows, columns, bits = (
            scanner.unsigned_short(raw.get(tag)) for tag in (_SAMPLES_PER_PIXEL, _ROWS, _COLUMNS, _BITS_ALLOCATED)
        )
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise UnreadableHeader(f"unreadable header: {error}") from error
    for name, uid in (
        ("SOP Class UID", sop_class),
        ("SOP Instance UID", sop_instance),
        ("Study Instance UID", study),
        ("Series Instance UID", series),
    ):
        if not is_valid_uid(uid):
            raise UnreadableHeader(f"missing or invalid {name}")
    frames = 1 if frames is None else frames
    if frames < 0:
        raise UnreadableHeader("negative Number of Frames")
    return Header(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        manufacturer=manufacturer,
        announced_study_instances=announced if announced is not None and announced > 0 else None,
        decoded_bytes=((rows or 0) * (columns or 0) * (samples or 1) * (bits or 0) * frames + 7) // 8,
        frame_pixels=(rows or 0) * (columns or 0),
        frames=frames,
    )


class _HeaderScanner:
    """Walks the top-level elements of an encoded dataset up to (0028,0100), skipping values and sequences by
    their lengths; every length is checked against the data, so a lying length is a ValueError, never a read
    past the end or a long loop. Much cheaper than building a pydicom Dataset on the hot path."""

    def __init__(self, data: bytes, *, implicit: bool, little_endian: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.order = "<" if little_endian else ">"

    def needed_values(self) -> dict[int, bytes]:
        values: dict[int, bytes] = {}
        position = 0
        while position < len(self.data):
            tag, vr, length, value_at = self._element_header(position, self.implicit, self.order)
            if tag > _LAST_NEEDED_TAG:
                break
            if tag in _NEEDED_TAGS:
                if length == _UNDEFINED_LENGTH:
                    raise ValueError(f"undefined length on ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                values[tag] = self._value(value_at, length)
            position = self._skip_value(tag, vr, length, value_at, self.implicit, self.order, 0)
        return values

    def unsigned_short(self, value: bytes | None) -> int | None:
        if value is None or value == b"":
            return None
        if len(value) < 2:
            raise ValueError("a US value shorter than 2 bytes")
        return int(_LAYOUTS[self.order].short_length.unpack_from(value)[0])

    def _element_header(self, position: int, implicit: bool, order: str) -> tuple[int, bytes | None, int, int]:
        data = self.data
        if position + 8 > len(data):
            raise ValueError("truncated element header")
        layout = _LAYOUTS[order]
        group, element, long_length = layout.implicit.unpack_from(data, position)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            return tag, None, long_length, position + 8
        vr = data[position + 4 : position + 6]
        if vr in _LONG_LENGTH_VRS:
            if position + 12 > len(data):
                raise ValueError("truncated element header")
            return tag, vr, layout.length.unpack_from(data, position + 8)[0], position + 12
        return tag, vr, layout.short_length.unpack_from(data, position + 6)[0], position + 8

    def _value(self, value_at: int, length: int) -> bytes:
        if value_at + length > len(self.data):
            raise ValueError("element length past the end of the dataset")
        return self.data[value_at : value_at + length]

    def _skip_value(self, tag: int, vr: bytes | None, length: int, value_at: int, implicit: bool, order: str, depth: int) -> int:
        if length != _UNDEFINED_LENGTH:
            if value_at + length > len(self.data):
                raise ValueError("element length past the end of the dataset")
            return value_at + length
        if vr == b"UN":  # an undefined-length UN is a sequence encoded implicit VR little endian
            return self._skip_sequence(value_at, True, "<", depth + 1)
        if vr not in (None, b"SQ"):
            raise ValueError(f"undefined length on a {vr!r} element")
        return self._skip_sequence(value_at, implicit, order, depth + 1)

    def _skip_sequence(self, position: int, implicit: bool, order: str, depth: int) -> int:
        if depth > _MAX_NESTING:
            raise ValueError("sequences nested too deep")
        while True:
            tag, _vr, length, value_at = self._element_header(position, True, order)
            if tag == _SEQUENCE_END:
                return value_at
            if tag != _ITEM:
                raise ValueError("sequence without an item")
            if length != _UNDEFINED_LENGTH:
                position = self._skip_value(tag, None, length, value_at, implicit, order, depth)
                continue
            position = value_at
            while True:
                tag, vr, length, value_at = self._element_header(position, implicit, order)
                if tag == _ITEM_END:
                    position = value_at
                    break
                position = self._skip_value(tag, vr, length, value_at, implicit, order, depth)


def _uid(value: bytes | None) -> str | None:
    return value.rstrip(b"\x00 ").decode("ascii") if value is not None else None


def _integer_string(value: bytes | None) -> int | None:
    """An IS value's first number; None when absent or empty."""
    if value is None:
        return None
    text = value.decode("ascii").strip(" \x00").split("\\")[0].strip()
    return int(text) if text else None


def _inflate(dataset: bytes) -> bytes:
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
    except zlib.error as error:
        raise UnreadableHeader("deflated dataset does not inflate") from error
