"""A worker on a real synthetic stroke study: real SQLite queue, studies table, outbox and model service.

The model is a tiny deterministic ONNX graph package (sigmoid of the z-scored DWI: "brighter than the head's mean"),
demo-signed like the defaults, so the test measures the worker, not the network; tests/test_worker_crash.py runs the
embedded default model.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from onnx import TensorProto, helper
from pydicom import dcmread

from dicom_gateway.outbox import Outbox, OutputKey
from dicom_gateway.roles import classify_study
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.studies import DATABASE_NAME, StudyIndex
from inference.jobs import JobQueue, JobState, results_dir
from inference.models import ModelService, ModelUnavailable
from inference.worker import Worker, installed_tasks, start_workers
from models.manifest import Task, default_manifest
from models.package import TrustPolicy, build_package
from models.signing import demo_private_key
from tests.test_studies import small_case as small_stroke_case
from tests.test_studies import spool
from training.synthetic import SiteProfile, generate_case
from training.synthetic.dicom_writer import write_dicom_study

STUDY_UID = "1.2.826.0.1.3680043.10.543.6.1"
OTHER_UID = "1.2.826.0.1.3680043.10.543.6.2"
OLD_FORMAT_UID = "1.2.826.0.1.3680043.10.543.6.3"
FLAIR_ONLY_UID = "1.2.826.0.1.3680043.10.543.6.4"
DESTINATION = "PACS@127.0.0.1:11112"  # never contacted here: deliveries stay pending
SITE = SiteProfile(name="worker", in_plane_mm=3.5, slice_thickness_mm=5.0, slice_spacing_mm=5.0)
SEG, SC, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], float]:
    """A synthetic stroke study (3.5 mm pixels, 5 mm slices: FLAIR, DWI b0 + b1000, ADC) and its true lesion volume;
    each test has its own node, so all use the one study."""
    case = generate_case("stroke", 4, site=SITE, size="medium", pattern="single", anatomy="procedural")
    paths = write_dicom_study(case, tmp_path_factory.mktemp("worker-study"), study_uid=STUDY_UID)
    return paths, sum(lesion.volume_ml for lesion in case.lesions)


def bright_dwi_graph(level: float = 2.5, steepness: float = 8.0) -> bytes:
    """probabilities = sigmoid(steepness · (z-scored DWI − level)): the voxels far brighter than the head's mean
    DWI, i.e. the synthetic infarct (restricted diffusion is bright on DWI)."""
    nodes = [
        helper.make_node("Split", ["image"], ["dwi", "adc"], axis=1, num_outputs=2),
        helper.make_node("Sub", ["dwi", "level"], ["centred"]),
        helper.make_node("Mul", ["centred", "steepness"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bright-dwi",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, "x", "y", "z"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 1, "x", "y", "z"])],
        [helper.make_tensor("level", TensorProto.FLOAT, [], [level]),
         helper.make_tensor("steepness", TensorProto.FLOAT, [], [steepness])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def tiny_package(out_dir: Path, version: int) -> Path:
    manifest = default_manifest(Task.STROKE_DWI_ADC, version, plan_sha256="c" * 64, demo=True,
                                description=f"test graph v{version}; not for clinical use")
    return build_package(out_dir, bright_dwi_graph(), manifest, demo_private_key())


@pytest.fixture
def service(tmp_path: Path) -> ModelService:
    """The node's model service in demo mode, serving the tiny graph as stroke version 1."""
    service = ModelService(tmp_path / "registry", TrustPolicy.demo(), [Task.STROKE_DWI_ADC], defaults_dir=None)
    service.start(watch=False)
    service.install(tiny_package(tmp_path / "v1", 1))
    return service


@pytest.fixture
def node(tmp_path: Path, service: ModelService):
    data_dir = tmp_path / "data"
    dicom = DicomSettings(destinations=(DESTINATION,))
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, dicom)
    queue = JobQueue(data_dir, dicom=dicom, installed=lambda: installed_tasks(service))
    outbox = Outbox(data_dir)
    yield Worker(queue, index, service, outbox, data_dir, destinations=dicom.parsed_destinations,
                 notify_not_processed=True)
    outbox.close()
    queue.close()
    index.close()


