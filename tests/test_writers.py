"""Output writers (dicom_gateway.writers): SEG, SC overlay series and TID 1500 SR from a synthetic stroke study.

Inputs are built the way the job will build them: the ADC series of a synthetic study (training.synthetic), its
ground-truth lesion mask resampled onto the highdicom Volume of that series, lesions = 26-connected components
(models.postprocessing.label_components). dciodvfy (dicom3tools) is the validity oracle, highdicom the reader.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.spatial import get_series_volume_positions

from dicom_gateway.uids import OWN_MANUFACTURER
from dicom_gateway.writers import (
    Lesion,
    ModelInfo,
    OutputSet,
    output_series_number,
    write_not_processed,
    write_outputs,
    write_overlay,
    write_seg,
    write_sr,
)
from dicom_gateway.writers.common import DEMO_MARK, NOT_FOR_DIAGNOSIS, OutputKind
from dicom_gateway.writers.overlay import (
    banner_lines,
    render_banner,
    upscale_factor,
    window,
)
from models.geometry import swap_ras_lps
from models.manifest import Task
from models.postprocessing import label_components
from training.synthetic import SiteProfile, generate_case
from training.synthetic.dicom_writer import write_dicom_study

PATIENT_NAME = "Müller^Jürgen"
PATIENT_ID = "PID-ÄÖÜ-1"
MODEL = ModelInfo("stroke-dwi-adc", "1", 3, "0123456789abcdef" * 4)
SITE = SiteProfile(name="writers", in_plane_mm=3.0, slice_thickness_mm=3.0, slice_spacing_mm=3.0)
EXISTING = [2, 4, 5]


@dataclasses.dataclass
class Study:
    datasets: list[pydicom.Dataset]  # the ADC series, in file (InstanceNumber) order
    labels: np.ndarray  # components on the highdicom Volume grid of `datasets`
    lesions: list[Lesion]
    case_labels_on_grid: np.ndarray

    @property
    def total_ml(self) -> float:
        return math.fsum(lesion.volume_ml for lesion in self.lesions)

    def outputs(self, **overrides) -> OutputSet:
        arguments = {
            "reference_datasets": self.datasets,
            "label_map": self.labels,
            "lesions": self.lesions,
            "model": MODEL,
            "task": Task.STROKE_DWI_ADC,
            "study_revision": 1,
            "existing_series_numbers": EXISTING,
            "total_volume_ml": self.total_ml,
            "adc_core_volume_ml": 0.25,
        }
        return write_outputs(**{**arguments, **overrides})

    def seg_and_sr(self, **overrides) -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
        """SEG and SR through the individual writers: what write_outputs makes, without the slower overlay."""
        arguments = {
            "label_map": self.labels,
            "lesions": self.lesions,
            "model": MODEL,
            "task": Task.STROKE_DWI_ADC,
            "study_revision": 1,
            "existing_series_numbers": EXISTING,
            "total_volume_ml": self.total_ml,
            "adc_core_volume_ml": 0.25,
        }
        arguments.update(overrides)
        seg_arguments = {key: arguments[key] for key in ("model", "task", "study_revision", "existing_series_numbers")}
        extra = {key: arguments[key] for key in ("max_lesion_segments",) if key in arguments}
        seg = write_seg(
            self.datasets,
            arguments["label_map"],
            arguments["lesions"],
            **seg_arguments,
            **extra,
        )
        sr = write_sr(
            self.datasets,
            seg,
            arguments["lesions"],
            total_volume_ml=arguments["total_volume_ml"],
            adc_core_volume_ml=arguments["adc_core_volume_ml"],
            **seg_arguments,
            **extra,
        )
        return seg, sr


def lesions_from_labels(labels: np.ndarray, volume: hd.Volume) -> list[Lesion]:
    """The job's measurement, done independently here: voxel counts, ml and LPS centroids per component."""
    voxel_ml = volume.voxel_volume / 1000.0
    lesions = []
    for label in range(1, int(labels.max()) + 1):
        voxels = np.argwhere(labels == label)
        centroid = volume.affine[:3, :3] @ voxels.mean(axis=0) + volume.affine[:3, 3]
        lesions.append(
            Lesion(
                label,
                round(len(voxels) * voxel_ml, 6),
                tuple(float(c) for c in centroid),
                len(voxels),
            )
        )
    return lesions


