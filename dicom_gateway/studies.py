"""The studies table: which instances arrived, when a study is complete, and one `study_ready` row per revision.

Why SQLite with short transactions: the SCP's handler threads record instances, a monitor thread completes studies
after inactivity, and a second process (`fedlesion study complete UID`) completes a study directly in the same
database; WAL mode lets them read while one writes, and every completion re-checks the study under a write lock, so
whichever completer commits first wins and the others see a study that is no longer receiving. The UNIQUE
(study_uid, revision) constraint is the backstop: a second row for one revision cannot exist.

The spool is the truth for what was acknowledged (the SCP answers Success after fsync, possibly before the commit
here), so `recover()` re-reads the headers of spooled files the table does not know.

Revisions (design.md §4): a study's first completion creates revision 1. New instances after completion reopen the
study (state `receiving`); at the next completion a new revision (and row) is created only when the usable series
(the series the roles use, with their instance counts) changed, otherwise the study returns to the state it had.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_gateway.records import StoredInstance
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import SPOOL_DIRNAME
from models.sqlite_tx import ThreadConnections, connect, read_snapshot, write_transaction
from dicom_gateway.uids import is_valid_uid

logger = logging.getLogger(__name__)

DATABASE_NAME = "dicom.sqlite3"  # under [storage] data_dir; the receiver and the CLI open the same file
COMPLETION_ATTEMPTS = 5  # roles recomputed when instances keep arriving during a completion; then left to the monitor
MONITOR_MAX_POLL_S = 1.0
_HEADER_TAGS = [
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "NumberOfStudyRelatedInstances",
]

# Handed off long enough, not purged yet, not reopened by a late push.
_PURGE_DUE = "state != 'receiving' AND purged_at IS NULL AND handed_off_at IS NOT NULL AND handed_off_at <= ?"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid, series_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete', 'handed-off')),
    settled_state TEXT CHECK (settled_state IN ('complete', 'handed-off')),  -- the state a reopened study had
    revision INTEGER NOT NULL DEFAULT 0,  -- the latest revision with a study_ready row; 0: none yet
    usable_series TEXT,  -- JSON fingerprint of the latest revision's usable series
    generation INTEGER NOT NULL DEFAULT 0,  -- +1 per new instance: a completion checks nothing arrived meanwhile
    first_activity REAL NOT NULL,
    last_activity REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    announced_count INTEGER,
    calling_ae TEXT NOT NULL DEFAULT '',
    completed_at REAL,
    completed_by TEXT,
    handed_off_at REAL,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, last_activity);
CREATE TABLE IF NOT EXISTS study_ready (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL REFERENCES studies (study_uid),
    revision INTEGER NOT NULL,
    spool_dir TEXT NOT NULL,
    roles_json TEXT NOT NULL,
    trigger TEXT NOT NULL,
    created_at REAL NOT NULL,
    handed_off_at REAL,
    UNIQUE (study_uid, revision)
);
"""


