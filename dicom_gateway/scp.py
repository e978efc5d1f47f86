"""The Storage SCP: accept every storage instance a PACS routes here, check it against the policy, spool it.

Policy (design.md §4): every Storage SOP class, private ones too, in whatever transfer syntax the peer proposes
first (stored as received; pixel data is never decoded here), C-ECHO, a calling-AE allow-list, an association
limit, size limits, a disk watermark, UID validation before any use, TCP_NODELAY on every connection, our own
outputs answered Success and dropped. Refusals are DICOM statuses with an ErrorComment, never exceptions, and the
association goes on. Only the header up to (0028,0100) Bits Allocated is parsed (`header_scan`): no private
blocks, no pixels.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.header_scan import Header, UnreadableHeader, parse_header
from dicom_gateway.records import StoredInstance
from dicom_gateway.scp_reactors import WakingRequestHandler
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import Spool, SpoolClosedError, SpoolOutcome
from dicom_gateway.uids import OWN_MANUFACTURER

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
_PER_MESSAGE_LOG_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
_DISK_CHECK_INTERVAL_S = 0.5
_ACCEPT_POLL_INTERVAL_S = 0.05  # how soon stop() takes effect (socketserver's default is 0.5 s)
_ERROR_COMMENT_MAX = 64  # LO
_BALANCE_STEP_S = 0.2  # a busier process's pause before it accepts, per association more than the least busy one
_BALANCE_MAX_STEPS = 5  # so a stuck or dead process delays an association by at most 1 s

class Refusal(Exception):
    """An instance the policy refuses: its status and the reason, which goes to the log and the ErrorComment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


@dataclass(frozen=True)
class SharedListener:
    """One listening socket that several receiver processes accept from, and each process's open associations in
    shared memory. A process that serves more than the least busy one waits before it accepts, so associations
    spread evenly: SO_REUSEPORT's hash of the peer's port put 3 or 4 of 4 associations on one process in 5 of 8
    cases, and the other core idled (benchmarks/ingest.py)."""

    sock: socket.socket
    loads: Any  # multiprocessing RawArray("i"), one slot per process
    index: int

    def publish(self, load: int) -> None:
        self.loads[self.index] = load

    def excess(self) -> int:
        """How many more associations this process serves than the least busy one."""
        return int(self.loads[self.index]) - min(self.loads)


class _AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on its own socket, or accepting from a `SharedListener` with other receiver
    processes, run by StorageScp itself (its own accept thread, shut down without pynetdicom's AE bookkeeping)."""

    def __init__(self, *args: Any, listener: SharedListener | None = None, **kwargs: Any) -> None:
        self._listener = listener
        self._starting = 0  # accepted, association thread not yet running
        self._starting_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._listener is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self._listener.sock
        self.socket.setblocking(False)  # the process that loses the race for a connection must not block
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listener is None:  # a shared socket already listens
            super().server_activate()

    def server_close(self) -> None:
        if self._listener is None:
            super().server_close()
        else:
            self.socket.close()  # no shutdown(): that would end accepting in every process

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept, after a pause when this process is busier than another (BlockingIOError if one took it)."""
        if self._listener is not None and (excess := self._listener.excess()) > 0:
            time.sleep(min(excess, _BALANCE_MAX_STEPS) * _BALANCE_STEP_S)
        request = super().get_request()
        with self._starting_lock:
            self._starting += 1
        self._publish_load()
        return request

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._starting_lock:
                self._starting -= 1

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def service_actions(self) -> None:
        """Publish this process's load (every accept poll, so an ended association counts out within 50 ms).

        Not pynetdicom's full `gc.collect()` every 60 polls (every 3 s here): it holds the GIL over every live
        object of the node (about 90 ms with the models and web app loaded) while associations wait. Python's own
        collector frees finished associations' cycles as it does any others."""
        self._publish_load()

    def _publish_load(self) -> None:
        if self._listener is not None:
            self._listener.publish(self._starting + len(self.active_associations))


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

    def start(self, host: str = "127.0.0.1", port: int = 0, *, listener: SharedListener | None = None) -> int:
        """Listen on host:port (0: any free port) in background threads; returns the bound port.

        `listener`: accept from that socket instead (host and port are then its own), with the other receiver
        processes that share it.
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
                (host, port), evt_handlers=handlers, server_class=_AcceptorServer, listener=listener,
                request_handler=WakingRequestHandler,
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
        try:
            header = parse_header(
                dataset, transfer_syntax, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
            )
        except UnreadableHeader as error:
            raise Refusal(CANNOT_UNDERSTAND, str(error)) from error
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
