"""The web page's read model: every query the pages, the JSON API and /metrics make, over the node's own objects.

Why one module: the views stay free of SQL and paths. Result files are found through the job table (study UID and
task → the job's recorded result directory), never from text in the request; the viewer's source volumes are built
once from the spooled instances of the job's revision (the same `load_study_inputs` the worker used, so the mask's
grid matches the first channel) and cached as NIfTI under `<data_dir>/web-cache/`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
from pydicom.errors import InvalidDicomError

from dicom_gateway.outbox import Outbox
from dicom_gateway.role_decisions import StudyRoles
from dicom_gateway.scp import DiskStatus
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import StudyIndex
from dicom_gateway.study_files import open_dicom, read_files
from dicom_gateway.study_inputs import load_study_inputs
from dicom_gateway.uids import is_valid_uid, spool_name
from inference.jobs import RESULTS_DIRNAME, Job, JobQueue, JobState
from inference.model_pull import ModelPuller
from inference.models import ModelService
from inference.report import DISCLAIMER, MASK_FILE, REPORT_FILE
from models.durable import write_atomic
from models.manifest import Role, Task

LOG = logging.getLogger(__name__)

RESULT_FILES = {MASK_FILE: "application/gzip", REPORT_FILE: "application/json"}
VIEWER_ROLES = ("dwi", "adc", "flair")
CACHE_DIRNAME = "web-cache"
STUDY_LIST_LIMIT = 500
DEMO_BANNER = "DEMO MODEL – NOT FOR CLINICAL USE"  # design.md §2: on every page in demo mode
_HEADER_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, InvalidDicomError)


@dataclass(frozen=True)
class PatientContext:
    """What the radiologist needs to recognise a study; shown on pages, never logged, never in /metrics."""

    patient_name: str = ""
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    study_description: str = ""

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


class NodeData:
    def __init__(
        self,
        data_dir: Path,
        dicom: DicomSettings,
        *,
        studies: StudyIndex,
        jobs: JobQueue,
        models: ModelService,
        outbox: Outbox,
        puller: ModelPuller | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.dicom = dicom
        self.studies_index = studies
        self.jobs = jobs
        self.models = models
        self.outbox = outbox
        self.puller = puller
        self._patients: dict[str, PatientContext] = {}
        self._build_lock = threading.Lock()

    # --- studies ---------------------------------------------------------------------------------------------

    def demo_mode(self) -> bool:
        return bool(self.models.demo_mode)

    def patient(self, study_uid: str) -> PatientContext:
        """From one spooled header, remembered (the spool is purged after retention, the page keeps showing it)."""
        if study_uid in self._patients:
            return self._patients[study_uid]
        context = PatientContext()
        for path in self.studies_index.study_files(study_uid)[:1]:
            try:
                ds = open_dicom(path, stop_before_pixels=True)
            except _HEADER_ERRORS as error:
                LOG.warning("study %s: header unreadable for the study list: %s", study_uid, type(error).__name__)
                return context
            context = PatientContext(
                patient_name=_person_name(ds.get("PatientName")),
                patient_id=str(ds.get("PatientID", "") or ""),
                accession=str(ds.get("AccessionNumber", "") or ""),
                study_date=_date(str(ds.get("StudyDate", "") or "")),
                study_description=str(ds.get("StudyDescription", "") or ""),
            )
            self._patients[study_uid] = context
        return context

    def studies(self, limit: int = STUDY_LIST_LIMIT) -> list[dict[str, Any]]:
        """The study list, most recent activity first (the newest `limit`; one job query per study)."""
        records = sorted(self.studies_index.list_studies(), key=lambda r: r.last_activity, reverse=True)[:limit]
        rows = []
        for record in records:
            jobs = _latest_jobs(self.jobs.jobs_for_study(record.study_uid))
            rows.append({
                "study_uid": record.study_uid,
                **self.patient(record.study_uid).as_dict(),
                "state": record.state,
                "revision": record.revision,
                "instances": record.instance_count,
                "status": _status(record.state, jobs),
                "tasks": [_job_summary(job) for job in jobs],
            })
        return rows

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """The study page; None for an invalid or unknown UID."""
        if not is_valid_uid(study_uid):
            return None
        record = next((r for r in self.studies_index.list_studies() if r.study_uid == study_uid), None)
        all_jobs = self.jobs.jobs_for_study(study_uid)
        if record is None and not all_jobs:
            return None
        jobs = _latest_jobs(all_jobs)
        results = []
        for job in jobs:
            summary = _job_summary(job)
            report = self._report(job)
            summary["report"] = report
            summary["downloads"] = sorted(RESULT_FILES) if report is not None else []
            results.append(summary)
        return {
            "study_uid": study_uid,
            **self.patient(study_uid).as_dict(),
            "state": record.state if record else None,
            "revision": record.revision if record else max(job.revision for job in all_jobs),
            "instances": record.instance_count if record else None,
            "status": _status(record.state if record else "", jobs),
            "disclaimer": DISCLAIMER,
            "results": results,
            "history": [_job_summary(job) for job in all_jobs],
        }

    def reprocess(self, study_uid: str) -> list[int]:
        """New jobs with the current models; the ids created (none when every task is still queued or running)."""
        return [job.id for job in self.jobs.reprocess(study_uid, self.studies_index)]

    # --- files -----------------------------------------------------------------------------------------------

    def _done_job(self, study_uid: str, task: Task) -> Job | None:
        if not is_valid_uid(study_uid):
            return None
        for job in self.jobs.jobs_for_study(study_uid):  # newest revision and run first
            if job.task is task and job.state is JobState.DONE and job.result_dir and job.purged_at is None:
                return job
        return None

    def result_file(self, study_uid: str, task: Task, name: str) -> Path | None:
        """A result file of the newest done job of (study, task), from the job's recorded directory."""
        job = self._done_job(study_uid, task)
        if job is None or name not in RESULT_FILES:
            return None
        root = (self.data_dir / RESULTS_DIRNAME).resolve()
        path = (Path(job.result_dir) / name).resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path

    def _report(self, job: Job) -> dict[str, Any] | None:
        import json

        if job.task is None or job.state is not JobState.DONE:
            return None
        path = self.result_file(job.study_uid, job.task, REPORT_FILE)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            LOG.warning("job %d: report.json unreadable: %s", job.id, error)
            return None

    def viewer_volumes(self, study_uid: str) -> dict[str, Path]:
        """The study's source volumes by role (dwi, adc, flair) for the viewer; empty when the spool was purged."""
        job = next(
            (j for j in self.jobs.jobs_for_study(study_uid) if j.state is JobState.DONE and j.task is not None), None
        ) if is_valid_uid(study_uid) else None
        if job is None:
            return {}
        folder = self.data_dir / CACHE_DIRNAME / spool_name(study_uid) / f"r{job.revision}"
        marker = folder / "complete"
        if not marker.exists():  # built once; later slice requests do not wait on another study's build
            with self._build_lock:
                if not marker.exists():
                    self._build_volumes(job, folder)
        return {role: folder / f"{role}.nii.gz" for role in VIEWER_ROLES if (folder / f"{role}.nii.gz").is_file()}

    def _build_volumes(self, job: Job, folder: Path) -> None:
        paths = self.studies_index.study_files(job.study_uid)
        if not paths:
            LOG.info("study %s r%d: spool purged, the viewer shows no source images", job.study_uid, job.revision)
            return
        try:
            inputs = load_study_inputs(StudyRoles.from_json(job.roles_json), read_files(paths).only_study())
        except (ValueError, OSError) as error:
            LOG.warning("study %s r%d: viewer volumes not built: %s", job.study_uid, job.revision, error)
            return
        folder.mkdir(parents=True, exist_ok=True)
        for role in VIEWER_ROLES:
            image = inputs.nifti(role)
            if image is not None:
                write_atomic(folder / f"{role}.nii.gz", lambda temp, image=image: nib.save(image, temp))
        (folder / "complete").touch()

    def overlay_mask(self, study_uid: str, role: str) -> Path | None:
        """The mask drawn on `role`: stroke's on DWI and ADC, MS's on FLAIR, else whichever task has one."""
        preferred = [task for task in Task if Role(role) in task.roles]
        for task in (*preferred, *Task):
            if (path := self.result_file(study_uid, task, MASK_FILE)) is not None:
                return path
        return None

    # --- models and node -------------------------------------------------------------------------------------

    def models_status(self) -> dict[str, Any]:
        """The model service's status plus, on a node that pulls, the last pull's outcome."""
        return {**self.models.status(), "pull": self.puller.status() if self.puller else None}

    def disk(self) -> DiskStatus:
        stats = os.statvfs(self.data_dir)
        return DiskStatus(stats.f_bavail * stats.f_frsize, self.dicom.min_free_disk_bytes)

    def node_status(self) -> dict[str, Any]:
        """Queue, outbox and disk for the JSON API (UIDs only)."""
        disk = self.disk()
        return {
            "jobs": {state.value: count for state, count in self.jobs.counts().items()},
            "outbox": {state.value: count for state, count in self.outbox.counts().items()},
            "dead_letters": [
                {
                    "study_uid": item.study_uid,
                    "sop_instance_uid": item.instance.sop_instance_uid,
                    "destination": item.destination,
                    "attempts": item.attempts,
                    "last_error": item.last_error,
                }
                for item in self.outbox.dead_letters()
            ],
            "disk": {"free_bytes": disk.free_bytes, "min_free_bytes": disk.min_free_bytes, "low": disk.low},
        }

    def finished_jobs(self, limit: int = 10000) -> list[Job]:
        return self.jobs.list_jobs(states=(JobState.DONE,), limit=limit)