class StudyState(str, Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    HANDED_OFF = "handed-off"


class CompletionTrigger(str, Enum):
    EXPLICIT = "explicit"  # `fedlesion study complete`, the web page
    RELEASE = "association-released"  # complete_on_release for the calling AE
    ANNOUNCED = "announced-count"  # NumberOfStudyRelatedInstances reached
    INACTIVITY = "inactivity"  # dicom.inactivity_timeout_s without a new instance


class CompletionOutcome(str, Enum):
    NEW_REVISION = "new-revision"  # a study_ready row was inserted
    UNCHANGED = "unchanged"  # new instances, same usable series: back to the previous state, no row
    NOT_RECEIVING = "not-receiving"  # already complete or handed off, nothing new arrived
    DEFERRED = "deferred"  # instances still arriving; the monitor completes it later


@dataclass(frozen=True)
class Completion:
    study_uid: str
    outcome: CompletionOutcome
    revision: int  # the study's latest revision after this call (0: none yet)
    ready_id: int | None = None  # the study_ready row inserted by this call


@dataclass(frozen=True)
class StudyReady:
    """One row of the job queue's input: revision `revision` of a study is complete and its roles are known."""

    id: int
    study_uid: str
    revision: int
    spool_dir: Path
    roles_json: str  # roles.StudyRoles.to_json() (read back with StudyRoles.from_json), or {"error": reason}
    trigger: str
    created_at: float
    handed_off_at: float | None

    @property
    def roles(self) -> dict[str, Any]:
        return json.loads(self.roles_json)

    @property
    def error(self) -> str | None:
        """Why the roles could not be determined; the job queue marks the study not processed with it."""
        return self.roles.get("error")


@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    state: str
    revision: int
    instance_count: int
    announced_count: int | None
    calling_ae: str
    first_activity: float
    last_activity: float
    completed_by: str | None
    handed_off_at: float | None
    purged_at: float | None


@dataclass(frozen=True)
class RecoveryReport:
    files_seen: int
    recovered: int  # spooled instances the table did not know, now recorded
    unreadable: list[Path]  # files in the spool that are not DICOM with valid UIDs (left in place)
    receiving: int  # studies still receiving; their inactivity clock restarted


DescribeRoles = Callable[[list[Path]], Any]  # returns roles.StudyRoles, or any JSON-ready dict of that shape
ROLE_CHOICES = ("dwi", "adc", "flair")  # StudyRoles' choices; each names its series_uid and sop_class_uid


def database_path(data_dir: Path) -> Path:
    return Path(data_dir) / DATABASE_NAME


def spool_root(data_dir: Path) -> Path:
    return Path(data_dir) / SPOOL_DIRNAME


def _classify_study(paths: list[Path]) -> Any:
    # Imported here: the series-role rules load only when a study completes.
    from dicom_gateway.roles import classify_study

    return classify_study(paths)


class StudyIndex:
    """The studies table over one SQLite file; implements `records.InstanceSink`. Safe across threads and processes."""

    def __init__(
        self,
        db_path: Path,
        spool_root: Path,
        settings: DicomSettings,
        describe_roles: DescribeRoles | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = Path(db_path)
        self.spool_root = Path(os.path.abspath(spool_root))
        self.settings = settings
        self._describe_roles = describe_roles or _classify_study
        self._clock = clock
        self._requests: dict[str, CompletionTrigger] = {}
        self._requests_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._connections = ThreadConnections(self._open_connection)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._connections.get().executescript(_SCHEMA)

    # --- connections -------------------------------------------------------------------------------------------

    def _open_connection(self) -> sqlite3.Connection:
        conn = connect(self.db_path, synchronous="NORMAL")
        conn.row_factory = sqlite3.Row
        # NORMAL is crash-safe in WAL mode (a killed process loses nothing committed); after a power loss
        # recover() re-reads the spool for the last instances, and a lost completion is simply redone.
        return conn

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._connections.get())

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return read_snapshot(self._connections.get())

    def close(self) -> None:
        """Stop the monitor and close every thread's connection."""
        self.stop()
        self._connections.close_all()

    # --- InstanceSink --------------------------------------------------------------------------------------------

    def instances_stored(self, instances: list[StoredInstance]) -> None:
        """Record durable instances (one transaction per group commit); duplicates only keep a receiving study alive."""
        if instances:
            self._record(instances, self._clock())

    def association_released(self, calling_ae: str, study_uids: set[str]) -> None:
        if calling_ae in self.settings.complete_on_release:
            for study_uid in study_uids:
                self.request_completion(study_uid, CompletionTrigger.RELEASE)

    def _record(self, instances: Iterable[StoredInstance], now: float) -> None:
        new_by_study: dict[str, list[StoredInstance]] = {}
        seen_studies: set[str] = set()
        with self._write() as conn:
            for item in instances:
                seen_studies.add(item.study_instance_uid)
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.sop_instance_uid,
                        item.study_instance_uid,
                        item.series_instance_uid,
                        item.sop_class_uid,
                        os.path.abspath(item.path),
                        item.calling_ae,
                        item.size_bytes,
                        item.received_at,
                    ),
                ).rowcount
                if inserted:
                    new_by_study.setdefault(item.study_instance_uid, []).append(item)
            for study_uid, new in new_by_study.items():
                announced = [i.announced_study_instances for i in new if (i.announced_study_instances or 0) > 0]
                conn.execute(
                    """
                    INSERT INTO studies (study_uid, state, first_activity, last_activity, instance_count,
                                         announced_count, calling_ae, generation)
                    VALUES (?, 'receiving', ?, ?, ?, ?, ?, 1)
                    ON CONFLICT (study_uid) DO UPDATE SET
                        settled_state = CASE WHEN state = 'receiving' THEN settled_state ELSE state END,
                        state = 'receiving',
                        last_activity = excluded.last_activity,
                        instance_count = instance_count + excluded.instance_count,
                        announced_count = COALESCE(excluded.announced_count, announced_count),
                        calling_ae = excluded.calling_ae,
                        generation = generation + 1,
                        purged_at = NULL
                    """,
                    (study_uid, now, now, len(new), announced[-1] if announced else None, new[-1].calling_ae),
                )
            repeated = seen_studies - new_by_study.keys()
            conn.executemany(
                "UPDATE studies SET last_activity = ? WHERE study_uid = ? AND state = 'receiving'",
                [(now, study_uid) for study_uid in repeated],
            )
            reached = [
                row["study_uid"]
                for study_uid in new_by_study
                for row in conn.execute(
                    "SELECT study_uid FROM studies WHERE study_uid = ? AND state = 'receiving'"
                    " AND announced_count IS NOT NULL AND instance_count >= announced_count",
                    (study_uid,),
                )
            ]
        for study_uid in reached:
            self.request_completion(study_uid, CompletionTrigger.ANNOUNCED)

    # --- completion ----------------------------------------------------------------------------------------------

    def request_completion(self, study_uid: str, trigger: CompletionTrigger) -> None:
        """Queue a completion for the monitor thread, so an SCP handler never waits for the roles to be computed."""
        with self._requests_lock:
            self._requests.setdefault(study_uid, trigger)
        self._wake.set()

    def complete(self, study_uid: str, trigger: CompletionTrigger = CompletionTrigger.EXPLICIT) -> Completion:
        """Complete a receiving study now: compute its roles and insert its study_ready row if the revision is new.

        Raises ValueError for an invalid or unknown Study Instance UID.
        """
        if not is_valid_uid(study_uid):
            raise ValueError(f"not a valid Study Instance UID: {study_uid!r}")
        trigger = CompletionTrigger(trigger)
        for _ in range(COMPLETION_ATTEMPTS):
            with self._read() as conn:
                study = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
                if study is None:
                    raise ValueError(f"unknown study {study_uid}: no instance of it was received")
                files = conn.execute(
                    "SELECT series_uid, sop_class_uid, path FROM instances WHERE study_uid = ?"
                    " ORDER BY series_uid, path",
                    (study_uid,),
                ).fetchall()
            if study["state"] != StudyState.RECEIVING:
                return Completion(study_uid, CompletionOutcome.NOT_RECEIVING, study["revision"])
            if trigger is CompletionTrigger.INACTIVITY and not self._inactive(study["last_activity"]):
                return Completion(study_uid, CompletionOutcome.DEFERRED, study["revision"])
            paths = [Path(row["path"]) for row in files]
            roles = self._roles(study_uid, paths)
            counts: dict[tuple[str, str], int] = {}
            for row in files:
                key = (row["series_uid"], row["sop_class_uid"])
                counts[key] = counts.get(key, 0) + 1
            fingerprint = _usable_fingerprint(roles, counts)
            done = self._commit_completion(study, paths, roles, fingerprint, trigger)
            if done is not None:
                return done
            logger.info("study %s: instances arrived while completing (%s); recomputing", study_uid, trigger.value)
        return Completion(study_uid, CompletionOutcome.DEFERRED, study["revision"])

    def _commit_completion(
        self,
        snapshot: sqlite3.Row,
        paths: list[Path],
        roles: dict[str, Any],
        fingerprint: dict[str, Any],
        trigger: CompletionTrigger,
    ) -> Completion | None:
        """Insert the revision's row, or settle the study; None when the study changed since `snapshot`."""
        study_uid = snapshot["study_uid"]
        now = self._clock()
        with self._write() as conn:
            study = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if study["state"] != StudyState.RECEIVING:
                return Completion(study_uid, CompletionOutcome.NOT_RECEIVING, study["revision"])
            if study["generation"] != snapshot["generation"]:
                return None
            previous = json.loads(study["usable_series"]) if study["usable_series"] else None
            if study["revision"] > 0 and previous == fingerprint:
                conn.execute(
                    "UPDATE studies SET state = COALESCE(settled_state, 'complete'), settled_state = NULL"
                    " WHERE study_uid = ?",
                    (study_uid,),
                )
                logger.info("study %s: usable series unchanged, stays at revision %d", study_uid, study["revision"])
                return Completion(study_uid, CompletionOutcome.UNCHANGED, study["revision"])
            revision = study["revision"] + 1
            ready_id = conn.execute(
                "INSERT INTO study_ready (study_uid, revision, spool_dir, roles_json, trigger, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (study_uid, revision, str(_common_dir(paths)), json.dumps(roles, sort_keys=True), trigger.value, now),
            ).lastrowid
            conn.execute(
                "UPDATE studies SET state = 'complete', settled_state = NULL, revision = ?, usable_series = ?,"
                " completed_at = ?, completed_by = ? WHERE study_uid = ?",
                (revision, json.dumps(fingerprint, sort_keys=True), now, trigger.value, study_uid),
            )
        logger.info("study %s: revision %d ready (%s, %d instances)", study_uid, revision, trigger.value, len(paths))
        return Completion(study_uid, CompletionOutcome.NEW_REVISION, revision, ready_id)

    def _roles(self, study_uid: str, paths: list[Path]) -> dict[str, Any]:
        """describe_roles as a JSON-ready dict; a failure is recorded, never lost, so the job says why it stopped."""
        try:
            result = self._describe_roles(paths)
            roles = result.to_dict() if hasattr(result, "to_dict") else result
            if not isinstance(roles, dict):
                raise TypeError(f"describe_roles returned {type(roles).__name__}, not a dict")
            json.dumps(roles)
            return roles
        except Exception as error:  # any failure becomes the recorded reason
            logger.exception("study %s: series roles could not be determined", study_uid)
            return {"error": f"series roles could not be determined: {type(error).__name__}: {error}"}

    def _inactive(self, last_activity: float) -> bool:
        return self._clock() - last_activity >= self.settings.inactivity_timeout_s

    # --- monitor -----------------------------------------------------------------------------------------------

    def run_once(self) -> list[Completion]:
        """One monitor pass: queued completions, then receiving studies idle for the inactivity timeout."""
        with self._requests_lock:
            requests, self._requests = self._requests, {}
        deadline = self._clock() - self.settings.inactivity_timeout_s
        with self._read() as conn:
            idle = [
                row["study_uid"]
                for row in conn.execute(
                    "SELECT study_uid FROM studies WHERE state = 'receiving' AND last_activity <= ?"
                    " ORDER BY last_activity",
                    (deadline,),
                )
            ]
        work = list(requests.items()) + [(uid, CompletionTrigger.INACTIVITY) for uid in idle if uid not in requests]
        done = []
        for study_uid, trigger in work:
            try:
                done.append(self.complete(study_uid, trigger))
            except sqlite3.Error:
                logger.exception("study %s: completion (%s) failed; retried on the next pass", study_uid, trigger)
                self.request_completion(study_uid, trigger)
        return done

    def start(self) -> None:
        """Start the monitor thread (inactivity timeout and queued completions)."""
        if self._monitor is not None:
            return
        self._stopping.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name="studies-monitor", daemon=True)
        self._monitor.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the monitor thread after its current pass; a study left receiving completes after the restart."""
        if self._monitor is None:
            return
        self._stopping.set()
        self._wake.set()
        self._monitor.join(timeout_s)
        self._monitor = None

    def _monitor_loop(self) -> None:
        interval = min(MONITOR_MAX_POLL_S, self.settings.inactivity_timeout_s / 5)
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:  # the monitor outlives a locked or broken database pass
                logger.exception("studies monitor pass failed")
            self._wake.wait(interval)
            self._wake.clear()

    # --- restart recovery --------------------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Before the SCP starts: record spooled files the table lacks, restart receiving studies' inactivity clocks."""
        with self._read() as conn:
            known = {row["path"] for row in conn.execute("SELECT path FROM instances")}
        seen = 0
        found: list[StoredInstance] = []
        unreadable: list[Path] = []
        for path in _spool_files(self.spool_root):
            seen += 1
            if str(path) in known:
                continue
            instance = _read_spooled(path)
            if instance is None:
                unreadable.append(path)
            else:
                found.append(instance)
        for path in unreadable:
            logger.warning("spool file %s is not a DICOM instance with valid UIDs; left in place", path)
        now = self._clock()
        if found:
            self._record(found, now)
        with self._write() as conn:
            receiving = conn.execute(
                "UPDATE studies SET last_activity = ? WHERE state = 'receiving'", (now,)
            ).rowcount
            reached = [
                row["study_uid"]
                for row in conn.execute(
                    "SELECT study_uid FROM studies WHERE state = 'receiving'"
                    " AND announced_count IS NOT NULL AND instance_count >= announced_count"
                )
            ]
        for study_uid in reached:
            self.request_completion(study_uid, CompletionTrigger.ANNOUNCED)
        logger.info(
            "recovery: %d spool files, %d recorded anew, %d unreadable, %d studies receiving",
            seen, len(found), len(unreadable), receiving,
        )
        return RecoveryReport(seen, len(found), unreadable, receiving)

    # --- consumer side (the job queue) ----------------------------------------------------------------------------

    def ready_rows(self, after_id: int = 0, *, pending_only: bool = False) -> list[StudyReady]:
        """study_ready rows with id > after_id, oldest first; `pending_only` skips those already handed off."""
        query = "SELECT * FROM study_ready WHERE id > ?" + (" AND handed_off_at IS NULL" if pending_only else "")
        with self._read() as conn:
            rows = conn.execute(query + " ORDER BY id", (after_id,)).fetchall()
        return [
            StudyReady(
                id=row["id"],
                study_uid=row["study_uid"],
                revision=row["revision"],
                spool_dir=Path(row["spool_dir"]),
                roles_json=row["roles_json"],
                trigger=row["trigger"],
                created_at=row["created_at"],
                handed_off_at=row["handed_off_at"],
            )
            for row in rows
        ]

    def mark_handed_off(self, study_uid: str, revision: int) -> bool:
        """The job queue took this revision. False when no such row exists; repeating the call changes nothing."""
        now = self._clock()
        with self._write() as conn:
            row = conn.execute(
                "SELECT handed_off_at FROM study_ready WHERE study_uid = ? AND revision = ?", (study_uid, revision)
            ).fetchone()
            if row is None:
                return False
            if row["handed_off_at"] is not None:
                return True
            conn.execute(
                "UPDATE study_ready SET handed_off_at = ? WHERE study_uid = ? AND revision = ?",
                (now, study_uid, revision),
            )
            conn.execute(
                """
                UPDATE studies SET
                    state = CASE WHEN state = 'complete' THEN 'handed-off' ELSE state END,
                    settled_state = CASE WHEN state = 'receiving' THEN 'handed-off' ELSE settled_state END,
                    handed_off_at = ?
                WHERE study_uid = ? AND revision = ?
                """,
                (now, study_uid, revision),
            )
        return True

    def study_files(self, study_uid: str) -> list[Path]:
        """The study's spooled files, by series then path."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT path FROM instances WHERE study_uid = ? ORDER BY series_uid, path", (study_uid,)
            ).fetchall()
        return [Path(row["path"]) for row in rows]

    def list_studies(self) -> list[StudyRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM studies ORDER BY first_activity, study_uid").fetchall()
        return [
            StudyRecord(**{name: row[name] for name in StudyRecord.__dataclass_fields__}) for row in rows
        ]

    # --- retention ---------------------------------------------------------------------------------------------

    def purge_spool(self, older_than_s: float | None = None) -> list[str]:
        """Delete the spooled files of studies handed off more than `older_than_s` ago (default: retention days).

        Rows go first, in one transaction that re-checks the study, so an instance arriving meanwhile (a new file)
        is never touched. A crash before the files are gone leaves files that recover() records anew: the study
        reopens, its usable series are unchanged, it settles back without a new row and is purged again.
        """
        if older_than_s is None:
            older_than_s = self.settings.spool_retention_days * 86400.0
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be 0 or more, got {older_than_s}")
        cutoff = self._clock() - older_than_s
        with self._read() as conn:
            due = conn.execute(f"SELECT study_uid FROM studies WHERE {_PURGE_DUE}", (cutoff,))
            candidates = [row["study_uid"] for row in due]
        purged = []
        for study_uid in candidates:
            paths = self._forget_instances(study_uid, cutoff)
            if paths is None:
                continue  # reopened by a late push since the first look
            for path in paths:
                path.unlink(missing_ok=True)
            self._remove_empty_dirs({path.parent for path in paths})
            purged.append(study_uid)
            logger.info("study %s: %d spool files purged", study_uid, len(paths))
        return purged

    def _forget_instances(self, study_uid: str, cutoff: float) -> list[Path] | None:
        """Drop a study's instance rows if it is still due for purging; returns their files, or None."""
        with self._write() as conn:
            still_due = conn.execute(f"SELECT 1 FROM studies WHERE study_uid = ? AND {_PURGE_DUE}", (study_uid, cutoff))
            if still_due.fetchone() is None:
                return None
            rows = conn.execute("SELECT path FROM instances WHERE study_uid = ?", (study_uid,)).fetchall()
            conn.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            conn.execute(
                "UPDATE studies SET purged_at = ?, instance_count = 0 WHERE study_uid = ?", (self._clock(), study_uid)
            )
        return [Path(row["path"]) for row in rows]

    def _remove_empty_dirs(self, folders: set[Path]) -> None:
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.spool_root and self.spool_root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent


