"""`kill -9` of `fedlesion receive` in the middle of a 500-instance push: every acknowledged instance survives.

The SCP answers Success only after the file is fsynced, possibly before the studies table commits; after the kill
the restarted receiver re-discovers the spool, the explicit trigger completes the study once, and the remainder
sent afterwards makes exactly one more revision.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, evt

from dicom_gateway.studies import DATABASE_NAME, SPOOL_DIRNAME
from dicom_gateway.uids import spool_name
from fedlesion.cli import main
from tests.conftest import REPO_ROOT
from tests.dicom_support import free_port
from tests.test_studies import write_small_study

RECEIVER_AE = "FEDLESION"
SENDER_AE = "PACS"
STUDY_UID = "1.2.826.0.1.3680043.10.543.4.500"


@dataclass
class Receiver:
    process: subprocess.Popen
    port: int
    data_dir: Path
    log: Path

    @property
    def db_path(self) -> Path:
        return self.data_dir / DATABASE_NAME

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def receiver_env(data_dir: Path, **dicom: object) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLESION_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        FEDLESION_STORAGE__DATA_DIR=str(data_dir),
        FEDLESION_NODE__AE_TITLE=RECEIVER_AE,
        **{f"FEDLESION_DICOM__{key.upper()}": str(value) for key, value in dicom.items()},
    )
    return env


def start_receiver(data_dir: Path, log: Path, **dicom: object) -> Receiver:
    """`fedlesion receive` in its own process; returns once it answers C-ECHO."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedlesion", "receive", "--port", str(port)],
            env=receiver_env(data_dir, **dicom), stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )
    receiver = Receiver(process, port, data_dir, log)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"receiver exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if echo(port):
            return receiver
        time.sleep(0.1)
    receiver.stop()
    raise AssertionError(f"receiver did not answer C-ECHO within 60 s:\n{log.read_text(errors='replace')}")


def echo(port: int) -> bool:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def ready_rows(db_path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db_path, timeout=5) as conn:
        return conn.execute("SELECT study_uid, revision FROM study_ready ORDER BY id").fetchall()


def no_delay(event: evt.Event) -> None:
    """Our side of the connection needs TCP_NODELAY too, or each store waits for a delayed ACK."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send(port: int, datasets: list[Dataset], acknowledged: set[str], lock: threading.Lock) -> None:
    """One association; records each SOP Instance UID answered Success; stops when the peer goes away."""
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=RECEIVER_AE, evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
    if not assoc.is_established:
        return
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if not status or "Status" not in status:
            break  # the receiver died: no answer, not acknowledged
        if status.Status == 0x0000:
            with lock:
                acknowledged.add(ds.SOPInstanceUID)
    if assoc.is_established:
        assoc.release()


@pytest.fixture
def receivers():
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def test_kill_9_mid_push_loses_no_acknowledged_instance(
    tmp_path: Path, receivers: list[Receiver], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_small_study(tmp_path / "study", study_uid=STUDY_UID, slices=125, size=16, negatives=False)
    datasets = [dcmread(path) for series in files.values() for path in series]
    assert len(datasets) == 500
    data_dir, log = tmp_path / "data", tmp_path / "receiver.log"
    # No automatic completion: the test completes with the explicit trigger (design.md §10).
    settings = {"inactivity_timeout_s": 3600}
    receiver = start_receiver(data_dir, log, **settings)
    receivers.append(receiver)

    acknowledged: set[str] = set()
    lock = threading.Lock()
    halves = [datasets[0::2], datasets[1::2]]  # two associations, so a group commit is in flight at the kill
    senders = [threading.Thread(target=send, args=(receiver.port, half, acknowledged, lock)) for half in halves]
    for sender in senders:
        sender.start()
    while len(acknowledged) < 250 and any(sender.is_alive() for sender in senders):
        time.sleep(0.002)
    receiver.process.send_signal(signal.SIGKILL)
    receiver.process.wait(10)
    for sender in senders:
        sender.join(30)
    assert 250 <= len(acknowledged) < 500, f"{len(acknowledged)} acknowledged: the kill missed the push"

    receiver = start_receiver(data_dir, log, **settings)
    receivers.append(receiver)
    study_dir = data_dir / SPOOL_DIRNAME / spool_name(STUDY_UID)
    for sop_uid in acknowledged:
        path = study_dir / f"{spool_name(sop_uid)}.dcm"
        assert path.is_file(), f"acknowledged instance {sop_uid} lost"
        assert dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_uid

    # The CLI runs here, a second process beside the receiver, on the same database.
    monkeypatch.delenv("FEDLESION_CONFIG", raising=False)
    monkeypatch.setenv("FEDLESION_STORAGE__DATA_DIR", str(data_dir))
    capsys.readouterr()
    assert main(["study", "list", "--json"]) == 0
    [study] = json.loads(capsys.readouterr().out)
    assert (study["study_uid"], study["state"]) == (STUDY_UID, "receiving")
    assert study["instance_count"] >= len(acknowledged)

    assert main(["study", "complete", STUDY_UID]) == 0
    assert capsys.readouterr().out.strip() == f"study {STUDY_UID}: revision 1 is ready"
    assert ready_rows(receiver.db_path) == [(STUDY_UID, 1)]

    remainder = [ds for ds in datasets if ds.SOPInstanceUID not in acknowledged]
    send(receiver.port, remainder, acknowledged, lock)
    assert len(acknowledged) == 500
    assert main(["study", "complete", STUDY_UID]) == 0
    assert capsys.readouterr().out.strip() == f"study {STUDY_UID}: revision 2 is ready"
    send(receiver.port, datasets[::5], acknowledged, lock)  # an identical re-push creates nothing
    assert main(["study", "complete", STUDY_UID]) == 0
    assert capsys.readouterr().out.strip() == f"study {STUDY_UID}: already complete at revision 2"
    assert ready_rows(receiver.db_path) == [(STUDY_UID, 1), (STUDY_UID, 2)]
    assert len(list(study_dir.glob("*.dcm"))) == 500
