"""The one path from study inputs to a result: post-processing measured exactly, and the grids the writers get.

A tiny real ONNX graph (sigmoid of the z-scored first channel) makes the network's output a known function of the
input, so thresholds, minimum lesion size, 26-connectivity, volumes and the ADC core are checked voxel for voxel; the
embedded default stroke model runs once on a synthetic DICOM study to check sides and grids end to end.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from onnx_graphs import first_channel_sigmoid
from pydicom.uid import JPEGBaseline8Bit

from dicom_gateway.roles import classify_headers
from dicom_gateway.study_files import open_dicom, read_path
from dicom_gateway.study_inputs import StudyInputs, load_study_inputs
from dicom_gateway.writers import write_outputs
from dicom_gateway.writers.common import reference_grid
from inference.engine import Engine
from inference.pipeline import segment_channels, segment_study
from inference.report import DISCLAIMER, write_result
from models.geometry import swap_ras_lps
from models.manifest import OutputSpec, Postprocessing, Task, default_manifest
from models.package import TrustPolicy, build_package, load_package
from models.signing import demo_private_key
from training.synthetic import SiteProfile, generate_case
from training.synthetic.dicom_writer import write_dicom_study

REPO = Path(__file__).resolve().parents[1]
VOXEL_ML = 0.008  # 2 mm isotropic


@pytest.fixture(scope="module")
def sigmoid_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """p = sigmoid(z-scored DWI): with threshold 0.9 a voxel is lesion iff its DWI is far above the head's mean."""
    manifest = default_manifest(
        Task.STROKE_DWI_ADC, 1, plan_sha256="c" * 64, demo=True, description="test", output=OutputSpec(threshold=0.9)
    )
    manifest = replace(manifest, postprocessing=Postprocessing(min_lesion_ml=0.01))
    path = build_package(tmp_path_factory.mktemp("pkg") / "p", first_channel_sigmoid(2), manifest, demo_private_key())
    return Engine(load_package(path, TrustPolicy.demo()), threads=1)


@pytest.fixture(scope="module")
def default_engine() -> Engine:
    return Engine(load_package(REPO / "models" / "defaults" / "stroke-dwi-adc", TrustPolicy.demo()))


def phantom(
    slices: int = 36, head_adc: float = 800.0, lesions: bool = True
) -> tuple[dict[str, nib.Nifti1Image], dict[str, np.ndarray]]:
    """An ellipsoid head (DWI 100 ± 3) on a 2 mm RAS grid with bright DWI blobs of known size and ADC."""
    shape = (48, 48, slices)
    i, j, k = np.indices(shape)
    k_radius = slices / 2 - 3 if slices > 12 else slices / 2
    head = ((i - 24) / 20) ** 2 + ((j - 24) / 20) ** 2 + ((k - slices / 2) / k_radius) ** 2 <= 1
    noise = np.random.default_rng(0).normal(0.0, 3.0, shape)
    dwi = np.where(head, 100.0 + noise, 0.0).astype(np.float32)
    adc = np.where(head, head_adc, 0.0).astype(np.float32)
    z = slices // 2
    blobs = {
        "big": (slice(10, 16), slice(20, 26), slice(z - 3, z + 3)),  # 216 voxels, ADC 400: all core
        "medium": (slice(30, 33), slice(24, 27), slice(z - 2, z + 1)),  # 27 voxels, ADC 620: not below 620
        "corner": ([24, 25], [34, 35], [z, z + 1]),  # 2 voxels touching only at a corner: one lesion
        "single": ([36], [20], [z + 2]),  # 1 voxel, 0.008 ml < 0.01 ml: dropped
    }
    truth = {}
    for name, where in blobs.items() if lesions else ():
        dwi[where] = 1000.0
        truth[name] = np.zeros(shape, bool)
        truth[name][where] = True
    if lesions:
        adc[blobs["big"]] = 400.0
        adc[blobs["medium"]] = 620.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-47.0, -47.0, -slices + 1.0]
    return {"dwi": nib.Nifti1Image(dwi, affine), "adc": nib.Nifti1Image(adc, affine)}, truth


