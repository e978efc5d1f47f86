"""`fedlesion receive`: the studies table, the durable spool and the Storage SCP joined, until SIGTERM or SIGINT.

Start-up order matters: half-written spool files of a crash are removed and the studies table re-discovers every
spooled instance (`recover`) before the SCP accepts anything, so a restart never forgets an acknowledged instance.
Shutdown runs the other way: stop accepting, let in-flight stores finish their group commit, then stop the table.

`dicom.receiver_processes` > 1: pynetdicom spends about 2.5 ms of Python per instance under one GIL, so one process
saturates one core. Then N worker processes each run an SCP on the same port (SO_REUSEPORT; the kernel spreads new
associations over them) with their own spool writer and studies-table connection (SQLite WAL is multi-process),
while this process keeps recovery and the inactivity monitor. Per-process limits: `max_associations` and
`max_series_decoded_bytes` are enforced by each worker for the associations it serves. Workers die with this
process (PR_SET_PDEATHSIG), so a `kill -9` leaves no orphan acknowledging instances.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue as ProcessQueue
from multiprocessing.synchronize import Event as ProcessEvent
from queue import Empty
from types import FrameType

from dicom_gateway.scp import StorageScp
from dicom_gateway.spool import Spool
from dicom_gateway.studies import StudyIndex, database_path, spool_root
from fedlesion.settings import Settings

LOG = logging.getLogger(__name__)

LISTEN_HOST = "0.0.0.0"  # a PACS reaches the node over the network; the calling-AE allow-list guards it
WORKER_START_TIMEOUT_S = 120.0
WORKER_STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1


def run_receiver(settings: Settings, port: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT; `port` overrides node.dicom_port (0: any free port). Returns the exit status."""
    index = StudyIndex(database_path(settings), spool_root(settings), settings.dicom)
    spool = Spool(settings.storage.data_dir, index)
    stale = spool.remove_stale_temporaries()
    if stale:
        LOG.warning("removed %d half-written spool files left by an interrupted receiver", stale)
    index.recover()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, _setter(stop)) for sig in (signal.SIGTERM, signal.SIGINT)}
    requested_port = settings.node.dicom_port if port is None else port

    def listening(bound_port: int) -> None:
        index.start()
        print(
            f"fedlesion receive: AE {settings.node.ae_title} on {LISTEN_HOST}:{bound_port}, "
            f"data in {settings.storage.data_dir.resolve()}",
            flush=True,
        )

    try:
        if settings.dicom.receiver_processes == 1:
            return _serve_here(settings, spool, requested_port, stop, listening)
        return _serve_in_workers(settings, requested_port, stop, listening)
    finally:
        spool.close()
        index.stop()
        index.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_here(
    settings: Settings, spool: Spool, port: int, stop: threading.Event, listening: Callable[[int], None]
) -> int:
    scp = StorageScp(settings.node.ae_title, settings.dicom, spool)
    try:
        listening(scp.start(LISTEN_HOST, port))
        while not stop.wait(1.0):
            pass
        LOG.info("stopping: no new associations; finishing stores in flight")
    finally:
        scp.stop()
    return 0


def _serve_in_workers(settings: Settings, port: int, stop: threading.Event, listening: Callable[[int], None]) -> int:
    count = settings.dicom.receiver_processes
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs threads
    ready = context.Queue()
    stop_workers = context.Event()
    with socket.socket() as reservation:  # holds the port (0: picks it) until every worker listens on it
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((LISTEN_HOST, port))
        bound_port = int(reservation.getsockname()[1])
        workers = [
            context.Process(
                target=_worker_main, args=(settings, bound_port, ready, stop_workers), name=f"scp-worker-{number}"
            )
            for number in range(count)
        ]
        for worker in workers:
            worker.start()
        try:
            for _ in workers:
                failure = ready.get(timeout=WORKER_START_TIMEOUT_S)
                if failure is not None:
                    raise RuntimeError(f"an SCP worker failed to start: {failure}")
        except (Empty, RuntimeError):
            _stop_workers(workers, stop_workers)
            raise
    status = 0
    try:
        LOG.info("%d SCP worker processes share port %d", count, bound_port)
        listening(bound_port)
        while not stop.wait(1.0):
            dead = [worker.name for worker in workers if not worker.is_alive()]
            if dead:
                LOG.error("SCP worker %s ended unexpectedly; stopping the receiver", ", ".join(dead))
                status = 1
                break
        LOG.info("stopping: no new associations; finishing stores in flight")
    finally:
        _stop_workers(workers, stop_workers)
    return status


def _stop_workers(workers: list[BaseProcess], stop_workers: ProcessEvent) -> None:
    stop_workers.set()
    for worker in workers:
        worker.join(WORKER_STOP_TIMEOUT_S)
        if worker.is_alive():
            LOG.warning("SCP worker %s did not stop in %.0f s; killing it", worker.name, WORKER_STOP_TIMEOUT_S)
            worker.kill()
            worker.join()


def _worker_main(settings: Settings, port: int, ready: ProcessQueue, stop_workers: ProcessEvent) -> None:
    """One SCP worker: its own spool writer and studies-table connection; stops when the parent says so."""
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the process group: the parent coordinates the stop
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=settings.logging.level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    try:
        index = StudyIndex(database_path(settings), spool_root(settings), settings.dicom)
        spool = Spool(settings.storage.data_dir, index)
        scp = StorageScp(settings.node.ae_title, settings.dicom, spool)
        scp.start(LISTEN_HOST, port, reuse_port=True)
    except Exception as error:
        ready.put(f"{error.__class__.__name__}: {error}")
        raise
    ready.put(None)
    try:
        stop_workers.wait()
    finally:
        scp.stop()
        spool.close()
        index.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the receiver process dies, however it dies."""
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        LOG.warning("cannot tie this SCP worker to its parent's life (no prctl)")
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


def _setter(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return handle
