"""The job queue (design.md §4 task routing, §5 jobs): one SQLite row per (study revision, task, run).

Why SQLite (`<data_dir>/jobs.sqlite3`, WAL, busy_timeout 5 s, short transactions): the node's worker threads, the
web page and a second process (`fedlesion reprocess`) share the queue, and a killed node must find every job where it
left it. The queue consumes the studies table's `study_ready` rows in id order (the largest `ready_id` taken is the
cursor) and routes each revision to the enabled tasks whose roles are present and whose study filter matches.

States: received (taken from study_ready; the studies table's hand-off not yet recorded) → queued → running →
done | failed | not-processed, each terminal state with its reason. The attempt counter grows when a worker claims
a job, so a job whose worker process dies `max_attempts` times fails instead of killing the node forever. Running
jobs belong to one worker process (`owner`: host, pid and process start time); `recover()` puts the jobs of a
process that no longer runs back in the queue. `reprocess()` adds a new run for the latest revision; a new model
version alone never does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError

from dicom_gateway.settings import DicomSettings
from models.sqlite_tx import ThreadConnections, connect, read_snapshot, write_transaction
from dicom_gateway.studies import StudyIndex, StudyReady
from dicom_gateway.study_files import open_dicom
from dicom_gateway.uids import is_valid_uid, spool_name
from inference.settings import InferenceSettings, TasksSettings
from models.manifest import Role, Task
from models.settings import ModelSettings

logger = logging.getLogger(__name__)

DATABASE_NAME = "jobs.sqlite3"
RESULTS_DIRNAME = "results"
_DAY_S = 86400.0
NO_TASK = ""  # the task column of a "no task matched" row (UNIQUE needs a value, NULLs never collide)


class JobState(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_PROCESSED = "not-processed"


ACTIVE_STATES = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)
TERMINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.NOT_PROCESSED)


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL CHECK (revision >= 1),
    task TEXT NOT NULL CHECK (task IN ({", ".join(f"'{task.short_name}'" for task in Task)}, '{NO_TASK}')),
    run INTEGER NOT NULL DEFAULT 1,  -- 1: routed from study_ready; n+1: the n-th reprocess
    state TEXT NOT NULL CHECK (state IN ('received', 'queued', 'running', 'done', 'failed', 'not-processed')),
    reason TEXT,
    priority INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- claims so far
    ready_id INTEGER NOT NULL,  -- the study_ready row it came from
    spool_dir TEXT NOT NULL,
    roles_json TEXT NOT NULL,
    study_description TEXT NOT NULL DEFAULT '',
    procedure_description TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,  -- also the outputs' creation time, so a retry writes identical bytes
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    owner TEXT,  -- the worker process that claimed it last
    worker TEXT,  -- and its thread
    model_version TEXT,
    result_dir TEXT,
    result_json TEXT,  -- volumes, lesion count, timings, warnings (JobResult)
    purged_at REAL,
    UNIQUE (study_uid, revision, task, run)
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (state, priority, queued_at, id);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid, revision);
"""


@dataclass(frozen=True)
class StudyContext:
    """What the study filters search (design.md §4): two header fields and the AE that sent the study."""

    study_description: str = ""
    procedure_description: str = ""
    calling_ae: str = ""

    def texts(self) -> tuple[str, str, str]:
        return (self.study_description, self.procedure_description, self.calling_ae)


@dataclass(frozen=True)
class Routing:
    """Which tasks run on a study revision; `reason` says why none does (empty `tasks`)."""

    tasks: tuple[Task, ...]
    reason: str | None = None


