"""`fedlesion node` end to end (issue 5 "Done when"), beside a real Orthanc in its own network namespace.

One Orthanc and one node data directory for the module, because each node start warms its model up. The node
serves a model whose output is known, not a trained one (whose accuracy is the benchmarks' business): a signed
package of `first_channel_sigmoid` read at 0.9, which marks the voxels whose z-scored DWI exceeds ln 9 ≈ 2.2. The
study is the synthetic stroke case's geometry (one large lesion on the patient's left) with two-level images: DWI
100 in the brain and 300 in the lesion, so the model marks exactly the lesion's voxels and the SEG must hold exactly
them. It is generated once and written twice under two Study Instance UIDs. The node runs with torch, MONAI and
onnx blocked from import, as in the `.[cpu]`-only install of a limited center.
  A — pushed by Orthanc, completed with the explicit trigger, processed normally: SEG, SC and SR come back to
      Orthanc; the SEG's lesion voxels are read back through Orthanc's REST API; the web page lists A.
  B — a tampered version 2 of the stroke model is dropped into the registry first (refused, version 1 keeps
      serving); then B is pushed and the node is killed with SIGKILL while B's job runs; after a restart the job
      completes once (two attempts, one done row) and Orthanc holds exactly one set of outputs with the UIDs the
      outbox recorded, each sent once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest

from dicom_gateway.outbox import DeliveryState, Outbox, OutputKey
from inference.node import check_onnxruntime_install
from models.geometry import swap_ras_lps, voxel_volume_ml
from models.manifest import OutputSpec, Task, default_manifest, parse_manifest
from models.package import build_package
from models.signing import demo_private_key
from tests.conftest import REPO_ROOT, WITHOUT_TORCH
from tests.onnx_graphs import first_channel_sigmoid
from tests.orthanc import Orthanc, require_orthanc, start_orthanc
from training.synthetic import SyntheticCase, generate_case
from training.synthetic.dicom_writer import write_dicom_study

NODE_AET = "FEDLESION"
NODE_DICOM_PORT = 11112  # inside the test's own network namespace: nothing else can bind there
NODE_WEB_PORT = 8080
STUDY_A = "1.2.826.0.1.3680043.10.1371.5.1"
STUDY_B = "1.2.826.0.1.3680043.10.1371.5.2"
SEED = 1  # generate_case("stroke", 1, size="large", pattern="single"): one ≈110 ml lesion, patient left
ADMIN_PASSWORD = "e2e-Password-1234"
KNOWN_MODEL_THRESHOLD = 0.9  # sigmoid(z) ≥ 0.9: z-scored DWI above ln 9 ≈ 2.2, only the lesion in the phantom
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 420

# The node as a limited center runs it: torch, MONAI and onnx cannot be imported in its process.
_NODE_WITHOUT_TORCH = WITHOUT_TORCH + """
from fedlesion.cli import main
sys.exit(main(["node"]))
"""

# In the namespace: log in through the form (CSRF token from the page, session cookie), then GET an API path.
_WEB_CLIENT = """
import http.cookiejar, re, sys, urllib.parse, urllib.request
base, user, password, path = sys.argv[1:5]
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
page = opener.open(base + "/login", timeout=30).read().decode()
token = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]
form = urllib.parse.urlencode({"csrf_token": token, "username": user, "password": password}).encode()
opener.open(urllib.request.Request(base + "/login", data=form, method="POST"), timeout=30).read()
sys.stdout.write(opener.open(base + path, timeout=30).read().decode())
"""

# In the namespace: GET one unauthenticated path and print the body (for /healthz and a refused /api call).
_GET = """
import sys, urllib.error, urllib.request
try:
    sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())
except urllib.error.HTTPError as error:
    sys.stdout.write(f"HTTP {error.code}")
