"""The Storage SCP against real peers: dcmtk's storescu/echoscu and pynetdicom SCUs, real files, real fsync.

The studies table's place is taken by a sink that records the calls: this tests the SCP side of the seam
(records.InstanceSink); receiver tests join the real table.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_gateway.records import StoredInstance
from dicom_gateway.scp import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    StorageScp,
)
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import Spool
from dicom_gateway.studies import DATABASE_NAME
from dicom_gateway.uids import OWN_MANUFACTURER, spool_name
from tests.conftest import REPO_ROOT
from tests.dicom_support import dcmtk_env, free_port

SCP_AE = "FEDLESION"
# storescu proposes explicit VR little endian first and no compressed syntax unless told which one to propose
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}
PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage: private, unknown to pynetdicom


@dataclass
class RecordingSink:
    """Records what the SCP hands on, thread-safe (handlers of several associations call it)."""

    batches: list[list[StoredInstance]] = field(default_factory=list)
    releases: list[tuple[str, set[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def instances_stored(self, instances: list[StoredInstance]) -> None:
        for instance in instances:
            assert instance.path.is_file(), "the sink hears of an instance only once it is on disk"
        with self.lock:
            self.batches.append(list(instances))

    def association_released(self, calling_ae: str, study_uids: set[str]) -> None:
        with self.lock:
            self.releases.append((calling_ae, set(study_uids)))

    @property
    def instances(self) -> list[StoredInstance]:
        with self.lock:
            return [instance for batch in self.batches for instance in batch]


@dataclass
class RunningScp:
    scp: StorageScp
    spool: Spool
    sink: RecordingSink
    port: int

    def spooled_files(self) -> list[Path]:
        return sorted(path for path in self.spool.root.rglob("*") if path.is_file())


    def stop(self) -> None:
        self.scp.stop(grace_s=1.0)
        self.spool.close()


def launch_scp(data_dir: Path, **policy: object) -> RunningScp:
    """An SCP on a free loopback port over a fresh spool in `data_dir`, with these DicomSettings (no watermark)."""
    sink = RecordingSink()
    spool = Spool(data_dir, sink)
    settings = DicomSettings(**{"min_free_disk_bytes": 0, **policy})  # type: ignore[arg-type]
    scp = StorageScp(SCP_AE, settings, spool)
    return RunningScp(scp, spool, sink, scp.start("127.0.0.1", 0))


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., RunningScp]]:
    """`start_scp(**dicom_settings)`: launch_scp in a fresh data dir; stopped at teardown."""
    running: list[RunningScp] = []

    def start(**policy: object) -> RunningScp:
        running.append(launch_scp(tmp_path / f"data{len(running)}", **policy))
        return running[-1]

    yield start
    for item in running:
        item.stop()


def storescu(port: int, *paths: Path, calling_ae: str = "STORESCU", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", SCP_AE, *extra, "127.0.0.1", str(port), *map(str, paths)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=False,
    )


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part-10 file: everything after the File Meta group (whose length it states)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", path
    (group_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + group_length :]


def instance(
    *,
    study: str | None = None,
    series: str | None = None,
    manufacturer: str = "ACME",
    rows: int = 4,
    columns: int = 4,
    frames: int | None = None,
    sop_class: str = MRImageStorage,
) -> Dataset:
    """A small valid MR instance (16-bit) with fresh UIDs unless given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Manufacturer = manufacturer
    ds.Modality = "MR"
    ds.PatientID = "SCP-TEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((frames or 1) * rows * columns, dtype=np.uint16).tobytes()
    return ds


