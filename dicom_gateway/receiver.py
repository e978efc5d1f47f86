"""The DICOM receiver: the studies table, the durable spool and the Storage SCP joined; `fedlesion receive` runs it
alone until SIGTERM or SIGINT, `fedlesion node` runs the same `Receiver` with the roles of the model it serves.

Start-up order matters: half-written spool files of a crash are removed and the studies table re-discovers every
spooled instance (`recover`) before the SCP accepts anything, so a restart never forgets an acknowledged instance.
Shutdown runs the other way: stop accepting, let in-flight stores finish their group commit, then stop the table.

`dicom.receiver_processes` > 1: pynetdicom spends about 2.5 ms of Python per instance under one GIL, so one process
saturates one core. Then N worker processes each run an SCP on one listening socket that this process opens
(`scp.SharedListener`: a process accepts the next association only when no other serves fewer, so 4 associations
land 2 and 2 on two processes) with their own spool writer and studies-table connection (SQLite WAL is multi-process),
while this process keeps recovery, the inactivity monitor and every completion: a worker forwards the completions
its associations trigger (release by a `complete_on_release` AE, the announced instance count) to this process, whose
studies table computes the roles (with the node's served model) and writes the `study_ready` row the job queue reads.
Per-process limits: `max_associations` and `max_series_decoded_bytes` are enforced by each worker for the
associations it serves. Workers die with this process (PR_SET_PDEATHSIG), so a `kill -9` leaves no orphan
acknowledging instances.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue as ProcessQueue
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from queue import Empty
from types import FrameType

from dicom_gateway.scp import SharedListener, StorageScp
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import Spool
from dicom_gateway.studies import (
    CompletionTrigger,
    DescribeRoles,
    RecoveryReport,
    StudyIndex,
    database_path,
    spool_root,
)
from models.processes import die_with_parent

LOG = logging.getLogger(__name__)

LISTEN_HOST = "0.0.0.0"  # a PACS reaches the node over the network; the calling-AE allow-list guards it
ASSOCIATION_GRACE_S = 30.0  # design.md §5: open associations may finish for this long after SIGTERM
WORKER_START_TIMEOUT_S = 120.0
WORKER_STOP_TIMEOUT_S = ASSOCIATION_GRACE_S + 10.0
LISTEN_BACKLOG = 64  # connections the kernel queues while the SCP processes are busy
_LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class Receiver:
    """Studies table + spool + SCP (in this process, or `dicom.receiver_processes` processes on one port).

    `recover()` before `start(port)`; `stop()` ends accepting and the studies monitor, `close()` the files. `index`
    is this process's studies table: the job queue and the web page read it.
    """

    def __init__(
        self,
        data_dir: Path,
        ae_title: str,
        dicom: DicomSettings,
        *,
        describe_roles: DescribeRoles | None = None,
        log_level: str = "INFO",
    ) -> None:
        """`describe_roles` decides the series roles at completion; `log_level` is the SCP processes' log level."""
        self.data_dir = Path(data_dir)
        self.ae_title = ae_title
        self.dicom = dicom
        self.log_level = log_level
        self.index = StudyIndex(database_path(self.data_dir), spool_root(self.data_dir), dicom, describe_roles)
        self.spool = Spool(self.data_dir, self.index)
        self.port: int | None = None
        self._scp: StorageScp | None = None
        self._workers: list[BaseProcess] = []
        self._stop_workers: ProcessEvent | None = None
        self._completions: ProcessQueue | None = None
        self._relay: threading.Thread | None = None
        self._loads: Sequence[int] = ()

    def recover(self) -> RecoveryReport:
        """Before `start`: remove a crash's half-written spool files, record spooled instances the table lacks."""
        stale = self.spool.remove_stale_temporaries()
        if stale:
            LOG.warning("removed %d half-written spool files left by an interrupted receiver", stale)
        return self.index.recover()

    def start(self, port: int) -> int:
        """Accept associations on `port` (0: any free port), then start the studies monitor; returns the bound port."""
        if self.dicom.receiver_processes == 1:
            self._scp = StorageScp(self.ae_title, self.dicom, self.spool)
            self.port = self._scp.start(LISTEN_HOST, port)
        else:
            self.port = self._start_workers(port)
        self.index.start()
        return self.port

    def failed_processes(self) -> list[str]:
        """SCP worker processes that ended while the receiver runs (the receiver then no longer serves fully)."""
        if self._stop_workers is None or self._stop_workers.is_set():
            return []
        return [worker.name for worker in self._workers if not worker.is_alive()]

    def association_loads(self) -> list[int]:
        """Open associations per SCP worker process (empty with one process): how evenly the port's load spreads."""
        return list(self._loads)

    def stop(self, grace_s: float = ASSOCIATION_GRACE_S) -> None:
        """No new associations; open ones may finish for `grace_s`; stores in flight commit; the monitor stops."""
        if self._scp is not None:
            self._scp.stop(grace_s=grace_s)
            self._scp = None
        if self._workers:
            self._stop_worker_processes()
        self.index.stop()

    def close(self) -> None:
        self.stop()
        self.spool.close()
        self.index.close()

    # --- receiver_processes > 1 -----------------------------------------------------------------------------------

    def _start_workers(self, port: int) -> int:
        context = multiprocessing.get_context("spawn")  # no fork of a process that already runs threads
        ready = context.Queue()
        self._completions = context.Queue()
        self._stop_workers = context.Event()
        self._relay = threading.Thread(target=self._relay_completions, name="scp-completions", daemon=True)
        self._relay.start()
        listener = socket.create_server((LISTEN_HOST, port), backlog=LISTEN_BACKLOG)
        bound_port = int(listener.getsockname()[1])
        self._loads = context.RawArray("i", self.dicom.receiver_processes)
        self._workers = [
            context.Process(
                target=_worker_main,
                args=(self.data_dir, self.ae_title, self.dicom, self.log_level,
                      SharedListener(listener, self._loads, number), ready, self._completions, self._stop_workers),
                name=f"scp-worker-{number}",
            )
            for number in range(self.dicom.receiver_processes)
        ]
        with listener:  # closed here once the workers hold their own copies
            for worker in self._workers:
                worker.start()
            try:
                for _ in self._workers:
                    failure = ready.get(timeout=WORKER_START_TIMEOUT_S)
                    if failure is not None:
                        raise RuntimeError(f"an SCP worker failed to start: {failure}")
            except (Empty, RuntimeError):
                self._stop_worker_processes()
                raise
        LOG.info("%d SCP worker processes share port %d", len(self._workers), bound_port)
        return bound_port

    def _relay_completions(self) -> None:
        """The workers' completion requests, handed to this process's studies monitor until the sentinel."""
        assert self._completions is not None
        while (request := self._completions.get()) is not None:
            study_uid, trigger = request
            self.index.request_completion(study_uid, CompletionTrigger(trigger))

    def _stop_worker_processes(self) -> None:
        assert self._stop_workers is not None and self._completions is not None
        self._stop_workers.set()
        for worker in self._workers:
            worker.join(WORKER_STOP_TIMEOUT_S)
            if worker.is_alive():
                LOG.warning("SCP worker %s did not stop in %.0f s; killing it", worker.name, WORKER_STOP_TIMEOUT_S)
                worker.kill()
                worker.join()
        self._workers = []
        self._completions.put(None)  # after the workers: every completion they forwarded reaches the monitor
        if self._relay is not None:
            self._relay.join()
            self._relay = None


