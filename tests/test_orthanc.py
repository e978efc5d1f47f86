"""A real PACS: Debian's Orthanc in its own network namespace (tests/orthanc.py, design.md §10).

Orthanc pushes a synthetic stroke study to our SCP through `POST /modalities/{id}/store`, the study is completed
with the explicit trigger, and the SEG, SC overlay and SR written from the ground truth go back through our SCU;
the test reads them back through Orthanc's REST API. Everything that talks to Orthanc runs in its namespace.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_gateway.outbox import DeliveryState, Outbox, OutputKey
from dicom_gateway.settings import Destination
from dicom_gateway.uids import output_uid
from dicom_gateway.writers import Lesion, ModelInfo, write_outputs
from models.geometry import voxel_volume_ml
from models.manifest import Task
from tests import orthanc as orthanc_support
from tests.orthanc import ORTHANC_AET, ORTHANC_DICOM_PORT, ORTHANC_HTTP_PORT, Orthanc
from training.synthetic import SiteProfile, SyntheticCase, generate_case
from training.synthetic.dicom_writer import write_dicom_study

OUR_AET = "FEDLESION"
OUR_PORT = 11112  # inside the test's own namespace
orthanc_factory = orthanc_support.orthanc_factory  # the fixture, usable by name in this module
ORTHANC = Destination(ORTHANC_AET, "127.0.0.1", ORTHANC_DICOM_PORT)

# Runs in the namespace: one send pass of the outbox to Orthanc; prints the pass report.
SEND = """
import dataclasses, json, sys
from dicom_gateway.outbox import Outbox
from dicom_gateway.scu import Sender
from dicom_gateway.settings import Destination
report = Sender(Outbox(sys.argv[1]), [Destination.parse(sys.argv[2])], attempts=1).send_pending()
print(json.dumps(dataclasses.asdict(report)))
"""


def send_from_namespace(orthanc: Orthanc, data_dir: Path) -> dict[str, int]:
    return json.loads(orthanc.python(SEND, str(data_dir), f"{ORTHANC.ae_title}@{ORTHANC.host}:{ORTHANC.port}"))


def orthanc_instances(orthanc: Orthanc, sop_instance_uids: list[str], out_dir: Path) -> dict[str, pydicom.Dataset]:
    """The instances as Orthanc stored them, found by SOP Instance UID and downloaded over REST."""
    files = orthanc.fetch_instances(sop_instance_uids, out_dir)
    assert set(files) == set(sop_instance_uids), "Orthanc lacks some of the instances sent"
    return {uid: pydicom.dcmread(path) for uid, path in files.items()}


def test_orthanc_in_its_namespace_echoes_both_ways_and_takes_our_c_store(tmp_path, orthanc_factory):
    orthanc: Orthanc = orthanc_factory({"fedlesion": (OUR_AET, "127.0.0.1", OUR_PORT)})
    with socket.socket() as probe:  # the REST port exists only inside the namespace
        assert probe.connect_ex(("127.0.0.1", ORTHANC_HTTP_PORT)) != 0

    # Orthanc → a dcmtk peer playing our AE in the namespace, and dcmtk → Orthanc.
    orthanc.start(["storescp", "-aet", OUR_AET, str(OUR_PORT)], log=tmp_path / "storescp.log")
    deadline = time.monotonic() + 10
    while orthanc.run(["echoscu", "-aec", OUR_AET, "127.0.0.1", str(OUR_PORT)], check=False).returncode:
        assert time.monotonic() < deadline, "storescp never answered in the namespace"
        time.sleep(0.05)
    assert orthanc.rest("POST", "/modalities/fedlesion/echo", {}) == {}
    assert orthanc.run(["echoscu", "-aec", ORTHANC_AET, "127.0.0.1", str(ORTHANC_DICOM_PORT)]).returncode == 0

    # Our SCU → Orthanc: outputs recorded in the outbox outside, sent from inside the namespace.
    source = sorted(write_dicom_study(generate_case("stroke", 11, anatomy="procedural", site=SMALL_SITE), tmp_path / "study"))
    adc = [pydicom.dcmread(p) for p in source if p.parent.name.endswith("_adc")][:3]
    key = OutputKey(adc[0].StudyInstanceUID, 1, "stroke", "test")
    for number, dataset in enumerate(adc, start=1):
        dataset.SeriesInstanceUID = output_uid("orthanc-echo", "series")
        dataset.SOPInstanceUID = output_uid("orthanc-echo", str(number))
    data_dir = tmp_path / "node"
    outbox = Outbox(data_dir)
    outbox.enqueue(key, adc, [ORTHANC])
    assert send_from_namespace(orthanc, data_dir) == {"sent": 3, "retrying": 0, "dead_lettered": 0}
    assert outbox.counts()[DeliveryState.SENT] == 3
    back = orthanc_instances(orthanc, [ds.SOPInstanceUID for ds in adc], tmp_path / "back")
    for original in adc:
        stored = back[original.SOPInstanceUID]
        assert stored.StudyInstanceUID == key.study_uid
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(stored.pixel_array, original.pixel_array)


SMALL_SITE = SiteProfile(name="orthanc", in_plane_mm=3.0, slice_thickness_mm=5.0, slice_spacing_mm=5.0)  # 128 files
ADC_CORE_LIMIT = 620.0  # µm²/s: the ground-truth core is the lesion below this ADC


def ground_truth_on_grid(case: SyntheticCase, grid_affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The case's lesion labels sampled on a DICOM grid: (slice, row, column) → LPS → RAS → case voxel."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    lps = index @ grid_affine[:3, :3].T + grid_affine[:3, 3]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = np.rint((ras - case.affine[:3, 3]) @ np.linalg.inv(case.affine[:3, :3]).T).astype(int)
    inside = np.all((ijk >= 0) & (ijk < case.lesion_labels.shape), axis=1)
    labels = np.zeros(len(ijk), dtype=np.int32)
    labels[inside] = case.lesion_labels[tuple(ijk[inside].T)]
    return labels.reshape(shape)


def numbers(dataset: pydicom.Dataset) -> list[tuple[str, float]]:
    """Every NUM content item of an SR, depth first: (concept meaning, value)."""
    found: list[tuple[str, float]] = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "NUM" and item.get("MeasuredValueSequence"):
            found.append((item.ConceptNameCodeSequence[0].CodeMeaning, float(item.MeasuredValueSequence[0].NumericValue)))
        found += numbers(item)
    return found


def wait_for_c_echo(orthanc: Orthanc, ae_title: str, port: int, what: object) -> None:
    deadline = time.monotonic() + 30
    while orthanc.run(["echoscu", "-aec", ae_title, "127.0.0.1", str(port)], check=False).returncode:
        assert time.monotonic() < deadline, f"{what} never answered C-ECHO in the namespace"
        time.sleep(0.1)


def test_orthanc_pushes_a_stroke_study_to_our_scp_and_reads_back_seg_sc_and_sr(tmp_path, orthanc_factory):
    case = generate_case("stroke", 11, anatomy="procedural", site=SMALL_SITE)
    paths = write_dicom_study(case, tmp_path / "study")
    study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    orthanc = orthanc_factory({"fedlesion": (OUR_AET, "127.0.0.1", OUR_PORT)})
    assert len(orthanc.upload(paths)) == len(paths)

    data_dir = tmp_path / "node"
    config = tmp_path / "fedlesion.toml"
    config.write_text(
        f'[node]\nae_title = "{OUR_AET}"\ndicom_port = {OUR_PORT}\n'
        f'[storage]\ndata_dir = "{data_dir}"\n'
        "[dicom]\ninactivity_timeout_s = 3600.0\n"  # only the explicit trigger completes the study here
    )
    orthanc.start([sys.executable, "-m", "fedlesion", "--config", str(config), "receive"], log=tmp_path / "receiver.log")
    wait_for_c_echo(orthanc, OUR_AET, OUR_PORT, "our SCP")
    assert orthanc.rest("POST", "/modalities/fedlesion/echo", {}) == {}

    (orthanc_study,) = [m["ID"] for m in orthanc.rest("POST", "/tools/lookup", study_uid.encode()) if m["Type"] == "Study"]
    started = time.monotonic()
    orthanc.rest("POST", "/modalities/fedlesion/store", {"Resources": [orthanc_study], "Synchronous": True})
    push_s = time.monotonic() - started

    completed = orthanc.run([sys.executable, "-m", "fedlesion", "--config", str(config), "study", "complete", study_uid])
    assert completed.returncode == 0, completed.stderr.decode()
    with sqlite3.connect(data_dir / "dicom.sqlite3") as db:
        ready = db.execute("SELECT revision FROM study_ready WHERE study_uid = ?", (study_uid,)).fetchall()
    assert ready == [(1,)]

    # The reference volume is the ADC series as our SCP spooled it.
    adc_series = pydicom.dcmread(next(p for p in paths if p.parent.name.endswith("_adc"))).SeriesInstanceUID
    spooled = [pydicom.dcmread(p) for p in sorted((data_dir / "spool").rglob("*")) if p.is_file()]
    assert len(spooled) == len(paths)
    reference = [ds for ds in spooled if ds.SeriesInstanceUID == adc_series]
    volume = hd.get_volume_from_series(reference)
    label_map = ground_truth_on_grid(case, volume.affine, volume.spatial_shape)
    voxel_ml = voxel_volume_ml(volume.affine)
    lesions = []
    for label in sorted(set(np.unique(label_map).tolist()) - {0}):
        voxels = np.argwhere(label_map == label)
        centroid = voxels.mean(axis=0) @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        lesions.append(Lesion(label, len(voxels) * voxel_ml, tuple(float(c) for c in centroid), len(voxels)))
    assert lesions, "the ground-truth lesion must be visible on the reference grid"
    total_ml = sum(lesion.volume_ml for lesion in lesions)
    core_ml = float(np.count_nonzero((label_map > 0) & (volume.array < ADC_CORE_LIMIT))) * voxel_ml
    model = ModelInfo("stroke-dwi-adc", "1.0.0", 3, "0" * 64)
    series_numbers = {int(ds.SeriesNumber) for ds in spooled}
    outputs = write_outputs(reference, label_map, lesions, model, Task.STROKE_DWI_ADC, 1, series_numbers, total_ml, core_ml)

    outbox = Outbox(data_dir)
    stored = outbox.enqueue(OutputKey(study_uid, 1, "stroke", model.version), outputs.datasets, [ORTHANC])
    written = {i.sop_instance_uid: pydicom.dcmread(i.path) for i in stored}  # the files as the SCU sends them
    report = send_from_namespace(orthanc, data_dir)
    assert report == {"sent": len(outputs.datasets), "retrying": 0, "dead_lettered": 0}

    study_instances = orthanc.rest("GET", f"/studies/{orthanc_study}/instances")
    assert len(study_instances) == len(paths) + len(outputs.datasets)  # the outputs joined the source study
    back = orthanc_instances(orthanc, outputs.sop_instance_uids, tmp_path / "back")
    for uid, sent in written.items():
        assert (back[uid].SOPClassUID, back[uid].StudyInstanceUID) == (sent.SOPClassUID, study_uid)
    assert {back[uid].SOPClassUID for uid in outputs.sop_instance_uids} == {
        SegmentationStorage, SecondaryCaptureImageStorage, Comprehensive3DSRStorage
    }
    seg = back[outputs.seg.SOPInstanceUID]
    assert len(seg.SegmentSequence) == len(lesions)
    sr_numbers = numbers(back[outputs.sr.SOPInstanceUID])
    assert sr_numbers == numbers(written[outputs.sr.SOPInstanceUID])
    values = [value for _, value in sr_numbers]
    for expected in (*[lesion.volume_ml for lesion in lesions], total_ml, core_ml, float(len(lesions))):
        assert min(abs(value - expected) for value in values) <= 0.005 + 1e-6 * expected
    print(f"Orthanc → our SCP: {len(paths)} instances in {push_s:.2f} s")
