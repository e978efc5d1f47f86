"""The outbox and the SCU against real peers: dcmtk storescp, and pynetdicom SCPs where a status must be forced.

Outputs are real synthetic MR instances (training.synthetic) given fresh output UIDs, as the writers would.
Time in the retry tests comes from a hand-moved clock, so backoff is checked exactly without sleeping.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt

from dicom_gateway import writers
from dicom_gateway.outbox import DeliveryState, Outbox, OutputKey, destination_name
from dicom_gateway.scu import PassReport, Sender
from dicom_gateway.settings import Destination, DicomSettings
from dicom_gateway.uids import output_uid
from models.geometry import voxel_volume_ml
from models.manifest import Task
from tests.conftest import REPO_ROOT
from tests.dicom_support import dcmtk_env, free_port
from training.synthetic.case import GroundTruthLesion, SyntheticCase
from training.synthetic.dicom_writer import write_dicom_study

KEY = OutputKey("1.2.826.0.1.3680043.10.511.4.1", 1, "stroke-dwi-adc", "1.0.0")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def source_instances(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """Real MR instances of a small synthetic study (one lesion), re-homed into KEY's study."""
    shape = (24, 28, 6)
    affine = np.diag([4.0, 4.0, 5.0, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    head = np.zeros(shape, dtype=np.float32)
    head[3:-3, 3:-3, :] = 1.0
    lesion = np.zeros(shape, dtype=np.int16)
    lesion[6:10, 8:12, 2:4] = 1
    images = {
        "dwi_b0": head, "dwi_b1000": head * (1 + lesion), "adc": head * 800 - lesion * 400, "flair": head + lesion,
    }
    case = SyntheticCase("scu", "stroke", 5, "axial", affine, images, lesion, [GroundTruthLesion(1, "infarct", "left", (0, 0, 0), 1.0)])
    paths = write_dicom_study(case, tmp_path_factory.mktemp("synthetic"), study_uid=KEY.study_uid)
    return [pydicom.dcmread(path) for path in paths if path.parent.name.endswith("_adc")]


def as_outputs(instances: list[Dataset], label: str, count: int) -> list[Dataset]:
    """`count` copies carrying fresh output UIDs derived from `label`, as a writer would make them."""
    series = output_uid(label, "series")
    outputs = []
    for number, source in enumerate(instances[:count], start=1):
        dataset = copy.deepcopy(source)  # Dataset(source) would share, and so change, the source's elements
        dataset.SeriesInstanceUID = series
        dataset.SOPInstanceUID = output_uid(label, str(number))
        outputs.append(dataset)
    return outputs


def start_storescp(directory: Path, *options: str) -> tuple[subprocess.Popen[bytes], Destination]:
    """dcmtk storescp writing every reception to its own file (+uf), so a duplicate shows as a second file."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "+uf", "-od", str(directory), "-aet", "STORESCP", *options, str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    destination = Destination("STORESCP", "127.0.0.1", port)
    wait_for_echo(destination, process)
    return process, destination


def wait_for_echo(destination: Destination, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the peer exited"
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if assoc.is_established or assoc.is_rejected:
            if assoc.is_established:
                assoc.release()
            return
        time.sleep(0.05)
    raise AssertionError(f"{destination} never answered")


@pytest.fixture
def storescp(tmp_path: Path):
    """A factory of storescp processes, all killed by PID at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *options: str) -> tuple[Path, Destination]:
        process, destination = start_storescp(tmp_path / name, *options)
        processes.append(process)
        return tmp_path / name, destination

    yield start
    for process in processes:
        process.kill()
        process.wait()


def received(directory: Path) -> Counter[str]:
    """How many times each SOP Instance UID arrived."""
    return Counter(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in directory.iterdir())


def test_outputs_are_stored_before_sending_and_arrive_once_each(tmp_path, source_instances, storescp):
    directory, destination = storescp("pacs")
    outbox = Outbox(tmp_path / "data")
    outputs = as_outputs(source_instances, "once", 4)
    stored = outbox.enqueue(KEY, outputs, [destination])

    assert [i.sop_instance_uid for i in stored] == [d.SOPInstanceUID for d in outputs]
    assert all(i.path.is_file() and i.path.is_relative_to(tmp_path / "data" / "outputs") for i in stored)
    assert outbox.counts() == {DeliveryState.PENDING: 4, DeliveryState.SENT: 0, DeliveryState.DEAD_LETTER: 0}

    sender = Sender(outbox, [destination])
    report = sender.send_pending()
    assert (report.sent, report.retrying, report.dead_lettered) == (4, 0, 0)
    assert sender.send_pending().sent == 0  # nothing is due any more
    assert received(directory) == Counter({d.SOPInstanceUID: 1 for d in outputs})
    arrived = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, directory.iterdir())}
    for original in outputs:
        assert np.array_equal(arrived[original.SOPInstanceUID].pixel_array, original.pixel_array)
    assert all(d.state is DeliveryState.SENT and d.attempts == 1 for d in outbox.deliveries(KEY))


