"""The Storage SCP: accept every storage instance a PACS routes here, check it against the policy, spool it.

Policy (design.md §4): every Storage SOP class, private ones too, in whatever transfer syntax the peer proposes
first (stored as received; pixel data is never decoded here), C-ECHO, a calling-AE allow-list, an association
limit, size limits, a disk watermark, UID validation before any use, TCP_NODELAY on every connection, our own
outputs answered Success and dropped. Refusals are DICOM statuses with an ErrorComment, never exceptions, and the
association goes on. Only the header up to (0028,0100) Bits Allocated is parsed: no private blocks, no pixels.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.records import StoredInstance
from dicom_gateway.spool import Spool, SpoolClosedError, SpoolOutcome
from dicom_gateway.uids import OWN_MANUFACTURER, is_valid_uid
from fedlesion.settings import DicomSettings

LOG = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk watermark, instance bytes, decoded bytes per series: the data is too much
CANNOT_UNDERSTAND = 0xC000  # unreadable header, missing or invalid UID, frame or frame count beyond the limits
PROCESSING_FAILURE = 0x0110  # the spool or the studies table failed, or the receiver is shutting down

# Transfer syntaxes the node decodes later with its non-GPL decoders (docs/dicom-conformance.md). The SCP accepts
# any transfer syntax the peer proposes (so routing never fails) and stores it as received; an instance in a
# syntax outside this list is kept but cannot be analysed.
DECODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [SV1])
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

MAX_PDU_BYTES = 1 << 20  # large PDUs: fewer Python round trips per instance
DUL_POLL_INTERVAL_S = 0.0005  # pynetdicom: 0.001; lower answers sooner, costs idle CPU per open association
_PER_MESSAGE_LOG_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
_DISK_CHECK_INTERVAL_S = 0.5
_ACCEPT_POLL_INTERVAL_S = 0.05  # how soon stop() takes effect (socketserver's default is 0.5 s)
_ERROR_COMMENT_MAX = 64  # LO

# Everything the policy needs lies at or before (0028,0100) Bits Allocated; the scan stops at the first tag after it.
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


class Refusal(Exception):
    """An instance the policy refuses: its status and the reason, which goes to the log and the ErrorComment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


@dataclass(frozen=True)
class DiskStatus:
    """Free space on the spool's filesystem against the watermark (for the web page and /metrics)."""

    free_bytes: int
    min_free_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.min_free_bytes


@dataclass
class _AssociationTally:
    calling_ae: str
    peer: str
    stored: int = 0
    duplicates: int = 0
    ignored_own: int = 0
    refused: int = 0
    study_uids: set[str] = field(default_factory=set)


class _UnrestrictedStorage:
    """pynetdicom's switch for accepting private and unknown SOP classes as storage is process-wide; it stays on
    while at least one StorageScp runs and goes back to its previous value after the last one stops."""

    _lock = threading.Lock()
    _users = 0
    _previous = False

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._previous = _config.UNRESTRICTED_STORAGE_SERVICE
                _config.UNRESTRICTED_STORAGE_SERVICE = True
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                _config.UNRESTRICTED_STORAGE_SERVICE = cls._previous