def _latest_jobs(jobs: list[Job]) -> list[Job]:
    """The newest run of each task of the newest revision (jobs come newest revision and run first)."""
    if not jobs:
        return []
    newest = jobs[0].revision
    latest: dict[Task | None, Job] = {}
    for job in jobs:
        if job.revision == newest and job.task not in latest:
            latest[job.task] = job
    return sorted(latest.values(), key=lambda job: (job.task is None, job.task.priority if job.task else 9))


def _status(study_state: str, jobs: list[Job]) -> str:
    """One word for the list: the study still receiving, else the least advanced job's state."""
    if study_state == "receiving":
        return "receiving"
    if not jobs:
        return study_state or "unknown"
    order = ["running", "queued", "received", "failed", "not-processed", "done"]
    return min((job.state.value for job in jobs), key=order.index)


def _job_summary(job: Job) -> dict[str, Any]:
    result = job.result
    return {
        "job_id": job.id,
        "task": job.task.short_name if job.task else None,
        "revision": job.revision,
        "run": job.run,
        "state": job.state.value,
        "reason": job.reason,
        "attempts": job.attempts,
        "queue_position": job.queue_position,
        "model_version": job.model_version,
        "total_volume_ml": result.total_volume_ml if result else None,
        "adc_core_volume_ml": result.adc_core_volume_ml if result else None,
        "lesion_count": result.lesion_count if result else None,
        "timings_s": dict(result.timings) if result else {},
        "warnings": list(result.warnings) if result else [],
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "duration_s": job.duration_s,
    }


def _person_name(value: Any) -> str:
    """DICOM PN `Family^Given^Middle` as "Family, Given Middle" for reading."""
    text = str(value or "")
    family, _, rest = text.partition("^")
    given = " ".join(part for part in rest.split("^")[:2] if part)
    return f"{family}, {given}" if family and given else (family or given)


def _date(value: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value