def _usable_fingerprint(roles: dict[str, Any], instance_counts: dict[tuple[str, str], int]) -> dict[str, Any]:
    """What decides a new revision: the series the roles use (DWI, ADC, FLAIR), with their instance counts.

    Keyed by series and SOP class, since one Series UID may hold a classic and an enhanced copy. Without roles
    (describe_roles failed) every series counts, so any change retries the classification.
    """
    if "error" in roles:
        return {"unclassified": {_series_key(*key): count for key, count in sorted(instance_counts.items())}}
    used = {
        (choice["series_uid"], choice["sop_class_uid"])
        for choice in (roles.get(name) for name in ROLE_CHOICES)
        if isinstance(choice, dict)
    }
    return {"usable": {_series_key(*key): instance_counts.get(key, 0) for key in sorted(used)}}


def _series_key(series_uid: str, sop_class_uid: str) -> str:
    return f"{series_uid}/{sop_class_uid}"


def _common_dir(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(path.parent) for path in paths]))


def _spool_files(root: Path) -> Iterator[Path]:
    """Every spooled file; hidden names are the spool's half-written temporaries, never acknowledged."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(folder) / name


def _read_spooled(path: Path) -> StoredInstance | None:
    """The identity of a spooled file from its header alone (stop_before_pixels); None if it is not usable.

    The SCP writes the command's SOP class and instance UIDs and the calling AE into the File Meta group, so those
    come from there when the dataset lacks them.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        stat = path.stat()
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None
    meta = getattr(ds, "file_meta", None) or {}
    uids = [
        ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"),
        ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID"),
        ds.get("StudyInstanceUID"),
        ds.get("SeriesInstanceUID"),
    ]
    if not all(uid is not None and is_valid_uid(str(uid)) for uid in uids):
        return None
    return StoredInstance(
        sop_instance_uid=str(uids[0]),
        sop_class_uid=str(uids[1]),
        study_instance_uid=str(uids[2]),
        series_instance_uid=str(uids[3]),
        path=path,
        calling_ae=str(meta.get("SourceApplicationEntityTitle") or "").strip(),
        size_bytes=stat.st_size,
        received_at=stat.st_mtime,
        announced_study_instances=_announced(ds.get("NumberOfStudyRelatedInstances")),
    )


def _announced(value: object) -> int | None:
    """(0020,1208) when it holds a positive count; anything else announces nothing."""
    try:
        count = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None