def labels_on_volume_grid(case_labels: np.ndarray, case_affine: np.ndarray, volume: hd.Volume) -> np.ndarray:
    """Nearest case voxel of every volume voxel, through patient space (the volume grid is the case grid permuted)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    ras = swap_ras_lps(index @ volume.affine[:3, :3].T + volume.affine[:3, 3])
    inverse = np.linalg.inv(case_affine)
    case_index = ras @ inverse[:3, :3].T + inverse[:3, 3]
    rounded = np.rint(case_index).astype(int)
    np.testing.assert_allclose(case_index, rounded, atol=1e-3)
    return case_labels[rounded[:, 0], rounded[:, 1], rounded[:, 2]].reshape(volume.spatial_shape)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    case = generate_case("stroke", 4, site=SITE, size="small", pattern="embolic", anatomy="procedural")
    out = tmp_path_factory.mktemp("writers-study")
    paths = write_dicom_study(
        case,
        out,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        charset="ISO_IR 192",
    )
    datasets = [pydicom.dcmread(path) for path in paths if path.parent.name.endswith("_adc")]
    volume = hd.get_volume_from_series(datasets)
    truth = labels_on_volume_grid(case.lesion_labels, case.affine, volume)
    labels, count = label_components(truth > 0)
    assert count >= 2, "the fixture needs several lesions to test ordering"
    return Study(datasets, labels, lesions_from_labels(labels, volume), truth)


@pytest.fixture(scope="module")
def outputs(study: Study) -> OutputSet:
    return study.outputs()


@pytest.fixture(scope="module")
def negative(study: Study) -> OutputSet:
    return study.outputs(
        label_map=np.zeros_like(study.labels),
        lesions=[],
        total_volume_ml=0.0,
        adc_core_volume_ml=0.0,
    )


def volume_order(datasets: list[pydicom.Dataset]) -> list[str]:
    """SOP Instance UIDs in highdicom's spatial order (label_map axis 0)."""
    _, positions = get_series_volume_positions(datasets)
    return [str(datasets[positions.index(k)].SOPInstanceUID) for k in range(len(datasets))]


def dciodvfy(dataset: pydicom.Dataset, path: Path) -> tuple[list[str], list[str]]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    dataset.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def round_trip(dataset: pydicom.Dataset) -> pydicom.Dataset:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def overlay_mask(frame: np.ndarray, rows: int, columns: int, factor: int) -> np.ndarray:
    """Coloured (non-grey) pixels of the image part of an SC frame, block-reduced to the source grid."""
    image = frame[: rows * factor, : columns * factor]
    coloured = (image[..., 0] != image[..., 1]) | (image[..., 1] != image[..., 2])
    return coloured.reshape(rows, factor, columns, factor).any(axis=(1, 3))


@pytest.mark.parametrize("kind", ["lesions", "negative"])
def test_outputs_pass_dciodvfy(outputs: OutputSet, negative: OutputSet, tmp_path: Path, kind: str) -> None:
    chosen = outputs if kind == "lesions" else negative
    with_lesion = max(
        chosen.overlay,
        key=lambda sc: int(np.count_nonzero(np.ptp(sc.pixel_array, axis=2))),
    )
    allowed = {
        "sc": "<Laterality>",  # present and empty: the brain has no laterality (absent is an error, empty a warning)
        "sr": "<99FEDLES>",  # our private coding scheme for the ADC-confirmed core volume
    }
    for name, dataset in (("seg", chosen.seg), ("sc", with_lesion), ("sr", chosen.sr)):
        errors, warnings = dciodvfy(dataset, tmp_path / f"{name}.dcm")
        assert errors == [], f"{name}: {errors}"
        assert all(allowed.get(name, "\0") in line for line in warnings), f"{name}: {warnings}"