def test_dead_destination_retries_with_exponential_backoff_then_dead_letters(tmp_path, source_instances):
    clock = Clock()
    dead = Destination("GONE", "127.0.0.1", free_port())  # nothing listens
    outbox = Outbox(tmp_path / "data", clock=clock)
    outbox.enqueue(KEY, as_outputs(source_instances, "dead", 2), [dead])
    sender = Sender(outbox, [dead], attempts=3, backoff_s=10.0, clock=clock)

    assert sender.send_pending().retrying == 2
    assert {d.next_attempt_at - clock.now for d in outbox.deliveries(KEY)} == {10.0}
    clock.now += 9.9
    assert sender.send_pending().retrying == 0  # not due yet: no connection is even tried
    clock.now += 0.1
    assert sender.send_pending().retrying == 2
    assert {d.next_attempt_at - clock.now for d in outbox.deliveries(KEY)} == {20.0}  # doubled
    clock.now += 20.0
    assert sender.send_pending().dead_lettered == 2

    letters = outbox.dead_letters()
    assert len(letters) == 2 and outbox.counts()[DeliveryState.PENDING] == 0
    for letter in letters:
        assert letter.attempts == 3
        assert f"connection to {destination_name(dead)} failed: Connection refused" in letter.last_error
        assert "attempt 3 of 3" in letter.last_error
    clock.now += 1000.0
    assert sender.send_pending() == PassReport()  # dead letters are never retried


def start_pynetdicom_scp(
    sop_classes: list[str], status: int, calling_aes: list[str] | None = None
) -> tuple[object, Destination]:
    """A pynetdicom SCP answering every C-STORE with `status`, rejecting calling AEs not in `calling_aes`."""
    ae = AE(ae_title="FORCED")
    ae.require_calling_aet = calling_aes or []
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    return server, Destination("FORCED", "127.0.0.1", server.server_address[1])


@pytest.mark.parametrize(
    ("sop_classes", "status", "attempts_used", "reason"),
    [
        ([MRImageStorage], 0xA702, 2, "answered status 0xA702 (Refused: Out of Resources)"),  # transient: retried
        ([MRImageStorage], 0xC123, 1, "answered status 0xC123 (Cannot Understand)"),  # permanent: at once
        (["1.2.840.10008.5.1.4.1.1.2"], 0x0000, 1, "presentation context refused"),  # takes only CT
    ],
)
def test_failure_statuses_and_refused_contexts(tmp_path, source_instances, sop_classes, status, attempts_used, reason):
    server, destination = start_pynetdicom_scp(sop_classes, status)
    try:
        outbox = Outbox(tmp_path / "data")
        outbox.enqueue(KEY, as_outputs(source_instances, "status", 1), [destination])
        sender = Sender(outbox, [destination], attempts=2, backoff_s=0.0)
        while outbox.counts()[DeliveryState.PENDING]:
            sender.send_pending()
    finally:
        server.shutdown()
    (letter,) = outbox.dead_letters()
    assert reason in letter.last_error and letter.attempts == attempts_used


def test_rejected_association_is_dead_lettered_with_the_peers_reason(tmp_path, source_instances):
    """A pynetdicom peer, not `storescp --refuse`: dcmtk closes the connection right after its A-ASSOCIATE-RJ, and
    pynetdicom then sometimes reports an abort instead of the rejection (both end in a dead letter)."""
    server, refusing = start_pynetdicom_scp([MRImageStorage], 0x0000, calling_aes=["SOMEONE"])
    try:
        outbox = Outbox(tmp_path / "data")
        outbox.enqueue(KEY, as_outputs(source_instances, "rejected", 1), [refusing])
        assert Sender(outbox, [refusing], attempts=1).send_pending().dead_lettered == 1
    finally:
        server.shutdown()
    (letter,) = outbox.dead_letters()
    assert letter.last_error.startswith(f"association rejected by {destination_name(refusing)}: ")
    assert "Calling AE title not recognised" in letter.last_error