def receive(worker: Worker, paths: list[Path]) -> None:
    spool_root = worker.data_dir / SPOOL_DIRNAME
    stored = spool(paths, spool_root)
    worker.index.instances_stored(stored)
    worker.index.complete(stored[0].study_instance_uid)


def test_a_stroke_study_is_segmented_and_its_outputs_stored_once(node: Worker, study) -> None:
    paths, truth_ml = study
    receive(node, paths)

    job = node.run_once()

    assert job.state is JobState.DONE, job.reason
    assert job.task is Task.STROKE_DWI_ADC and job.model_version == "1" and job.attempts == 1
    out = results_dir(node.data_dir, STUDY_UID, 1, Task.STROKE_DWI_ADC)
    assert job.result_dir == out
    report = json.loads((out / "report.json").read_text())
    mask = nib.load(out / "mask.nii.gz")
    assert report["model_version"] == 1 and report["task"] == "stroke-dwi-adc"
    assert report["total_volume_ml"] == job.result.total_volume_ml and report["lesion_count"] == job.result.lesion_count
    assert report["lesion_count"] == int(np.asarray(mask.dataobj).max()) >= 1
    assert abs(report["total_volume_ml"] - truth_ml) < 0.5 * truth_ml, (report["total_volume_ml"], truth_ml)
    assert {"load", "inference", "postprocess"} <= set(report["timings"])
    assert {"results", "dicom_outputs"} <= set(job.result.timings)

    key = OutputKey(STUDY_UID, 1, "stroke", "1")
    stored = node.outbox.stored(key)
    classes = [instance.sop_class_uid for instance in stored]
    assert classes[0] == SEG and classes[-1] == SR and set(classes[1:-1]) == {SC}
    assert job.result.outputs == {
        "seg": stored[0].series_instance_uid, "sc": stored[1].series_instance_uid, "sr": stored[-1].series_instance_uid
    }
    seg = dcmread(stored[0].path)
    assert seg.StudyInstanceUID == STUDY_UID
    assert ["1", "not federated"] in [list(item.get("SoftwareVersions", [])) for item in seg.ContributingEquipmentSequence]
    assert len(seg.SegmentSequence) == report["lesion_count"]
    deliveries = node.outbox.deliveries(key)
    assert {d.destination for d in deliveries} == {DESTINATION} and len(deliveries) == len(stored)

    # A second run (reprocess with the same model) rebuilds nothing new: same UIDs, same rows, same bytes.
    before = {instance.sop_instance_uid: instance.path.read_bytes() for instance in stored}
    (again,) = node.queue.reprocess(STUDY_UID)
    rerun = node.run_once()
    assert (rerun.id, rerun.state, rerun.run) == (again.id, JobState.DONE, 2)
    assert {i.sop_instance_uid: i.path.read_bytes() for i in node.outbox.stored(key)} == before
    assert len(node.outbox.deliveries(key)) == len(deliveries)
    assert node.outbox.counts()["pending"] == len(stored)
    assert rerun.result.total_volume_ml == job.result.total_volume_ml
    assert node.run_once() is None  # nothing queued


def test_a_new_model_version_runs_only_when_asked(node: Worker, study, service, tmp_path: Path) -> None:
    receive(node, study[0])
    assert node.run_once().model_version == "1"
    assert service.install(tiny_package(tmp_path / "v2", 2)).version == 2
    assert node.run_once() is None  # the new version alone reprocesses nothing
    node.queue.reprocess(STUDY_UID)
    job = node.run_once()
    assert (job.state, job.model_version, job.run) == (JobState.DONE, "2", 2)
    v1, v2 = (node.outbox.stored(OutputKey(STUDY_UID, 1, "stroke", version)) for version in ("1", "2"))
    assert v1 and v2 and not {i.sop_instance_uid for i in v1} & {i.sop_instance_uid for i in v2}
    assert json.loads((job.result_dir / "report.json").read_text())["model_version"] == 2
    assert [j.model_version for j in node.queue.jobs_for_study(STUDY_UID)] == ["2", "1"]


class SwapDuringInference:
    """The service as a worker sees it, swapping in version 2 while the job that took version 1 runs."""

    def __init__(self, service: ModelService, package: Path) -> None:
        self.service, self.package = service, package

    def current(self, task: Task):
        serving = self.service.current(task)
        self.service.install(self.package)  # the registry watcher's swap, right after the worker took its model
        return serving

    def served_versions(self):
        return self.service.served_versions()