def test_seg_reads_back_as_the_written_label_map(study: Study, outputs: OutputSet, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    outputs.seg.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    by_volume = sorted(study.lesions, key=lambda lesion: (-lesion.volume_ml, lesion.id))
    expected = np.zeros(study.labels.shape, dtype=np.uint8)
    for number, lesion in enumerate(by_volume, start=1):
        expected[study.labels == lesion.id] = number
    read = seg.get_pixels_by_source_instance(volume_order(study.datasets), combine_segments=True)
    np.testing.assert_array_equal(read, expected)
    # Only frames holding lesion pixels are stored (omit_empty_frames), one per (segment, slice).
    assert seg.NumberOfFrames == sum(
        int((study.labels == lesion.id).any(axis=(1, 2)).sum()) for lesion in study.lesions
    )
    for number, item in enumerate(seg.SegmentSequence, start=1):
        assert item.SegmentNumber == number
        assert item.SegmentLabel == f"Infarct {number}"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "55641003"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == MODEL.name
    ms_seg, _ = study.seg_and_sr(task=Task.MS_FLAIR, adc_core_volume_ml=None)
    assert [item.SegmentLabel for item in ms_seg.SegmentSequence] == [
        f"Lesion {n}" for n in range(1, len(study.lesions) + 1)
    ]
    assert {item.SegmentedPropertyTypeCodeSequence[0].CodeValue for item in ms_seg.SegmentSequence} == {"52988006"}


def test_negative_study_gives_one_empty_frame_and_zero_report(study: Study, negative: OutputSet) -> None:
    seg = round_trip(negative.seg)
    assert seg.NumberOfFrames == 1 and len(seg.SegmentSequence) == 1
    assert not np.any(seg.pixel_array)
    sr = hd.sr.Comprehensive3DSR.from_dataset(round_trip(negative.sr))
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    (summary,) = sr.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in summary.get_measurements()}
    assert values == {
        "Volume": 0.0,
        "Number of lesions": 0.0,
        "Infarct core volume confirmed by ADC": 0.0,
    }
    assert len(negative.overlay) == len(study.datasets)
    rows, columns = int(study.datasets[0].Rows), int(study.datasets[0].Columns)
    factor = upscale_factor(rows, columns)
    assert not any(overlay_mask(sc.pixel_array, rows, columns, factor).any() for sc in negative.overlay)
    lines = banner_lines(MODEL, 0, 0.0)
    assert lines[-1] == "AI: no lesion detected"
    banner = render_banner(lines, columns * factor)
    np.testing.assert_array_equal(negative.overlay[0].pixel_array[rows * factor :], banner)


