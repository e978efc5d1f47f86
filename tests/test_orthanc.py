"""A real PACS: Debian's Orthanc in its own network namespace (tests/orthanc.py, design.md §10).

Orthanc pushes a synthetic stroke study to our SCP through `POST /modalities/{id}/store`, the study is completed
with the explicit trigger, and the SEG, SC overlay and SR written from the ground truth go back through our SCU;
the test reads them back through Orthanc's REST API. Everything that talks to Orthanc runs in its namespace.
"""

from __future__ import annotations

import json
import socket
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicom_gateway.outbox import DeliveryState, Outbox, OutputKey
from dicom_gateway.uids import output_uid
from fedlesion.settings import Destination
from tests import orthanc as orthanc_support
from tests.orthanc import ORTHANC_AET, ORTHANC_DICOM_PORT, ORTHANC_HTTP_PORT, Orthanc
from training.synthetic import generate_case
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
from fedlesion.settings import Destination
report = Sender(Outbox(sys.argv[1]), [Destination.parse(sys.argv[2])], attempts=1).send_pending()
print(json.dumps(dataclasses.asdict(report)))
"""


def send_from_namespace(orthanc: Orthanc, data_dir: Path) -> dict[str, int]:
    return json.loads(orthanc.python(SEND, str(data_dir), f"{ORTHANC.ae_title}@{ORTHANC.host}:{ORTHANC.port}"))


def orthanc_instance(orthanc: Orthanc, sop_instance_uid: str) -> pydicom.Dataset:
    """The instance as Orthanc stored it, found by its SOP Instance UID and downloaded over REST."""
    (match,) = [m for m in orthanc.rest("POST", "/tools/lookup", sop_instance_uid.encode()) if m["Type"] == "Instance"]
    return pydicom.dcmread(BytesIO(orthanc.download(f"/instances/{match['ID']}/file")))


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
    source = sorted(write_dicom_study(generate_case("stroke", 11, anatomy="procedural"), tmp_path / "study"))
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
    for original in adc:
        stored = orthanc_instance(orthanc, original.SOPInstanceUID)
        assert stored.StudyInstanceUID == key.study_uid
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(stored.pixel_array, original.pixel_array)
