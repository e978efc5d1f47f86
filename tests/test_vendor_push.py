"""Each vendor's study pushed by dcmtk `storescu` to the real SCP + spool + studies table, each in its own run.

What a PACS does (design.md §10): Canon's classic and enhanced copies share Study and Series UIDs, so they go in
separate runs; Philips goes with `storescu -nh` and a presentation-context profile that names its GSPS and its two
private SOP classes (storescu skips files of SOP classes it does not know, whatever the flags). Every instance must be stored, the explicit trigger must give one study_ready row, and the roles
in that row (read back with `StudyRoles.from_json`) must be the ones the header-level tests expect, with volume counts
and b-values equal to dcm2niix's `.bval`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_gateway.role_decisions import AdcSource, DwiKind, SeriesRole, StudyRoles
from dicom_gateway.scp import StorageScp
from dicom_gateway.settings import DicomSettings
from dicom_gateway.spool import Spool
from dicom_gateway.studies import StudyIndex
from tests.dicom_support import dcmtk_env
from tests.test_roles import (
    OUT_OF_RANGE,
    SHARED,
    _check_philips,
    bvals,
    files,
    volume_b_values,
)

SCP_AE = "FEDLESION"
PHILIPS_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[Philips]
PresentationContext1 = MRImageStorage\\Uncompressed
PresentationContext2 = GrayscaleSoftcopyPresentationStateStorage\\Uncompressed
PresentationContext3 = 1.3.46.670589.11.0.0.12.2\\Uncompressed
PresentationContext4 = 1.3.46.670589.11.0.0.12.4\\Uncompressed

[[Profiles]]
[Philips]
PresentationContexts = Philips
"""


class Node:
    """SCP, spool and studies table joined as `fedlesion receive` joins them, in-process, on a free port."""

    def __init__(self, data_dir: Path) -> None:
        settings = DicomSettings(min_free_disk_bytes=0)
        self.index = StudyIndex(data_dir / "dicom.sqlite3", data_dir / "spool", settings)
        self.spool = Spool(data_dir, self.index)
        self.scp = StorageScp(SCP_AE, settings, self.spool)
        self.port = self.scp.start("127.0.0.1", 0)

    def push(self, paths: list[Path], *extra: str) -> None:
        result = subprocess.run(
            ["storescu", "-aet", "PACS", "-aec", SCP_AE, *extra, "127.0.0.1", str(self.port), *map(str, paths)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]

    def complete_only_study(self, expected_instances: int) -> StudyRoles:
        [study] = self.index.list_studies()
        assert study.instance_count == expected_instances, "every pushed instance is stored, used or not"
        self.index.complete(study.study_uid)
        [row] = self.index.ready_rows()
        assert row.revision == 1 and row.error is None
        return StudyRoles.from_json(row.roles_json)

    def stop(self) -> None:
        self.scp.stop(grace_s=1.0)
        self.spool.close()
        self.index.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    running = Node(tmp_path / "data")
    yield running
    running.stop()


def test_xa30_whole_study_trace_at_b2500_with_the_warning_and_the_scanner_adc(shared_dicom, node: Node) -> None:
    pushed = files(shared_dicom("dcm_qa_xa30i/dicom"))
    node.push(pushed)
    roles = node.complete_only_study(len(pushed))
    assert roles.dwi is not None and (roles.dwi.series_number, roles.dwi.kind, roles.dwi.b_value) == (
        13001, DwiKind.TRACE, 2500.0
    )
    assert roles.warnings == [OUT_OF_RANGE]
    assert roles.adc is not None and (roles.adc.source, roles.adc.series_number) == (AdcSource.SCANNER, 12001)
    assert roles.by_number(11001).role == SeriesRole.DWI_SOURCE
    assert {d.number for d in roles.series if d.role == SeriesRole.IGNORED} == {14001, 15001, 17001, 5001}
    assert volume_b_values(roles, 11001) == bvals(SHARED / "dcm_qa_xa30i/ref/11001_DWI_dir80_AP.bval.gz")


@pytest.mark.parametrize("name", ["cl", "enh"])
def test_canon_classic_or_enhanced_alone(shared_dicom, node: Node, name: str) -> None:
    pushed = files(shared_dicom("dcm_qa_canon_61/dicom") / f"{name}_3000_DTI_PA-ortho")
    node.push(pushed)
    roles = node.complete_only_study(len(pushed))
    assert roles.dwi is not None and (roles.dwi.kind, roles.dwi.b_value) == (DwiKind.COMPUTED, 1500.0)
    assert roles.adc is not None and roles.adc.source == AdcSource.COMPUTED
    assert volume_b_values(roles, 3000) == bvals(SHARED / f"dcm_qa_canon_61/ref/3000_DTI_PA-ortho_{name}.bval")


def test_philips_with_storescu_nh_stores_and_ignores_gsps_and_private_objects(
    shared_dicom, node: Node, tmp_path: Path
) -> None:
    pushed = [path for path in files(shared_dicom("dcm_qa_philips_dwi/dicom") / "cl") if path.name != "DICOMDIR"]
    profile = tmp_path / "philips.cfg"
    profile.write_text(PHILIPS_PROFILE)
    node.push(pushed, "-nh", "-xf", str(profile), "Philips")
    _check_philips(node.complete_only_study(len(pushed)))


def test_ge_nine_slice_series_chosen_adc_computed(shared_dicom, node: Node) -> None:
    pushed = files(shared_dicom("dcm_qa_ge/dicom"))
    node.push(pushed)
    roles = node.complete_only_study(len(pushed))
    assert roles.dwi is not None and (roles.dwi.series_number, roles.dwi.b_value) == (4, 1000.0)
    assert roles.adc is not None and roles.adc.source == AdcSource.COMPUTED
    assert volume_b_values(roles, 4) == bvals(SHARED / "dcm_qa_ge/ref/Ax_DWI_TENSOR_R2MB2_4.bval")
    assert volume_b_values(roles, 1) == bvals(SHARED / "dcm_qa_ge/ref/Ax_DWI_TENSOR_R2_1.bval")
