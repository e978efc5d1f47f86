"""docs/dicom-conformance.md against the running SCP: its tables are parsed and compared with what the AE object
offers and with what a real association negotiates, so the statement cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import UID, MRImageStorage
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    __version__ as PYNETDICOM_VERSION,
    AllStoragePresentationContexts,
    _config,
    build_context,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_gateway.scp import (
    CANNOT_UNDERSTAND,
    DECODABLE_TRANSFER_SYNTAXES,
    MAX_PDU_BYTES,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from dicom_gateway.settings import DicomSettings
from inference.settings import NodeSettings
from tests.conftest import REPO_ROOT
from tests.test_scp import PRIVATE_SOP_CLASS, SCP_AE, RunningScp, launch_scp

DOC = REPO_ROOT / "docs" / "dicom-conformance.md"
MAX_CONTEXTS = 127  # odd context IDs 1-255, one left for Verification


def table(heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, cells stripped of backticks."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    return rows[2:]  # header and separator rows


def paragraph(starting: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(starting)
    return text[start : text.index("\n\n", start)].replace("\n", " ")


@pytest.fixture
def running(tmp_path: Path):
    scp = launch_scp(tmp_path / "data")
    yield scp
    scp.stop()


def negotiate(port: int, contexts: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Propose each (abstract syntax, transfer syntax) in a context of its own; which were accepted."""
    accepted: dict[tuple[str, str], bool] = {}
    for first in range(0, len(contexts), MAX_CONTEXTS):
        chunk = contexts[first : first + MAX_CONTEXTS]
        ae = AE(ae_title="DOCTEST")
        ae.requested_contexts = [build_context(abstract, transfer) for abstract, transfer in chunk]
        assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
        taken: set[tuple[str, str]] = set()
        if assoc.is_established:  # pynetdicom aborts when no context was accepted
            taken = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            assoc.release()
        accepted.update({pair: pair in taken for pair in chunk})
    return accepted


def test_transfer_syntax_table_is_what_the_scp_accepts_and_can_decode(running: RunningScp) -> None:
    rows = table("### Accepted as SCP and decoded for analysis")

    assert [uid for _, uid, _ in rows] == list(DECODABLE_TRANSFER_SYNTAXES)
    for name, uid, decoders in rows:
        assert UID(uid).name == name.removesuffix(" (retired)"), uid
        if decoders == "native":
            assert not UID(uid).is_compressed, uid
        else:
            available = set(get_decoder(UID(uid)).available_plugins)
            assert set(decoders.split(", ")) <= available, f"{uid}: {decoders} documented, {available} installed"
    accepted = negotiate(running.port, [(MRImageStorage, uid) for _, uid, _ in rows])
    assert all(accepted.values()), [pair for pair, ok in accepted.items() if not ok]


def test_verification_syntaxes_are_those_of_the_ae(running: RunningScp) -> None:
    sentence = paragraph("Verification is accepted in")
    (context,) = [cx for cx in running.scp.ae.supported_contexts if cx.abstract_syntax == Verification]
    names = [UID(uid).name for uid in context.transfer_syntax]
    assert all(name in sentence for name in names)
    assert len(re.findall(r"Endian", sentence)) == len(names)


def test_scp_sop_class_table_matches_the_ae_and_the_negotiation(running: RunningScp) -> None:
    rows = {uid: (name, notes) for name, uid, notes in table("## SOP classes as SCP")}
    public_storage = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    assert [cx.abstract_syntax for cx in running.scp.ae.supported_contexts] == [Verification]
    assert _config.UNRESTRICTED_STORAGE_SERVICE, "storage comes from pynetdicom's unrestricted storage service"
    proposed = [(uid, "1.2.840.10008.1.2.1") for uid in [*public_storage, PRIVATE_SOP_CLASS, "1.2.3.4.5.6.7"]]
    accepted = negotiate(running.port, proposed)
    assert all(accepted.values()), [pair for pair, ok in accepted.items() if not ok]

    # The documented count is that of the public Storage SOP classes the SCP just accepted, in the pynetdicom release
    # the note names.
    accepted_storage = sum(accepted[(uid, "1.2.840.10008.1.2.1")] for uid in public_storage)
    assert rows.keys() == {Verification, f"{accepted_storage} classes", "*"}
    assert UID(Verification).name == rows[Verification][0]
    major_minor = ".".join(PYNETDICOM_VERSION.split(".")[:2])
    assert f"pynetdicom {major_minor} knows" in rows[f"{accepted_storage} classes"][1]
    not_storage = negotiate(running.port, [(StudyRootQueryRetrieveInformationModelFind, "1.2.840.10008.1.2")])
    assert not any(not_storage.values()), "a known non-storage SOP class is not accepted"


def test_scu_sop_classes_are_named_by_their_uids() -> None:
    rows = table("## SOP classes as SCU")
    assert {name for name, _, _ in rows} == {
        "Segmentation Storage",
        "Secondary Capture Image Storage",
        "Comprehensive 3D SR Storage",
    }
    for name, uid, _ in rows:
        assert UID(uid).name == name


def test_limits_and_ae_defaults_are_the_settings_defaults() -> None:
    defaults = DicomSettings()
    units = {"GiB": 1 << 30, "MiB": 1 << 20}
    for setting, default, _, status in table("## Limits"):
        number, *unit = default.split(" ", 1)
        expected = int(number) * (units[unit[0]] if unit and unit[0] in units else 1)
        assert getattr(defaults, setting.removeprefix("dicom.")) == expected, setting
        assert int(status, 16) in {OUT_OF_RESOURCES, CANNOT_UNDERSTAND}
    ae_rows = {setting: default for setting, default, _ in table("## AE settings")}
    assert ae_rows["node.ae_title"] == NodeSettings().ae_title
    assert ae_rows["node.dicom_port"] == str(NodeSettings().dicom_port)
    assert ae_rows["dicom.max_associations"] == str(defaults.max_associations)
    assert ae_rows["dicom.receiver_processes"] == str(defaults.receiver_processes)
    assert ae_rows["maximum PDU length received"] == "1 MiB" and MAX_PDU_BYTES == 1 << 20
    text = DOC.read_text(encoding="utf-8")
    assert PYNETDICOM_IMPLEMENTATION_UID in text and PYNETDICOM_IMPLEMENTATION_VERSION in text


def test_status_table_lists_exactly_the_statuses_the_scp_returns() -> None:
    statuses = {int(status, 16) for status, _, _ in table("## Status codes returned to C-STORE")}
    assert statuses == {SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE}