def test_post_processing_is_exact(sigmoid_engine: Engine, tmp_path: Path) -> None:
    images, truth = phantom()
    result = segment_channels(images, sigmoid_engine)
    labels = np.asarray(result.mask.dataobj)

    assert result.mask.shape == images["dwi"].shape and np.allclose(result.mask.affine, images["dwi"].affine)
    assert labels.dtype == np.uint8
    # Minimum size: the lone voxel (0.008 ml) is gone; the 26-connected corner pair (0.016 ml) is one lesion.
    assert [lesion.voxel_count for lesion in result.lesions] == [216, 27, 2]
    assert [lesion.id for lesion in result.lesions] == [1, 2, 3]
    for lesion, name in zip(result.lesions, ("big", "medium", "corner")):
        assert np.array_equal(labels == lesion.id, truth[name])
        assert lesion.volume_ml == pytest.approx(lesion.voxel_count * VOXEL_ML)
    assert not labels[truth["single"]].any()
    assert result.total_volume_ml == pytest.approx((216 + 27 + 2) * VOXEL_ML)
    # Centroid in patient LPS: the big blob sits at RAS x = −47 + 2·12.5 = −22 (patient left), i.e. LPS x = +22.
    assert result.lesions[0].centroid_mm == pytest.approx((22.0, 2.0, 0.0))
    # ADC core counts lesion voxels with ADC < 620 only: the big blob (400), not the medium one (exactly 620).
    assert result.adc_core_volume_ml == pytest.approx(216 * VOXEL_ML)
    assert result.warnings == ("coverage 72 mm along the slice axis (less than 100 mm)",)
    assert result.label_map is None and result.reference_datasets is None
    assert set(result.timings) == {"load", "preprocess", "inference", "postprocess"}

    mask_path, report_path = write_result(result, tmp_path / "out")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["disclaimer"] == DISCLAIMER
    assert (report["task"], report["model_version"], report["lesion_count"]) == ("stroke-dwi-adc", 1, 3)
    assert report["total_volume_ml"] == result.total_volume_ml
    assert report["adc_core_volume_ml"] == result.adc_core_volume_ml
    assert [item["volume_ml"] for item in report["lesions"]] == [lesion.volume_ml for lesion in result.lesions]
    assert report["model"]["demo"] is True and len(report["model"]["manifest_sha256"]) == 64
    assert report["timings"] == dict(result.timings) and report["warnings"] == list(result.warnings)
    assert np.array_equal(np.asarray(nib.load(mask_path).dataobj), labels)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mask.nii.gz", "report.json"]  # no temp files


def test_qa_warnings_fire(sigmoid_engine: Engine) -> None:
    images, _ = phantom(slices=8, head_adc=2000.0, lesions=False)
    warnings = segment_channels(images, sigmoid_engine).warnings
    assert "only 8 slices (fewer than 10)" in warnings
    assert "coverage 16 mm along the slice axis (less than 100 mm)" in warnings
    assert any(w.startswith("ADC median 2000 µm²/s inside the head is outside 500–1200") for w in warnings)


@pytest.fixture(scope="module")
def gap_study(tmp_path_factory: pytest.TempPathFactory) -> StudyInputs:
    """A synthetic DICOM study whose slices are 5 mm thick at 6 mm spacing (a 1 mm gap)."""
    site = SiteProfile(name="gap", in_plane_mm=1.8, slice_thickness_mm=5.0, slice_spacing_mm=6.0)
    case = generate_case("stroke", 5, site=site, size="small", pattern="single", anatomy="procedural")
    folder = tmp_path_factory.mktemp("gap")
    write_dicom_study(case, folder)
    study = read_path(folder).only_study()
    return load_study_inputs(classify_headers(study), study)


def test_dicom_volumes_come_from_slice_positions(gap_study: StudyInputs, sigmoid_engine: Engine) -> None:
    first = gap_study.dwi.reference_datasets[0]
    assert float(first.SliceThickness) == 5.0  # the trap: volumes must not use it
    result = segment_study(gap_study, sigmoid_engine)
    voxel_ml = 1.8 * 1.8 * 6.0 / 1000.0
    assert result.voxel_volume_ml == pytest.approx(voxel_ml)
    labels = np.asarray(result.mask.dataobj)
    assert result.lesions, "the bright synthetic infarct should pass the test model's threshold"
    for lesion in result.lesions:
        assert lesion.voxel_count == np.count_nonzero(labels == lesion.id)
        assert lesion.volume_ml == pytest.approx(lesion.voxel_count * voxel_ml, abs=1e-6)
        assert lesion.volume_ml >= 0.01
    assert result.total_volume_ml == pytest.approx(math.fsum(lesion.volume_ml for lesion in result.lesions))
    adc = np.asarray(gap_study.adc.to_nifti().dataobj)  # the scanner ADC, on the DWI's grid
    assert result.adc_core_volume_ml == pytest.approx(np.count_nonzero((labels > 0) & (adc < 620.0)) * voxel_ml)
    assert 0 < result.adc_core_volume_ml < result.total_volume_ml
    assert [series.series_number for series in result.source.series] == [4, 5]
    assert result.source.dwi_b_value == 1000.0
    assert not any("lossy" in warning for warning in result.warnings)


