"""The durable spool: received instances as Part-10 files, made durable in group commits before Success.

Layout: <data_dir>/spool/<sha256(Study UID)>/<sha256(SOP Instance UID)>.dcm (uids.spool_name), so no UID text
ever reaches a path. Why a group commit: every association's handler thread would otherwise pay its own fsync
round trips. Leader/follower: a handler that finds no commit running commits everything queued so far itself
(no hand-off to another thread, which costs a GIL round trip on a busy node); handlers that arrive meanwhile queue
and wait, and the next of them commits their whole group. A commit writes each file under a temporary name,
syncs the data, renames, syncs the directories once, tells the sink, and only then wakes the waiting handlers
(design.md §4 "Durability").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dicom_gateway.records import InstanceSink, StoredInstance
from dicom_gateway.uids import spool_name
from models.durable import fsync_dir

LOG = logging.getLogger(__name__)

SPOOL_DIRNAME = "spool"
SPOOL_SUFFIX = ".dcm"
_TEMP_PREFIX = ".incoming-"


class SpoolOutcome(str, Enum):
    """What a store did on disk."""

    WRITTEN = "written"
    DUPLICATE = "duplicate"  # the same SOP Instance UID with the same size was already durable: not rewritten


class SpoolClosedError(RuntimeError):
    """The spool no longer accepts writes (the receiver is shutting down)."""


@dataclass(eq=False)
class _PendingWrite:
    instance: StoredInstance
    data: bytes
    done: bool = False
    outcome: SpoolOutcome | None = None
    error: BaseException | None = None


class Spool:
    """Durable, idempotent storage of received instances, shared by every association of one receiver."""

    def __init__(self, data_dir: Path, sink: InstanceSink) -> None:
        self.root = Path(os.path.abspath(data_dir)) / SPOOL_DIRNAME  # absolute: the studies table keys on paths
        self.root.mkdir(parents=True, exist_ok=True)
        self._sink = sink
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: list[_PendingWrite] = []
        self._committing = False
        self._closed = False
        self._temp_counter = 0

    @property
    def sink(self) -> InstanceSink:
        return self._sink

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; raises ValueError for an invalid UID (never a path from one)."""
        return self.root / spool_name(study_uid) / (spool_name(sop_instance_uid) + SPOOL_SUFFIX)

    def free_bytes(self) -> int:
        """Free space for an unprivileged writer on the spool's filesystem (for the disk watermark)."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def store(self, instance: StoredInstance, data: bytes) -> tuple[StoredInstance, SpoolOutcome]:
        """Queue `data` (a whole Part-10 file) for `instance.path`; return once durable and handed to the sink.

        The returned instance carries `received_at` = the moment its group commit finished. Raises what the
        write or the sink raised (the caller answers with a failure status), or SpoolClosedError.
        """
        pending = _PendingWrite(instance, data)
        with self._changed:
            if self._closed:
                raise SpoolClosedError("the spool is closed")
            self._queue.append(pending)
            while not pending.done:
                if self._committing:
                    self._changed.wait()
                    continue
                self._committing = True
                batch, self._queue = self._queue, []
                self._lock.release()
                try:
                    self._commit_safely(batch)
                finally:
                    self._lock.acquire()
                    self._committing = False
                    self._changed.notify_all()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.instance, pending.outcome

    def close(self) -> None:
        """Refuse new writes and wait for the commit in progress and the writes queued behind it."""
        with self._changed:
            self._closed = True
            while self._committing or self._queue:
                self._changed.wait()

    def _commit_safely(self, batch: list[_PendingWrite]) -> None:
        try:
            self._commit(batch)
        except BaseException as error:  # every waiter must wake, each with an outcome or an error
            for pending in batch:
                if pending.outcome is None and pending.error is None:
                    pending.error = error
            raise
        finally:
            for pending in batch:
                pending.done = True

    def _commit(self, batch: list[_PendingWrite]) -> None:
        """Write, sync data, rename, sync directories, tell the sink, wake the handlers: the whole batch at once."""
        written: list[tuple[_PendingWrite, Path, int]] = []
        directories: set[Path] = set()
        new_directories: set[Path] = set()
        claimed: set[Path] = set()
        for pending in batch:
            target = pending.instance.path
            try:
                if target in claimed or _is_same_size(target, len(pending.data)):
                    pending.outcome = SpoolOutcome.DUPLICATE
                else:
                    if not target.parent.is_dir():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        new_directories.add(target.parent)
                    written.append((pending, *self._write_temp(target, pending.data)))
                    pending.outcome = SpoolOutcome.WRITTEN
                claimed.add(target)
                directories.add(target.parent)
            except OSError as error:
                pending.error = error
        try:
            for _pending, _temp, descriptor in written:
                os.fdatasync(descriptor)
            for pending, temp, _descriptor in written:
                os.replace(temp, pending.instance.path)
            for directory in directories | ({self.root} if new_directories else set()):
                fsync_dir(directory)
        except OSError as error:
            for pending, _temp, _descriptor in written:
                pending.error = error
        finally:
            for _pending, _temp, descriptor in written:
                os.close(descriptor)
        durable_at = time.time()
        done = [pending for pending in batch if pending.error is None]
        for pending in done:
            pending.instance = dataclasses.replace(pending.instance, received_at=durable_at)
        if done:
            try:
                self._sink.instances_stored([pending.instance for pending in done])
            except Exception as error:  # the sink's failure becomes a failure status for these waiters, not a crash
                LOG.exception("the instance sink failed on %d instances", len(done))
                for pending in done:
                    pending.error = error

    def _write_temp(self, target: Path, data: bytes) -> tuple[Path, int]:
        """Write to a temporary name beside `target`; the descriptor stays open for the batch's data sync."""
        self._temp_counter += 1
        temp = target.with_name(f"{_TEMP_PREFIX}{os.getpid()}-{self._temp_counter}")
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
        except OSError:
            os.close(descriptor)
            raise
        return temp, descriptor

    def remove_stale_temporaries(self) -> int:
        """Delete half-written files left by a crash (never acknowledged); returns how many."""
        removed = 0
        for temp in self.root.glob(f"*/{_TEMP_PREFIX}*"):
            temp.unlink(missing_ok=True)
            removed += 1
        return removed


def _is_same_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False
