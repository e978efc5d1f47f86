"""`fedlesion receive`: the studies table, the durable spool and the Storage SCP joined, until SIGTERM or SIGINT.

Start-up order matters: half-written spool files of a crash are removed and the studies table re-discovers every
spooled instance (`recover`) before the SCP accepts anything, so a restart never forgets an acknowledged instance.
Shutdown runs the other way: stop accepting, let in-flight stores finish their group commit, then stop the table.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from dicom_gateway.scp import StorageScp
from dicom_gateway.spool import Spool
from dicom_gateway.studies import StudyIndex, database_path, spool_root
from fedlesion.settings import Settings

LOG = logging.getLogger(__name__)

LISTEN_HOST = "0.0.0.0"  # a PACS reaches the node over the network; the calling-AE allow-list guards it


def run_receiver(settings: Settings, port: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT; `port` overrides node.dicom_port (0: any free port). Returns the exit status."""
    index = StudyIndex(database_path(settings), spool_root(settings), settings.dicom)
    spool = Spool(settings.storage.data_dir, index)
    stale = spool.remove_stale_temporaries()
    if stale:
        LOG.warning("removed %d half-written spool files left by an interrupted receiver", stale)
    index.recover()
    scp = StorageScp(settings.node.ae_title, settings.dicom, spool)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, _setter(stop)) for sig in (signal.SIGTERM, signal.SIGINT)}
    index.start()
    try:
        bound = scp.start(LISTEN_HOST, settings.node.dicom_port if port is None else port)
        print(
            f"fedlesion receive: AE {settings.node.ae_title} on {LISTEN_HOST}:{bound}, "
            f"data in {settings.storage.data_dir.resolve()}",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        LOG.info("stopping: no new associations; finishing stores in flight")
    finally:
        scp.stop()
        spool.close()
        index.stop()
        index.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _setter(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return handle