def test_lossy_sources_are_flagged(gap_study: StudyInputs, sigmoid_engine: Engine) -> None:
    dwi_first, adc_first = gap_study.dwi.reference_datasets[0], gap_study.adc.reference_datasets[0]
    dwi_first.LossyImageCompression = "01"
    syntax = adc_first.file_meta.TransferSyntaxUID
    adc_first.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    try:
        warnings = segment_study(gap_study, sigmoid_engine).warnings
    finally:
        del dwi_first.LossyImageCompression
        adc_first.file_meta.TransferSyntaxUID = syntax
    assert "series 4 (dwi) is lossy-compressed: LossyImageCompression 01" in warnings
    assert any(w.startswith("series 5 (adc) is lossy-compressed: transfer syntax JPEG Baseline") for w in warnings)


def test_stroke_without_adc_is_refused(gap_study: StudyInputs, sigmoid_engine: Engine) -> None:
    with pytest.raises(ValueError, match="^ADC missing"):
        segment_study(replace(gap_study, adc=None), sigmoid_engine)


def _lps_points(labels: np.ndarray, affine: np.ndarray) -> dict[tuple[float, ...], int]:
    voxels = np.argwhere(labels > 0)
    points = (affine[:3, :3] @ voxels.T).T + affine[:3, 3]
    return {tuple(np.round(p, 2)): int(labels[tuple(v)]) for p, v in zip(points, voxels)}


def test_default_model_left_stays_left_on_both_grids(default_engine: Engine, tmp_path: Path) -> None:
    """Row-flipped slices: the mask (source grid) and the label map (writers' grid) hold the same labelled points
    in space, the lesion is on the patient's left, and the SR the writers build carries the report's numbers."""
    case = generate_case("stroke", 4, geometry="flipped", size="small", pattern="single", anatomy="procedural")
    (truth,) = case.lesions
    assert truth.side == "left"
    write_dicom_study(case, tmp_path / "study")
    study = read_path(tmp_path / "study").only_study()
    result = segment_study(load_study_inputs(classify_headers(study), study), default_engine)

    labels = np.asarray(result.mask.dataobj)
    dice = 2 * np.count_nonzero((labels > 0) & (case.mask > 0)) / (np.count_nonzero(labels) + case.mask.sum())
    assert dice > 0.7
    assert result.lesion_count == 1 and result.total_volume_ml == pytest.approx(truth.volume_ml, rel=0.35)
    centroid = np.asarray(result.lesions[0].centroid_mm)
    assert centroid[0] > 0  # LPS +x is the patient's left
    assert np.linalg.norm(centroid - swap_ras_lps(truth.centroid_ras_mm)) < 4.0

    grid = reference_grid(result.reference_datasets)
    assert result.label_map.shape == grid.shape
    on_reference = _lps_points(result.label_map, grid.geometry.affine)
    lps_affine = swap_ras_lps(result.mask.affine)
    on_source = _lps_points(labels, lps_affine)
    assert on_reference == on_source and len(on_source) == result.lesions[0].voxel_count

    with_pixels = [open_dicom(Path(ds.filename)) for ds in result.reference_datasets]  # headers-only until now
    outputs = write_outputs(
        with_pixels, result.label_map, result.lesions, result.model.info(), result.task, 1,
        [2, 4, 5], result.total_volume_ml, result.adc_core_volume_ml,
    )
    measured = {
        item.ConceptNameCodeSequence[0].CodeMeaning: float(item.MeasuredValueSequence[0].NumericValue)
        for item in _walk(outputs.sr.ContentSequence)
        if item.ValueType == "NUM"
    }
    assert math.isclose(measured["Volume"], result.lesions[0].volume_ml, abs_tol=1e-6)
    report = result.report
    assert report["total_volume_ml"] == result.total_volume_ml and report["lesion_count"] == 1
    assert hd.seg.Segmentation.from_dataset(outputs.seg).number_of_segments == 1


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))
