"""Series roles (design.md §4) on the shared vendor studies, the synthetic study with its negatives, and small
header-only studies that pin each DWI/FLAIR preference.

Volume counts and b-values are checked against dcm2niix's `.bval` files shipped with the shared data, in their
order, so the split keys agree with an independent converter.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA, require
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_gateway.role_decisions import AdcSource, DwiKind, SeriesRole, StudyRoles
from dicom_gateway.role_rules import RoleRules
from dicom_gateway.roles import classify_headers, classify_study
from dicom_gateway.study_files import StudyHeaders, read_path

SHARED = SHARED_DATA / "dicom"
OUT_OF_RANGE = "DWI b=2500 outside the model's trained range 700–1500"


def files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def bvals(path: Path) -> list[float]:
    """A dcm2niix .bval file (gzip-compressed or not) as b-values rounded the node's way (b < 50 is b0)."""
    require(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [0.0 if float(value) < 50 else float(value) for value in text.split()]


def volume_b_values(roles: StudyRoles, number: int) -> list[float]:
    return [volume.b_value for volume in roles.by_number(number).volumes]


# --- Siemens XA30 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xa30(shared_dicom):
    return read_path(shared_dicom("dcm_qa_xa30i/dicom")).only_study()


def test_xa30_whole_study(xa30) -> None:
    roles = classify_headers(xa30)
    # folder names map series numbers: 11001 DWI, 12001 ADC, 13001 TRACEW, 14001 FA, 15001 ColFA, 17001 TENSOR_B0
    assert roles.dwi is not None and roles.dwi.series_number == 13001
    assert (roles.dwi.kind, roles.dwi.b_value) == (DwiKind.TRACE, 2500.0)
    assert roles.warnings == [OUT_OF_RANGE]
    assert roles.adc is not None and (roles.adc.source, roles.adc.series_number) == (AdcSource.SCANNER, 12001)
    assert roles.flair is None
    expected = {
        11001: (SeriesRole.DWI_SOURCE, "dwi-source: directional DWI"),
        12001: (SeriesRole.ADC, "adc: scanner ADC"),
        13001: (SeriesRole.DWI, "dwi: scanner trace at b=2500"),
        14001: (SeriesRole.IGNORED, "ignored: FA map"),
        15001: (SeriesRole.IGNORED, "ignored: not an MR image (Secondary Capture Image Storage)"),
        17001: (SeriesRole.IGNORED, "ignored: TENSOR_B0"),
        5001: (SeriesRole.IGNORED, "ignored: not diffusion"),
    }
    assert {d.number: d.role for d in roles.series} == {n: role for n, (role, _) in expected.items()}
    for number, (_, reason) in expected.items():
        assert roles.by_number(number).reason.startswith(reason), roles.by_number(number).reason
    assert volume_b_values(roles, 11001) == bvals(SHARED / "dcm_qa_xa30i/ref/11001_DWI_dir80_AP.bval.gz")
    assert volume_b_values(roles, 13001) == bvals(SHARED / "dcm_qa_xa30i/ref/13001_DWI_dir80_AP.bval.gz")
    source = roles.by_number(11001)
    assert (source.instances, source.frames) == (819, 819)
    assert {volume.frames for volume in source.volumes} == {39}
    assert StudyRoles.from_json(roles.to_json()) == roles


def test_xa30_without_the_scanner_adc_computes_it_from_the_directional_series(xa30) -> None:
    """TRACEW 13001 has no b0, so the ADC comes from 11001's b0 and its 20 directions at b=2500."""
    without_adc = StudyHeaders(xa30.study_uid, [s for s in xa30.series if s.number != 12001])
    roles = classify_headers(without_adc)
    assert roles.dwi is not None and roles.dwi.series_number == 13001
    assert roles.adc is not None and (roles.adc.source, roles.adc.series_number) == (AdcSource.COMPUTED, 11001)
    assert (roles.adc.b_value, len(roles.adc.b0_volumes), len(roles.adc.b_volumes)) == (2500.0, 1, 20)
    assert roles.by_number(11001).reason.startswith("dwi-source: source of the computed ADC (b0 and b=2500)")
    with pytest.raises(ValueError, match="roles_json"):
        StudyRoles.from_json(roles.to_json().replace('"version": 1', '"version": 9'))
    with pytest.raises(ValueError, match="malformed"):
        StudyRoles.from_json('{"version": 1, "series": []}')


def test_xa30_with_a_model_trained_at_high_b(xa30) -> None:
    """The model's b and range are parameters (the manifest's dwi channel): inside the range, no warning."""
    roles = classify_headers(xa30, dwi_b_value=2500, dwi_b_range=(2000, 3000))
    assert roles.dwi is not None and roles.dwi.series_number == 13001
    assert roles.warnings == []
    with pytest.raises(ValueError, match="dwi_b_range"):
        classify_headers(xa30, dwi_b_value=1000, dwi_b_range=(1500, 700))


def test_rules_are_data(xa30, tmp_path) -> None:
    """Dropping the FA exclusion from the TOML makes the FA map fall through to "not diffusion"."""
    text = (Path(__file__).parents[1] / "dicom_gateway/role_rules.toml").read_text()
    fa_rule = 'reason = "FA map"\nimage_type_any = ["FA"]'
    edited = text.replace(fa_rule, fa_rule.replace('"FA"]', '"NO_SUCH"]'))
    assert edited != text
    (tmp_path / "rules.toml").write_text(edited)
    roles = classify_headers(xa30, rules=RoleRules.load(tmp_path / "rules.toml"))
    assert roles.by_number(14001).reason == "ignored: not diffusion"
    (tmp_path / "bad.toml").write_text(text.replace("[dwi]", "[dwi]\nprefer_typo = 1"))
    with pytest.raises(ValueError, match="prefer_typo"):
        RoleRules.load(tmp_path / "bad.toml")


# --- Canon classic and enhanced ------------------------------------------------------------------------------------


def test_canon_classic_and_enhanced_alone_agree(shared_dicom) -> None:
    root = shared_dicom("dcm_qa_canon_61/dicom")
    results = {}
    for name, folder in (("cl", "cl_3000_DTI_PA-ortho"), ("enh", "enh_3000_DTI_PA-ortho")):
        roles = classify_study(files(root / folder))
        assert roles.dwi is not None and (roles.dwi.kind, roles.dwi.b_value) == (DwiKind.COMPUTED, 1500.0)
        assert len(roles.dwi.volumes) == 12
        assert roles.adc is not None and roles.adc.source == AdcSource.COMPUTED
        assert roles.adc.series_uid == roles.dwi.series_uid and len(roles.adc.b0_volumes) == 1
        assert volume_b_values(roles, 3000) == bvals(SHARED / f"dcm_qa_canon_61/ref/3000_DTI_PA-ortho_{name}.bval")
        assert roles.warnings == []
        results[name] = roles.by_number(3000)
    classic, enhanced = results["cl"], results["enh"]
    assert (classic.instances, enhanced.instances) == (520, 1)
    assert classic.frames == enhanced.frames == 520
    assert [v.key for v in classic.volumes] == [v.key for v in enhanced.volumes]
    assert [v.frames for v in classic.volumes] == [v.frames for v in enhanced.volumes] == [40] * 13


# --- Philips -------------------------------------------------------------------------------------------------------


def _check_philips(roles: StudyRoles) -> None:
    assert roles.dwi is not None and (roles.dwi.kind, roles.dwi.b_value) == (DwiKind.COMPUTED, 1000.0)
    assert roles.dwi.series_number == 701 and len(roles.dwi.volumes) == 12
    assert roles.adc is not None and roles.adc.source == AdcSource.COMPUTED
    assert len(roles.adc.b0_volumes) == 5  # b = 0, 0.001 … 0.004: five volumes averaged into S0
    assert roles.adc.b_volumes == roles.dwi.volumes
    assert volume_b_values(roles, 701) == bvals(
        SHARED / "dcm_qa_philips_dwi/ref_generated_dcm2niix_v1.0.20260724/701_DTI_Biobank_2mm_MB3S2_EPI.bval"
    )
    assert {volume.frames for volume in roles.by_number(701).volumes} == {32}
    ignored = {(d.sop_class_uid, d.reason) for d in roles.series if d.role == SeriesRole.IGNORED}
    assert ignored == {
        ("1.2.840.10008.5.1.4.1.1.11.1", "ignored: not an MR image (Grayscale Softcopy Presentation State Storage)"),
        ("1.3.46.670589.11.0.0.12.2", "ignored: not an MR image (private SOP class 1.3.46.670589.11.0.0.12.2)"),
        ("1.3.46.670589.11.0.0.12.4", "ignored: not an MR image (private SOP class 1.3.46.670589.11.0.0.12.4)"),
    }


def test_philips_folder(shared_dicom) -> None:
    root = shared_dicom("dcm_qa_philips_dwi/dicom") / "cl"
    _check_philips(classify_study([path for path in files(root) if path.name != "DICOMDIR"]))


def test_philips_dicomdir_with_gzip_compressed_files() -> None:
    """The shared DICOMDIR references DICOM/IM_0001 … whose files are stored as IM_0001.gz beside it."""
    dicomdir = SHARED / "dcm_qa_philips_dwi/dicom/cl/DICOMDIR"
    require(dicomdir)
    found = read_path(dicomdir)
    assert found.skipped == []
    _check_philips(classify_headers(found.only_study()))


# --- GE ------------------------------------------------------------------------------------------------------------


def test_ge_nine_slices_over_two_with_b_values_from_gems(shared_dicom, tmp_path) -> None:
    root = shared_dicom("dcm_qa_ge/dicom")
    roles = classify_study(files(root))
    assert roles.dwi is not None and roles.dwi.series_number == 4
    assert (roles.dwi.kind, roles.dwi.b_value, len(roles.dwi.volumes)) == (DwiKind.COMPUTED, 1000.0, 6)
    assert roles.adc is not None and (roles.adc.source, roles.adc.series_number) == (AdcSource.COMPUTED, 4)
    assert {volume.frames for volume in roles.by_number(4).volumes} == {9}
    assert {volume.frames for volume in roles.by_number(1).volumes} == {2}
    assert roles.by_number(1).reason.startswith("ignored: equivalent DWI")
    assert volume_b_values(roles, 4) == bvals(SHARED / "dcm_qa_ge/ref/Ax_DWI_TENSOR_R2MB2_4.bval")
    assert volume_b_values(roles, 1) == bvals(SHARED / "dcm_qa_ge/ref/Ax_DWI_TENSOR_R2_1.bval")

    # Without the standard (0018,9087) every b-value must come from GEMS_PARM_01 (0043,xx39).
    stripped = tmp_path / "ge"
    shutil.copytree(root / "04_Ax_DWI_TENSOR_R2MB2", stripped)
    for path in files(stripped):
        dataset = pydicom.dcmread(path)
        if "DiffusionBValue" in dataset:
            del dataset.DiffusionBValue
        dataset.save_as(path)
    again = classify_study(files(stripped))
    assert volume_b_values(again, 4) == volume_b_values(roles, 4)
    assert again.dwi is not None and again.dwi.volumes == roles.dwi.volumes


# --- not diffusion -------------------------------------------------------------------------------------------------


def test_transfer_syntax_files_each_alone(shared_dicom) -> None:
    paths = files(shared_dicom("dcm_qa_ts/dicom"))
    assert len(paths) == 9
    for path in paths:
        roles = classify_study([path])
        assert [(d.role, d.reason) for d in roles.series] == [(SeriesRole.IGNORED, "ignored: not diffusion")], path
        assert (roles.dwi, roles.adc, roles.flair) == (None, None, None)


# --- synthetic study with negatives --------------------------------------------------------------------------------


def _small_case():
    from training.synthetic.case import SyntheticCase

    shape = (12, 10, 4)
    head = np.zeros(shape, np.float32)
    head[2:10, 2:8, :] = 1.0
    adc = head * 800.0
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    return SyntheticCase(
        case_id="roles",
        kind="stroke",
        seed=5,
        geometry="axial",
        affine=affine,
        images={
            "dwi_b0": head,
            "dwi_b1000": head * np.float32(np.exp(-0.8)),
            "adc": adc,
            "flair": head * 1.5,
        },
        lesion_labels=np.zeros(shape, np.int16),
        lesions=[],
    )


def test_synthetic_study_and_its_negatives(tmp_path) -> None:
    from training.synthetic.dicom_writer import write_dicom_study

    roles = classify_study(write_dicom_study(_small_case(), tmp_path, negatives=True))
    by_number = {d.number: (d.role, d.reason) for d in roles.series}
    assert by_number[2] == (SeriesRole.FLAIR, "flair: inversion recovery, 2D")
    assert by_number[4] == (SeriesRole.DWI, "dwi: scanner trace at b=1000")
    assert by_number[5] == (SeriesRole.ADC, "adc: scanner ADC (ImageType ADC)")
    assert by_number[3] == (SeriesRole.IGNORED, "ignored: T1-FLAIR (TI < 1500 ms)")
    assert by_number[6] == (SeriesRole.IGNORED, "ignored: eADC (exponential ADC) map")
    assert by_number[10] == (SeriesRole.IGNORED, "ignored: post-contrast FLAIR (contrast agent Gadobutrol)")
    assert roles.dwi is not None and (roles.dwi.series_number, roles.dwi.b_value) == (4, 1000.0)
    assert roles.adc is not None and roles.adc.series_number == 5
    assert roles.flair is not None and roles.flair.series_number == 2
    assert volume_b_values(roles, 4) == [0.0, 1000.0]
    assert roles.warnings == []
    assert StudyRoles.from_json(roles.to_json()) == roles


# --- header-only studies: each preference on its own ---------------------------------------------------------------


class HeaderStudy:
    """Writes header-only MR instances (no pixel data): roles never read pixels."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.study_uid = generate_uid()
        self.paths: list[Path] = []

    def series(self, number: int, time: str, volumes: list[dict], slices: int = 3, **attributes) -> None:
        series_uid = generate_uid()
        instance = 0
        for volume in volumes:
            for z in range(slices):
                instance += 1
                dataset = Dataset()
                dataset.file_meta = FileMetaDataset()
                dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
                dataset.SOPClassUID = MRImageStorage
                dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                dataset.StudyInstanceUID, dataset.SeriesInstanceUID = self.study_uid, series_uid
                dataset.Modality, dataset.SeriesNumber, dataset.InstanceNumber = "MR", number, instance
                dataset.AcquisitionDate, dataset.AcquisitionTime = "20260101", time
                dataset.Rows = dataset.Columns = 8
                dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                dataset.ImagePositionPatient = [0, 0, 4.0 * z]
                for keyword, value in {**attributes, **volume}.items():
                    setattr(dataset, keyword, value)
                path = self.root / f"{number}_{instance}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                self.paths.append(path)


def trace(b_value: float) -> list[dict]:
    return [
        {"ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], "DiffusionBValue": 0.0},
        {"ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"], "DiffusionBValue": b_value},
    ]


def directional(b_value: float, count: int = 6) -> list[dict]:
    angles = np.linspace(0, np.pi, count, endpoint=False)
    return [{"ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], "DiffusionBValue": 0.0}] + [
        {"DiffusionBValue": b_value, "DiffusionGradientOrientation": [float(np.cos(a)), float(np.sin(a)), 0.3]}
        for a in angles
    ]


def test_dwi_preferences(tmp_path) -> None:
    study = HeaderStudy(tmp_path)
    study.series(3, "080000", directional(1000))  # computed at the nominal b
    study.series(4, "081000", trace(500))  # trace in range, further from 1000
    study.series(5, "082000", trace(1000))  # trace at the nominal b
    study.series(6, "083000", trace(1000))  # equivalent to 5, acquired later: chosen
    roles = classify_study(study.paths)
    assert roles.dwi is not None and (roles.dwi.series_number, roles.dwi.kind) == (6, DwiKind.TRACE)
    assert roles.by_number(5).reason.startswith("ignored: equivalent DWI")
    assert roles.by_number(4).reason.startswith("ignored: DWI at b=500 not chosen")
    assert roles.by_number(3).role == SeriesRole.DWI_SOURCE
    assert roles.adc is not None and (roles.adc.source, roles.adc.series_number) == (AdcSource.COMPUTED, 6)
    assert roles.warnings == []


def test_isotropic_volume_in_a_directional_series_is_the_scanner_trace(tmp_path) -> None:
    """Philips and Canon keep their isotropic image inside the DTI series (DiffusionDirectionality ISOTROPIC)."""
    study = HeaderStudy(tmp_path)
    isotropic = {"DiffusionBValue": 1000.0, "DiffusionDirectionality": "ISOTROPIC"}
    study.series(3, "080000", directional(1000) + [{**isotropic, "DiffusionGradientOrientation": [0.0, 0.0, 0.0]}])
    roles = classify_study(study.paths)
    assert roles.dwi is not None and (roles.dwi.kind, roles.dwi.series_number) == (DwiKind.TRACE, 3)
    assert [(key.b_value, key.direction) for key in roles.dwi.volumes] == [(1000.0, None)]
    assert roles.adc is not None and roles.adc.b_volumes == roles.dwi.volumes


def test_dwi_outside_the_range_takes_the_closest_b_and_warns(tmp_path) -> None:
    study = HeaderStudy(tmp_path)
    study.series(7, "080000", trace(2500))
    study.series(8, "081000", trace(3000))
    roles = classify_study(study.paths)
    assert roles.dwi is not None and (roles.dwi.series_number, roles.dwi.b_value) == (7, 2500.0)
    assert roles.warnings == [OUT_OF_RANGE]


def test_flair_rules(tmp_path) -> None:
    study = HeaderStudy(tmp_path)
    ir = {"ScanningSequence": ["SE", "IR"], "SequenceName": "*tir2d1_16", "ImageType": ["ORIGINAL", "PRIMARY", "M"]}
    flair_2d = {**ir, "InversionTime": 2500, "RepetitionTime": 9000, "MRAcquisitionType": "2D"}
    study.series(2, "090000", [{}], **flair_2d)
    study.series(3, "080000", [{}], **{**flair_2d, "MRAcquisitionType": "3D", "SequenceName": "spcir_278ns"})
    study.series(4, "091000", [{}], **{**flair_2d, "RepetitionTime": 3000})
    study.series(5, "092000", [{}], **{**flair_2d, "InversionTime": 900})
    study.series(6, "093000", [{}], **{**flair_2d, "SeriesDescription": "FLAIR +C"})
    study.series(9, "094000", [{}], **{**flair_2d, "ImageType": ["DERIVED", "PRIMARY", "ADC"]})
    roles = classify_study(study.paths)
    assert roles.flair is not None and (roles.flair.series_number, roles.flair.acquisition_type) == (3, "3D")
    assert roles.by_number(2).reason == "ignored: another FLAIR preferred (series 3)"
    assert roles.by_number(4).reason == "ignored: not FLAIR (TR 3000 ms < 4000 ms)"
    assert roles.by_number(5).reason == "ignored: T1-FLAIR (TI < 1500 ms)"
    assert roles.by_number(6).reason == "ignored: post-contrast FLAIR"
    # An ADC map without a DWI is not used, whatever its sequence says.
    assert roles.by_number(9).role == SeriesRole.IGNORED and roles.adc is None


def test_image_type_tokens_are_compared_whole(tmp_path) -> None:
    study = HeaderStudy(tmp_path)
    study.series(4, "080000", trace(1000))
    study.series(5, "081000", [{"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "EADC"]}])
    study.series(6, "082000", [{"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC_NOT"]}])
    study.series(7, "083000", [{"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}])
    roles = classify_study(study.paths)
    assert roles.by_number(5).reason == "ignored: eADC (exponential ADC) map"
    assert roles.by_number(6).reason == "ignored: not diffusion"
    assert roles.by_number(7).role == SeriesRole.ADC
    assert roles.adc is not None and roles.adc.series_number == 7


# A roles_json as the studies table stores it (written before roles.py split into rules, decisions and classifier):
# stored rows must keep reading back, and re-serialising must give the same text.
STORED_ROLES_JSON = (
    '{"adc": {"b0_volumes": [{"b_value": 0.0, "direction": null, "repeat": 0}], "b_value": 1000.0, "b_volumes": '
    '[{"b_value": 1000.0, "direction": [1.0, 0.0, 0.0], "repeat": 0}, {"b_value": 1000.0, "direction": [0.0, 1.0, '
    '0.0], "repeat": 0}], "series_number": 7, "series_uid": "1.2.3.4", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4", '
    '"source": "computed"}, "dwi": {"b_value": 1000.0, "kind": "computed", "series_number": 7, "series_uid": '
    '"1.2.3.4", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4", "volumes": [{"b_value": 1000.0, "direction": [1.0, '
    '0.0, 0.0], "repeat": 0}, {"b_value": 1000.0, "direction": [0.0, 1.0, 0.0], "repeat": 0}]}, "dwi_b_range": [700, '
    '1500], "dwi_b_value": 1000, "flair": {"acquisition_type": "3D", "series_number": 9, "series_uid": "1.2.3.5", '
    '"sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"}, "series": [{"b_values": [0.0, 1000.0], "description": '
    '"ep2d_diff", "frames": 60, "instances": 60, "modality": "MR", "number": 7, "reason": "dwi: computed trace at '
    'b=1000", "role": "dwi", "series_uid": "1.2.3.4", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4", "volumes": '
    '[{"b_value": 0.0, "direction": null, "frames": 20, "repeat": 0, "trace": false}, {"b_value": 1000.0, '
    '"direction": [1.0, 0.0, 0.0], "frames": 20, "repeat": 0, "trace": false}], "warnings": ["w"]}], "study_uid": '
    '"1.2.3", "version": 1, "warnings": ["a warning"]}'
)


def test_stored_roles_json_reads_back_and_serialises_unchanged() -> None:
    roles = StudyRoles.from_json(STORED_ROLES_JSON)
    assert roles.dwi is not None and roles.dwi.kind is DwiKind.COMPUTED and len(roles.dwi.volumes) == 2
    assert roles.adc is not None and roles.adc.source is AdcSource.COMPUTED and roles.adc.b0_volumes[0].direction is None
    assert roles.series[0].role is SeriesRole.DWI and roles.series[0].volumes[1].direction == (1.0, 0.0, 0.0)
    assert roles.flair is not None and roles.flair.acquisition_type == "3D"
    assert roles.to_json() == STORED_ROLES_JSON