def pynetdicom_scu(port: int, calling_ae: str = "PYSCU", contexts: tuple[str, ...] = (MRImageStorage,)):
    ae = AE(ae_title=calling_ae)
    for context in contexts:  # one context per syntax: the SCP accepts the first syntax of each context
        ae.add_requested_context(context, ExplicitVRLittleEndian)
        ae.add_requested_context(context, ImplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    assert assoc.is_established
    return assoc


def _no_delay(event: evt.Event) -> None:
    """Without TCP_NODELAY a small PDU after another waits for a delayed ACK (~40 ms per C-STORE)."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_raw(assoc, path: Path) -> int:
    """C-STORE a file's bytes after its meta exactly as they are (no decode, no re-encode); returns the status."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(status.Status) if status and "Status" in status else -1


# -- whole studies over dcmtk ---------------------------------------------------------------------------------------


def test_storescu_xa30_study_every_instance_stored_byte_identical(shared_dicom, start_scp) -> None:
    source = shared_dicom("dcm_qa_xa30i/dicom")
    files = sorted(path for path in source.rglob("*.dcm"))
    assert len(files) > 1100
    running = start_scp()

    result = storescu(running.port, source, extra=("+sd", "+r"))

    assert result.returncode == 0, result.stderr
    stored = {instance.sop_instance_uid: instance for instance in running.sink.instances}
    assert len(stored) == len(files) == len(running.spooled_files())
    for path in files:
        original = dcmread(path, stop_before_pixels=True)
        record = stored[original.SOPInstanceUID]
        assert record.path == running.spool.path_for(original.StudyInstanceUID, original.SOPInstanceUID)
        assert record.path.parent.name == spool_name(original.StudyInstanceUID)
        assert (record.series_instance_uid, record.calling_ae) == (original.SeriesInstanceUID, "STORESCU")
        assert record.size_bytes == record.path.stat().st_size and record.received_at > 0
        assert dataset_bytes(record.path) == dataset_bytes(path), f"{path.name} changed on the way"
    copy = dcmread(stored[original.SOPInstanceUID].path)
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert copy.file_meta.SourceApplicationEntityTitle == "STORESCU"
    study_uids = {record.study_instance_uid for record in stored.values()}
    assert running.sink.releases == [("STORESCU", study_uids)]


def test_echoscu_answers(start_scp) -> None:
    running = start_scp()
    result = subprocess.run(
        ["echoscu", "-aec", SCP_AE, "127.0.0.1", str(running.port)],
        env=dcmtk_env(), capture_output=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_duplicates_resent_are_success_and_not_rewritten(shared_dicom, start_scp) -> None:
    series = shared_dicom("dcm_qa_xa30i/dicom") / "12001_DWI_dir80_AP"
    running = start_scp()
    assert storescu(running.port, series, extra=("+sd",)).returncode == 0
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in running.spooled_files()}
    first_count = len(running.sink.instances)

    again = storescu(running.port, series, extra=("+sd",))

    assert again.returncode == 0, again.stderr
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in running.spooled_files()} == before
    repeated = running.sink.instances[first_count:]
    assert len(repeated) == first_count == len(before) == 39, "duplicates are still reported to the sink"


@pytest.mark.parametrize("name", [f"{number}.dcm" for number in range(1, 10)])
def test_each_transfer_syntax_file_is_stored_as_received(shared_dicom, start_scp, name: str) -> None:
    path = shared_dicom("dcm_qa_ts/dicom") / name
    running = start_scp()
    transfer_syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    result = storescu(running.port, path, extra=("-R", STORESCU_PROPOSAL[transfer_syntax]))

    assert result.returncode == 0, result.stderr
    (record,) = running.sink.instances
    copy, original = dcmread(record.path, stop_before_pixels=True), dcmread(path, stop_before_pixels=True)
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert dataset_bytes(record.path) == dataset_bytes(path)


# -- policy ---------------------------------------------------------------------------------------------------------


def test_allow_list_refuses_an_unknown_calling_ae(tmp_path: Path, start_scp) -> None:
    running = start_scp(allowed_calling_aes=("PACS",))
    path = tmp_path / "one.dcm"
    instance().save_as(path, enforce_file_format=True)

    refused = storescu(running.port, path, calling_ae="INTRUDER")
    allowed = storescu(running.port, path, calling_ae="PACS")

    assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
    assert allowed.returncode == 0, allowed.stderr
    assert [instance.calling_ae for instance in running.sink.instances] == ["PACS"]


def test_association_limit_rejects_the_extra_association(start_scp) -> None:
    running = start_scp(max_associations=1)
    first = pynetdicom_scu(running.port)
    ae = AE(ae_title="SECOND")
    ae.add_requested_context(Verification)
    second = ae.associate("127.0.0.1", running.port, ae_title=SCP_AE)
    try:
        assert second.is_rejected
        assert first.send_c_echo().Status == 0
    finally:
        first.release()