def test_uids_and_bytes_are_stable_and_follow_revision_and_model_version(study: Study, outputs: OutputSet) -> None:
    common = {
        "model": MODEL,
        "task": Task.STROKE_DWI_ADC,
        "study_revision": 1,
        "existing_series_numbers": EXISTING,
    }
    seg = write_seg(study.datasets, study.labels, study.lesions, **common)
    overlay = write_overlay(
        study.datasets,
        study.labels,
        study.lesions,
        total_volume_ml=study.total_ml,
        **common,
    )
    sr = write_sr(
        study.datasets,
        seg,
        study.lesions,
        total_volume_ml=study.total_ml,
        adc_core_volume_ml=0.25,
        **common,
    )
    again = OutputSet(seg, overlay, sr)
    assert again.sop_instance_uids == outputs.sop_instance_uids
    assert again.series_uids == outputs.series_uids
    assert [to_bytes(ds) for ds in again.datasets] == [to_bytes(ds) for ds in outputs.datasets]
    uids = set(outputs.sop_instance_uids) | set(outputs.series_uids.values())
    assert len(uids) == len(outputs.datasets) + 3
    for changed in (
        {"study_revision": 2},
        {"model": dataclasses.replace(MODEL, version="2")},
    ):
        seg, sr = study.seg_and_sr(**changed)
        other = {
            seg.SOPInstanceUID,
            seg.SeriesInstanceUID,
            sr.SOPInstanceUID,
            sr.SeriesInstanceUID,
        }
        assert uids.isdisjoint(other), changed
    for dataset in outputs.datasets:
        assert dataset.StudyInstanceUID == study.datasets[0].StudyInstanceUID
        assert dataset.Manufacturer == OWN_MANUFACTURER
        assert "not for diagnosis" in dataset.SeriesDescription
        (model_item,) = [
            item for item in dataset.ContributingEquipmentSequence if item.Manufacturer == OWN_MANUFACTURER
        ]
        assert model_item.ManufacturerModelName == MODEL.name
        assert list(model_item.SoftwareVersions) == ["1", "federated round 3"]
        assert model_item.DeviceSerialNumber == MODEL.manifest_sha256


def test_series_numbers_skip_by_10000_past_existing_series(study: Study, outputs: OutputSet) -> None:
    source = study.datasets[0]
    assert source.SeriesNumber == 5
    assert (
        outputs.seg.SeriesNumber,
        outputs.overlay[0].SeriesNumber,
        outputs.sr.SeriesNumber,
    ) == (1005, 2005, 3005)
    seg, sr = study.seg_and_sr(existing_series_numbers=[2, 4, 5, 1005, 11005, 3005])
    assert (seg.SeriesNumber, sr.SeriesNumber) == (21005, 13005)
    assert output_series_number(source, OutputKind.OVERLAY, [2005, 12005]) == 22005
    assert output_series_number(pydicom.Dataset(), OutputKind.SEG, {1000}) == 11000


def test_lesions_beyond_the_cap_merge_into_other_lesions(study: Study) -> None:
    # 55 cubes of distinct sizes 2 voxels apart: 26-connectivity keeps them separate lesions.
    shape = study.labels.shape
    labels = np.zeros(shape, dtype=np.int32)
    centres = [(k, r, c) for k in range(3, shape[0] - 3, 6) for r in range(10, shape[1] - 10, 8) for c in (20, 32, 44)]
    for label, (k, r, c) in enumerate(centres[:55], start=1):
        size = 1 + label % 4
        labels[k : k + 1 + label % 2, r : r + size, c : c + size] = label
    assert label_components(labels > 0)[1] == 55
    lesions = lesions_from_labels(labels, hd.get_volume_from_series(study.datasets))
    total = math.fsum(lesion.volume_ml for lesion in lesions)
    seg, sr = study.seg_and_sr(label_map=labels, lesions=lesions, total_volume_ml=total)
    items = seg.SegmentSequence
    assert len(items) == 51
    assert items[49].SegmentLabel == "Infarct 50" and items[50].SegmentLabel == "Other lesions"
    ranked = sorted(lesions, key=lambda lesion: (-lesion.volume_ml, lesion.id))
    rest = [lesion.id for lesion in ranked[50:]]
    read = hd.seg.Segmentation.from_dataset(round_trip(seg)).get_pixels_by_source_instance(
        volume_order(study.datasets), segment_numbers=[51]
    )
    np.testing.assert_array_equal(read[..., 0] > 0, np.isin(labels, rest))
    groups = hd.sr.Comprehensive3DSR.from_dataset(round_trip(sr)).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 51
    assert groups[50].get_measurements()[0].value == pytest.approx(
        math.fsum(lesion.volume_ml for lesion in ranked[50:])
    )
    (summary,) = hd.sr.Comprehensive3DSR.from_dataset(round_trip(sr)).content.get_image_measurement_groups()
    assert {m.name.meaning: m.value for m in summary.get_measurements()}["Number of lesions"] == 55
    small_cap = write_seg(study.datasets, labels, lesions, MODEL, Task.STROKE_DWI_ADC, 1, EXISTING, max_lesion_segments=3)
    assert [item.SegmentLabel for item in small_cap.SegmentSequence] == [
        "Infarct 1",
        "Infarct 2",
        "Infarct 3",
        "Other lesions",
    ]


