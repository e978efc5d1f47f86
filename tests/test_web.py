"""The web page with Flask's test client on a real node state: a synthetic DICOM study recorded in the studies
table, routed by the job queue, segmented by the demo model through the real worker, outputs in the outbox."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_gateway.outbox import Outbox
from dicom_gateway.records import StoredInstance
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import SPOOL_DIRNAME
from dicom_gateway.studies import StudyIndex
from dicom_gateway.study_files import open_dicom
from inference.jobs import JobQueue, JobState, enabled_tasks
from inference.models import ModelService, trust_from_bundle
from inference.settings import NodeSettings, TasksSettings
from inference.worker import Worker, installed_tasks
from models.settings import ModelSettings

PATIENT_NAME = "Zyxwvut^Quixotic"
PATIENT_SHOWN = "Zyxwvut, Quixotic"
PATIENT_ID = "PID-4711-WEB"
PASSWORD = "correct horse battery staple"


@dataclass
class Node:
    data_dir: Path
    node_settings: NodeSettings
    dicom: DicomSettings
    studies: StudyIndex
    jobs: JobQueue
    models: ModelService
    outbox: Outbox
    study_uid: str

    def close(self) -> None:
        self.models.stop()
        self.jobs.close()
        self.outbox.close()
        self.studies.close()


def build_node(data_dir: Path, *, seed: int = 5) -> Node:
    """A node's data directory after one synthetic stroke study went through SCP bookkeeping, queue and worker."""
    from training.synthetic import generate_case
    from training.synthetic.dicom_writer import write_dicom_study

    case = generate_case("stroke", seed, anatomy="procedural")
    files = write_dicom_study(case, data_dir / SPOOL_DIRNAME / "incoming", patient_name=PATIENT_NAME,
                              patient_id=PATIENT_ID)
    studies = StudyIndex(data_dir / "dicom.sqlite3", data_dir / SPOOL_DIRNAME, DicomSettings())
    stored = []
    for path in files:
        ds = open_dicom(path, stop_before_pixels=True)
        stored.append(StoredInstance(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                     path, "MODALITY", path.stat().st_size, 0.0))
    studies.instances_stored(stored)
    study_uid = stored[0].study_instance_uid
    studies.complete(study_uid)
    models, jobs = stroke_only(data_dir)
    outbox = Outbox(data_dir)
    job = Worker(jobs, studies, models, outbox, data_dir).run_once()
    assert job is not None and job.state is JobState.DONE, job
    return Node(data_dir, NodeSettings(), DicomSettings(), studies, jobs, models, outbox, study_uid)


def stroke_only(data_dir: Path) -> tuple[ModelService, JobQueue]:
    """The demo stroke model served from the data directory's registry, and a queue routing stroke only."""
    tasks = TasksSettings(ms=False)
    models = ModelService(ModelSettings().registry_path(data_dir), trust_from_bundle(None, enabled_tasks(tasks)),
                          enabled_tasks(tasks))
    models.start(watch=False)
    jobs = JobQueue(data_dir, tasks=tasks, installed=lambda: installed_tasks(models))
    return models, jobs


def open_node(data_dir: Path) -> Node:
    """Reopen a data directory `build_node` filled (another test module's copy of the session fixture)."""
    studies = StudyIndex(data_dir / "dicom.sqlite3", data_dir / SPOOL_DIRNAME, DicomSettings())
    models, jobs = stroke_only(data_dir)
    study_uid = studies.list_studies()[0].study_uid
    return Node(data_dir, NodeSettings(), DicomSettings(), studies, jobs, models, Outbox(data_dir), study_uid)


@pytest.fixture(scope="session")
def web_node(tmp_path_factory: pytest.TempPathFactory):
    """One segmented study per test session, built once (about 25 s on 2 busy cores) and reopened by each module."""
    data_dir = tmp_path_factory.getbasetemp() / "web-node"
    marker = data_dir / ".built"
    node = open_node(data_dir) if marker.exists() else build_node(data_dir)
    marker.touch()
    yield node
    node.close()


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_user(node: Node) -> str:
    """A fresh account per test (the users database is the node's, shared by the tests)."""
    from inference.web.auth import UserStore

    name = f"radiologist-{secrets.token_hex(6)}"  # unique although this module is imported under two names
    store = UserStore(node.data_dir)
    store.add_user(name, PASSWORD)
    store.close()
    return name


