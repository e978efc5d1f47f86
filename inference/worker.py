"""The job workers (design.md §5): claim a job, segment the study on the model serving its task, store the results.

Why the order below: results go under `<data_dir>/results/<spool_name(study)>/r<revision>/<task>/` (each file
atomic), then the DICOM outputs are built with the job's stored creation time and stored in the outbox under
(study, revision, task, model version) before the SCU sends anything, and only then is the job marked done. A worker
killed anywhere in between leaves a running job that `JobQueue.recover()` queues again; the retry rebuilds the same
bytes, finds the outputs already stored and reuses their UIDs, so the PACS receives each output once. A job keeps
the `ServingModel` it started with even when a new version is swapped in meanwhile, and records that version.
Any error ends the one job (failed, with the reason); the worker loop goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from pydicom.dataset import Dataset

from dicom_gateway.outbox import Outbox, OutputKey
from dicom_gateway.role_decisions import StudyRoles
from dicom_gateway.settings import Destination
from dicom_gateway.studies import StudyIndex
from dicom_gateway.study_files import StudyHeaders, open_dicom, read_files
from dicom_gateway.study_inputs import StudyInputs, load_study_inputs
from dicom_gateway.writers import write_not_processed, write_outputs
from inference.jobs import Job, JobQueue, JobResult, JobState, results_dir
from inference.models import ModelSource, ModelUnavailable, ServingModel
from inference.pipeline import segment_study
from inference.report import write_result
from inference.settings import InferenceSettings
from inference.study_plan import plan_study
from models.manifest import Task

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
FINISH_ATTEMPTS = 5
NOT_PROCESSED_MODEL = "none"  # the outbox key's model version of a "not performed" notice without a model


def installed_tasks(models: ModelSource) -> frozenset[Task]:
    """The tasks a verified model serves now: the queue routes only to these."""
    return frozenset(models.served_versions())


class NotProcessed(Exception):
    """The study cannot be segmented for a reason a radiologist should read (a role's volume missing)."""


@dataclass(frozen=True)
class Outcome:
    state: JobState
    reason: str | None = None
    result: JobResult | None = None
    result_dir: Path | None = None


class Worker:
    """One worker: `run(stop)` in a thread claims and processes jobs until `stop` is set."""

    def __init__(
        self,
        queue: JobQueue,
        index: StudyIndex,
        models: ModelSource,
        outbox: Outbox,
        data_dir: Path,
        *,
        inference: InferenceSettings = InferenceSettings(),
        destinations: Sequence[Destination] = (),
        notify_not_processed: bool = False,
        name: str = "worker-1",
        poll_s: float = IDLE_POLL_S,
    ) -> None:
        """`destinations` receive the outputs; `notify_not_processed` sends the "not performed" notice too."""
        self.queue = queue
        self.index = index
        self.models = models
        self.outbox = outbox
        self.data_dir = Path(data_dir)
        self.inference = inference
        self.destinations = tuple(destinations)
        self.notify_not_processed = notify_not_processed
        self.name = name
        self.poll_s = poll_s

    def run(self, stop: threading.Event) -> None:
        """Process jobs until `stop` is set; the job in hand is finished first (SIGTERM, design.md §5)."""
        while not stop.is_set():
            try:
                job = self.run_once()
            except Exception:  # a locked or broken database pass; the next pass tries again
                logger.exception("%s: pass failed", self.name)
                job = None
            if job is None:
                stop.wait(self.poll_s)

    def run_once(self) -> Job | None:
        """Take new study_ready rows into the queue, then claim and process one job; None when none was queued."""
        for job in self.queue.intake(self.index):
            if job.state is JobState.NOT_PROCESSED:
                self._notify_not_processed(job, job.reason or "no task matched")
        job = self.queue.claim(self.name)
        if job is None:
            return None
        outcome = self.process(job)
        if outcome.state is JobState.NOT_PROCESSED:
            self._notify_not_processed(job, outcome.reason or "not processed")
        self._finish(job, outcome)
        return self.queue.job(job.id)

    def _finish(self, job: Job, outcome: Outcome) -> None:
        """Record the outcome, retrying a database busy past its timeout: a job left running by a live process
        would wait for the next start."""
        for attempt in range(1, FINISH_ATTEMPTS + 1):
            try:
                self.queue.finish(
                    job.id, outcome.state, outcome.reason, result=outcome.result, result_dir=outcome.result_dir
                )
                return
            except sqlite3.OperationalError:
                if attempt == FINISH_ATTEMPTS:
                    raise
                logger.warning("job %d: recording its end failed (attempt %d); retrying", job.id, attempt)
                time.sleep(self.poll_s)

    def process(self, job: Job) -> Outcome:
        """One claimed job to its outcome; never raises."""
        try:
            return self._process(job)
        except NotProcessed as reason:
            return Outcome(JobState.NOT_PROCESSED, str(reason))
        except Exception as error:  # any failure ends this job only, with its reason
            logger.exception("job %d (study %s r%d %s) failed", job.id, job.study_uid, job.revision, job.task)
            return Outcome(JobState.FAILED, f"{type(error).__name__}: {error}")

    def _process(self, job: Job) -> Outcome:
        if job.task is None:
            raise ValueError("a job without a task cannot run")
        started = time.perf_counter()
        study = self._study(job)
        try:
            plan = plan_study(study, job.task, self.models, StudyRoles.from_json(job.roles_json))
        except ModelUnavailable as error:  # e.g. an enrolled node before its first release is installed
            raise NotProcessed(f"no model: {error}") from None
        serving = plan.model  # kept for the whole job: hot-swap safe
        inputs = load_study_inputs(plan.roles, study)
        _check_inputs(inputs, serving)
        loaded = time.perf_counter() - started
        created = _created(job)
        result = segment_study(
            inputs,
            serving.engine,
            adc_core_threshold=self.inference.adc_core_threshold,
            flip_tta=self.inference.flip_tta,
            load_seconds=loaded,
        )
        result = replace(result, created=created)
        timings = dict(result.timings)

        step = time.perf_counter()
        out_dir = results_dir(self.data_dir, job.study_uid, job.revision, job.task)
        write_result(result, out_dir)
        timings["results"] = time.perf_counter() - step

        step = time.perf_counter()
        key = OutputKey(job.study_uid, job.revision, job.task.short_name, str(serving.version))
        if self.outbox.stored(key):  # a retry after a crash: the stored outputs and their UIDs are the truth
            datasets = []
            logger.info("job %d: outputs already stored for %s, reused", job.id, key)
        else:
            if result.label_map is None or result.reference_datasets is None:
                raise ValueError("the pipeline gave no label map on the reference grid for a DICOM study")
            datasets = write_outputs(
                _with_pixels(result.reference_datasets, study),
                result.label_map,
                result.lesions,
                result.model.info(),
                result.task,
                job.revision,
                _series_numbers(study),
                result.total_volume_ml,
                result.adc_core_volume_ml,
                created=created,
            ).datasets
        stored = self.outbox.enqueue(key, datasets, self.destinations)
        timings["dicom_outputs"] = time.perf_counter() - step
        series = {}
        for instance in stored:
            series.setdefault(_output_kind(instance.sop_class_uid), instance.series_instance_uid)
        logger.info(
            "job %d: %s r%d %s done with model v%d: %d lesions, %.3f ml",
            job.id, job.study_uid, job.revision, job.task.short_name, serving.version, result.lesion_count,
            result.total_volume_ml,
        )
        return Outcome(
            JobState.DONE,
            result=JobResult(
                model_version=str(serving.version),
                total_volume_ml=result.total_volume_ml,
                adc_core_volume_ml=result.adc_core_volume_ml,
                lesion_count=result.lesion_count,
                timings={name: round(value, 4) for name, value in timings.items()},
                warnings=tuple(result.warnings),
                outputs=series,
            ),
            result_dir=out_dir,
        )

    def _study(self, job: Job) -> StudyHeaders:
        paths = self.index.study_files(job.study_uid)
        if not paths:
            raise NotProcessed("the study's spooled instances are gone (retention purge); send it again")
        return read_files(paths).only_study()

    def _notify_not_processed(self, job: Job, reason: str) -> None:
        """One SC "AI analysis not performed: reason" (tasks.notify_not_processed); best effort."""
        if not self.notify_not_processed:
            return
        try:
            paths = self.index.study_files(job.study_uid)
            if not paths:
                return
            reference = open_dicom(paths[0], stop_before_pixels=True)
            study = read_files(paths).only_study()
            task = job.task.short_name if job.task else "none"
            key = OutputKey(job.study_uid, job.revision, task, job.model_version or NOT_PROCESSED_MODEL)
            datasets = []
            if not self.outbox.stored(key):
                datasets = [
                    write_not_processed(
                        [reference],
                        reason,
                        study_revision=job.revision,
                        existing_series_numbers=_series_numbers(study),
                        task=job.task,
                        model_version=job.model_version,
                        demo=self.models.demo_mode,
                        created=_created(job),
                    )
                ]
            self.outbox.enqueue(key, datasets, self.destinations)
        except Exception:  # a notice that cannot be written must not fail the job or the loop
            logger.exception("job %d: not-processed notice not written", job.id)


def _check_inputs(inputs: StudyInputs, serving: ServingModel) -> None:
    """Every channel the model needs has a volume; otherwise not processed with the volume's reason."""
    for channel in serving.manifest.inputs:
        role = channel.role.value
        if getattr(inputs, role, None) is None:
            detail = inputs.not_processed.get(role)
            raise NotProcessed(f"{role.upper()} missing" + (f": {detail}" if detail else ""))


def _created(job: Job) -> dt.datetime:
    """The outputs' creation time: the job's, so a retry builds identical bytes."""
    return dt.datetime.fromtimestamp(int(job.created_at), tz=dt.UTC)


def _with_pixels(references: Sequence[Dataset], study: StudyHeaders) -> list[Dataset]:
    """The reference instances read whole: the study holds headers only, the overlay draws on the pixels."""
    paths = {str(ds.SOPInstanceUID): path for series in study.series for path, ds in series.instances}
    return [open_dicom(paths[str(ds.SOPInstanceUID)]) for ds in references]


def _series_numbers(study: StudyHeaders) -> set[int]:
    return {series.number for series in study.series if series.number is not None}


_KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
}


def _output_kind(sop_class_uid: str) -> str:
    return _KINDS.get(str(sop_class_uid), "sc")


def start_workers(
    queue: JobQueue,
    index: StudyIndex,
    models: ModelSource,
    outbox: Outbox,
    data_dir: Path,
    stop: threading.Event,
    *,
    inference: InferenceSettings = InferenceSettings(),
    destinations: Sequence[Destination] = (),
    notify_not_processed: bool = False,
    count: int | None = None,
) -> list[threading.Thread]:
    """`inference.workers` worker threads (or `count`), after recovering the jobs of a previous run."""
    queue.recover(index)
    threads = []
    for number in range(1, (count or inference.workers) + 1):
        worker = Worker(
            queue, index, models, outbox, data_dir, inference=inference, destinations=destinations,
            notify_not_processed=notify_not_processed, name=f"worker-{number}",
        )
        thread = threading.Thread(target=worker.run, args=(stop,), name=worker.name, daemon=True)
        thread.start()
        threads.append(thread)
    return threads