class _AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with SO_REUSEPORT when several receiver processes share one port, and
    run by StorageScp itself (its own accept thread, shut down without pynetdicom's AE bookkeeping)."""

    def __init__(self, *args: Any, reuse_port: bool = False, **kwargs: Any) -> None:
        self._reuse_port = reuse_port
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StorageScp:
    """A pynetdicom Storage SCP in its own threads: `start(host, port)` returns the bound port, `stop()` ends it."""

    def __init__(self, ae_title: str, policy: DicomSettings, spool: Spool) -> None:
        self.ae_title = ae_title
        self.policy = policy
        self.spool = spool
        self.ae = self._build_ae()
        self._server: Any = None
        self._lock = threading.Lock()
        self._series_decoded_bytes: dict[str, int] = {}
        self._tallies: dict[object, _AssociationTally] = {}
        self._disk_checked_at = 0.0
        self._disk_free = 0

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification, list(DECODABLE_TRANSFER_SYNTAXES[:4]))
        ae.maximum_associations = self.policy.max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.require_calling_aet = list(self.policy.allowed_calling_aes)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> int:
        """Listen on host:port (0: any free port) in background threads; returns the bound port.

        `reuse_port`: bind with SO_REUSEPORT, so that several receiver processes accept on one port and the kernel
        spreads new associations over them.
        """
        if self._server is not None:
            raise RuntimeError("the SCP is already running")
        _UnrestrictedStorage.acquire()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            server = self.ae.make_server(
                (host, port), evt_handlers=handlers, server_class=_AcceptorServer, reuse_port=reuse_port
            )
        except BaseException:
            _UnrestrictedStorage.release()
            raise
        threading.Thread(
            target=server.serve_forever, args=(_ACCEPT_POLL_INTERVAL_S,), name=f"scp-accept-{port}", daemon=True
        ).start()
        self._server = server
        LOG.info("storage SCP %s listening on %s:%d", self.ae_title, host, self.port)
        return self.port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations end for up to `grace_s`, abort the rest.

        Stores already handed to the spool finish their group commit; their peers may miss the response and
        re-send, which is harmless (duplicates are idempotent).
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            LOG.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        _UnrestrictedStorage.release()
        LOG.info("storage SCP %s stopped", self.ae_title)

    def disk_status(self) -> DiskStatus:
        """Free space now against `min_free_disk_bytes`; `low` means stores are refused with 0xA700."""
        return DiskStatus(self.spool.free_bytes(), self.policy.min_free_disk_bytes)

    # -- association events -------------------------------------------------------------------------------------

    def _on_connection_open(self, event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom's DUL thread polls its socket and queues, sleeping this long when idle (default 1 ms): that
        # sleep is paid twice per C-STORE round trip. It is a plain attribute on each association's DUL.
        event.assoc.dul._run_loop_delay = DUL_POLL_INTERVAL_S
        # pynetdicom binds debug-logging handlers to every PDU and DIMSE message; they re-decode each message
        # (about a quarter of the CPU per instance) only to format debug lines. The SCP logs per association.
        for notification in _PER_MESSAGE_LOG_EVENTS:
            for handler, _args in list(event.assoc.get_handlers(notification)):
                event.assoc.unbind(notification, handler)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        tally = _AssociationTally(assoc.requestor.ae_title, _peer(assoc))
        with self._lock:
            self._tallies[assoc] = tally
        LOG.info("association from %s (%s) accepted", tally.calling_ae, tally.peer)

    def _on_rejected(self, event: evt.Event) -> None:
        calling_ae = event.assoc.requestor.ae_title
        allowed = self.policy.allowed_calling_aes
        if allowed and calling_ae not in allowed:
            reason = "calling AE title not in dicom.allowed_calling_aes"
        else:
            reason = f"association limit ({self.policy.max_associations}) reached"
        LOG.warning("association from %s (%s) rejected: %s", calling_ae, _peer(event.assoc), reason)

    def _on_released(self, event: evt.Event) -> None:
        tally = self._end_association(event.assoc, "released")
        if tally is not None and tally.study_uids:
            try:
                self.spool.sink.association_released(tally.calling_ae, set(tally.study_uids))
            except Exception:  # the association is over; the studies table's own timeout still completes them
                LOG.exception("the instance sink failed on the release from %s", tally.calling_ae)

    def _on_aborted(self, event: evt.Event) -> None:
        self._end_association(event.assoc, "aborted")

    def _end_association(self, assoc: object, how: str) -> _AssociationTally | None:
        with self._lock:
            tally = self._tallies.pop(assoc, None)
        if tally is not None:
            LOG.info(
                "association from %s (%s) %s: %d stored, %d duplicates, %d own outputs ignored, %d refused",
                tally.calling_ae,
                tally.peer,
                how,
                tally.stored,
                tally.duplicates,
                tally.ignored_own,
                tally.refused,
            )
        return tally

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # -- C-STORE ------------------------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int | Dataset:
        tally = self._tallies.get(event.assoc)
        calling_ae = event.assoc.requestor.ae_title
        try:
            status = self._store(event, calling_ae, tally)
        except Refusal as refusal:
            if tally is not None:
                tally.refused += 1
            LOG.warning(
                "C-STORE from %s refused with 0x%04X: %s", calling_ae, refusal.status, refusal.reason
            )
            return _status(refusal.status, refusal.reason)
        return status

    def _store(self, event: evt.Event, calling_ae: str, tally: _AssociationTally | None) -> int:
        request = event.request
        dataset = event.encoded_dataset(include_meta=False)
        if len(dataset) > self.policy.max_instance_bytes:
            raise Refusal(
                OUT_OF_RESOURCES, f"instance of {len(dataset)} bytes over max_instance_bytes"
            )
        self._check_disk(len(dataset))
        transfer_syntax = str(event.context.transfer_syntax)  # the accepted syntax (a UID, not a list)
        header = parse_header(
            dataset, transfer_syntax, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        )
        if header.manufacturer == OWN_MANUFACTURER:
            if tally is not None:
                tally.ignored_own += 1
            LOG.debug("ignored our own output %s", header.sop_instance_uid)
            return SUCCESS
        self._check_image_limits(header)
        path = self.spool.path_for(header.study_instance_uid, header.sop_instance_uid)
        counted = self._count_series_bytes(header, already_stored=path.exists())
        part10 = file_meta_bytes(header.sop_class_uid, header.sop_instance_uid, transfer_syntax, calling_ae) + dataset
        instance = StoredInstance(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            path=path,
            calling_ae=calling_ae,
            size_bytes=len(part10),
            received_at=0.0,  # set by the spool when the group commit is durable
            announced_study_instances=header.announced_study_instances,
        )
        try:
            _, outcome = self.spool.store(instance, part10)
        except (OSError, SpoolClosedError) as error:
            self._uncount_series_bytes(header, counted)
            raise Refusal(PROCESSING_FAILURE, f"not stored: {error.__class__.__name__}") from error
        except Exception as error:  # the sink (studies table) failed after the file became durable
            self._uncount_series_bytes(header, counted)
            raise Refusal(PROCESSING_FAILURE, "stored but not recorded; send again") from error
        if tally is not None:
            tally.study_uids.add(header.study_instance_uid)
            if outcome is SpoolOutcome.DUPLICATE:
                tally.duplicates += 1
            else:
                tally.stored += 1
        return SUCCESS

    def _check_disk(self, incoming_bytes: int) -> None:
        now = time.monotonic()
        if now - self._disk_checked_at > _DISK_CHECK_INTERVAL_S:
            self._disk_free = self.spool.free_bytes()
            self._disk_checked_at = now
        if self._disk_free - incoming_bytes < self.policy.min_free_disk_bytes:
            raise Refusal(OUT_OF_RESOURCES, "spool disk below min_free_disk_bytes")

    def _check_image_limits(self, header: Header) -> None:
        if header.frame_pixels > self.policy.max_frame_pixels:
            raise Refusal(CANNOT_UNDERSTAND, f"{header.frame_pixels} pixels per frame over max_frame_pixels")
        if header.frames > self.policy.max_frames:
            raise Refusal(CANNOT_UNDERSTAND, f"{header.frames} frames over max_frames")

    def _count_series_bytes(self, header: Header, already_stored: bool) -> int:
        """Add this instance's decoded size to its series' total; refuse when the total would pass the limit."""
        if already_stored:
            return 0
        size = header.decoded_bytes
        with self._lock:
            total = self._series_decoded_bytes.get(header.series_instance_uid, 0) + size
            if total > self.policy.max_series_decoded_bytes:
                raise Refusal(OUT_OF_RESOURCES, "series over max_series_decoded_bytes")
            self._series_decoded_bytes[header.series_instance_uid] = total
        return size

    def _uncount_series_bytes(self, header: Header, size: int) -> None:
        with self._lock:
            self._series_decoded_bytes[header.series_instance_uid] -= size


def parse_header(dataset: bytes, transfer_syntax: str, command_sop_class: str, command_sop_instance: str) -> Header:
    """Read the policy's attributes from an encoded dataset, stopping before private blocks and pixel data.

    SOP Class and Instance UIDs fall back to the C-STORE command's when the dataset lacks them. Raises Refusal
    (0xC000) for an unreadable header or a missing or invalid UID.
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
        raise Refusal(CANNOT_UNDERSTAND, f"unreadable header: {error}") from error
    for name, uid in (
        ("SOP Class UID", sop_class),
        ("SOP Instance UID", sop_instance),
        ("Study Instance UID", study),
        ("Series Instance UID", series),
    ):
        if not is_valid_uid(uid):
            raise Refusal(CANNOT_UNDERSTAND, f"missing or invalid {name}")
    frames = 1 if frames is None else frames
    if frames < 0:
        raise Refusal(CANNOT_UNDERSTAND, "negative Number of Frames")
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
        raise Refusal(CANNOT_UNDERSTAND, "deflated dataset does not inflate") from error


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, `DICM` and the File Meta group (explicit VR little endian) for a dataset stored as received."""
    elements = b"".join(
        (
            _long_element(0x0001, b"OB", b"\x00\x01"),
            _short_element(0x0002, b"UI", _uid_bytes(sop_class_uid)),
            _short_element(0x0003, b"UI", _uid_bytes(sop_instance_uid)),
            _short_element(0x0010, b"UI", _uid_bytes(transfer_syntax)),
            _short_element(0x0012, b"UI", _uid_bytes(PYNETDICOM_IMPLEMENTATION_UID)),
            _short_element(0x0013, b"SH", _text_bytes(PYNETDICOM_IMPLEMENTATION_VERSION)),
            _short_element(0x0016, b"AE", _text_bytes(source_ae[:16])),
        )
    )
    group_length = _short_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _long_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def _text_bytes(text: str) -> bytes:
    value = text.encode("ascii", "replace")
    return value + b" " if len(value) % 2 else value


def _status(code: int, reason: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = reason[:_ERROR_COMMENT_MAX]
    return status


def _peer(assoc: Any) -> str:
    address = assoc.requestor.address_info
    return f"{address.address}:{address.port}" if address is not None else "?"