@dataclass(frozen=True)
class JobResult:
    """What a finished job recorded for the web page; the same numbers as its report.json."""

    model_version: str | None = None
    total_volume_ml: float | None = None
    adc_core_volume_ml: float | None = None
    lesion_count: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    outputs: Mapping[str, str] = field(default_factory=dict)  # output kind → Series Instance UID

    def to_json(self) -> str:
        return json.dumps(
            {
                "model_version": self.model_version,
                "total_volume_ml": self.total_volume_ml,
                "adc_core_volume_ml": self.adc_core_volume_ml,
                "lesion_count": self.lesion_count,
                "timings": dict(self.timings),
                "warnings": list(self.warnings),
                "outputs": dict(self.outputs),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> JobResult | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(
            model_version=data.get("model_version"),
            total_volume_ml=data.get("total_volume_ml"),
            adc_core_volume_ml=data.get("adc_core_volume_ml"),
            lesion_count=data.get("lesion_count"),
            timings=data.get("timings") or {},
            warnings=tuple(data.get("warnings") or ()),
            outputs=data.get("outputs") or {},
        )


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    revision: int
    task: Task | None  # None: the "no task matched" row of a revision
    run: int
    state: JobState
    reason: str | None
    attempts: int
    ready_id: int
    spool_dir: Path
    roles_json: str
    context: StudyContext
    created_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    owner: str | None
    worker: str | None
    model_version: str | None
    result_dir: Path | None
    result: JobResult | None
    purged_at: float | None
    queue_position: int | None  # 1: claimed next; None unless queued

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class RetentionReport:
    results_purged: list[int]  # job ids whose result directories went
    spool_purged: list[str]  # study UIDs whose spooled files went
    output_batches_purged: int  # outbox batches (SEG/SC/SR files and rows)
    spool_deferred: bool  # a study due for purging still has an active job: spool purge left for the next pass


def results_dir(data_dir: Path, study_uid: str, revision: int, task: Task) -> Path:
    """`<data_dir>/results/<spool_name(study)>/r<revision>/<task short name>/`: no UID or free text reaches a
    path."""
    return Path(data_dir) / RESULTS_DIRNAME / spool_name(study_uid) / f"r{int(revision)}" / Task(task).short_name


def enabled_tasks(tasks: TasksSettings) -> frozenset[Task]:
    """The tasks settings [tasks] stroke / ms switch on: the models the node serves and the jobs it routes."""
    return frozenset(task for task in Task if _task_settings(tasks, task)[0])


def _task_settings(tasks: TasksSettings, task: Task) -> tuple[bool, str]:
    """[tasks] for one task: whether it is enabled, and its study filter."""
    if task is Task.STROKE_DWI_ADC:
        return tasks.stroke, tasks.stroke_study_filter
    return tasks.ms, tasks.ms_study_filter


def registry_tasks(data_dir: Path, models: ModelSettings) -> frozenset[Task]:
    """The tasks a model is installed for, read from disk for a process without a ModelService (the CLI): the
    version the registry pins (a pin to nothing: none yet), else any version in the registry, or (demo mode) the
    embedded default the node seeds an empty registry with."""
    # the node's model service and the registry, imported only here
    from inference.models import DEFAULTS_DIR
    from models.registry import Registry, TrustPolicy

    registry = Registry(models.registry_path(data_dir), TrustPolicy.demo())
    demo = models.enrollment_bundle is None

    def installed(task: Task) -> bool:
        pin = registry.installed(task)
        if pin is not None:
            return pin.version is not None
        return bool(registry.versions(task)) or (demo and (DEFAULTS_DIR / task.value).is_dir())

    return frozenset(task for task in Task if installed(task))


def process_owner() -> str:
    """This process as a job owner: host, pid and start time (a reused pid is another process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def owner_alive(owner: str) -> bool:
    """Whether the process that claimed a job still runs; another host's process counts as alive (unknowable)."""
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname():
        return True
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return _start_ticks(pid) == ticks and ticks != ""


def _start_ticks(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time in clock ticks); empty when the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def study_context(index: StudyIndex, study_uid: str, calling_aes: Mapping[str, str]) -> StudyContext:
    """The filter texts of a study: StudyDescription and RequestedProcedureDescription (top level or in the
    Request Attributes Sequence) from one spooled header, and the calling AE the studies table recorded."""
    study_description = procedure_description = ""
    for path in index.study_files(study_uid)[:1]:
        try:
            ds = open_dicom(path, stop_before_pixels=True)
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, InvalidDicomError) as error:
            # an unreadable header routes like empty fields; the worker says why the study cannot be read
            logger.warning("study %s: header of %s unreadable for routing: %s", study_uid, path.name, error)
            break
        study_description = str(ds.get("StudyDescription", "") or "")
        procedures = [str(ds.get("RequestedProcedureDescription", "") or "")]
        for item in ds.get("RequestAttributesSequence", []) or []:
            procedures.append(str(item.get("RequestedProcedureDescription", "") or ""))
        procedure_description = "\\".join(text for text in procedures if text)
    return StudyContext(study_description, procedure_description, calling_aes.get(study_uid, ""))


def route_study(
    roles: Mapping[str, Any], context: StudyContext, tasks: TasksSettings, installed: Collection[Task]
) -> Routing:
    """Task routing (design.md §4): every installed, enabled task whose roles are present and whose filter matches.

    `roles`: the study_ready row's roles dict (StudyRoles.to_dict(), or {"error": reason}). Stroke needs a DWI and
    an ADC (the scanner's or one computable from the DWI's b0, which roles.py records as a computed choice); MS
    needs a FLAIR.
    """
    if roles.get("error"):
        return Routing((), str(roles["error"]))
    chosen: list[Task] = []
    refusals: list[str] = []
    for task in sorted(Task, key=lambda task: task.priority):
        enabled, study_filter = _task_settings(tasks, task)
        missing = next((_MISSING_ROLE[role] for role in task.roles if not roles.get(role.value)), None)
        if not enabled:
            refusals.append(f"{task.short_name}: disabled")
        elif task not in installed:
            refusals.append(f"{task.short_name}: no model installed")
        elif missing:
            refusals.append(f"{task.short_name}: {missing}")
        elif study_filter and not any(re.search(study_filter, text) for text in context.texts()):
            refusals.append(f"{task.short_name}: study filter {study_filter!r} does not match")
        else:
            chosen.append(task)
    if chosen:
        return Routing(tuple(chosen))
    return Routing((), "no task matched (" + "; ".join(refusals) + ")" + _series_reasons(roles))


# Why a task cannot run when its role has no series (roles.py records a computable ADC as a computed choice).
_MISSING_ROLE = {
    Role.DWI: "no DWI series",
    Role.ADC: "ADC missing (no ADC series and no b0 to compute it)",
    Role.FLAIR: "no FLAIR series",
}


def _series_reasons(roles: Mapping[str, Any], limit: int = 8) -> str:
    """The roles' per-series decisions, so a radiologist sees why no series qualified."""
    decisions = [
        f"series {item.get('number')}: {item.get('reason')}"
        for item in roles.get("series", [])
        if isinstance(item, Mapping) and item.get("reason")
    ]
    if not decisions:
        return ""
    more = f"; {len(decisions) - limit} more" if len(decisions) > limit else ""
    return " — " + "; ".join(decisions[:limit]) + more


class JobQueue:
    """The jobs table over `<data_dir>/jobs.sqlite3`; safe across threads (one connection each) and processes."""

    def __init__(
        self,
        data_dir: Path,
        *,
        tasks: TasksSettings = TasksSettings(),
        inference: InferenceSettings = InferenceSettings(),
        dicom: DicomSettings = DicomSettings(),
        installed: Callable[[], Collection[Task]] = lambda: tuple(Task),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tasks` routes studies, `inference` bounds the attempts, `dicom` gives the retention periods."""
        self.data_dir = Path(data_dir)
        self.tasks = tasks
        self.inference = inference
        self.dicom = dicom
        self.owner = process_owner()
        self._installed = installed
        self._clock = clock
        self._connections = ThreadConnections(self._open_connection)
        self._intake_lock = threading.Lock()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._connections.get().executescript(_SCHEMA)

    # --- connections -------------------------------------------------------------------------------------------

    def _open_connection(self) -> sqlite3.Connection:
        conn = connect(self.data_dir / DATABASE_NAME, synchronous="NORMAL", foreign_keys=False)
        conn.row_factory = sqlite3.Row  # WAL + NORMAL: a killed process loses nothing committed
        return conn

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """The write lock is taken at BEGIN, so a claim cannot interleave with another."""
        return write_transaction(self._connections.get())

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return read_snapshot(self._connections.get())

    def close(self) -> None:
        self._connections.close_all()

    # --- intake ------------------------------------------------------------------------------------------------

    def installed_tasks(self) -> frozenset[Task]:
        return frozenset(Task(task) for task in self._installed())

    def intake(self, index: StudyIndex) -> list[Job]:
        """Route the study_ready rows not taken yet into jobs, record the hand-off, queue them; returns new rows."""
        with self._intake_lock:
            with self._read() as conn:
                (cursor,) = conn.execute("SELECT COALESCE(MAX(ready_id), 0) FROM jobs").fetchone()
            rows = index.ready_rows(after_id=cursor)
            if rows:
                calling_aes = {study.study_uid: study.calling_ae for study in index.list_studies()}
                installed = self.installed_tasks()
                for row in rows:
                    self._take(row, study_context(index, row.study_uid, calling_aes), installed)
            self._hand_off(index)
        return [self.job(ident) for ident in self._ids("ready_id > ?", (cursor,))]

    def _take(self, row: StudyReady, context: StudyContext, installed: Collection[Task]) -> None:
        try:
            roles = row.roles
        except json.JSONDecodeError as error:
            roles = {"error": f"roles_json is not JSON: {error}"}
        routing = route_study(roles, context, self.tasks, installed)
        now = self._clock()
        with self._write() as conn:
            self._insert(conn, row.id, row.study_uid, row.revision, 1, str(row.spool_dir), row.roles_json,
                         context, routing, JobState.RECEIVED, now)
        if routing.tasks:
            logger.info("study %s r%d: jobs %s", row.study_uid, row.revision, ", ".join(t.short_name for t in routing.tasks))
        else:
            logger.info("study %s r%d: not processed: %s", row.study_uid, row.revision, routing.reason)

    def _insert(
        self,
        conn: sqlite3.Connection,
        ready_id: int,
        study_uid: str,
        revision: int,
        run: int,
        spool_dir: str,
        roles_json: str,
        context: StudyContext,
        routing: Routing,
        state: JobState,
        now: float,
    ) -> None:
        plans: list[tuple[str, int, JobState, str | None]] = [(task.short_name, task.priority, state, None)
                                                              for task in routing.tasks]
        if not routing.tasks:  # received until handed off, like the others; a reprocess ends it at once
            no_task_state = JobState.RECEIVED if state is JobState.RECEIVED else JobState.NOT_PROCESSED
            plans = [(NO_TASK, 9, no_task_state, routing.reason)]
        for task, priority, job_state, reason in plans:
            conn.execute(
                "INSERT OR IGNORE INTO jobs (study_uid, revision, task, run, state, reason, priority, ready_id,"
                " spool_dir, roles_json, study_description, procedure_description, calling_ae, created_at,"
                " queued_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study_uid, revision, task, run, job_state.value, reason, priority, ready_id, spool_dir, roles_json,
                 *context.texts(), now, now if job_state is JobState.QUEUED else None,
                 now if job_state is JobState.NOT_PROCESSED else None),
            )

    def _hand_off(self, index: StudyIndex) -> None:
        """Record the hand-off in the studies table, then move the revision's rows on (queued, or not-processed for
        a "no task matched" row): a crash between the two redoes both."""
        with self._read() as conn:
            revisions = conn.execute("SELECT DISTINCT study_uid, revision FROM jobs WHERE state = 'received'").fetchall()
        for row in revisions:
            index.mark_handed_off(row["study_uid"], row["revision"])
            now = self._clock()
            with self._write() as conn:
                conn.execute(
                    "UPDATE jobs SET state = CASE WHEN task = ? THEN 'not-processed' ELSE 'queued' END,"
                    " queued_at = CASE WHEN task = ? THEN NULL ELSE ? END,"
                    " finished_at = CASE WHEN task = ? THEN ? ELSE NULL END"
                    " WHERE study_uid = ? AND revision = ? AND state = 'received'",
                    (NO_TASK, NO_TASK, now, NO_TASK, now, row["study_uid"], row["revision"]),
                )

    # --- workers -----------------------------------------------------------------------------------------------

    def claim(self, worker: str = "") -> Job | None:
        """The next queued job (stroke before MS, then first queued first), now running and owned by this process;
        the attempt counter grows here, so a claim that never finishes still counts."""
        max_attempts = self.inference.max_attempts
        now = self._clock()
        with self._write() as conn:
            while True:
                row = conn.execute(
                    "SELECT id, attempts FROM jobs WHERE state = 'queued' ORDER BY priority, queued_at, id LIMIT 1"
                ).fetchone()
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:  # max_attempts lowered since it was queued
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', reason = ?, finished_at = ? WHERE id = ?",
                        (f"gave up after {row['attempts']} attempts", now, row["id"]),
                    )
                    continue
                conn.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, owner = ?,"
                    " worker = ?, reason = NULL WHERE id = ?",
                    (now, self.owner, worker, row["id"]),
                )
                ident = row["id"]
                break
        return self.job(ident)

    def finish(
        self,
        job_id: int,
        state: JobState,
        reason: str | None = None,
        *,
        result: JobResult | None = None,
        result_dir: Path | None = None,
    ) -> bool:
        """Record a running job's end; False when this process no longer owns it (recovered meanwhile)."""
        state = JobState(state)
        if state not in TERMINAL_STATES:
            raise ValueError(f"a job finishes as done, failed or not-processed, not {state.value}")
        if state is not JobState.DONE and not reason:
            raise ValueError(f"a {state.value} job needs a reason")
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished_at = ?, model_version = ?, result_dir = ?,"
                " result_json = ? WHERE id = ? AND state = 'running' AND owner = ?",
                (state.value, reason, self._clock(), result.model_version if result else None,
                 str(result_dir) if result_dir else None, result.to_json() if result else None, job_id, self.owner),
            ).rowcount
        if changed:
            logger.info("job %d: %s%s", job_id, state.value, f" ({reason})" if reason else "")
        return bool(changed)

    def recover(self, index: StudyIndex | None = None) -> list[Job]:
        """After a restart: running jobs of processes that no longer run go back to the queue, or fail once they
        used `max_attempts` claims; received jobs are handed off and queued. Returns the jobs it changed."""
        max_attempts = self.inference.max_attempts
        with self._read() as conn:
            running = conn.execute("SELECT id, owner, attempts FROM jobs WHERE state = 'running'").fetchall()
        orphans = [row for row in running if row["owner"] != self.owner and not owner_alive(row["owner"] or "")]
        changed = []
        for row in orphans:
            now = self._clock()
            with self._write() as conn:
                if row["attempts"] >= max_attempts:
                    update = ("UPDATE jobs SET state = 'failed', reason = ?, finished_at = ? WHERE id = ?"
                              " AND state = 'running' AND owner = ?")
                    text = f"the worker stopped during this job {row['attempts']} times (max_attempts {max_attempts})"
                else:
                    update = ("UPDATE jobs SET state = 'queued', reason = ?, queued_at = ? WHERE id = ?"
                              " AND state = 'running' AND owner = ?")
                    text = f"requeued: the worker stopped during attempt {row['attempts']}"
                if conn.execute(update, (text, now, row["id"], row["owner"])).rowcount:
                    changed.append(row["id"])
                    logger.warning("job %d: %s", row["id"], text)
        if index is not None:
            received = self._ids("state = 'received'", ())
            self._hand_off(index)
            changed += received
        return [self.job(ident) for ident in changed]

    def release_running(self) -> list[int]:
        """A graceful stop (SIGTERM) that cannot wait for a job: this process's running jobs go back to the queue
        without spending an attempt, since a stop is no crash. Returns their ids."""
        with self._write() as conn:
            ids = [row["id"] for row in conn.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND owner = ?", (self.owner,))]
            conn.executemany(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), queued_at = ?,"
                " reason = 'requeued: the node stopped during the job' WHERE id = ? AND state = 'running'",
                [(self._clock(), ident) for ident in ids],
            )
        for ident in ids:
            logger.info("job %d: requeued at stop", ident)
        return ids

    # --- reprocess -----------------------------------------------------------------------------------------------

    def reprocess(self, study_uid: str, index: StudyIndex | None = None) -> list[Job]:
        """New jobs for the study's latest revision with the current routing (and so the current model); a task
        whose job is still queued or running is left to that job. ValueError for an unknown study."""
        if not is_valid_uid(study_uid):
            raise ValueError(f"not a valid Study Instance UID: {study_uid!r}")
        if index is not None:
            self.intake(index)
        with self._read() as conn:
            latest = conn.execute(
                "SELECT * FROM jobs WHERE study_uid = ? ORDER BY revision DESC, run DESC, id DESC LIMIT 1",
                (study_uid,),
            ).fetchone()
        if latest is None:
            raise ValueError(
                f"unknown study {study_uid}: no job exists for it (is it complete? `fedlesion study complete UID`)"
            )
        context = StudyContext(latest["study_description"], latest["procedure_description"], latest["calling_ae"])
        try:
            roles = json.loads(latest["roles_json"])
        except json.JSONDecodeError as error:
            roles = {"error": f"roles_json is not JSON: {error}"}
        routing = route_study(roles, context, self.tasks, self.installed_tasks())
        now = self._clock()
        with self._write() as conn:
            active = {
                row["task"]
                for row in conn.execute(
                    "SELECT task FROM jobs WHERE study_uid = ? AND revision = ? AND state IN"
                    " ('received', 'queued', 'running')",
                    (study_uid, latest["revision"]),
                )
            }
            (run,) = conn.execute(
                "SELECT MAX(run) + 1 FROM jobs WHERE study_uid = ? AND revision = ?", (study_uid, latest["revision"])
            ).fetchone()
            routing = Routing(tuple(task for task in routing.tasks if task.short_name not in active),
                              routing.reason) if routing.tasks else routing
            if routing.tasks or not active:
                self._insert(conn, latest["ready_id"], study_uid, latest["revision"], run, latest["spool_dir"],
                             latest["roles_json"], context, routing, JobState.QUEUED, now)
        created = self._ids("study_uid = ? AND revision = ? AND run = ?", (study_uid, latest["revision"], run))
        logger.info("study %s r%d: reprocess run %d, %d job(s)", study_uid, latest["revision"], run, len(created))
        return [self.job(ident) for ident in created]

    # --- queries for the web page and the CLI ----------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        """One job with its queue position; KeyError when it does not exist."""
        jobs = self._jobs("WHERE j.id = ?", (job_id,))
        if not jobs:
            raise KeyError(job_id)
        return jobs[0]

    def jobs_for_study(self, study_uid: str) -> list[Job]:
        """Every job of a study, newest revision and run first."""
        return self._jobs("WHERE j.study_uid = ? ORDER BY j.revision DESC, j.run DESC, j.priority", (study_uid,))

    def list_jobs(self, *, states: Collection[JobState] = (), limit: int = 200) -> list[Job]:
        """The newest jobs (optionally in some states), for the study list."""
        where, params = "", []
        if states:
            where = "WHERE j.state IN (" + ", ".join("?" * len(states)) + ")"
            params = [JobState(state).value for state in states]
        return self._jobs(where + " ORDER BY j.id DESC LIMIT ?", (*params, int(limit)))

    def queue_position(self, job_id: int) -> int | None:
        """1 for the job claimed next; None when the job is not queued."""
        return self.job(job_id).queue_position

    def counts(self) -> dict[JobState, int]:
        """Jobs per state, every state present (for /metrics)."""
        with self._read() as conn:
            rows = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: int(rows.get(state.value, 0)) for state in JobState}

    def _ids(self, where: str, params: tuple[Any, ...]) -> list[int]:
        with self._read() as conn:
            return [row["id"] for row in conn.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY id", params)]

    def _jobs(self, tail: str, params: tuple[Any, ...]) -> list[Job]:
        query = (
            "WITH positions AS (SELECT id, ROW_NUMBER() OVER (ORDER BY priority, queued_at, id) AS position"
            " FROM jobs WHERE state = 'queued')"
            " SELECT j.*, p.position FROM jobs j LEFT JOIN positions p USING (id) " + tail
        )
        with self._read() as conn:
            rows = conn.execute(query, params).fetchall()
        return [_job(row) for row in rows]

    # --- retention -------------------------------------------------------------------------------------------------

    def purge_expired(self, index: StudyIndex, outbox: Any | None = None) -> RetentionReport:
        """Retention (design.md §4): result directories `output_retention_days` after their job ended, the outbox's
        DICOM outputs after as long, and the spool `spool_retention_days` after the hand-off (StudyIndex); a spool
        purge waits while a study due for it still has an active job (a reprocess of an old study)."""
        now = self._clock()
        output_cutoff = now - self.dicom.output_retention_days * _DAY_S
        with self._read() as conn:
            expired = conn.execute(
                "SELECT id, result_dir FROM jobs WHERE purged_at IS NULL AND finished_at IS NOT NULL"
                " AND finished_at <= ? AND state IN ('done', 'failed', 'not-processed')",
                (output_cutoff,),
            ).fetchall()
        purged_results = []
        for row in expired:
            if row["result_dir"] and not self._result_dir_in_use(row["result_dir"], row["id"], output_cutoff):
                _remove_result_dir(Path(row["result_dir"]), self.data_dir / RESULTS_DIRNAME)
            with self._write() as conn:
                conn.execute("UPDATE jobs SET purged_at = ? WHERE id = ?", (now, row["id"]))
            purged_results.append(row["id"])
        batches = outbox.purge_expired(self.dicom.output_retention_days, now) if outbox is not None else 0

        spool_cutoff = now - self.dicom.spool_retention_days * _DAY_S
        due = {
            study.study_uid
            for study in index.list_studies()
            if study.handed_off_at is not None and study.handed_off_at <= spool_cutoff and study.purged_at is None
        }
        with self._read() as conn:
            active = {
                row["study_uid"]
                for row in conn.execute("SELECT DISTINCT study_uid FROM jobs WHERE state IN"
                                        " ('received', 'queued', 'running')")
            }
        deferred = bool(due & active)
        spool = [] if deferred else index.purge_spool(self.dicom.spool_retention_days * _DAY_S)
        if deferred:
            logger.info("spool purge deferred: %d due studies still have active jobs", len(due & active))
        return RetentionReport(purged_results, spool, batches, deferred)

    def _result_dir_in_use(self, result_dir: str, job_id: int, cutoff: float) -> bool:
        """A later run of the same (study, revision, task) writes the same directory: keep it for that run."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM jobs WHERE result_dir = ? AND id != ? AND (finished_at IS NULL OR finished_at > ?)",
                (result_dir, job_id, cutoff),
            ).fetchone()
        return row is not None


def _remove_result_dir(path: Path, root: Path) -> None:
    """Remove a job's result directory and the empty folders above it, never anything outside `root`."""
    path, root = path.resolve(), root.resolve()
    if root not in path.parents:
        logger.warning("result directory %s is outside %s; not removed", path, root)
        return
    shutil.rmtree(path, ignore_errors=True)
    folder = path.parent
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        study_uid=row["study_uid"],
        revision=row["revision"],
        task=Task.from_short_name(row["task"]) if row["task"] != NO_TASK else None,
        run=row["run"],
        state=JobState(row["state"]),
        reason=row["reason"],
        attempts=row["attempts"],
        ready_id=row["ready_id"],
        spool_dir=Path(row["spool_dir"]),
        roles_json=row["roles_json"],
        context=StudyContext(row["study_description"], row["procedure_description"], row["calling_ae"]),
        created_at=row["created_at"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        owner=row["owner"],
        worker=row["worker"],
        model_version=row["model_version"],
        result_dir=Path(row["result_dir"]) if row["result_dir"] else None,
        result=JobResult.from_json(row["result_json"]),
        purged_at=row["purged_at"],
        queue_position=row["position"],
    )
