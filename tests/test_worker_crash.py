"""kill -9 of a worker process mid-job (design.md §5): after the restart the job completes once, the outbox holds
each output once with the UIDs the first stored, and a storescp destination receives each output once.

The worker runs in its own process (the node's composition: model service with the embedded default stroke model,
studies table, job queue, outbox, sender, `start_workers`). The slow step that the kill lands in is real: the default
model segmenting a clinical-size synthetic study (85 slices) takes seconds on this CPU.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_gateway.outbox import DATABASE_NAME as OUTBOX_DATABASE
from dicom_gateway.outbox import Outbox, OutputKey, destination_name
from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import DATABASE_NAME, StudyIndex
from inference.jobs import JobQueue, JobState
from tests.conftest import REPO_ROOT
from tests.test_scu import received, start_storescp
from tests.test_studies import spool
from training.synthetic import SiteProfile, generate_case
from training.synthetic.dicom_writer import write_dicom_study

STUDY_UID = "1.2.826.0.1.3680043.10.543.7.1"

# The node's worker side in one process; exits 0 once every job has ended and every delivery was sent. With a third
# argument "die-before-done" it sends nothing and kills itself with SIGKILL where the job would be marked done, i.e.
# after its outputs were stored in the outbox (a test seam set from outside, the node's code is unchanged).
WORKER_PROCESS = """
import os, signal, sys, threading, time
from pathlib import Path
from dicom_gateway.outbox import Outbox
from dicom_gateway.scu import Sender
from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import DATABASE_NAME, StudyIndex
from inference.jobs import ACTIVE_STATES, JobQueue
from inference.models import ModelService
from inference.worker import installed_tasks, start_workers
from models.manifest import Task
from models.package import TrustPolicy
from models.settings import ModelSettings

data, destination = Path(sys.argv[1]), sys.argv[2]
die_before_done = sys.argv[3:] == ["die-before-done"]
if die_before_done:
    JobQueue.finish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
dicom = DicomSettings(destinations=(destination,), send_backoff_s=0.2)
service = ModelService(ModelSettings().registry_path(data), TrustPolicy.demo(), [Task.STROKE_DWI_ADC])
service.start(watch=False)
index = StudyIndex(data / DATABASE_NAME, data / SPOOL_DIRNAME, dicom)
queue = JobQueue(data, dicom=dicom, installed=lambda: installed_tasks(service))
outbox = Outbox(data)
stop = threading.Event()
sender = threading.Thread(target=Sender.from_settings(outbox, dicom, "FEDLESION").run, args=(stop,), daemon=True)
if not die_before_done:
    sender.start()
workers = start_workers(queue, index, service, outbox, data, stop, destinations=dicom.parsed_destinations)
print("started", flush=True)
while True:
    time.sleep(0.2)
    active = sum(queue.counts()[state] for state in ACTIVE_STATES)
    if queue.list_jobs() and not active and not outbox.counts()["pending"]:
        break
stop.set()
for thread in [sender, *workers]:
    if thread.is_alive():
        thread.join(60)
print("idle", flush=True)
"""


@pytest.fixture(scope="module")
def stroke_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A clinical-size synthetic stroke study: FLAIR, DWI b0 + b1000 and ADC, 85 slices each."""
    case = generate_case("stroke", 3, size="medium", pattern="single")
    return write_dicom_study(case, tmp_path_factory.mktemp("crash-study"), study_uid=STUDY_UID)