"""


@dataclass
class NodeRun:
    orthanc: Orthanc
    data_dir: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """`fedlesion node` in Orthanc's namespace; returns once it printed its start line."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.process = self.orthanc.start([sys.executable, "-c", _NODE_WITHOUT_TORCH], log=self.log, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"node exited {self.process.returncode}: {self.log_text()[-4000:]}")
            if "fedlesion node: AE" in self.log.read_bytes()[offset:].decode(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"node never started: {self.log_text()[-4000:]}")

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)  # nsenter exec'd the node: this PID is the node itself
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str, input: str | None = None) -> str:
        """A fedlesion command against the node's data directory (outside the namespace: files only)."""
        result = subprocess.run([sys.executable, "-m", "fedlesion", *args], env=self.env, cwd=REPO_ROOT,
                                capture_output=True, text=True, input=input, timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def web(self, path: str) -> Any:
        return json.loads(self.orthanc.python(
            _WEB_CLIENT, f"http://127.0.0.1:{NODE_WEB_PORT}", "admin", ADMIN_PASSWORD, path
        ))

    def jobs(self, study_uid: str) -> list[sqlite3.Row]:
        with sqlite3.connect(f"file:{self.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=5) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,)).fetchall()


@dataclass
class Scenario:
    node: NodeRun
    orthanc: Orthanc
    case: SyntheticCase
    inputs: dict[str, int]  # study UID → instances Orthanc held before the node answered
    killed_during: str  # the job state seen just before the SIGKILL
    refused_before_b: dict[str, Any]
    tmp: Path


def orthanc_study(orthanc: Orthanc, study_uid: str) -> str:
    (found,) = [item for item in orthanc.rest("POST", "/tools/lookup", study_uid.encode()) if item["Type"] == "Study"]
    return found["ID"]


def orthanc_series(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    study = orthanc_study(orthanc, study_uid)
    return orthanc.rest("GET", f"/studies/{study}/series?expand")


def wait_for(predicate: Any, timeout_s: float, what: str, node: NodeRun, poll_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}; node log tail:\n{node.log_text()[-4000:]}")


def all_sent(data_dir: Path, key: OutputKey) -> bool:
    outbox = Outbox(data_dir)
    try:
        deliveries = outbox.deliveries(key)
        return bool(deliveries) and all(d.state is DeliveryState.SENT for d in deliveries)
    finally:
        outbox.close()


def push_and_complete(scenario_node: NodeRun, orthanc: Orthanc, study_uid: str) -> None:
    """Orthanc C-STOREs the study to the node (synchronous job), then the explicit completion trigger."""
    orthanc.rest("POST", "/modalities/fedlesion/store",
                 {"Resources": [orthanc_study(orthanc, study_uid)], "Synchronous": True})
    assert "ready" in scenario_node.cli("study", "complete", study_uid)


def two_level_case() -> SyntheticCase:
    """The synthetic stroke case's grid, brain and lesion, with noise-free two-level images: what the known model
    marks in it is exactly the lesion."""
    case = generate_case("stroke", SEED, size="large", pattern="single")
    assert case.brain_mask is not None
    brain, lesion = case.brain_mask > 0, case.lesion_labels > 0
    levels = {
        "dwi_b0": 100.0 * brain,
        "dwi_b1000": 100.0 * brain + 200.0 * lesion,
        "adc": 800.0 * brain - 400.0 * lesion,  # µm²/s: a plausible brain and infarct
        "flair": 100.0 * brain + 100.0 * lesion,
        "t1_flair": 100.0 * brain,
    }
    return replace(case, images={key: levels[key].astype(np.float32) for key in case.images})


def known_model(tmp: Path, version: int = 1) -> Path:
    """The stroke task's package of `first_channel_sigmoid`, at the synthetic case's 2 mm so that the model's grid is
    the study's own, signed with the demo key."""
    manifest = default_manifest(Task.STROKE_DWI_ADC, version, plan_sha256="e" * 64, demo=True,
                                description="e2e known model; not for clinical use",
                                output=OutputSpec(threshold=KNOWN_MODEL_THRESHOLD))
    assert manifest.preprocessing.target_spacing_mm == (2.0, 2.0, 2.0)
    return build_package(tmp / f"known-v{version}", first_channel_sigmoid(2), manifest, demo_private_key())


def tampered_version_2(version_1: Path, tmp: Path) -> Path:
    """The version 1 package re-signed as version 2 with the demo key, then one byte of model.onnx flipped."""
    manifest = parse_manifest((version_1 / "manifest.json").read_bytes())
    package = build_package(tmp / "stroke-v2", (version_1 / "model.onnx").read_bytes(),
                            replace(manifest, version=2, files={}), demo_private_key())
    onnx = bytearray((package / "model.onnx").read_bytes())
    onnx[len(onnx) // 2] ^= 0x01
    (package / "model.onnx").write_bytes(bytes(onnx))
    return package


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    require_orthanc()
    tmp = tmp_path_factory.mktemp("node-e2e")
    case = two_level_case()
    assert len(case.lesions) == 1 and case.lesions[0].side == "left"
    files = {
        uid: write_dicom_study(case, tmp / uid, patient_name="E2E^Stroke", patient_id=f"E2E{n}", study_uid=uid)
        for n, uid in enumerate((STUDY_A, STUDY_B))
    }
    orthanc = start_orthanc(tmp / "orthanc", {"fedlesion": (NODE_AET, "127.0.0.1", NODE_DICOM_PORT)})
    try:
        for paths in files.values():
            orthanc.upload(paths)
        data_dir = tmp / "node-data"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "FEDLESION_STORAGE__DATA_DIR": str(data_dir),
            "FEDLESION_NODE__AE_TITLE": NODE_AET,
            "FEDLESION_NODE__DICOM_PORT": str(NODE_DICOM_PORT),
            "FEDLESION_NODE__WEB_PORT": str(NODE_WEB_PORT),
            "FEDLESION_DICOM__DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "FEDLESION_DICOM__INACTIVITY_TIMEOUT_S": "600",  # only the explicit trigger completes a study
            "FEDLESION_TASKS__MS": "false",
            "FEDLESION_INFERENCE__REGISTRY_POLL_S": "0.5",
        }
        node = NodeRun(orthanc, data_dir, env, tmp / "node.log")
        node.cli("user", "add", "admin", "--password-stdin", input=ADMIN_PASSWORD + "\n")
        version_1 = known_model(tmp)
        node.cli("model", "publish", str(version_1), "--registry", str(data_dir / "registry"))
        inputs = {uid: len(paths) for uid, paths in files.items()}
        node.start()

        # A: a normal run.
        push_and_complete(node, orthanc, STUDY_A)
        wait_for(lambda: all_sent(data_dir, OutputKey(STUDY_A, 1, "stroke", "1")), JOB_TIMEOUT_S, "A's outputs", node)

        # A tampered version 2 appears in the registry: refused, version 1 keeps serving.
        tampered = tampered_version_2(version_1, tmp)
        staged = data_dir / "registry" / "staged-v2"  # not a version name: the watcher ignores it until the rename
        shutil.copytree(tampered, staged)
        staged.rename(data_dir / "registry" / "stroke-dwi-adc" / "2")

        def refused_models() -> dict[str, Any] | None:
            models = node.web("/api/models")
            return models if models["refusals"] else None

        refused = wait_for(refused_models, 60, "the refusal of the tampered package", node)

        # B: SIGKILL while its job runs, then a restart.
        push_and_complete(node, orthanc, STUDY_B)
        state = wait_for(lambda: next((r["state"] for r in node.jobs(STUDY_B) if r["state"] == "running"), None),
                         120, "B's job to start", node, poll_s=0.1)
        time.sleep(0.5)  # into reading the study and running the model (the job takes seconds)
        assert [r["state"] for r in node.jobs(STUDY_B)] == ["running"]
        node.kill9()
        assert not all_sent(data_dir, OutputKey(STUDY_B, 1, "stroke", "1"))
        node.start()
        wait_for(lambda: all_sent(data_dir, OutputKey(STUDY_B, 1, "stroke", "1")), JOB_TIMEOUT_S, "B's outputs", node)
        yield Scenario(node, orthanc, case, inputs, state, refused, tmp)
        assert node.terminate() == 0, node.log_text()[-3000:]
    finally:
        orthanc.stop()


def output_series(scenario: Scenario, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Orthanc's series of the study that the node wrote, by modality."""
    outbox = Outbox(scenario.node.data_dir)
    try:
        ours = {i.series_instance_uid for i in outbox.stored(OutputKey(study_uid, 1, "stroke", "1"))}
    finally:
        outbox.close()
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc_series(scenario.orthanc, study_uid):
        if series["MainDicomTags"]["SeriesInstanceUID"] in ours:
            by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return by_modality


def seg_lesion_voxels(scenario: Scenario, study_uid: str) -> tuple[np.ndarray, float]:
    """The SEG as stored in Orthanc, fetched through its REST API: (centres of its lesion voxels in LPS mm, one
    voxel's volume in ml)."""
    (seg_series,) = output_series(scenario, study_uid)["SEG"]
    (seg_instance,) = seg_series["Instances"]
    sop = scenario.orthanc.rest("GET", f"/instances/{seg_instance}")["MainDicomTags"]["SOPInstanceUID"]
    seg_path = scenario.orthanc.fetch_instances([sop], scenario.tmp / f"fetched-{study_uid}")[sop]
    volume = hd.seg.segread(seg_path).get_volume(combine_segments=True)
    voxels = np.argwhere(volume.array > 0)
    centres_lps = voxels @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    return centres_lps, voxel_volume_ml(volume.affine)


@pytest.mark.slow
def test_seg_sc_and_sr_arrive_with_the_lesion_on_the_correct_side(scenario: Scenario) -> None:
    series = output_series(scenario, STUDY_A)
    assert len(series.get("SEG", [])) == 1 and len(series.get("SR", [])) == 1
    assert len([s for modality, group in series.items() if modality not in ("SEG", "SR") for s in group]) == 1
    centres_lps, voxel_ml = seg_lesion_voxels(scenario, STUDY_A)
    seg_ml = len(centres_lps) * voxel_ml
    (row,) = scenario.node.jobs(STUDY_A)
    reported_ml = json.loads(row["result_json"])["total_volume_ml"]
    assert centres_lps.mean(axis=0)[0] > 0, "the lesion is on the patient's left: LPS x > 0"
    assert seg_ml == pytest.approx(reported_ml, rel=0.01)  # the SEG says what the report says


@pytest.mark.slow
def test_seg_holds_exactly_the_voxels_the_known_model_marks(scenario: Scenario) -> None:
    """The pipeline (DICOM in, preprocessing, model, back to the source grid, SEG through Orthanc) neither moves,
    flips, grows nor loses a voxel: the SEG's voxels are the two-level phantom's lesion voxels, so its volume, side
    and centroid are the synthetic truth's."""
    case = scenario.case
    (truth,) = case.lesions
    centres_lps, voxel_ml = seg_lesion_voxels(scenario, STUDY_A)
    on_case = np.linalg.solve(case.affine, np.c_[swap_ras_lps(centres_lps), np.ones(len(centres_lps))].T)[:3].T
    indices = np.rint(on_case).astype(int)
    assert np.abs(on_case - indices).max() < 1e-3, "SEG voxel centres are the study's voxel centres"
    assert {tuple(v) for v in indices} == {tuple(v) for v in np.argwhere(case.lesion_labels > 0)}
    assert len(centres_lps) * voxel_ml == pytest.approx(truth.volume_ml, abs=1e-6)
    assert np.allclose(swap_ras_lps(centres_lps.mean(axis=0)), truth.centroid_ras_mm, atol=1e-3)
    assert truth.side == "left" and centres_lps.mean(axis=0)[0] > 0
    (row,) = scenario.node.jobs(STUDY_A)
    assert json.loads(row["result_json"])["total_volume_ml"] == pytest.approx(truth.volume_ml, abs=0.01)


@pytest.mark.slow
def test_web_page_shows_the_study(scenario: Scenario) -> None:
    refused = scenario.orthanc.python(_GET, f"http://127.0.0.1:{NODE_WEB_PORT}/api/studies")
    assert refused.startswith("HTTP 401") or "login required" in refused  # no session, no data
    listing = scenario.node.web("/api/studies")
    assert listing["demo_mode"] is True
    (row,) = [study for study in listing["studies"] if study["study_uid"] == STUDY_A]
    assert row["status"] == "done" and row["patient_name"] == "E2E, Stroke"  # patient context for the reader
    (task,) = row["tasks"]
    assert task["task"] == "stroke" and task["model_version"] == "1" and task["total_volume_ml"] > 0
    detail = scenario.node.web(f"/api/studies/{STUDY_A}")["study"]
    assert detail["status"] == "done" and detail["results"][0]["report"]["total_volume_ml"] > 0
    health = json.loads(scenario.orthanc.python(_GET, f"http://127.0.0.1:{NODE_WEB_PORT}/healthz"))
    assert health["ok"] is True


@pytest.mark.slow
def test_node_log_carries_uids_never_patient_names_or_ids(scenario: Scenario) -> None:
    log = scenario.node.log_text()
    assert STUDY_A in log and STUDY_B in log  # what happened is traceable by UID and job ID
    for patient in ("E2E^Stroke", "E2E, Stroke", "Stroke", "E2E0", "E2E1"):
        assert patient not in log


@pytest.mark.slow
def test_kill_9_mid_job_completes_once_with_the_same_uids(scenario: Scenario) -> None:
    assert scenario.killed_during == "running"
    rows = scenario.node.jobs(STUDY_B)
    assert [(r["task"], r["state"], r["attempts"]) for r in rows] == [("stroke", "done", 2)]
    outbox = Outbox(scenario.node.data_dir)
    try:
        key = OutputKey(STUDY_B, 1, "stroke", "1")
        stored = outbox.stored(key)
        deliveries = outbox.deliveries(key)
    finally:
        outbox.close()
    assert stored and all(d.attempts == 1 and d.state is DeliveryState.SENT for d in deliveries)
    in_orthanc: dict[str, set[str]] = {}
    for series in output_series(scenario, STUDY_B).values():
        for one in series:
            uids = {instance["MainDicomTags"]["SOPInstanceUID"]
                    for instance in scenario.orthanc.rest("GET", f"/series/{one['ID']}/instances")}
            in_orthanc[one["MainDicomTags"]["SeriesInstanceUID"]] = uids
    expected: dict[str, set[str]] = {}
    for instance in stored:
        expected.setdefault(instance.series_instance_uid, set()).add(instance.sop_instance_uid)
    assert in_orthanc == expected
    # nothing else arrived for B: Orthanc holds its inputs plus exactly one set of outputs
    total = sum(len(s["Instances"]) for s in orthanc_series(scenario.orthanc, STUDY_B))
    assert total == scenario.inputs[STUDY_B] + len(stored)


@pytest.mark.slow
def test_tampered_package_is_refused_while_version_1_keeps_serving(scenario: Scenario) -> None:
    refusals = scenario.refused_before_b["refusals"]
    assert refusals[0]["kind"] == "TamperedPackage" and refusals[0]["version"] == 2
    assert scenario.refused_before_b["tasks"]["stroke-dwi-adc"]["serving"]["version"] == 1
    # after the restart the registry still holds the tampered v2: refused again, v1 serves, B ran on v1
    models = scenario.node.web("/api/models")
    assert models["tasks"]["stroke-dwi-adc"]["serving"]["version"] == 1
    assert models["tasks"]["stroke-dwi-adc"]["registry_versions"] == [1, 2]
    assert any(r["kind"] == "TamperedPackage" for r in models["refusals"])
    (row,) = scenario.node.jobs(STUDY_B)
    assert row["model_version"] == "1"


def test_the_node_wants_exactly_one_onnxruntime_distribution() -> None:
    """design.md §1: onnxruntime and onnxruntime-gpu share one module, so both (or neither) stop the node."""
    with pytest.raises(RuntimeError, match="both of onnxruntime and onnxruntime-gpu"):
        check_onnxruntime_install(lambda name: True)
    with pytest.raises(RuntimeError, match="neither of onnxruntime and onnxruntime-gpu"):
        check_onnxruntime_install(lambda name: False)
    assert check_onnxruntime_install(lambda name: name == "onnxruntime-gpu") == "onnxruntime-gpu"
    assert check_onnxruntime_install() == "onnxruntime"  # this venv: the cpu extra


@pytest.mark.slow
def test_send_sample_reaches_the_node_and_is_processed(scenario: Scenario) -> None:
    """`fedlesion send-sample` as `make run` prints it: C-STORE from the node's namespace, explicit completion in the
    node's database, then the job runs like any other study's."""
    result = subprocess.run(
        scenario.orthanc.command([sys.executable, "-m", "fedlesion", "send-sample", "--port", str(NODE_DICOM_PORT),
                                  "--seed", "2"]),
        env=scenario.node.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study_uid = next(line.split()[5] for line in result.stdout.splitlines() if line.startswith("sent "))
    assert "revision 1 is ready" in result.stdout and "truth: lesion 1" in result.stdout

    def finished() -> sqlite3.Row | None:
        rows = scenario.node.jobs(study_uid)
        return rows[0] if rows and rows[0]["state"] in ("done", "failed", "not-processed") else None

    row = wait_for(finished, JOB_TIMEOUT_S, "the sample's job", scenario.node)
    assert (row["task"], row["state"]) == ("stroke", "done")
    assert json.loads(row["result_json"])["lesion_count"] >= 1