def test_size_limits_refuse_those_instances_and_store_the_rest(start_scp) -> None:
    running = start_scp(max_frame_pixels=64, max_frames=3, max_instance_bytes=20_000, max_series_decoded_bytes=500)
    series = generate_uid()
    huge = instance()
    huge.add_new(0x00091010, "OB", b"\x00" * 20_000)  # a private blob takes the instance past 20,000 bytes
    cases = [
        ("small", instance(rows=4, columns=4), 0x0000),
        ("wide frame", instance(rows=16, columns=16), CANNOT_UNDERSTAND),
        ("many frames", instance(rows=2, columns=2, frames=4), CANNOT_UNDERSTAND),
        ("huge instance", huge, OUT_OF_RESOURCES),
        ("series, first", instance(rows=8, columns=8, series=series), 0x0000),  # 128 decoded bytes
        ("series, second", instance(rows=8, columns=8, frames=3, series=series), OUT_OF_RESOURCES),  # +384 > 500
        ("other series", instance(rows=8, columns=8, frames=3), 0x0000),
    ]
    assoc = pynetdicom_scu(running.port)
    try:
        statuses = [(name, assoc.send_c_store(ds).Status) for name, ds, _ in cases]
    finally:
        assoc.release()

    assert statuses == [(name, expected) for name, _, expected in cases]
    stored = {instance.sop_instance_uid for instance in running.sink.instances}
    assert stored == {ds.SOPInstanceUID for _, ds, expected in cases if expected == 0}
    assert len(running.spooled_files()) == len(stored) == 3


def test_disk_watermark_refuses_with_out_of_resources(start_scp) -> None:
    running = start_scp(min_free_disk_bytes=1 << 60)
    assert running.scp.disk_status().low
    assoc = pynetdicom_scu(running.port)
    try:
        status = assoc.send_c_store(instance())
    finally:
        assoc.release()
    assert status.Status == OUT_OF_RESOURCES and "min_free_disk_bytes" in status.ErrorComment
    assert running.spooled_files() == [] and running.sink.instances == []


def test_disk_status_reports_free_space(start_scp) -> None:
    running = start_scp()
    status = running.scp.disk_status()
    assert status.free_bytes > 0 and not status.low


def test_own_outputs_are_acknowledged_but_not_stored_synthetic_ones_are(start_scp) -> None:
    running = start_scp()
    own, synthetic = instance(manufacturer=OWN_MANUFACTURER), instance(manufacturer="fedlesion-synthetic")
    assoc = pynetdicom_scu(running.port)
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in (own, synthetic)]
    finally:
        assoc.release()
    assert statuses == [0, 0]
    assert [instance.sop_instance_uid for instance in running.sink.instances] == [synthetic.SOPInstanceUID]
    assert len(running.spooled_files()) == 1


def test_private_sop_class_is_accepted_and_stored(start_scp) -> None:
    running = start_scp()
    private = instance(sop_class=PRIVATE_SOP_CLASS)
    assoc = pynetdicom_scu(running.port, contexts=(PRIVATE_SOP_CLASS,))
    try:
        status = assoc.send_c_store(private)
    finally:
        assoc.release()
    assert status.Status == 0
    (record,) = running.sink.instances
    assert record.sop_class_uid == PRIVATE_SOP_CLASS
    assert dcmread(record.path).file_meta.MediaStorageSOPClassUID == PRIVATE_SOP_CLASS


def test_announced_study_instances_are_passed_on(start_scp) -> None:
    running = start_scp()
    ds = instance()
    ds.NumberOfStudyRelatedInstances = 42
    assoc = pynetdicom_scu(running.port)
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert [record.announced_study_instances for record in running.sink.instances] == [42]


def test_corrupt_dataset_fails_and_the_association_goes_on(tmp_path: Path, start_scp) -> None:
    running = start_scp()
    good, broken = instance(), instance()
    good_path, broken_path = tmp_path / "good.dcm", tmp_path / "broken.dcm"
    good.save_as(good_path, enforce_file_format=True)
    broken.save_as(broken_path, enforce_file_format=True)
    data = bytearray(broken_path.read_bytes())
    header_end = len(data) - len(dataset_bytes(broken_path))
    struct.pack_into("<H", data, header_end + 6, 0xFFF0)  # the first element claims a length past the end
    broken_path.write_bytes(bytes(data))
    assoc = pynetdicom_scu(running.port)
    try:
        statuses = [send_raw(assoc, broken_path), send_raw(assoc, good_path), assoc.send_c_echo().Status]
    finally:
        assoc.release()
    assert CANNOT_UNDERSTAND <= statuses[0] <= 0xCFFF and statuses[1:] == [0, 0]
    assert [record.sop_instance_uid for record in running.sink.instances] == [good.SOPInstanceUID]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID is the point