def make_app(node: Node, clock: FakeClock | None = None, node_settings: NodeSettings | None = None):
    from inference.web import create_app

    app = create_app(node.data_dir, node_settings or node.node_settings, node.dicom, studies=node.studies,
                     jobs=node.jobs, models=node.models, outbox=node.outbox, **({"clock": clock} if clock else {}))
    app.config["TESTING"] = True
    return app


def csrf_from(html: str) -> str:
    import re

    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1)


def login(client, name: str, password: str = PASSWORD, next_path: str = ""):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    url = "/login" + (f"?next={next_path}" if next_path else "")
    return client.post(url, data={"username": name, "password": password, "csrf_token": token})


@pytest.fixture()
def client(web_node: Node):
    app = make_app(web_node)
    with app.test_client() as test_client:
        test_client.user = new_user(web_node)
        assert login(test_client, test_client.user).status_code == 302
        yield test_client


def test_study_list_shows_patient_context_status_and_volume(client, web_node: Node) -> None:
    html = client.get("/studies").get_data(as_text=True)
    assert PATIENT_SHOWN in html
    assert PATIENT_ID in html
    header = open_dicom(web_node.studies.study_files(web_node.study_uid)[0], stop_before_pixels=True)
    assert header.AccessionNumber and header.AccessionNumber in html
    date = str(header.StudyDate)
    assert f"{date[:4]}-{date[4:6]}-{date[6:]}" in html
    assert str(header.StudyDescription) in html
    job = next(j for j in web_node.jobs.jobs_for_study(web_node.study_uid) if j.state is JobState.DONE)
    assert f"{job.result.total_volume_ml:.2f}" in html and "stroke" in html
    assert "DEMO MODEL – NOT FOR CLINICAL USE" in html


def test_study_page_has_viewer_lesions_timings_downloads_and_is_audited(client, web_node: Node) -> None:
    from inference.web.audit import AuditLog

    response = client.get(f"/studies/{web_node.study_uid}")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert '<canvas id="canvas"' in html and "viewer.js" in html
    assert "not for primary diagnosis" in html and "DEMO MODEL – NOT FOR CLINICAL USE" in html
    report = next(j for j in web_node.jobs.jobs_for_study(web_node.study_uid) if j.state is JobState.DONE).result
    assert f"{report.lesion_count} lesion(s)" in html and "Timings" in html and "inference" in html
    assert f'/studies/{web_node.study_uid}/stroke/mask.nii.gz"' in html
    assert 'name="csrf_token"' in html and 'id="reprocess"' in html
    events = [e for e in AuditLog(web_node.data_dir).events() if e["user"] == client.user]
    assert [(e["action"], e["study_uid"]) for e in events][-1] == ("view", web_node.study_uid)


def test_downloads_are_the_job_results_and_are_audited(client, web_node: Node) -> None:
    import gzip
    import json

    import nibabel as nib

    from inference.web.audit import AuditLog

    mask = client.get(f"/studies/{web_node.study_uid}/stroke/mask.nii.gz")
    assert mask.status_code == 200 and "attachment" in mask.headers["Content-Disposition"]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(mask.data))
    report = json.loads(client.get(f"/studies/{web_node.study_uid}/stroke/report.json").data)
    assert report["study_uid"] == web_node.study_uid and report["task"] == "stroke-dwi-adc"
    voxels = int((image.get_fdata() > 0).sum())
    assert voxels == sum(lesion["voxel_count"] for lesion in report["lesions"])
    events = [(e["action"], e.get("file")) for e in AuditLog(web_node.data_dir).events() if e["user"] == client.user]
    assert ("download", "mask.nii.gz") in events and ("download", "report.json") in events
    assert client.get(f"/studies/{web_node.study_uid}/ms/mask.nii.gz").status_code == 404  # MS not run here