def test_sr_numbers_equal_the_inputs(study: Study) -> None:
    total, core = 3.125, 1.5
    lesions = list(study.lesions)
    lesions[0] = dataclasses.replace(lesions[0], volume_ml=lesions[0].volume_ml + total - study.total_ml)
    seg, written = study.seg_and_sr(lesions=lesions, total_volume_ml=total, adc_core_volume_ml=core)
    sr = hd.sr.Comprehensive3DSR.from_dataset(round_trip(written))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    groups = sr.content.get_volumetric_roi_measurement_groups()
    by_volume = sorted(lesions, key=lambda lesion: (-lesion.volume_ml, lesion.id))
    segments = {item.SegmentNumber: item for item in seg.SegmentSequence}
    for number, (group, lesion) in enumerate(zip(groups, by_volume, strict=True), start=1):
        (measurement,) = group.get_measurements()
        assert (measurement.name.value, measurement.unit.value) == ("118565006", "ml")
        assert measurement.value == pytest.approx(lesion.volume_ml, rel=1e-12)
        assert group.referenced_segment.referenced_segment_numbers == [number]
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.tracking_uid == segments[number].TrackingUID
    (summary,) = sr.content.get_image_measurement_groups()
    assert summary.tracking_identifier == "All lesions"
    values = {m.name.meaning: (m.value, m.unit.value) for m in summary.get_measurements()}
    assert values == {
        "Volume": (total, "ml"),
        "Number of lesions": (len(lesions), "{lesions}"),
        "Infarct core volume confirmed by ADC": (core, "ml"),
    }
    _, ms_written = study.seg_and_sr(task=Task.MS_FLAIR, adc_core_volume_ml=None)
    (ms_summary,) = hd.sr.Comprehensive3DSR.from_dataset(round_trip(ms_written)).content.get_image_measurement_groups()
    assert [m.name.meaning for m in ms_summary.get_measurements()] == [
        "Volume",
        "Number of lesions",
    ]
    other_seg, _ = study.seg_and_sr(task=Task.MS_FLAIR, adc_core_volume_ml=None)
    with pytest.raises(ValueError, match="differ from the lesions"):
        write_sr(
            study.datasets,
            other_seg,
            study.lesions,
            MODEL,
            Task.STROKE_DWI_ADC,
            1,
            EXISTING,
            total_volume_ml=study.total_ml,
            adc_core_volume_ml=0.0,
        )