def start_worker(data_dir: Path, destination: str, log: Path, *mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_PROCESS, str(data_dir), destination, *mode],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log.open("ab"), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def batches(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / OUTBOX_DATABASE) as conn:
        return conn.execute("SELECT COUNT(*) FROM output_batches").fetchone()[0]


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_completes_once_and_sends_each_output_once(stroke_study, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings())
    index.instances_stored(spool(stroke_study, data_dir / SPOOL_DIRNAME))
    index.complete(STUDY_UID)
    queue = JobQueue(data_dir)
    pacs_dir = tmp_path / "pacs"
    pacs, destination = start_storescp(pacs_dir)
    log = tmp_path / "worker.log"
    first = second = None
    try:
        first = start_worker(data_dir, destination_name(destination), log)
        deadline = time.monotonic() + 120
        while not [job for job in queue.list_jobs() if job.state is JobState.RUNNING]:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never claimed the job"
            time.sleep(0.05)
        time.sleep(1.0)  # inside the job: reading the study and running the model take several seconds
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        (crashed,) = queue.list_jobs()
        assert (crashed.state, crashed.attempts) == (JobState.RUNNING, 1), "the kill did not land mid-job"
        assert batches(data_dir) == 0 and not any(pacs_dir.iterdir())

        second = start_worker(data_dir, destination_name(destination), log)
        assert second.wait(300) == 0, log.read_text()[-3000:]
    finally:
        for process in (first, second, pacs):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        index.close()

    (job,) = queue.list_jobs()
    assert (job.state, job.attempts, job.model_version) == (JobState.DONE, 2, "1"), job.reason
    assert "requeued" not in (job.reason or "")
    assert batches(data_dir) == 1
    outbox = Outbox(data_dir)
    stored = outbox.stored(OutputKey(STUDY_UID, 1, "stroke", "1"))
    deliveries = outbox.deliveries(OutputKey(STUDY_UID, 1, "stroke", "1"))
    assert len(stored) >= 3 and {d.state.value for d in deliveries} == {"sent"} and len(deliveries) == len(stored)
    arrivals = received(pacs_dir)
    assert set(arrivals) == {instance.sop_instance_uid for instance in stored}
    assert set(arrivals.values()) == {1}, "an output reached the PACS twice"
    seg = next(path for path in pacs_dir.iterdir() if dcmread(path, stop_before_pixels=True).Modality == "SEG")
    assert dcmread(seg, stop_before_pixels=True).StudyInstanceUID == STUDY_UID
    outbox.close()
    queue.close()


@pytest.fixture(scope="module")
def small_stroke_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A coarser synthetic stroke study (3.5 mm pixels, 5 mm slices): the default model needs a few seconds."""
    site = SiteProfile(name="crash", in_plane_mm=3.5, slice_thickness_mm=5.0, slice_spacing_mm=5.0)
    case = generate_case("stroke", 4, site=site, size="medium", pattern="single", anatomy="procedural")
    return write_dicom_study(case, tmp_path_factory.mktemp("small-crash-study"), study_uid=STUDY_UID)


@pytest.mark.slow
def test_kill_9_after_outputs_were_stored_reuses_their_uids(small_stroke_study, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings())
    index.instances_stored(spool(small_stroke_study, data_dir / SPOOL_DIRNAME))
    index.complete(STUDY_UID)
    index.close()
    pacs_dir = tmp_path / "pacs"
    pacs, destination = start_storescp(pacs_dir)
    log = tmp_path / "worker.log"
    try:
        first = start_worker(data_dir, destination_name(destination), log, "die-before-done")
        assert first.wait(300) == -signal.SIGKILL, log.read_text()[-3000:]
        key = OutputKey(STUDY_UID, 1, "stroke", "1")
        outbox = Outbox(data_dir)
        before = [(i.sop_instance_uid, i.series_instance_uid, i.path.read_bytes()) for i in outbox.stored(key)]
        assert before and {d.state.value for d in outbox.deliveries(key)} == {"pending"}
        assert not any(pacs_dir.iterdir())

        second = start_worker(data_dir, destination_name(destination), log)
        assert second.wait(300) == 0, log.read_text()[-3000:]
    finally:
        for process in (pacs,):
            process.kill()
            process.wait()

    queue = JobQueue(data_dir)
    (job,) = queue.list_jobs()
    assert (job.state, job.attempts) == (JobState.DONE, 2), job.reason
    after = [(i.sop_instance_uid, i.series_instance_uid, i.path.read_bytes()) for i in outbox.stored(key)]
    assert after == before and batches(data_dir) == 1
    arrivals = received(pacs_dir)
    assert set(arrivals) == {uid for uid, _, _ in before} and set(arrivals.values()) == {1}
    outbox.close()
    queue.close()