def test_json_api_covers_studies_study_models_and_node(client, web_node: Node) -> None:
    listing = client.get("/api/studies").get_json()
    row = next(s for s in listing["studies"] if s["study_uid"] == web_node.study_uid)
    assert row["patient_id"] == PATIENT_ID and row["status"] == "done"
    task = row["tasks"][0]
    assert task["task"] == "stroke" and task["model_version"] == "1" and task["total_volume_ml"] > 0
    detail = client.get(f"/api/studies/{web_node.study_uid}").get_json()["study"]
    result = detail["results"][0]
    assert result["report"]["lesion_count"] == len(result["report"]["lesions"]) == result["lesion_count"]
    assert set(result["downloads"]) == {"mask.nii.gz", "report.json"}
    models = client.get("/api/models").get_json()
    assert models["demo_mode"] is True and models["banner"] == "DEMO MODEL – NOT FOR CLINICAL USE"
    serving = models["tasks"]["stroke-dwi-adc"]["serving"]
    assert serving["version"] == 1 and "federated_round" in serving and "validation_metrics" in serving
    node = client.get("/api/node").get_json()
    assert node["jobs"]["done"] >= 1 and set(node["outbox"]) == {"pending", "sent", "dead-letter"}
    assert node["disk"]["free_bytes"] > 0 and node["disk"]["min_free_bytes"] == web_node.dicom.min_free_disk_bytes
    assert client.get("/api/studies/1.2.3.4.5").status_code == 404


def test_viewer_slices_and_overlay_come_from_the_source_and_the_mask(client, web_node: Node) -> None:
    import nibabel as nib
    import numpy as np

    volumes = client.get(f"/api/studies/{web_node.study_uid}/volumes").get_json()["volumes"]
    assert set(volumes) == {"dwi", "adc", "flair"} and all(v["overlay"] for v in volumes.values())
    dwi = volumes["dwi"]
    best = dwi["best_slice"]
    raw = client.get(f"/api/studies/{web_node.study_uid}/volumes/dwi/{best}")
    pixels = np.frombuffer(raw.data, "<f4")
    assert pixels.size == dwi["rows"] * dwi["columns"] and pixels.max() > 0
    overlay = np.frombuffer(client.get(f"/api/studies/{web_node.study_uid}/overlay/dwi/{best}").data, np.uint8)
    assert overlay.size == pixels.size and overlay.sum() > 0
    mask = nib.load(client.application.extensions["fedlesion"].data.overlay_mask(web_node.study_uid, "dwi"))
    expected = (np.asarray(mask.dataobj)[:, :, best] > 0).T.ravel()  # the mask is on the DWI grid: no resampling
    np.testing.assert_array_equal(overlay, expected)
    assert best == int(np.argmax((np.asarray(mask.dataobj) > 0).sum(axis=(0, 1))))
    adc = volumes["adc"]
    adc_overlay = client.get(f"/api/studies/{web_node.study_uid}/overlay/adc/{adc['best_slice']}").data
    assert np.frombuffer(adc_overlay, np.uint8).sum() > 0
    assert client.get(f"/api/studies/{web_node.study_uid}/volumes/dwi/{dwi['slices']}").status_code == 404
    assert client.get(f"/api/studies/{web_node.study_uid}/volumes/t1/0").status_code == 404


def test_models_page_shows_provenance_and_a_refused_package(client, web_node: Node, tmp_path: Path) -> None:
    import shutil

    from inference.models import DEFAULTS_DIR
    from models.errors import PackageRefused
    from models.manifest import Task

    tampered = tmp_path / "stroke-dwi-adc"
    shutil.copytree(DEFAULTS_DIR / "stroke-dwi-adc", tampered)
    with (tampered / "model.onnx").open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(PackageRefused):
        web_node.models.install(tampered)
    html = client.get("/models").get_data(as_text=True)
    assert "DEMO MODEL – NOT FOR CLINICAL USE" in html and "Federated round" in html
    serving = web_node.models.current(Task.STROKE_DWI_ADC)
    assert serving.package.manifest_sha256 in html
    refusal = web_node.models.refusals()[0]
    assert refusal.kind in html and 'id="refusals"' in html


def test_healthz_needs_no_login_and_names_versions(web_node: Node) -> None:
    with make_app(web_node).test_client() as anonymous:
        body = anonymous.get("/healthz").get_json()
    assert body["ok"] is True and body["models"] == {"stroke-dwi-adc": 1} and body["demo_mode"] is True