def test_overlay_series_copies_patient_module_and_burns_in_only_the_banner(study: Study, outputs: OutputSet) -> None:
    source = study.datasets[0]
    assert len(outputs.overlay) == len(study.datasets)
    assert [sc.InstanceNumber for sc in outputs.overlay] == list(range(1, len(study.datasets) + 1))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in study.datasets}
    referenced = [by_uid[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)] for sc in outputs.overlay]
    assert [ds.InstanceNumber for ds in referenced] == sorted(ds.InstanceNumber for ds in study.datasets)
    rows, columns = int(source.Rows), int(source.Columns)
    factor = upscale_factor(rows, columns)
    assert min(rows, columns) * factor >= 512 > min(rows, columns) * (factor - 1)
    lines = banner_lines(MODEL, len(study.lesions), study.total_ml)
    assert lines[0] == NOT_FOR_DIAGNOSIS
    assert any(MODEL.name in line and MODEL.version in line and "federated round 3" in line for line in lines)
    assert f"{len(study.lesions)} lesions, total volume {study.total_ml:.2f} ml" in lines
    joined = " ".join(lines).upper()
    for identifier in (
        "MÜLLER",
        "JÜRGEN",
        PATIENT_ID,
        str(source.PatientBirthDate),
        str(source.AccessionNumber),
    ):
        assert identifier.upper() not in joined
    banner = render_banner(lines, columns * factor)
    assert np.count_nonzero(banner) > 0
    overlay_pixels = 0
    for sc in outputs.overlay:
        assert (sc.Rows, sc.Columns) == (
            rows * factor + banner.shape[0],
            columns * factor,
        )
        np.testing.assert_array_equal(sc.pixel_array[rows * factor :], banner)
        overlay_pixels += int(overlay_mask(sc.pixel_array, rows, columns, factor).sum())
    assert overlay_pixels == int(np.count_nonzero(study.labels))
    sc = round_trip(outputs.overlay[0])
    assert sc.SpecificCharacterSet == "ISO_IR 192"
    assert str(sc.PatientName) == PATIENT_NAME and sc.PatientID == PATIENT_ID
    for keyword in (
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "StudyDescription",
    ):
        assert sc.get(keyword) == source.get(keyword), keyword
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert (sc.BurnedInAnnotation, sc.ConversionType, sc.Modality) == (
        "YES",
        "WSD",
        "OT",
    )
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage


def test_window_maps_head_percentiles_to_full_range() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 1000.0, size=(4, 16, 16)).astype(np.float32)
    head = np.zeros(values.shape, dtype=bool)
    head[:, 4:12, 4:12] = True
    values[~head] = 5000.0  # bright outside the head must not move the window
    gray = window(values, head)
    low, high = np.percentile(values[head], [1.0, 99.5])
    assert gray[values <= low].max() == 0 and gray[values >= high].min() == 255
    inside = (values > low) & (values < high)
    np.testing.assert_allclose(gray[inside], np.rint((values[inside] - low) / (high - low) * 255), atol=1)


def test_not_processed_notice(study: Study, tmp_path: Path) -> None:
    notice = write_not_processed(
        study.datasets[:1],
        "no task matched the study",
        study_revision=1,
        existing_series_numbers=EXISTING,
    )
    again = write_not_processed(
        study.datasets[:1],
        "another reason",
        study_revision=1,
        existing_series_numbers=EXISTING,
    )
    assert notice.SOPInstanceUID == again.SOPInstanceUID and notice.SeriesInstanceUID == again.SeriesInstanceUID
    assert notice.ImageComments == "AI analysis not performed: no task matched the study"
    assert (notice.SeriesNumber, notice.Manufacturer, notice.BurnedInAnnotation) == (
        2005,
        OWN_MANUFACTURER,
        "YES",
    )
    assert str(round_trip(notice).PatientName) == PATIENT_NAME
    assert np.any(notice.pixel_array)
    errors, _ = dciodvfy(notice, tmp_path / "notice.dcm")
    assert errors == []
    with pytest.raises(ValueError, match="reason"):
        write_not_processed(study.datasets[:1], " ", study_revision=1, existing_series_numbers=EXISTING)