def test_invalid_uid_is_refused_and_never_becomes_a_path(tmp_path: Path, start_scp) -> None:
    running = start_scp()
    path = tmp_path / "evil.dcm"
    evil = instance()
    evil.StudyInstanceUID = "../../../../tmp/evil"
    evil.save_as(path, enforce_file_format=True)
    assoc = pynetdicom_scu(running.port)
    try:
        status = send_raw(assoc, path)
    finally:
        assoc.release()
    assert CANNOT_UNDERSTAND <= status <= 0xCFFF
    assert running.spooled_files() == [] and not (tmp_path / "evil").exists()


def test_dropped_association_loses_no_acknowledged_instance(start_scp) -> None:
    running = start_scp()
    study = generate_uid()
    datasets = [instance(study=study, rows=64, columns=64) for _ in range(200)]
    acknowledged: list[str] = []
    assoc = pynetdicom_scu(running.port)
    assoc.dimse_timeout = 2  # the C-STORE in flight at the abort gets no answer

    def send_all() -> None:
        for ds in datasets:
            if not assoc.is_established:
                return
            status = assoc.send_c_store(ds)
            if status and status.get("Status") == 0:
                acknowledged.append(ds.SOPInstanceUID)

    sender = threading.Thread(target=send_all)
    sender.start()
    while len(acknowledged) < 10:
        threading.Event().wait(0.005)
    assoc.abort()  # mid-send: one C-STORE is usually in flight
    sender.join(30)

    assert 10 <= len(acknowledged) < len(datasets)
    for uid in acknowledged:
        path = running.spool.path_for(study, uid)
        assert dcmread(path).SOPInstanceUID == uid
    assert not [path for path in running.spooled_files() if path.name.startswith(".")], "no half-written file left"
    assert running.sink.releases == [], "an aborted association is not a release"
    echo = pynetdicom_scu(running.port)
    try:
        assert echo.send_c_echo().Status == 0
    finally:
        echo.release()


def test_tcp_nodelay_is_set_on_accepted_connections(start_scp) -> None:
    running = start_scp()
    assoc = pynetdicom_scu(running.port)
    try:
        (accepted,) = running.scp.ae.active_associations
        assert accepted.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        assoc.release()


def _context_switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads per-thread counters from Linux's /proc")
def test_an_idle_association_waits_instead_of_polling(start_scp) -> None:
    """pynetdicom's reactors poll every 1 ms (about 1,000 wake-ups a second each); ours wait for data, a queued
    primitive or IDLE_WAIT_S, and still answer at once."""
    running = start_scp()
    assoc = pynetdicom_scu(running.port)
    try:
        (accepted,) = running.scp.ae.active_associations
        threads = (accepted, accepted.dul)
        before = [_context_switches(thread) for thread in threads]
        time.sleep(1.0)
        wakeups = [_context_switches(thread) - count for thread, count in zip(threads, before)]
        assert all(count < 100 for count in wakeups), wakeups
        round_trips = []
        for _ in range(5):
            started = time.monotonic()
            assert assoc.send_c_echo().Status == 0
            round_trips.append(time.monotonic() - started)
        assert sorted(round_trips)[2] < 0.03  # answered on the data, not at the next idle check (0.05 s)
    finally:
        assoc.release()


def test_stop_finishes_in_flight_stores_and_refuses_new_associations(start_scp) -> None:
    running = start_scp()
    assoc = pynetdicom_scu(running.port)
    ds = instance()
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    running.scp.stop(grace_s=1.0)
    ae = AE(ae_title="LATE")
    ae.add_requested_context(Verification)
    late = ae.associate("127.0.0.1", running.port, ae_title=SCP_AE)
    assert not late.is_established
    assert running.spool.path_for(ds.StudyInstanceUID, ds.SOPInstanceUID).is_file()


# -- fedlesion receive ----------------------------------------------------------------------------------------------