def test_metrics_have_jobs_latency_models_disk_outbox_and_no_patient_data(web_node: Node) -> None:
    with make_app(web_node).test_client() as anonymous:
        text = anonymous.get("/metrics").get_data(as_text=True)
    assert 'fedlesion_jobs{state="done"}' in text
    assert 'fedlesion_job_run_seconds_count{task="stroke"}' in text
    assert 'fedlesion_job_stage_seconds_mean{task="stroke",stage="inference"}' in text
    assert 'fedlesion_model_version{task="stroke-dwi-adc"} 1' in text and "fedlesion_demo_mode 1" in text
    assert "fedlesion_disk_free_bytes " in text and "fedlesion_disk_watermark_bytes " in text
    assert 'fedlesion_outbox_deliveries{state="dead-letter"} 0' in text
    for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, web_node.study_uid):
        assert secret not in text


def test_reprocess_adds_a_run_that_the_worker_finishes(client, web_node: Node) -> None:
    page = client.get(f"/studies/{web_node.study_uid}").get_data(as_text=True)
    before = len(web_node.jobs.jobs_for_study(web_node.study_uid))
    response = client.post(f"/studies/{web_node.study_uid}/reprocess", data={"csrf_token": csrf_from(page)})
    assert response.status_code == 302
    jobs = web_node.jobs.jobs_for_study(web_node.study_uid)
    assert len(jobs) == before + 1 and jobs[0].state is JobState.QUEUED and jobs[0].queue_position == 1
    listing = _listed(client, web_node.study_uid)
    assert listing["status"] == "queued" and listing["tasks"][0]["queue_position"] == 1
    done = Worker(web_node.jobs, web_node.studies, web_node.models, web_node.outbox, web_node.data_dir).run_once()
    assert done is not None and done.state is JobState.DONE and done.run == jobs[0].run
    assert _listed(client, web_node.study_uid)["status"] == "done"


def _listed(client, study_uid: str) -> dict:
    return next(s for s in client.get("/api/studies").get_json()["studies"] if s["study_uid"] == study_uid)


def test_a_study_still_receiving_is_listed_and_cannot_be_reprocessed(client, web_node: Node) -> None:
    from pydicom.uid import generate_uid

    source = web_node.studies.study_files(web_node.study_uid)[0]
    ds = open_dicom(source)
    ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientName = generate_uid(), generate_uid(), "Receiving^Still"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = web_node.data_dir / SPOOL_DIRNAME / "incoming-2" / "1.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    web_node.studies.instances_stored([StoredInstance(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID,
                                                      ds.SeriesInstanceUID, path, "MODALITY", 1, 0.0)])
    row = _listed(client, ds.StudyInstanceUID)
    assert row["status"] == "receiving" and row["patient_name"] == "Receiving, Still" and row["tasks"] == []
    token = client.get("/studies").get_data(as_text=True)
    response = client.post(f"/api/studies/{ds.StudyInstanceUID}/reprocess", headers={"X-CSRF-Token": csrf_from(token)})
    assert response.status_code == 409 and "no job exists" in response.get_json()["detail"]


def test_logs_carry_no_patient_data(client, web_node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    client.get(f"/studies/{web_node.study_uid}")
    client.get(f"/studies/{web_node.study_uid}/stroke/report.json")
    client.post("/login", data={"username": "nobody", "password": "x", "csrf_token": "forged"})
    assert PATIENT_NAME.split("^")[0] not in caplog.text and PATIENT_ID not in caplog.text


def test_user_add_command_stores_a_salted_scrypt_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sqlite3

    from fedlesion.cli import main
    from inference.web.auth import LoginOutcome, UserStore

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    for name in ("alice", "bob"):
        monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
        assert main(["--config", str(config), "user", "add", name, "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["--config", str(config), "user", "add", "alice", "--password-stdin"]) == 2
    assert "exists already" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["--config", str(config), "user", "add", "carol", "--password-stdin"]) == 2
    database = tmp_path / "data" / "users.sqlite3"
    assert database.stat().st_mode & 0o777 == 0o600
    rows = sqlite3.connect(database).execute("SELECT name, salt, hash FROM users ORDER BY name").fetchall()
    assert [row[0] for row in rows] == ["alice", "bob"]
    assert rows[0][1] != rows[1][1] and rows[0][2] != rows[1][2]  # per-user salt
    assert PASSWORD.encode() not in database.read_bytes()
    store = UserStore(tmp_path / "data")
    assert store.login("alice", PASSWORD).outcome is LoginOutcome.OK
    assert store.login("alice", PASSWORD + "!").outcome is LoginOutcome.BAD_CREDENTIALS
    store.close()
