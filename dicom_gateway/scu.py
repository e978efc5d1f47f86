"""The SCU: C-STORE of the outbox's pending rows to the configured destinations, with retries and dead-letter.

Why this shape: the outbox (outbox.py) already holds every output on disk with its UIDs, so a send is a pure
function of a row; the SCU moves each row pending → sent as soon as its Success arrives (one short transaction),
so a crash loses at most the instance in flight, which the destination treats as a duplicate SOP Instance UID.
A failed attempt waits `backoff_s · 2^(attempt-1)`; after `attempts` attempts, or at once when retrying cannot help
(the peer cannot take the SOP class, or says the data set is wrong), the row is dead-lettered with the reason.

Transfer syntaxes: each instance's own syntax is proposed in a context of its own, plus explicit and implicit VR
little endian. A destination that takes only an uncompressed syntax gets a copy decompressed with pydicom;
pynetdicom converts between explicit and implicit VR when it encodes.

`send_study` is the other direction's test tool: one study's files on one association, as a PACS sends them.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_gateway.outbox import Delivery, Outbox, destination_name
from dicom_gateway.settings import DicomSettings, Destination

LOGGER = logging.getLogger(__name__)
UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1-255
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
_TRANSIENT_STATUS_RANGES = (range(0xA700, 0xA800), range(0x0210, 0x0211), range(0x0213, 0x0214))


@dataclass(frozen=True)
class PassReport:
    """What one `send_pending` pass did."""

    sent: int = 0
    retrying: int = 0
    dead_lettered: int = 0


@dataclass(frozen=True)
class _Failure:
    reason: str
    permanent: bool  # retrying the same bytes cannot succeed


class Sender:
    """Sends the outbox's due rows; `send_pending()` is one pass, `run(stop_event)` loops until the event is set."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Sequence[Destination],
        *,
        ae_title: str = "FEDLESION",
        attempts: int = 5,
        backoff_s: float = 2.0,
        timeout_s: float = 30.0,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts!r}")
        if backoff_s < 0 or timeout_s <= 0 or poll_s <= 0:
            raise ValueError("backoff_s must be ≥ 0 and timeout_s, poll_s > 0")
        self.outbox = outbox
        self.destinations = {destination_name(d): d for d in destinations}
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.poll_s = poll_s
        self._clock = clock
        self._ae = AE(ae_title=ae_title)
        self._ae.acse_timeout = timeout_s
        self._ae.dimse_timeout = timeout_s
        self._ae.network_timeout = timeout_s
        self._ae.connection_timeout = timeout_s

    @classmethod
    def from_settings(cls, outbox: Outbox, dicom: DicomSettings, ae_title: str) -> Sender:
        """A sender with the node's AE title and the [dicom] destinations, attempts and backoff."""
        return cls(
            outbox,
            dicom.parsed_destinations,
            ae_title=ae_title,
            attempts=dicom.send_attempts,
            backoff_s=dicom.send_backoff_s,
        )

    def run(self, stop_event: threading.Event) -> None:
        """Send passes until `stop_event` is set, waking when the next row is due or every `poll_s` for new ones.

        A pass that fails on the database or the disk (locked past busy_timeout, disk full) is logged and tried again
        after `poll_s`: the node keeps sending once the condition clears instead of losing its sender thread.
        """
        while not stop_event.is_set():
            try:
                self.send_pending()
                next_due = self.outbox.next_due_at()
            except (sqlite3.Error, OSError):
                LOGGER.exception("send pass failed; trying again in %.1f s", self.poll_s)
                next_due = None
            wait = self.poll_s if next_due is None else min(self.poll_s, max(0.0, next_due - self._clock()))
            stop_event.wait(wait)

    def send_pending(self) -> PassReport:
        """One pass: every due row, one association per destination (more if it needs over 128 contexts)."""
        by_destination: dict[str, list[Delivery]] = {}
        for delivery in self.outbox.due(self._clock()):
            by_destination.setdefault(delivery.destination, []).append(delivery)
        report = PassReport()
        for name, deliveries in by_destination.items():
            destination = self.destinations.get(name)
            if destination is None:
                failure = _Failure(f"destination {name} is no longer configured", permanent=True)
                report = _add(report, [self._fail(d, failure) for d in deliveries])
                continue
            for batch in _context_batches(deliveries):
                report = _add(report, self._send_batch(destination, batch))
        return report

    def _send_batch(self, destination: Destination, deliveries: list[Delivery]) -> list[str]:
        """One association; returns each attempted row's outcome ("sent", "retrying" or "dead-letter")."""
        connected = threading.Event()

        def on_connection_open(event: evt.Event) -> None:
            _no_delay(event)
            connected.set()

        assoc = self._ae.associate(
            destination.host,
            destination.port,
            contexts=_contexts(deliveries),
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
        )
        if not assoc.is_established:
            failure = _association_failure(assoc, destination, connected.is_set())
            return [self._fail(d, failure) for d in deliveries]
        _keep_responses_for_the_sender(assoc)
        outcomes: list[str] = []
        try:
            for message_id, delivery in enumerate(deliveries, start=1):
                if not assoc.is_established:
                    break  # the peer aborted: the rest stay due and go in the next pass
                failure = _store(assoc, delivery, message_id)
                if failure is None:
                    self.outbox.mark_sent(delivery.instance.sop_instance_uid, delivery.destination)
                    outcomes.append("sent")
                else:
                    outcomes.append(self._fail(delivery, failure))
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    def _fail(self, delivery: Delivery, failure: _Failure) -> str:
        """Record a failed attempt: retry later with exponential backoff, or dead-letter."""
        attempt = delivery.attempts + 1
        if failure.permanent or attempt >= self.attempts:
            reason = f"{failure.reason} (attempt {attempt} of {self.attempts})"
            self.outbox.mark_failed(delivery.instance.sop_instance_uid, delivery.destination, reason, retry_at=None)
            LOGGER.warning("dead-letter %s → %s: %s", delivery.instance.sop_instance_uid, delivery.destination, reason)
            return "dead-letter"
        retry_at = self._clock() + self.backoff_s * 2 ** (attempt - 1)
        self.outbox.mark_failed(
            delivery.instance.sop_instance_uid, delivery.destination, failure.reason, retry_at=retry_at
        )
        LOGGER.info("send %s → %s failed (%s); retry at attempt %d", delivery.instance.sop_instance_uid,
                    delivery.destination, failure.reason, attempt + 1)
        return "retrying"