def test_a_job_in_flight_finishes_on_its_model(node: Worker, study, service, tmp_path: Path) -> None:
    receive(node, study[0])
    node.models = SwapDuringInference(service, tiny_package(tmp_path / "v2", 2))
    job = node.run_once()
    assert (job.state, job.model_version) == (JobState.DONE, "1")
    assert service.current(Task.STROKE_DWI_ADC).version == 2
    assert node.outbox.stored(OutputKey(STUDY_UID, 1, "stroke", "1"))


def test_broken_studies_end_their_own_jobs_and_the_loop_goes_on(node: Worker, study, tmp_path) -> None:
    dwi = [path for path in study[0] if path.parent.name == "4_dwi"]
    adc = [path for path in study[0] if path.parent.name == "5_adc"]
    receive(node, dwi + adc)
    spooled = node.index.study_files(STUDY_UID)
    adc_sops = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in adc}
    middle = sorted(p for p in spooled if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in adc_sops)[3]
    middle.unlink()  # the disk lost one ADC slice after the study completed
    # A study_ready row in a roles format of another release (as after an upgrade): routable, not loadable.
    other_release = StudyIndex(node.index.db_path, node.index.spool_root, node.index.settings,
                               describe_roles=lambda paths: {**classify_study(paths).to_dict(), "version": 99})
    old = spool(write_dicom_study(small_stroke_case(), tmp_path / "old", study_uid=OLD_FORMAT_UID),
                node.index.spool_root)
    other_release.instances_stored(old)
    other_release.complete(OLD_FORMAT_UID)
    other_release.close()
    receive(node, write_dicom_study(small_stroke_case(), tmp_path / "other", study_uid=OTHER_UID))
    flair_only = write_dicom_study(small_stroke_case(), tmp_path / "flair", study_uid=FLAIR_ONLY_UID)
    receive(node, [path for path in flair_only if path.parent.name == "2_flair"])

    stop = threading.Event()
    threads = start_workers(node.queue, node.index, node.models, node.outbox, node.data_dir, stop,
                            destinations=node.destinations, notify_not_processed=node.notify_not_processed)
    try:
        for _ in range(600):
            jobs = node.queue.list_jobs()
            if len(jobs) == 4 and all(job.state not in (JobState.QUEUED, JobState.RUNNING) for job in jobs):
                break
            stop.wait(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    missing, cut, fine = (node.queue.jobs_for_study(uid)[0] for uid in (STUDY_UID, OLD_FORMAT_UID, OTHER_UID))
    assert missing.state is JobState.NOT_PROCESSED and missing.reason.startswith("ADC missing: series 5:"), missing
    assert "missing or unevenly spaced slices" in missing.reason
    assert (cut.state, cut.reason) == (JobState.FAILED, "ValueError: roles_json version must be 1")
    assert fine.state is JobState.DONE and not any(thread.is_alive() for thread in threads)
    (notice,) = node.outbox.stored(OutputKey(STUDY_UID, 1, "stroke", "none"))  # notify_not_processed
    assert dcmread(notice.path).ImageComments == f"AI analysis not performed: {missing.reason}"
    (unmatched,) = node.queue.jobs_for_study(FLAIR_ONLY_UID)
    assert unmatched.state is JobState.NOT_PROCESSED and unmatched.task is None
    assert unmatched.reason.startswith("no task matched (stroke: no DWI series; ms: no model installed)")
    (notice,) = node.outbox.stored(OutputKey(FLAIR_ONLY_UID, 1, "none", "none"))
    assert dcmread(notice.path).ImageComments.startswith("AI analysis not performed: no task matched")


class NoModelServes:
    """A model source with nothing serving (an enrolled node before its first release is installed)."""

    demo_mode = False

    def current(self, task: Task):
        raise ModelUnavailable(f"no verified model serves {task.value}")

    def served_versions(self):
        return {}


def test_a_job_without_a_serving_model_is_not_processed_visibly(node: Worker, study) -> None:
    receive(node, study[0])
    node.models = NoModelServes()  # routed while a model served; gone when the worker plans the job
    job = node.run_once()
    assert (job.state, job.reason) == (JobState.NOT_PROCESSED, "no model: no verified model serves stroke-dwi-adc")
