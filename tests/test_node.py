"""The node's composition: `fedlesion node` runs the same receiver as `fedlesion receive` (dicom.receiver_processes
included, completions reaching the job queue), and a SIGTERM returns the job in hand without spending a retry."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

import inference.node
from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.studies import DATABASE_NAME
from inference.jobs import DATABASE_NAME as JOBS_DATABASE
from inference.jobs import JobQueue, JobState
from inference.node import Node
from inference.settings import NodeSettings, TasksSettings
from inference.worker import Outcome, Worker
from tests.conftest import REPO_ROOT
from tests.dicom_support import free_port
from tests.test_studies import spool, write_small_study

NODE_AE = "FEDLESION"
RELEASING_AE = "PACS"
STUDY_UID = "1.2.826.0.1.3680043.10.543.12.1"
START_TIMEOUT_S = 180.0


def associate(port: int, calling_ae: str, *contexts: str):
    ae = AE(ae_title=calling_ae)
    for context in contexts:
        ae.add_requested_context(context, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE)


def associate_when_free(port: int, calling_ae: str, *contexts: str, timeout_s: float = 20.0):
    """An association once the SCP processes have let the probes' associations go (each counts until its thread
    ends, and the limit is one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assoc = associate(port, calling_ae, *contexts)
        if assoc.is_established:
            return assoc
        time.sleep(0.2)
    raise AssertionError(f"no association accepted within {timeout_s:.0f} s")


def test_fedlesion_node_runs_receiver_processes_that_all_accept_and_complete_through_the_node(tmp_path: Path) -> None:
    """Two SCP processes with one association each: a second association while the first is held can only be
    accepted by the other process; the study sent by a complete-on-release AE becomes a job of the node's queue."""
    data_dir, port = tmp_path / "data", free_port()
    files = [path for paths in write_small_study(tmp_path / "study", study_uid=STUDY_UID, negatives=False).values()
             for path in paths]
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLESION_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        FEDLESION_STORAGE__DATA_DIR=str(data_dir),
        FEDLESION_DICOM__RECEIVER_PROCESSES="2",
        FEDLESION_DICOM__MAX_ASSOCIATIONS="1",
        FEDLESION_DICOM__MIN_FREE_DISK_BYTES="0",
        FEDLESION_DICOM__COMPLETE_ON_RELEASE=RELEASING_AE,
        FEDLESION_DICOM__INACTIVITY_TIMEOUT_S="3600",  # only the forwarded release trigger can complete the study
        FEDLESION_TASKS__MS="false",
    )
    log = tmp_path / "node.log"
    with log.open("wb") as err:
        node = subprocess.Popen(
            [sys.executable, "-m", "fedlesion", "node", "--dicom-port", str(port), "--web-port", "0"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        assert node.stdout is not None
        start_line = node.stdout.readline()
        assert start_line.startswith(f"fedlesion node: AE {NODE_AE} on 0.0.0.0:{port},"), log.read_text()
        held = associate(port, "HOLDER", Verification)
        assert held.is_established
        second = [associate(port, "PROBE", Verification) for _ in range(30)]
        accepted = [assoc for assoc in second if assoc.is_established]
        for assoc in accepted:
            assoc.release()
        held.release()
        assert accepted, "no second association accepted while one was held: one SCP process serves the port"

        sender = associate_when_free(port, RELEASING_AE, MRImageStorage)
        assert all(sender.send_c_store(dcmread(path)).Status == 0 for path in files)
        sender.release()
        jobs = wait_for_jobs(data_dir / JOBS_DATABASE, STUDY_UID, timeout_s=60.0)
        assert [task for task, _ in jobs] == ["stroke"]
        with sqlite3.connect(data_dir / DATABASE_NAME) as db:
            triggers = [row[0] for row in db.execute("SELECT trigger FROM study_ready WHERE study_uid = ?",
                                                     (STUDY_UID,))]
        assert triggers == ["association-released"]
        wait_for_jobs(data_dir / JOBS_DATABASE, STUDY_UID, timeout_s=120.0, settled=True)
    finally:
        node.send_signal(signal.SIGTERM)
        exit_status = node.wait(90)
    assert exit_status == 0, log.read_text()


def wait_for_jobs(db_path: Path, study_uid: str, *, timeout_s: float, settled: bool = False) -> list[tuple[str, str]]:
    """(task, state) of the study's jobs once there are any (and, with `settled`, none queued or running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if db_path.exists():
            with sqlite3.connect(db_path, timeout=5) as db:
                jobs = db.execute("SELECT task, state FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,)).fetchall()
            if jobs and not (settled and any(state in ("received", "queued", "running") for _, state in jobs)):
                return jobs
        time.sleep(0.2)
    raise AssertionError(f"no {'settled ' if settled else ''}job for {study_uid} within {timeout_s:.0f} s")


def test_sigterm_returns_the_job_in_hand_to_the_queue_without_spending_an_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job outlives the node's wait for it: SIGTERM must leave it queued with its attempt given back, so the
    next start neither counts it as a crash nor fails it early."""
    in_hand, let_go = threading.Event(), threading.Event()

    def slow_process(worker: Worker, job: object) -> Outcome:
        in_hand.set()
        let_go.wait(60)
        return Outcome(JobState.FAILED, "stopped by the test")

    monkeypatch.setattr(Worker, "process", slow_process)
    monkeypatch.setattr(inference.node, "JOB_FINISH_S", 0.5)
    data_dir = tmp_path / "data"
    node = Node(data_dir, node=NodeSettings(ae_title=NODE_AE), tasks=TasksSettings(ms=False), dicom_port=0, web_port=0)
    node.start()
    try:
        files = [path for paths in write_small_study(tmp_path / "study", study_uid=STUDY_UID).values() for path in paths]
        node.index.instances_stored(spool(files, data_dir / SPOOL_DIRNAME))
        node.index.complete(STUDY_UID)
        assert in_hand.wait(60), "no worker took the job"
        (running,) = node.jobs.jobs_for_study(STUDY_UID)
        assert (running.state, running.attempts) == (JobState.RUNNING, 1)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        node.wait()  # returns on the signal, as `fedlesion node` does
    finally:
        node.stop()
        let_go.set()
    queue = JobQueue(data_dir)
    try:
        assert queue.recover() == []  # nothing for the next start to count as a crash
        (job,) = queue.jobs_for_study(STUDY_UID)
        assert (job.state, job.attempts, job.reason) == (
            JobState.QUEUED, 0, "requeued: the node stopped during the job"
        )
    finally:
        queue.close()