def _keep_responses_for_the_sender(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0: a response taken by the association's reactor goes back to the sender.

    `send_c_store` pauses the reactor thread by clearing `_reactor_checkpoint` and waiting for `_is_paused`, but
    the flag is still True for a moment after the reactor passed the checkpoint. A reactor preempted in that
    moment (two busy cores, the sender holding the GIL while it encodes and sends a large instance) later takes
    the C-STORE response off the DIMSE queue, logs "Received unexpected C-STORE service message" and drops it:
    `send_c_store` then waits out the DIMSE timeout and the retry sends the destination an instance it already
    acknowledged. Our associations only send requests, so whatever the reactor takes that is not a request is put
    back on the queue, where `send_c_store` is waiting for it.
    """
    serve_request = assoc._serve_request

    def requeue_responses(message: Any, context_id: int) -> None:
        if message.is_valid_request:
            serve_request(message, context_id)
        else:
            assoc.dimse.msg_queue.put((context_id, message))

    assoc._serve_request = requeue_responses  # type: ignore[method-assign]


def _add(report: PassReport, outcomes: list[str]) -> PassReport:
    return PassReport(
        report.sent + outcomes.count("sent"),
        report.retrying + outcomes.count("retrying"),
        report.dead_lettered + outcomes.count("dead-letter"),
    )


def _proposals(delivery: Delivery) -> list[tuple[UID, ...]]:
    """The transfer-syntax lists proposed for one instance: its own syntax alone, then both little-endian ones."""
    own = UID(delivery.instance.transfer_syntax_uid)
    if own in UNCOMPRESSED_SYNTAXES:
        return [(own, *(s for s in UNCOMPRESSED_SYNTAXES if s != own))]
    return [(own,), UNCOMPRESSED_SYNTAXES]


def _context_batches(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """Split rows so that no association needs more than 128 presentation contexts."""
    batches: list[list[Delivery]] = []
    keys: set[tuple[str, tuple[UID, ...]]] = set()
    for delivery in deliveries:
        needed = {(delivery.instance.sop_class_uid, p) for p in _proposals(delivery)} - keys
        if not batches or len(keys) + len(needed) > MAX_CONTEXTS:
            batches.append([])
            keys = set()
            needed = {(delivery.instance.sop_class_uid, p) for p in _proposals(delivery)}
        batches[-1].append(delivery)
        keys |= needed
    return batches


def _contexts(deliveries: list[Delivery]) -> list[PresentationContext]:
    proposed: dict[tuple[str, tuple[UID, ...]], None] = {}
    for delivery in deliveries:
        for syntaxes in _proposals(delivery):
            proposed[(delivery.instance.sop_class_uid, syntaxes)] = None
    return [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in proposed]


def _store(assoc: Association, delivery: Delivery, message_id: int) -> _Failure | None:
    """C-STORE one instance over an established association; None on Success or Warning."""
    instance = delivery.instance
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == instance.sop_class_uid]
    if not accepted:
        return _Failure(f"presentation context refused: {delivery.destination} accepts no transfer syntax for "
                        f"SOP class {UID(instance.sop_class_uid).name}", permanent=True)
    own = UID(instance.transfer_syntax_uid)
    if own not in accepted and not any(s in UNCOMPRESSED_SYNTAXES for s in accepted):
        return _Failure(f"presentation context refused: {delivery.destination} accepts {UID(instance.sop_class_uid).name}"
                        f" only as {', '.join(UID(s).name for s in accepted)}, not {own.name} or uncompressed",
                        permanent=True)
    try:
        dataset = dcmread(instance.path)
        if own not in accepted and own.is_compressed:
            # pydicom would give the copy a new SOP Instance UID by default; the destination must get ours
            dataset.decompress(generate_instance_uid=False)
    except FileNotFoundError:
        return _Failure(f"output file missing: {instance.path}", permanent=True)
    except (InvalidDicomError, OSError, ValueError, RuntimeError, NotImplementedError) as error:
        return _Failure(f"cannot read or convert {instance.path.name}: {error}", permanent=True)
    try:
        status = assoc.send_c_store(dataset, msg_id=message_id)
    except (ValueError, AttributeError) as error:
        return _Failure(f"cannot encode for {delivery.destination}: {error}", permanent=True)
    if "Status" not in status:
        return _Failure(f"no C-STORE response from {delivery.destination} (association aborted or timed out)",
                        permanent=False)
    code = int(status.Status)
    if code == 0x0000:
        return None
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    if code in WARNING_STATUSES:
        LOGGER.info("%s stored %s with warning 0x%04X (%s)", delivery.destination, instance.sop_instance_uid, code,
                    meaning)
        return None
    transient = any(code in codes for codes in _TRANSIENT_STATUS_RANGES)
    return _Failure(f"{delivery.destination} answered status 0x{code:04X} ({meaning}{comment})",
                    permanent=not transient)


def _association_failure(assoc: Association, destination: Destination, connected: bool) -> _Failure:
    """Why no association: no presentation context accepted, rejected (with the peer's result, source and reason),
    aborted, or no connection at all."""
    where = destination_name(destination)
    answer = assoc.acceptor.primitive
    if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
        sop_classes = sorted({UID(cx.abstract_syntax).name for cx in assoc.rejected_contexts})
        return _Failure(f"presentation context refused: {where} accepts none of {', '.join(sop_classes)}",
                        permanent=True)
    if assoc.is_rejected and answer is not None:
        return _Failure(f"association rejected by {where}: {answer.result_str}, {answer.source_str}, "
                        f"{answer.reason_str}", permanent=False)
    if connected:
        return _Failure(f"association with {where} aborted or timed out before it was accepted", permanent=False)
    try:
        with socket.create_connection((destination.host, destination.port), timeout=5.0):
            pass
    except OSError as error:
        return _Failure(f"connection to {where} failed: {error.strerror or error}", permanent=False)
    return _Failure(f"connection to {where} failed", permanent=False)


def send_study(paths: Sequence[Path], host: str, port: int, called_aet: str, calling_aet: str) -> str:
    """C-STORE one study's files on one association, as a PACS sends a study (`fedlesion send-sample`); returns its
    Study Instance UID. A refused instance or a failed association is a ValueError."""
    datasets = [dcmread(path) for path in paths]
    study_uids = {str(dataset.StudyInstanceUID) for dataset in datasets}
    if len(study_uids) != 1:
        raise ValueError(f"expected one study, found {len(study_uids)}")
    ae = AE(ae_title=calling_aet)
    for sop_class, syntax in sorted({(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        raise ValueError(f"{called_aet}@{host}:{port} did not accept an association from {calling_aet}")
    failures = []
    try:
        for path, dataset in zip(paths, datasets):
            status = assoc.send_c_store(dataset)
            if not status or status.Status not in (0x0000, *WARNING_STATUSES):
                failures.append(f"{Path(path).name}: status {getattr(status, 'Status', 'none'):#06x}"
                                if status else f"{Path(path).name}: no response")
    finally:
        assoc.release()
    if failures:
        raise ValueError(f"{len(failures)} of {len(paths)} instances were not stored: {failures[0]}")
    return study_uids.pop()


def _no_delay(event: evt.Event) -> None:
    """Without TCP_NODELAY every store waits for a delayed ACK (design.md §4)."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