class _ForwardingIndex(StudyIndex):
    """A worker's studies table: records instances here, forwards completion requests to the parent, whose studies
    monitor completes studies (with the roles the node's model needs)."""

    def __init__(self, data_dir: Path, dicom: DicomSettings, completions: ProcessQueue) -> None:
        super().__init__(database_path(data_dir), spool_root(data_dir), dicom)
        self._completions = completions

    def request_completion(self, study_uid: str, trigger: CompletionTrigger) -> None:
        self._completions.put((study_uid, CompletionTrigger(trigger).value))


def _worker_main(
    data_dir: Path,
    ae_title: str,
    dicom: DicomSettings,
    log_level: str,
    listener: SharedListener,
    ready: ProcessQueue,
    completions: ProcessQueue,
    stop_workers: ProcessEvent,
) -> None:
    """One SCP worker: its own spool writer and studies-table connection; stops when the parent says so."""
    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the process group: the parent coordinates the stop
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=_LOG_FORMAT)
    try:
        index = _ForwardingIndex(data_dir, dicom, completions)
        spool = Spool(data_dir, index)
        scp = StorageScp(ae_title, dicom, spool)
        scp.start(listener=listener)
    except Exception as error:
        ready.put(f"{error.__class__.__name__}: {error}")
        raise
    ready.put(None)
    try:
        stop_workers.wait()
    finally:
        scp.stop(grace_s=ASSOCIATION_GRACE_S)
        spool.close()
        index.close()
        completions.close()
        completions.join_thread()  # every forwarded completion is in the pipe before this process ends


def run_receiver(data_dir: Path, ae_title: str, dicom: DicomSettings, port: int, *, log_level: str = "INFO") -> int:
    """`fedlesion receive`: serve on `port` (0: any free port) until SIGTERM/SIGINT. Returns the exit status."""
    receiver = Receiver(data_dir, ae_title, dicom, log_level=log_level)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, _setter(stop)) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        receiver.recover()
        bound_port = receiver.start(port)
        print(
            f"fedlesion receive: AE {ae_title} on {LISTEN_HOST}:{bound_port}, data in {receiver.data_dir.resolve()}",
            flush=True,
        )
        while not stop.wait(1.0):
            dead = receiver.failed_processes()
            if dead:
                LOG.error("SCP worker %s ended unexpectedly; stopping the receiver", ", ".join(dead))
                status = 1
                break
        LOG.info("stopping: no new associations; finishing stores in flight")
    finally:
        receiver.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _setter(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return handle
