"""The outbox: outputs on disk and one delivery row per (instance, destination), written before the first send.

Why: an output's Series/SOP Instance UIDs must be the same on every retry and after a crash (design.md §4), and a
destination that acknowledged an instance must never get it again. So `enqueue` writes the Part-10 files and
records their UIDs under their (study, revision, task, model version) key in one transaction before the SCU sees
them; enqueuing the same key again returns what is stored instead of what the caller built. The SCU (scu.py) only
moves rows pending → sent | dead-letter, one short transaction per instance.

Layout under the data directory: `outbox.sqlite3` and `outputs/<spool_name(study)>/<batch>/<spool_name(sop)>.dcm`,
so no UID or free text reaches a path.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_gateway.settings import Destination
from models.sqlite_tx import connect, write_transaction
from dicom_gateway.uids import is_valid_uid, spool_name
from models.durable import fsync_dir, write_atomic

DATABASE_NAME = "outbox.sqlite3"
OUTPUTS_DIR = "outputs"
_DAY_S = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS output_batches (
    batch_id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    task TEXT NOT NULL,
    model_version TEXT NOT NULL,
    directory TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (study_uid, revision, task, model_version)
);
CREATE TABLE IF NOT EXISTS output_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES output_batches (batch_id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    file_name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    sop_instance_uid TEXT NOT NULL REFERENCES output_instances (sop_instance_uid) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead-letter')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
"""


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class OutputKey:
    """What identifies one set of outputs: the same key always means the same UIDs and files."""

    study_uid: str
    revision: int
    task: str
    model_version: str

    def __post_init__(self) -> None:
        if not is_valid_uid(self.study_uid):
            raise ValueError(f"study_uid is not a valid DICOM UID: {self.study_uid!r}")
        if isinstance(self.revision, bool) or not isinstance(self.revision, int) or self.revision < 1:
            raise ValueError(f"revision must be an integer ≥ 1, got {self.revision!r}")
        for name in ("task", "model_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class OutputInstance:
    """One stored output file with the UIDs it was recorded under."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass(frozen=True)
class Delivery:
    """One (instance, destination) row."""

    instance: OutputInstance
    study_uid: str
    destination: str  # AE_TITLE@host:port, as in `dicom.destinations`
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None


def destination_name(destination: Destination) -> str:
    """The row key of a destination: the same `AE_TITLE@host:port` text the settings use."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


class Outbox:
    """The SQLite outbox under `data_dir` (WAL, busy_timeout 5 s, short transactions); safe to share by threads."""

    def __init__(self, data_dir: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.data_dir = Path(data_dir)
        self.outputs_dir = self.data_dir / OUTPUTS_DIR
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.data_dir / DATABASE_NAME, synchronous="FULL")
        with self._transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, write_transaction(self._db) as db:
            yield db

    def enqueue(
        self, key: OutputKey, datasets: Sequence[Dataset], destinations: Sequence[Destination]
    ) -> list[OutputInstance]:
        """Store `datasets` as the outputs of `key` and queue each for every destination; returns what is stored.

        When `key` is already stored (a retry, or a job re-run after a crash) the stored files and UIDs are kept and
        `datasets` are not written: only destinations not yet queued get pending rows, and rows already sent stay
        sent. Files are fsynced before the rows are committed, so a committed row always has its file.
        """
        directory = self._batch_directory(key)
        written: list[OutputInstance] = []
        if not self.stored(key):
            _check_outputs(key, datasets)
            written = [_write_part10(dataset, directory) for dataset in datasets]
            fsync_dir(directory)
            fsync_dir(directory.parent)
        try:
            recorded = self._record(key, directory, written, destinations)
        finally:
            kept = {instance.path for instance in self.stored(key)}
            for orphan in (instance.path for instance in written if instance.path not in kept):
                orphan.unlink(missing_ok=True)  # rejected, or another enqueue of this key committed first
        return self.stored(key) if recorded else self.enqueue(key, datasets, destinations)

    def _record(
        self, key: OutputKey, directory: Path, written: list[OutputInstance], destinations: Sequence[Destination]
    ) -> bool:
        """Record the batch (unless stored meanwhile) and its pending rows; False when the batch vanished meanwhile
        (purged between the check and the transaction) and nothing was written for it."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT batch_id FROM output_batches WHERE study_uid=? AND revision=? AND task=? AND model_version=?",
                (key.study_uid, key.revision, key.task, key.model_version),
            ).fetchone()
            if row is None and not written:
                return False
            if row is None:
                batch_id = db.execute(
                    "INSERT INTO output_batches (study_uid, revision, task, model_version, directory, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key.study_uid, key.revision, key.task, key.model_version,
                     str(directory.relative_to(self.outputs_dir)), now),
                ).lastrowid
                try:
                    db.executemany(
                        "INSERT INTO output_instances (sop_instance_uid, batch_id, position, series_instance_uid,"
                        " sop_class_uid, transfer_syntax_uid, file_name) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [
                            (i.sop_instance_uid, batch_id, n, i.series_instance_uid, i.sop_class_uid,
                             i.transfer_syntax_uid, i.path.name)
                            for n, i in enumerate(written)
                        ],
                    )
                except sqlite3.IntegrityError:
                    raise ValueError("an output SOP Instance UID is already stored under another output key") from None
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (sop_instance_uid, destination, state, next_attempt_at, updated_at)"
                " SELECT sop_instance_uid, ?, 'pending', ?, ? FROM output_instances"
                " JOIN output_batches USING (batch_id)"
                " WHERE study_uid=? AND revision=? AND task=? AND model_version=?",
                [
                    (destination_name(d), now, now, key.study_uid, key.revision, key.task, key.model_version)
                    for d in destinations
                ],
            )
        return True

    def stored(self, key: OutputKey) -> list[OutputInstance]:
        """The outputs recorded under `key`, in the order they were enqueued; empty when none are."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, series_instance_uid, sop_class_uid, transfer_syntax_uid, directory,"
                " file_name FROM output_instances JOIN output_batches USING (batch_id)"
                " WHERE study_uid=? AND revision=? AND task=? AND model_version=? ORDER BY position",
                (key.study_uid, key.revision, key.task, key.model_version),
            ).fetchall()
        return [self._instance(*row) for row in rows]

    def due(self, now: float | None = None, *, limit: int = 1000) -> list[Delivery]:
        """Pending rows whose next attempt is due, oldest first."""
        now = self._clock() if now is None else now
        return self._deliveries("WHERE d.state='pending' AND d.next_attempt_at<=? LIMIT ?", (now, limit))

    def next_due_at(self) -> float | None:
        """When the earliest pending row becomes due; None when nothing is pending."""
        with self._lock:
            (value,) = self._db.execute("SELECT min(next_attempt_at) FROM deliveries WHERE state='pending'").fetchone()
        return value

    def mark_sent(self, sop_instance_uid: str, destination: str) -> None:
        """The destination acknowledged the instance: it is never sent there again."""
        self._update(sop_instance_uid, destination, "state='sent', attempts=attempts+1, last_error=NULL", ())

    def mark_failed(self, sop_instance_uid: str, destination: str, reason: str, *, retry_at: float | None) -> None:
        """A failed attempt: pending again at `retry_at`, or dead-letter with `reason` when `retry_at` is None."""
        if retry_at is None:
            self._update(sop_instance_uid, destination, "state='dead-letter', attempts=attempts+1, last_error=?",
                         (reason,))
        else:
            self._update(sop_instance_uid, destination, "attempts=attempts+1, next_attempt_at=?, last_error=?",
                         (retry_at, reason))

    def counts(self) -> dict[DeliveryState, int]:
        """Rows per state, every state present (for the web page and /metrics)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
        return {state: int(rows.get(state.value, 0)) for state in DeliveryState}

    def dead_letters(self) -> list[Delivery]:
        """Dead-lettered rows with their reasons, newest first."""
        return self._deliveries("WHERE d.state='dead-letter' ORDER BY d.updated_at DESC", ())

    def deliveries(self, key: OutputKey) -> list[Delivery]:
        """Every row of one output key, in output order then destination."""
        return self._deliveries(
            "WHERE b.study_uid=? AND b.revision=? AND b.task=? AND b.model_version=?"
            " ORDER BY i.position, d.destination",
            (key.study_uid, key.revision, key.task, key.model_version),
        )

    def purge_expired(self, retention_days: float, now: float | None = None) -> int:
        """Delete outputs (files and rows) created more than `retention_days` ago; returns how many batches went."""
        if retention_days <= 0:
            raise ValueError(f"retention_days must be greater than 0, got {retention_days!r}")
        cutoff = (self._clock() if now is None else now) - retention_days * _DAY_S
        with self._lock:
            expired = self._db.execute(
                "SELECT batch_id, directory FROM output_batches WHERE created_at<?", (cutoff,)
            ).fetchall()
        for batch_id, directory in expired:
            with self._transaction() as db:
                db.execute("DELETE FROM output_batches WHERE batch_id=?", (batch_id,))
            shutil.rmtree(self.outputs_dir / directory, ignore_errors=True)
            _remove_if_empty((self.outputs_dir / directory).parent)
        return len(expired)

    def _batch_directory(self, key: OutputKey) -> Path:
        """`<spool_name(study)>/r<revision>-<hash of task and model version>`: free text never reaches a path."""
        digest = hashlib.sha256(f"{key.task}\x1f{key.model_version}".encode()).hexdigest()[:24]
        return self.outputs_dir / spool_name(key.study_uid) / f"r{key.revision}-{digest}"

    def _instance(self, sop: str, series: str, sop_class: str, syntax: str, directory: str, name: str) -> OutputInstance:
        return OutputInstance(sop, series, sop_class, syntax, self.outputs_dir / directory / name)

    def _deliveries(self, where: str, params: tuple[object, ...]) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT i.sop_instance_uid, i.series_instance_uid, i.sop_class_uid, i.transfer_syntax_uid,"
                " b.directory, i.file_name, b.study_uid, d.destination, d.state, d.attempts, d.next_attempt_at,"
                " d.last_error FROM deliveries d JOIN output_instances i USING (sop_instance_uid)"
                " JOIN output_batches b USING (batch_id) " + where,
                params,
            ).fetchall()
        return [
            Delivery(self._instance(*row[:6]), row[6], row[7], DeliveryState(row[8]), row[9], row[10], row[11])
            for row in rows
        ]

    def _update(self, sop_instance_uid: str, destination: str, assignments: str, params: tuple[object, ...]) -> None:
        """Move a pending row; a row already sent or dead-lettered is left as it is."""
        with self._transaction() as db:
            db.execute(
                f"UPDATE deliveries SET {assignments}, updated_at=? WHERE sop_instance_uid=? AND destination=?"
                " AND state='pending'",
                (*params, self._clock(), sop_instance_uid, destination),
            )


def _check_outputs(key: OutputKey, datasets: Sequence[Dataset]) -> None:
    """Outputs go into their source study and need valid, distinct UIDs before anything is written."""
    if not datasets:
        raise ValueError("datasets is empty: a job always has at least one output")
    seen: set[str] = set()
    for dataset in datasets:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"datasets must hold pydicom Datasets, got {type(dataset).__name__}")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not is_valid_uid(str(dataset.get(keyword, ""))):
                raise ValueError(f"output dataset has no valid {keyword}: {dataset.get(keyword)!r}")
        if dataset.StudyInstanceUID != key.study_uid:
            raise ValueError(
                f"output {dataset.SOPInstanceUID} belongs to study {dataset.StudyInstanceUID}, not {key.study_uid}"
            )
        if dataset.SOPInstanceUID in seen:
            raise ValueError(f"SOP Instance UID {dataset.SOPInstanceUID} appears twice in the outputs")
        seen.add(dataset.SOPInstanceUID)


def _write_part10(dataset: Dataset, directory: Path) -> OutputInstance:
    """Write one Part-10 file atomically (temp name, fsync, rename) under a name derived from its SOP UID."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta = meta
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = directory / f"{spool_name(dataset.SOPInstanceUID)}.dcm"
    write_atomic(path, lambda temp: dataset.save_as(temp, enforce_file_format=True), sync_directory=False)
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    return OutputInstance(dataset.SOPInstanceUID, dataset.SeriesInstanceUID, dataset.SOPClassUID, syntax, path)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass
