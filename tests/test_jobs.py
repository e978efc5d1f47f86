"""The job queue on real SQLite, fed by a real studies table with synthetic DICOM studies spooled as the SCP does."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.studies import DATABASE_NAME, StudyIndex
from fedlesion.cli import main
from dicom_gateway.settings import DicomSettings
from inference.jobs import (
    DATABASE_NAME as JOBS_DATABASE,
)
from inference.jobs import (
    JobQueue,
    JobResult,
    JobState,
    StudyContext,
    owner_alive,
    process_owner,
    results_dir,
    route_study,
)
from inference.settings import InferenceSettings, TasksSettings
from models.manifest import Task
from tests.conftest import REPO_ROOT
from tests.test_studies import FakeClock, small_case, spool
from training.synthetic.dicom_writer import write_dicom_study

UID_A = "1.2.826.0.1.3680043.10.543.5.1"
UID_B = "1.2.826.0.1.3680043.10.543.5.2"
UID_C = "1.2.826.0.1.3680043.10.543.5.3"
DAY = 86400.0

# Claim one job in another process and die without finishing it: a worker killed mid-job.
CRASHING_WORKER = """
import os, signal, sys
from pathlib import Path
from inference.jobs import JobQueue
data = Path(sys.argv[1])
job = JobQueue(data).claim("doomed")
print(job.id if job else 0, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def write_study(out_dir: Path, study_uid: str, description: str = "MR brain") -> dict[str, list[Path]]:
    """A tiny synthetic study (12×12×6): files by series folder, 2_flair, 4_dwi (b0 + b1000), 5_adc."""
    by_series: dict[str, list[Path]] = {}
    for path in write_dicom_study(small_case(), out_dir, study_uid=study_uid, study_description=description):
        by_series.setdefault(path.parent.name, []).append(path)
    return by_series


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("studies")
    return {
        UID_A: write_study(root / "a", UID_A, "MR brain stroke protocol"),
        UID_B: write_study(root / "b", UID_B, "MR brain MS follow-up"),
        UID_C: write_study(root / "c", UID_C, "MR knee"),
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def make_queue(data_dir: Path, clock: FakeClock | None = None, **tasks: object) -> JobQueue:
    return JobQueue(
        data_dir,
        tasks=TasksSettings(**tasks),
        dicom=DicomSettings(spool_retention_days=7.0, output_retention_days=30.0),
        inference=InferenceSettings(max_attempts=3),
        **({"clock": clock} if clock else {}),
    )


@pytest.fixture
def index(data_dir: Path, clock: FakeClock) -> StudyIndex:
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings(), clock=clock)
    yield index
    index.close()


def receive(index: StudyIndex, data_dir: Path, paths: list[Path], calling_ae: str = "PACS") -> None:
    """Spool the files as the SCP would, then the explicit completion trigger."""
    stored = spool(paths, data_dir / SPOOL_DIRNAME, calling_ae=calling_ae)
    index.instances_stored(stored)
    index.complete(stored[0].study_instance_uid)


def everything(files: dict[str, list[Path]]) -> list[Path]:
    return [path for paths in files.values() for path in paths]


def summary(queue: JobQueue, study_uid: str) -> list[tuple[str | None, str, str | None]]:
    return sorted(
        ((job.task.short_name if job.task else None), job.state.value, job.reason) for job in queue.jobs_for_study(study_uid)
    )


def test_routing_by_roles_gives_one_job_per_task_and_hands_off(studies, index, data_dir, clock) -> None:
    queue = make_queue(data_dir, clock)
    receive(index, data_dir, everything(studies[UID_A]))
    receive(index, data_dir, studies[UID_B]["4_dwi"] + studies[UID_B]["5_adc"])  # no FLAIR: stroke only
    receive(index, data_dir, studies[UID_C]["2_flair"])  # FLAIR only: MS only

    created = queue.intake(index)

    assert sorted((job.study_uid, job.task.short_name, job.state.value) for job in created) == [
        (UID_A, "ms", "queued"), (UID_A, "stroke", "queued"), (UID_B, "stroke", "queued"), (UID_C, "ms", "queued"),
    ]
    assert {study.study_uid: study.state for study in index.list_studies()} == dict.fromkeys(
        (UID_A, UID_B, UID_C), "handed-off"
    )
    assert all(row.handed_off_at is not None for row in index.ready_rows())
    assert queue.intake(index) == []  # the cursor: a second pass takes nothing twice
    assert len(queue.list_jobs()) == 4
    (job_a,) = [job for job in created if job.study_uid == UID_A and job.task is Task.STROKE_DWI_ADC]
    assert job_a.context == StudyContext("MR brain stroke protocol", "", "PACS")
    assert job_a.attempts == 0 and job_a.run == 1


def test_stroke_jobs_are_claimed_before_ms_jobs_then_first_in_first_out(studies, index, data_dir, clock) -> None:
    queue = make_queue(data_dir, clock)
    receive(index, data_dir, studies[UID_C]["2_flair"])  # an MS job queued first
    queue.intake(index)
    clock.now += 10
    receive(index, data_dir, everything(studies[UID_A]))  # stroke + MS
    clock.now += 10
    receive(index, data_dir, studies[UID_B]["4_dwi"] + studies[UID_B]["5_adc"])  # stroke
    queue.intake(index)

    queued = sorted(queue.list_jobs(states=[JobState.QUEUED]), key=lambda job: job.queue_position)
    assert [(job.study_uid, job.task.short_name, job.queue_position) for job in queued] == [
        (UID_A, "stroke", 1), (UID_B, "stroke", 2), (UID_C, "ms", 3), (UID_A, "ms", 4),
    ]
    claimed = [queue.claim("w") for _ in range(5)]
    assert [(job.study_uid, job.task.short_name) for job in claimed[:4]] == [
        (UID_A, "stroke"), (UID_B, "stroke"), (UID_C, "ms"), (UID_A, "ms"),
    ]
    assert claimed[4] is None
    assert all(job.state is JobState.RUNNING and job.attempts == 1 and job.queue_position is None
               for job in claimed[:4])
    assert queue.counts()[JobState.RUNNING] == 4


def test_study_filters_search_descriptions_and_calling_ae(studies, index, data_dir, clock) -> None:
    queue = make_queue(data_dir, clock, stroke_study_filter=r"(?i)stroke", ms_study_filter=r"^MSCLINIC$")
    receive(index, data_dir, everything(studies[UID_A]), calling_ae="ER")  # "stroke" in StudyDescription
    receive(index, data_dir, everything(studies[UID_B]), calling_ae="MSCLINIC")  # the AE matches the MS filter
    queue.intake(index)

    assert summary(queue, UID_A) == [("stroke", "queued", None)]
    assert summary(queue, UID_B) == [("ms", "queued", None)]


def test_route_study_reasons_and_requirements() -> None:
    stroke_roles = {"dwi": {"series_uid": "1"}, "adc": {"series_uid": "2"}, "flair": None, "series": []}
    tasks = TasksSettings()
    assert route_study(stroke_roles, StudyContext(), tasks, set(Task)).tasks == (Task.STROKE_DWI_ADC,)
    no_adc = {**stroke_roles, "adc": None}
    routing = route_study(no_adc, StudyContext(), tasks, set(Task))
    assert routing.tasks == () and "stroke: ADC missing" in routing.reason and "ms: no FLAIR series" in routing.reason
    not_installed = route_study(stroke_roles, StudyContext(), tasks, {Task.MS_FLAIR})
    assert "stroke: no model installed" in not_installed.reason
    assert route_study({"error": "series roles could not be determined: boom"}, StudyContext(), tasks,
                       set(Task)).reason == "series roles could not be determined: boom"


def test_no_task_matched_is_not_processed_with_the_roles_reasons(studies, index, data_dir, clock) -> None:
    queue = make_queue(data_dir, clock, ms=False)
    receive(index, data_dir, studies[UID_C]["2_flair"])  # FLAIR only, and MS disabled
    (job,) = queue.intake(index)

    assert job.state is JobState.NOT_PROCESSED and job.task is None and job.finished_at is not None
    assert job.reason.startswith("no task matched (stroke: no DWI series; ms: disabled)")
    assert "series 2: flair" in job.reason  # the roles' own per-series reason
    assert queue.claim("w") is None
    assert index.list_studies()[0].state == "handed-off"


def test_a_roles_error_is_not_processed_with_that_reason(studies, data_dir, clock) -> None:
    def broken_rules(paths: list[Path]) -> dict:
        raise RuntimeError("role rules file unreadable")

    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings(),
                       describe_roles=broken_rules, clock=clock)
    queue = make_queue(data_dir, clock)
    receive(index, data_dir, everything(studies[UID_A]))
    (job,) = queue.intake(index)
    index.close()
    assert job.state is JobState.NOT_PROCESSED
    assert job.reason == "series roles could not be determined: RuntimeError: role rules file unreadable"


def crash_while_holding_a_job(data_dir: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_WORKER, str(data_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return int(result.stdout.strip())


def test_a_job_whose_worker_dies_three_times_fails(studies, index, data_dir) -> None:
    queue = make_queue(data_dir)
    receive(index, data_dir, studies[UID_B]["4_dwi"] + studies[UID_B]["5_adc"])
    (job,) = queue.intake(index)

    for attempt in (1, 2, 3):
        assert crash_while_holding_a_job(data_dir) == job.id
        crashed = queue.job(job.id)
        assert (crashed.state, crashed.attempts) == (JobState.RUNNING, attempt)  # counted at the claim
        assert not owner_alive(crashed.owner)
        restarted = make_queue(data_dir)  # the node starting again
        (changed,) = restarted.recover(index)
        if attempt < 3:
            assert changed.state is JobState.QUEUED and changed.reason == f"requeued: the worker stopped during " \
                f"attempt {attempt}"
        else:
            assert changed.state is JobState.FAILED
            assert changed.reason == "the worker stopped during this job 3 times (max_attempts 3)"
    assert queue.claim("w") is None


def test_recover_leaves_live_workers_jobs_alone(studies, index, data_dir) -> None:
    queue = make_queue(data_dir)
    receive(index, data_dir, studies[UID_B]["4_dwi"] + studies[UID_B]["5_adc"])
    queue.intake(index)
    job = queue.claim("alive")
    assert owner_alive(process_owner())
    assert make_queue(data_dir).recover(index) == []  # this process still runs
    assert queue.job(job.id).state is JobState.RUNNING
    assert queue.finish(job.id, JobState.DONE, result=JobResult(model_version="1", total_volume_ml=0.0))
    done = queue.job(job.id)
    assert (done.state, done.model_version, done.result.total_volume_ml) == (JobState.DONE, "1", 0.0)
    assert not queue.finish(job.id, JobState.FAILED, "late")  # no longer running: nothing changes


def test_a_graceful_stop_requeues_running_jobs_without_spending_an_attempt(studies, index, data_dir) -> None:
    queue = make_queue(data_dir)
    receive(index, data_dir, everything(studies[UID_A]))
    queue.intake(index)
    stroke = queue.claim("w")
    assert queue.release_running() == [stroke.id]
    released = queue.job(stroke.id)
    assert (released.state, released.attempts, released.queue_position) == (JobState.QUEUED, 0, 1)
    assert released.reason == "requeued: the node stopped during the job"
    assert not queue.finish(stroke.id, JobState.DONE, result=JobResult(model_version="1"))  # the late worker
    assert queue.claim("w").id == stroke.id  # stroke still goes first


class LockedOnce(StudyIndex):
    """The studies database busy once at the hand-off (another writer held it past busy_timeout)."""

    fail = True

    def mark_handed_off(self, study_uid: str, revision: int) -> bool:
        if self.fail:
            self.fail = False
            raise sqlite3.OperationalError("database is locked")
        return super().mark_handed_off(study_uid, revision)


def test_received_jobs_resume_after_a_failed_hand_off(studies, data_dir, clock) -> None:
    index = LockedOnce(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings(), clock=clock)
    queue = make_queue(data_dir, clock)
    receive(index, data_dir, everything(studies[UID_A]))
    with pytest.raises(sqlite3.OperationalError):
        queue.intake(index)
    assert summary(queue, UID_A) == [("ms", "received", None), ("stroke", "received", None)]
    assert queue.claim("w") is None  # not queued until the hand-off is recorded

    resumed = make_queue(data_dir, clock).recover(index)
    assert sorted(job.state.value for job in resumed) == ["queued", "queued"]
    assert index.list_studies()[0].state == "handed-off"
    index.close()


def test_reprocess_queues_a_new_run_of_the_latest_revision(studies, index, data_dir, clock) -> None:
    queue = make_queue(data_dir, clock)
    receive(index, data_dir, studies[UID_B]["4_dwi"] + studies[UID_B]["5_adc"])
    queue.intake(index)
    assert queue.reprocess(UID_B) == []  # the job is still queued: nothing to add
    job = queue.claim("w")
    queue.finish(job.id, JobState.DONE, result=JobResult(model_version="1"))
    receive(index, data_dir, studies[UID_B]["2_flair"])  # a FLAIR arrives: revision 2 with both tasks
    clock.now += 5

    created = queue.reprocess(UID_B, index)  # takes revision 2 in first, its jobs are still queued

    assert created == []
    assert [(j.revision, j.run, j.task.short_name, j.state.value) for j in queue.jobs_for_study(UID_B)] == [
        (2, 1, "stroke", "queued"), (2, 1, "ms", "queued"), (1, 1, "stroke", "done"),
    ]
    for _ in range(2):
        claimed = queue.claim("w")
        queue.finish(claimed.id, JobState.DONE, result=JobResult(model_version="2"))
    again = queue.reprocess(UID_B)
    assert sorted((j.revision, j.run, j.task.short_name, j.state.value) for j in again) == [
        (2, 2, "ms", "queued"), (2, 2, "stroke", "queued"),
    ]
    assert all(j.created_at == clock.now for j in again)
    with pytest.raises(ValueError, match="unknown study 1.2.3.999"):
        queue.reprocess("1.2.3.999")
    with pytest.raises(ValueError, match="not a valid Study Instance UID"):
        queue.reprocess("../etc")


def test_fedlesion_reprocess_cli(studies, index, data_dir, monkeypatch, capsys) -> None:
    monkeypatch.delenv("FEDLESION_CONFIG", raising=False)
    monkeypatch.setenv("FEDLESION_STORAGE__DATA_DIR", str(data_dir))
    queue = make_queue(data_dir)
    receive(index, data_dir, studies[UID_B]["4_dwi"] + studies[UID_B]["5_adc"])
    queue.intake(index)
    job = queue.claim("w")
    queue.finish(job.id, JobState.FAILED, "ValueError: boom")

    assert main(["reprocess", UID_B]) == 0
    assert capsys.readouterr().out.strip() == f"study {UID_B}: revision 1, job {job.id + 1} (stroke) queued"
    assert [(j.run, j.state.value) for j in queue.jobs_for_study(UID_B)] == [(2, "queued"), (1, "failed")]
    assert main(["reprocess", "1.2.3.999"]) == 2
    assert "unknown study 1.2.3.999" in capsys.readouterr().err


def test_retention_purges_results_then_spool(studies, index, data_dir, clock) -> None:
    queue = make_queue(data_dir, clock)
    receive(index, data_dir, everything(studies[UID_A]))
    queue.intake(index)
    stroke = queue.claim("w")
    out = results_dir(data_dir, UID_A, 1, Task.STROKE_DWI_ADC)
    out.mkdir(parents=True)
    (out / "report.json").write_text("{}")
    queue.finish(stroke.id, JobState.DONE, result=JobResult(model_version="1"), result_dir=out)
    spooled = index.study_files(UID_A)

    clock.now += 8 * DAY  # spool due (7 days), but the MS job is still queued
    report = queue.purge_expired(index)
    assert report.spool_deferred and report.spool_purged == [] and all(path.exists() for path in spooled)
    ms = queue.claim("w")
    queue.finish(ms.id, JobState.DONE, result=JobResult(model_version="1"))
    report = queue.purge_expired(index)
    assert report.spool_purged == [UID_A] and not any(path.exists() for path in spooled)
    assert report.results_purged == [] and out.exists()

    clock.now += 15 * DAY  # a re-run of the stroke task writes the same result directory
    reruns = queue.reprocess(UID_A)
    stroke_rerun, ms_rerun = (queue.claim("w") for _ in reruns)
    assert stroke_rerun.task is Task.STROKE_DWI_ADC
    queue.finish(stroke_rerun.id, JobState.DONE, result=JobResult(model_version="1"), result_dir=out)
    queue.finish(ms_rerun.id, JobState.DONE, result=JobResult(model_version="1"))

    clock.now += 8 * DAY  # 31 days after the first stroke job ended, 23 after the first MS job, 8 after the re-runs
    report = queue.purge_expired(index)
    assert report.results_purged == [stroke.id] and queue.job(stroke.id).purged_at == clock.now
    assert out.exists()  # still the re-run's results

    clock.now += 30 * DAY
    report = queue.purge_expired(index)
    assert sorted(report.results_purged) == sorted([ms.id, stroke_rerun.id, ms_rerun.id])
    assert not out.exists() and not any((data_dir / "results").iterdir())  # the empty folders above it went too
    assert queue.purge_expired(index).results_purged == []


def test_the_queue_uses_wal_and_a_busy_timeout(data_dir) -> None:
    queue = make_queue(data_dir)
    conn = queue._connections.get()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert (data_dir / JOBS_DATABASE).exists()
    assert os.path.basename(results_dir(data_dir, UID_A, 2, Task.MS_FLAIR).parent) == "r2"