def _other_series(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    stranger = copy.deepcopy(datasets[0])
    stranger.SeriesInstanceUID = "1.2.3.4"
    return [stranger, *datasets[1:]]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"reference_datasets": []}, "reference_datasets is empty"),
        ({"reference_datasets": "mixed"}, "share one SeriesInstanceUID"),
        ({"reference_datasets": "duplicate"}, "SOPInstanceUID twice"),
        ({"reference_datasets": "gap"}, "regularly spaced"),
        ({"label_map": "transposed"}, "label_map has shape"),
        ({"label_map": "float"}, "integer labels"),
        ({"lesions": "missing"}, "differ from the lesion ids"),
        ({"lesions": "count"}, "voxel_count"),
        ({"task": "brain"}, "task must be one of"),
        ({"study_revision": 0}, "study_revision"),
        ({"adc_core_volume_ml": None}, "adc_core_volume_ml"),
        ({"task": Task.MS_FLAIR}, "applies to stroke only"),
        ({"total_volume_ml": 99.0}, "summed volume"),
        ({"total_volume_ml": float("nan")}, "finite"),
        ({"head_mask": "shape"}, "head_mask has shape"),
        ({"max_lesion_segments": 0}, "max_lesion_segments"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(study: Study, overrides: dict, message: str) -> None:
    resolved = dict(overrides)
    datasets = study.datasets
    special = {
        "mixed": lambda: _other_series(datasets),
        "duplicate": lambda: [*datasets, datasets[0]],
        "gap": lambda: datasets[:3] + datasets[4:],
        "transposed": lambda: np.swapaxes(study.labels, 1, 2).copy()[:, :, :-1],
        "float": lambda: study.labels.astype(np.float32),
        "missing": lambda: study.lesions[1:],
        "count": lambda: [
            dataclasses.replace(study.lesions[0], voxel_count=study.lesions[0].voxel_count + 1),
            *study.lesions[1:],
        ],
        "shape": lambda: np.ones(study.labels.shape[::-1], dtype=bool),
    }
    for key, value in overrides.items():
        if isinstance(value, str) and value in special:
            resolved[key] = special[value]()
    with pytest.raises(ValueError, match=message):
        study.outputs(**resolved)


def test_model_info_and_lesion_validate_themselves() -> None:
    with pytest.raises(ValueError, match="manifest_sha256"):
        ModelInfo("m", "1", 0, "not-a-hash")
    with pytest.raises(ValueError, match="federated_round"):
        ModelInfo("m", "1", -1, "0" * 64)
    with pytest.raises(ValueError, match="volume_ml"):
        Lesion(1, 0.0, (0.0, 0.0, 0.0), 1)
    with pytest.raises(ValueError, match="centroid_mm"):
        Lesion(1, 1.0, (0.0, float("inf"), 0.0), 1)


def test_wrong_types_raise_type_errors(study: Study) -> None:
    with pytest.raises(TypeError, match="not a dicom_gateway.writers.Lesion"):
        study.outputs(lesions=[{"id": 1}])
    with pytest.raises(TypeError, match="model must be a ModelInfo"):
        study.outputs(model={"name": "m"})
    with pytest.raises(TypeError, match="not a pydicom Dataset"):
        study.outputs(reference_datasets=[*study.datasets[:-1], b"DICM"])


def test_seg_needs_only_headers_the_overlay_needs_pixels(study: Study, outputs: OutputSet) -> None:
    headers = [copy.deepcopy(ds) for ds in study.datasets]
    for ds in headers:
        del ds.PixelData
    seg = write_seg(headers, study.labels, study.lesions, MODEL, Task.STROKE_DWI_ADC, 1, EXISTING)
    assert to_bytes(seg) == to_bytes(outputs.seg)
    with pytest.raises(ValueError, match="carry no PixelData"):
        study.outputs(reference_datasets=headers)


def test_demo_model_outputs_say_so_in_every_series_description(study: Study, outputs: OutputSet) -> None:
    """design.md §2: a demo-signed model's outputs can never pass for a clinical model's."""
    demo = ModelInfo(MODEL.name, MODEL.version, MODEL.federated_round, MODEL.manifest_sha256, demo=True)
    seg, sr = study.seg_and_sr(model=demo)
    notice = write_not_processed(study.datasets[:1], "no task matched", study_revision=1, existing_series_numbers=(),
                                 demo=True)
    for dataset in (seg, sr, notice):
        assert dataset.SeriesDescription.startswith(DEMO_MARK) and len(dataset.SeriesDescription) <= 64
    assert DEMO_MARK in banner_lines(demo, 1, 1.0) and DEMO_MARK not in banner_lines(MODEL, 1, 1.0)
    assert all(DEMO_MARK not in ds.SeriesDescription for ds in outputs.datasets)
