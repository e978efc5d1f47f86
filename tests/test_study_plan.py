"""`fedlesion segment` and the node's worker pick the same series and the same model for one study (study_plan).

The study holds two DWI series (b = 1000 and b = 500); the node's registry serves a b = 500 model (range 300–700) as
version 1, and its version 2 is tampered. Both paths must refuse version 2 and serve version 1, and both must take
the b = 500 series although the roles stored at completion (default b range) chose the b = 1000 one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from onnx_graphs import first_channel_sigmoid
from pydicom.uid import generate_uid

from dicom_gateway.outbox import Outbox
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.studies import DATABASE_NAME, StudyIndex
from fedlesion.cli import main
from inference.jobs import JobQueue, JobState, results_dir
from inference.models import ModelService, trust_from_bundle
from inference.settings import TasksSettings
from inference.study_plan import default_task
from inference.worker import Worker, installed_tasks
from models.manifest import ADC_UNIT, InputChannel, OutputSpec, Role, Task, default_manifest
from models.package import TrustPolicy, build_package
from models.registry import Registry
from models.settings import ModelSettings
from models.signing import demo_private_key
from tests.test_studies import spool
from training.synthetic import SiteProfile, generate_case
from training.synthetic.dicom_writer import write_dicom_study

B500_SERIES_NUMBER = 7


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic stroke study plus a copy of its DWI series acquired at b = 500 (SeriesNumber 7)."""
    folder = tmp_path_factory.mktemp("study")
    site = SiteProfile(name="plan", in_plane_mm=2.0, slice_thickness_mm=4.0, slice_spacing_mm=4.0)
    write_dicom_study(generate_case("stroke", 5, site=site, size="small", pattern="single", anatomy="procedural"), folder)
    b500 = folder / f"{B500_SERIES_NUMBER}_dwi"
    b500.mkdir()
    series_uid = generate_uid()
    for path in sorted((folder / "4_dwi").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, B500_SERIES_NUMBER, "DWI b500"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if float(ds.DiffusionBValue) > 0:
            ds.DiffusionBValue = 500.0
        ds.save_as(b500 / path.name)
    return folder


def publish_models(registry_dir: Path, work: Path) -> None:
    """Version 1: a b = 500 stroke model; version 2: a newer one whose ONNX bytes were changed after signing."""
    inputs = (
        InputChannel("dwi", Role.DWI, b_value=500, b_value_range=(300, 700)),
        InputChannel("adc", Role.ADC, unit=ADC_UNIT),
    )
    for version in (1, 2):
        manifest = default_manifest(
            Task.STROKE_DWI_ADC, version, plan_sha256="e" * 64, demo=True, description=f"b500 v{version}",
            output=OutputSpec(threshold=0.9),
        )
        manifest = dataclasses.replace(manifest, inputs=inputs)
        package = build_package(work / f"v{version}", first_channel_sigmoid(2), manifest, demo_private_key())
        if version == 1:
            Registry(registry_dir, TrustPolicy.demo()).publish(package)
        else:
            target = registry_dir / Task.STROKE_DWI_ADC.value / "2"
            shutil.copytree(package, target)
            with (target / "model.onnx").open("ab") as onnx:
                onnx.write(b"\0")


def worker_report(data_dir: Path, study_folder: Path) -> dict:
    """The study sent to the node: spooled, completed with the default roles, run by one worker pass."""
    tasks = [Task.STROKE_DWI_ADC]
    models = ModelService(ModelSettings().registry_path(data_dir), trust_from_bundle(None, tasks), tasks)
    models.start(watch=False)
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings())
    queue = JobQueue(data_dir, tasks=TasksSettings(ms=False), installed=lambda: installed_tasks(models))
    outbox = Outbox(data_dir)
    try:
        stored = spool(sorted(study_folder.rglob("*.dcm")), data_dir / SPOOL_DIRNAME)
        index.instances_stored(stored)
        study_uid = stored[0].study_instance_uid
        index.complete(study_uid)
        (row,) = index.ready_rows()
        assert row.roles["dwi"]["series_number"] == 4  # the default b range took the b = 1000 series
        job = Worker(queue, index, models, outbox, data_dir).run_once()
        assert job is not None and job.state is JobState.DONE, job
        report = results_dir(data_dir, study_uid, 1, Task.STROKE_DWI_ADC) / "report.json"
        return json.loads(report.read_text(encoding="utf-8"))
    finally:
        outbox.close()
        queue.close()
        index.close()


def test_segment_and_the_worker_choose_the_same_series_and_model(
    study_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    publish_models(data_dir / "registry", tmp_path)
    monkeypatch.delenv("FEDLESION_CONFIG", raising=False)
    monkeypatch.setenv("FEDLESION_STORAGE__DATA_DIR", str(data_dir))

    assert main(["segment", str(study_folder), "--out", str(tmp_path / "cli"), "--json"]) == 0, capsys.readouterr()
    from_cli = json.loads(capsys.readouterr().out)
    from_node = worker_report(data_dir, study_folder)

    for report in (from_cli, from_node):
        assert report["model_version"] == 1  # version 2 is refused by both
        assert [s["series_number"] for s in report["series"]] == [B500_SERIES_NUMBER, 5]
    assert from_cli["model"] == from_node["model"]
    assert from_cli["series"] == from_node["series"]
    assert from_cli["dwi_b_value"] == from_node["dwi_b_value"] == 500.0


def test_default_task_is_the_first_task_whose_first_role_has_a_series() -> None:
    assert default_task({Role.DWI, Role.ADC, Role.FLAIR}) is Task.STROKE_DWI_ADC
    assert default_task({Role.DWI}) is Task.STROKE_DWI_ADC  # then refused for its missing ADC, as the node would
    assert default_task({Role.ADC, Role.FLAIR}) is Task.MS_FLAIR
    with pytest.raises(ValueError, match="neither a DWI nor a FLAIR series"):
        default_task({Role.ADC})