def test_destination_taking_only_implicit_vr_gets_converted_copies(tmp_path, source_instances, storescp):
    directory, implicit_only = storescp("implicit", "+xi")
    explicit, compressed = as_outputs(source_instances, "convert", 2)
    compressed.compress(RLELossless, generate_instance_uid=False)
    outbox = Outbox(tmp_path / "data")
    stored = outbox.enqueue(KEY, [explicit, compressed], [implicit_only])
    assert [i.transfer_syntax_uid for i in stored] == [ExplicitVRLittleEndian, RLELossless]

    assert Sender(outbox, [implicit_only]).send_pending().sent == 2

    arrived = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, directory.iterdir())}
    assert {ds.file_meta.TransferSyntaxUID for ds in arrived.values()} == {ImplicitVRLittleEndian}
    for original in (explicit, compressed):
        assert np.array_equal(arrived[original.SOPInstanceUID].pixel_array, original.pixel_array)
    assert pydicom.dcmread(stored[1].path).file_meta.TransferSyntaxUID == RLELossless  # the stored file is kept


SENDER_SCRIPT = """
import sys
from dicom_gateway.outbox import Outbox
from dicom_gateway.scu import PassReport, Sender
from dicom_gateway.settings import Destination
Sender(Outbox(sys.argv[1]), [Destination.parse(sys.argv[2])]).send_pending()
"""


def test_crash_mid_send_resumes_with_the_stored_uids_and_no_second_copy(tmp_path, source_instances, storescp):
    directory, slow = storescp("slow", "--sleep-after", "1")  # one instance a second: the kill lands mid-send
    data_dir = tmp_path / "data"
    outputs = as_outputs(source_instances, "crash", 3)
    stored = Outbox(data_dir).enqueue(KEY, outputs, [slow])

    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER_SCRIPT, str(data_dir), destination_name(slow)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    watcher = Outbox(data_dir)
    deadline = time.monotonic() + 30
    while not watcher.counts()[DeliveryState.SENT] and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(sender.pid, signal.SIGKILL)
    sender.wait()
    acknowledged = {d.instance.sop_instance_uid for d in watcher.deliveries(KEY) if d.state is DeliveryState.SENT}
    assert 1 <= len(acknowledged) < 3
    watcher.close()

    # Restart: the job re-runs its writer, which hands over datasets with other UIDs; the stored ones win.
    outbox = Outbox(data_dir)
    again = outbox.enqueue(KEY, as_outputs(source_instances, "crash-rerun", 3), [slow])
    assert again == stored
    Sender(outbox, [slow]).send_pending()

    arrivals = received(directory)
    assert set(arrivals) == {d.SOPInstanceUID for d in outputs}
    assert all(arrivals[uid] == 1 for uid in acknowledged)
    assert outbox.counts()[DeliveryState.SENT] == 3


def test_enqueue_validates_and_new_destinations_get_rows_without_resending(tmp_path, source_instances):
    outbox = Outbox(tmp_path / "data")
    first = Destination("PACS", "127.0.0.1", 104)
    outputs = as_outputs(source_instances, "validate", 2)
    with pytest.raises(ValueError, match="not 1.2.3"):
        outbox.enqueue(OutputKey("1.2.3", 1, "stroke-dwi-adc", "1.0.0"), outputs, [first])
    with pytest.raises(ValueError, match="appears twice"):
        outbox.enqueue(KEY, [outputs[0], outputs[0]], [first])
    with pytest.raises(ValueError, match="revision"):
        OutputKey(KEY.study_uid, 0, "stroke-dwi-adc", "1.0.0")
    assert not list((tmp_path / "data" / "outputs").rglob("*.dcm"))  # nothing is written before validation

    outbox.enqueue(KEY, outputs, [first])
    (row, _) = outbox.deliveries(KEY)
    outbox.mark_sent(row.instance.sop_instance_uid, row.destination)
    other_key = OutputKey(KEY.study_uid, 2, KEY.task, KEY.model_version)
    with pytest.raises(ValueError, match="another output key"):
        outbox.enqueue(other_key, outputs, [first])  # a writer must not reuse one revision's UIDs in the next
    assert outbox.stored(other_key) == [] and len(list((tmp_path / "data" / "outputs").rglob("*.dcm"))) == 2
    second = Destination("ARCHIVE", "127.0.0.1", 105)
    outbox.enqueue(KEY, outputs, [first, second])
    states = Counter((d.destination, d.state) for d in outbox.deliveries(KEY))
    assert states == Counter({
        (destination_name(first), DeliveryState.SENT): 1,
        (destination_name(first), DeliveryState.PENDING): 1,
        (destination_name(second), DeliveryState.PENDING): 2,
    })