def start_receiver(data_dir: Path, port: int, processes: int) -> subprocess.Popen:
    """`fedlesion receive` in its own process; returns once it printed its start line (checked here)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLESION_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        FEDLESION_STORAGE__DATA_DIR=str(data_dir),
        FEDLESION_DICOM__RECEIVER_PROCESSES=str(processes),
        FEDLESION_DICOM__MIN_FREE_DISK_BYTES="0",
    )
    receiver = subprocess.Popen(
        [sys.executable, "-m", "fedlesion", "receive", "--port", str(port)],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert receiver.stdout is not None
    start_line = receiver.stdout.readline()
    assert start_line.strip() == f"fedlesion receive: AE {SCP_AE} on 0.0.0.0:{port}, data in {data_dir.resolve()}"
    return receiver


@pytest.mark.parametrize("processes", [1, 2])
def test_fedlesion_receive_stores_into_the_studies_table_and_stops_on_sigterm(tmp_path: Path, processes: int) -> None:
    data_dir, port = tmp_path / "data", free_port()
    study = generate_uid()
    files = [tmp_path / f"{index}.dcm" for index in range(8)]
    for path in files:
        instance(study=study).save_as(path, enforce_file_format=True)
    receiver = start_receiver(data_dir, port, processes)
    try:
        senders = [  # four associations at once: with two processes the kernel spreads them over both
            subprocess.Popen(
                ["storescu", "-aet", "STORESCU", "-aec", SCP_AE, "127.0.0.1", str(port), *map(str, files[part::4])],
                env=dcmtk_env(), stderr=subprocess.PIPE, text=True,
            )
            for part in range(4)
        ]
        for sender in senders:
            assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else ""
    finally:
        receiver.send_signal(signal.SIGTERM)
        exit_status = receiver.wait(60)
    assert exit_status == 0
    with sqlite3.connect(data_dir / DATABASE_NAME) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
    assert count == len(files) == len(list((data_dir / "spool").rglob("*.dcm")))


def test_kill_9_of_the_receiver_takes_its_workers_along(tmp_path: Path) -> None:
    port = free_port()
    receiver = start_receiver(tmp_path / "data", port, processes=2)
    receiver.kill()
    receiver.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    raise AssertionError("an orphaned SCP worker still accepts associations after kill -9 of the receiver")


# -- the spool on its own -------------------------------------------------------------------------------------------


def _record(spool: Spool, study: str, sop: str) -> StoredInstance:
    return StoredInstance(sop, MRImageStorage, study, generate_uid(), spool.path_for(study, sop), "T", 4, 0.0)


def test_group_commit_makes_concurrent_stores_durable_together(tmp_path: Path) -> None:
    class SlowSink(RecordingSink):
        def instances_stored(self, instances: list[StoredInstance]) -> None:
            time.sleep(0.2)  # the first commit is slow: everything arriving meanwhile waits for the next one
            super().instances_stored(instances)

    sink = SlowSink()
    spool = Spool(tmp_path, sink)
    study = generate_uid()
    records = [_record(spool, study, generate_uid()) for _ in range(8)]
    start = threading.Barrier(len(records))
    results: list[tuple[StoredInstance, object]] = []

    def store(record: StoredInstance) -> None:
        start.wait()
        results.append(spool.store(record, b"DICM"))

    threads = [threading.Thread(target=store, args=(record,)) for record in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(results) == 8 and all(stored.received_at > 0 for stored, _ in results)
    assert len(sink.batches) <= 3, f"{len(sink.batches)} commits for 8 concurrent stores"
    assert all(record.path.read_bytes() == b"DICM" for record in records)


def test_a_failing_sink_fails_the_store_and_a_resend_succeeds(tmp_path: Path) -> None:
    class FlakySink(RecordingSink):
        failures = 1

        def instances_stored(self, instances: list[StoredInstance]) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("database is locked")
            super().instances_stored(instances)

    sink = FlakySink()
    spool = Spool(tmp_path / "data", sink)
    scp = StorageScp(SCP_AE, DicomSettings(min_free_disk_bytes=0), spool)
    running = RunningScp(scp, spool, sink, scp.start("127.0.0.1", 0))
    ds = instance()
    assoc = pynetdicom_scu(running.port)
    try:
        statuses = [assoc.send_c_store(ds).Status, assoc.send_c_store(ds).Status]
    finally:
        assoc.release()
        running.stop()
    assert statuses == [PROCESSING_FAILURE, 0]
    assert [record.sop_instance_uid for record in sink.instances] == [ds.SOPInstanceUID]


def test_stale_temporaries_of_a_crash_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, RecordingSink())
    study_dir = spool.path_for(generate_uid(), generate_uid()).parent
    study_dir.mkdir(parents=True)
    (study_dir / ".incoming-123-1").write_bytes(b"half")
    kept = study_dir / "kept.dcm"
    kept.write_bytes(b"whole")
    assert spool.remove_stale_temporaries() == 1
    assert [path.name for path in study_dir.iterdir()] == ["kept.dcm"]