def test_retention_purges_old_outputs_only(tmp_path, source_instances):
    clock = Clock()
    outbox = Outbox(tmp_path / "data", clock=clock)
    destination = Destination("PACS", "127.0.0.1", 104)
    old = outbox.enqueue(KEY, as_outputs(source_instances, "old", 1), [destination])
    clock.now += 20 * 86400
    newer_key = OutputKey(KEY.study_uid, 2, KEY.task, KEY.model_version)
    newer = outbox.enqueue(newer_key, as_outputs(source_instances, "newer", 1), [destination])
    clock.now += 15 * 86400

    assert outbox.purge_expired(DicomSettings().output_retention_days) == 1
    assert outbox.stored(KEY) == [] and not old[0].path.exists() and not old[0].path.parent.exists()
    assert outbox.stored(newer_key) == newer and newer[0].path.is_file()
    assert outbox.counts()[DeliveryState.PENDING] == 1


def test_sender_loop_sends_what_is_enqueued_while_it_runs_and_stops_on_the_event(tmp_path, source_instances, storescp):
    directory, destination = storescp("loop")
    outbox = Outbox(tmp_path / "data")
    stop = threading.Event()
    loop = threading.Thread(target=Sender(outbox, [destination], poll_s=0.05).run, args=(stop,))
    loop.start()
    try:
        outputs = as_outputs(source_instances, "loop", 2)
        outbox.enqueue(KEY, outputs, [destination])
        deadline = time.monotonic() + 10
        while outbox.counts()[DeliveryState.SENT] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        loop.join(timeout=5)
    assert not loop.is_alive()
    assert received(directory) == Counter({d.SOPInstanceUID: 1 for d in outputs})


def test_writer_outputs_reach_storescp_once_each_and_unchanged(tmp_path, source_instances, storescp):
    """SEG, SC overlay series and SR from dicom_gateway.writers, as a job enqueues them."""
    volume = hd.get_volume_from_series(source_instances)
    label_map = np.zeros(volume.spatial_shape, dtype=np.int32)
    label_map[2:4, 8:12, 6:10] = 1
    voxels = np.argwhere(label_map == 1)
    voxel_ml = voxel_volume_ml(volume.affine)
    centroid = tuple(float(c) for c in voxels.mean(axis=0) @ volume.affine[:3, :3].T + volume.affine[:3, 3])
    lesion = writers.Lesion(1, len(voxels) * voxel_ml, centroid, len(voxels))
    model = writers.ModelInfo("stroke-dwi-adc", "1.0.0", None, "a" * 64)
    outputs = writers.write_outputs(
        source_instances, label_map, [lesion], model, Task.STROKE_DWI_ADC, 1, {2, 4, 5}, lesion.volume_ml, lesion.volume_ml
    )
    directory, destination = storescp("writers")
    outbox = Outbox(tmp_path / "data")
    stored = outbox.enqueue(OutputKey(KEY.study_uid, 1, "stroke", model.version), outputs.datasets, [destination])

    assert Sender(outbox, [destination]).send_pending().sent == len(outputs.datasets)
    assert received(directory) == Counter({uid: 1 for uid in outputs.sop_instance_uids})
    arrived = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, directory.iterdir())}
    for instance in stored:
        sent = pydicom.dcmread(instance.path)
        assert arrived[instance.sop_instance_uid].SOPClassUID == sent.SOPClassUID
        assert arrived[instance.sop_instance_uid].get("PixelData") == sent.get("PixelData")


def test_a_response_taken_by_the_pynetdicom_reactor_still_reaches_the_sender(
    tmp_path, source_instances, storescp, monkeypatch
):
    """pynetdicom's reactor thread can take a C-STORE response meant for `send_c_store` (a race on busy cores, seen
    here as "Received unexpected C-STORE service message" and a DIMSE timeout). The steal is made certain: after each
    request the response goes down the reactor's path (`dimse.get_msg`, then `Association._serve_request`)."""
    directory, destination = storescp("race")
    outbox = Outbox(tmp_path / "data")
    outputs = as_outputs(source_instances, "race", 3)
    outbox.enqueue(KEY, outputs, [destination])
    sender = Sender(outbox, [destination], timeout_s=5.0)
    associate = sender._ae.associate

    def associate_with_a_thieving_reactor(*args, **kwargs):
        assoc = associate(*args, **kwargs)
        send_msg = assoc.dimse.send_msg

        def send_then_the_reactor_takes_the_response(primitive, context_id):
            send_msg(primitive, context_id)
            taken_context, response = assoc.dimse.get_msg(block=True)
            assoc._serve_request(response, taken_context)

        monkeypatch.setattr(assoc.dimse, "send_msg", send_then_the_reactor_takes_the_response)
        return assoc

    monkeypatch.setattr(sender._ae, "associate", associate_with_a_thieving_reactor)
    started = time.monotonic()
    assert sender.send_pending().sent == 3
    assert time.monotonic() - started < 3.0  # no DIMSE timeout was waited out
    assert received(directory) == Counter({d.SOPInstanceUID: 1 for d in outputs})
