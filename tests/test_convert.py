"""`fedlesion convert` / dicom_gateway.convert on real vendor data and on synthetic studies with a known truth.

Vendor data: Canon classic and enhanced copies of one DTI give the same computed trace (b=1500) and computed ADC;
Philips' ADC comes from the mean of its five b≈0 volumes. Synthetic studies (training.synthetic) check values,
units and laterality in four slice geometries, a site with slice gaps, a missing slice and the CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_gateway.convert import convert_study
from dicom_gateway.volumes import VolumeNotProcessed, series_volumes
from fedlesion.cli import main as fedlesion_main
from training.synthetic.case import SiteProfile, SyntheticCase
from training.synthetic.dicom_writer import write_dicom_study
from training.synthetic.generate import generate_case

COARSE_SITE = SiteProfile(name="coarse", in_plane_mm=3.0, slice_thickness_mm=3.0, slice_spacing_mm=3.0)
GAP_SITE = SiteProfile(name="gap", in_plane_mm=3.0, slice_thickness_mm=5.0, slice_spacing_mm=6.0)
LESION_MARKER_ADC = 123.0  # µm²/s written into the lesion so the converted ADC shows where it landed


def canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(image)
    return np.asarray(image.dataobj, dtype=np.float64), image.affine


def load_json(folder: Path) -> dict:
    return json.loads((folder / "study.json").read_text(encoding="utf-8"))


# --- vendor data -------------------------------------------------------------------------------------------------


def test_canon_classic_and_enhanced_give_equal_dwi_and_adc(shared_dicom, tmp_path):
    root = shared_dicom("dcm_qa_canon_61/dicom")
    converted = {}
    for copy in ("cl_3000_DTI_PA-ortho", "enh_3000_DTI_PA-ortho"):
        out = tmp_path / copy
        written = convert_study(root / copy, out)
        assert [p.name for p in written] == ["dwi.nii.gz", "adc.nii.gz", "study.json"]
        summary = load_json(out)
        assert summary["roles"]["dwi"]["kind"] == "computed" and summary["roles"]["dwi"]["b_value"] == 1500
        assert len(summary["roles"]["dwi"]["volumes"]) == 12
        assert summary["roles"]["adc"]["source"] == "computed" and summary["roles"]["adc"]["unit"] == "1e-6 mm2/s"
        converted[copy] = {role: nib.load(out / f"{role}.nii.gz") for role in ("dwi", "adc")}
    classic, enhanced = converted.values()
    for role in ("dwi", "adc"):
        assert classic[role].shape == (80, 80, 40)
        assert np.array_equal(np.asarray(classic[role].dataobj), np.asarray(enhanced[role].dataobj)), role
        np.testing.assert_allclose(classic[role].affine, enhanced[role].affine, atol=1e-4)
    adc = np.asarray(classic["adc"].dataobj)
    assert 600 < float(np.median(adc[adc > 0])) < 1100  # healthy brain, µm²/s


def test_philips_adc_from_the_mean_of_five_b0_volumes(shared_dicom, tmp_path):
    root = shared_dicom("dcm_qa_philips_dwi/dicom/cl")
    convert_study(root / "DICOMDIR", tmp_path)
    summary = load_json(tmp_path)
    adc_role = summary["roles"]["adc"]
    assert adc_role["source"] == "computed" and len(adc_role["b0_volumes"]) == 5 and adc_role["b_value"] == 1000
    assert summary["roles"]["dwi"]["kind"] == "computed" and len(summary["roles"]["dwi"]["volumes"]) == 12
    adc = np.asarray(nib.load(tmp_path / "adc.nii.gz").dataobj)
    assert adc.dtype == np.float32 and np.all(np.isfinite(adc))
    assert adc.min() >= 0 and adc.max() <= 5000
    inside = adc[adc > 0]
    assert inside.size > 0.1 * adc.size
    assert 600 < float(np.median(inside)) < 1200  # healthy brain, µm²/s


# --- synthetic studies -------------------------------------------------------------------------------------------


def marked_case(geometry: str, site: SiteProfile = COARSE_SITE, seed: int = 11) -> SyntheticCase:
    """A stroke case whose lesion holds one ADC value found nowhere else."""
    case = generate_case("stroke", seed, geometry=geometry, site=site)
    adc = case.images["adc"]
    assert not np.any(np.rint(adc[case.mask == 0]) == LESION_MARKER_ADC)
    case.images["adc"] = np.where(case.mask > 0, LESION_MARKER_ADC, adc).astype(np.float32)
    return case


@pytest.fixture(scope="module")
def axial_study(tmp_path_factory) -> tuple[SyntheticCase, Path]:
    case = marked_case("axial")
    folder = tmp_path_factory.mktemp("axial") / "dicom"
    write_dicom_study(case, folder)
    return case, folder


def rescale_slope(folder: Path) -> float:
    return float(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).RescaleSlope)


@pytest.mark.parametrize("geometry", ["axial", "flipped", "oblique", "sagittal"])
def test_synthetic_study_values_units_and_laterality(geometry, axial_study, tmp_path):
    if geometry == "axial":
        case, folder = axial_study
    else:
        case, folder = marked_case(geometry), tmp_path / "dicom"
        write_dicom_study(case, folder)
    out = tmp_path / "out"
    convert_study(folder, out)
    summary = load_json(out)
    assert summary["roles"]["adc"]["source"] == "scanner" and summary["roles"]["dwi"]["kind"] == "trace"
    assert summary["roles"]["dwi"]["b_value"] == 1000
    assert summary["roles"]["adc"]["unit_detected"].startswith("1e-6 mm2/s")

    truth_image = nib.Nifti1Image(case.images["adc"], case.affine)
    truth_adc, truth_affine = canonical(truth_image)
    adc, affine = canonical(nib.load(out / "adc.nii.gz"))
    np.testing.assert_allclose(affine, truth_affine, atol=1e-3)
    assert adc.shape == truth_adc.shape
    assert np.abs(adc - np.clip(truth_adc, 0, 5000)).max() <= 0.5 + 1e-4  # stored as integer µm²/s

    truth_dwi, _ = canonical(nib.Nifti1Image(case.images["dwi_b1000"], case.affine))
    dwi, dwi_affine = canonical(nib.load(out / "dwi.nii.gz"))
    np.testing.assert_allclose(dwi_affine, truth_affine, atol=1e-3)
    slope = rescale_slope(folder / "4_dwi")
    assert np.abs(dwi - truth_dwi).max() <= slope / 2 + 1e-3 * slope

    # the lesion, found by its marker in the converted ADC, lies in the patient's left hemisphere (RAS x < 0)
    lesion_voxels = np.argwhere(adc == LESION_MARKER_ADC)
    assert len(lesion_voxels) == int(case.mask.sum())
    centroid = nib.affines.apply_affine(affine, lesion_voxels.mean(axis=0))
    assert centroid[0] < 0
    np.testing.assert_allclose(centroid, case.lesions[0].centroid_ras_mm, atol=0.5)
    assert {lesion.side for lesion in case.lesions} == {"left"}


def test_adc_with_a_real_world_value_mapping_in_mm2_per_s(axial_study, tmp_path):
    """An ADC series that says mm²/s in its Real World Value Mapping is converted by that unit, not by guessing."""
    case, folder = axial_study
    copy = tmp_path / "dicom"
    shutil.copytree(folder, copy)
    for path in sorted((copy / "5_adc").glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "mm2/s", "UCUM", "mm2/s"
        mapping = Dataset()
        mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped = 0, 5000
        mapping.RealWorldValueIntercept, mapping.RealWorldValueSlope = 0.0, 1e-6
        mapping.LUTExplanation, mapping.LUTLabel = "ADC", "ADC"
        mapping.MeasurementUnitsCodeSequence = Sequence([unit])
        dataset.RealWorldValueMappingSequence = Sequence([mapping])
        dataset.save_as(path)
    out = tmp_path / "out"
    convert_study(copy, out)
    assert load_json(out)["roles"]["adc"]["unit_detected"] == "mm2/s (real world value mapping units mm2/s)"
    adc, _ = canonical(nib.load(out / "adc.nii.gz"))
    truth, _ = canonical(nib.Nifti1Image(case.images["adc"], case.affine))
    assert np.abs(adc - np.clip(truth, 0, 5000)).max() <= 0.5 + 1e-3


def test_adc_in_no_known_unit_is_not_processed(axial_study, tmp_path):
    """A median inside the head in none of the three unit ranges is refused, not guessed; the DWI still converts."""
    _, folder = axial_study
    copy = tmp_path / "dicom"
    shutil.copytree(folder, copy)
    for path in sorted((copy / "5_adc").glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.RescaleSlope = "10"  # median ≈ 9000: neither mm²/s, 10⁻³ mm²/s nor 10⁻⁶ mm²/s
        dataset.save_as(path)
    out = tmp_path / "out"
    written = convert_study(copy, out)
    assert [p.name for p in written] == ["dwi.nii.gz", "flair.nii.gz", "study.json"]
    assert load_json(out)["not_processed"]["adc"].startswith("series 5: ADC unit not recognised")


def test_slice_gap_site_gives_the_spacing_between_positions(tmp_path):
    case = generate_case("stroke", 5, site=GAP_SITE)
    folder = tmp_path / "dicom"
    write_dicom_study(case, folder)
    first = pydicom.dcmread(next((folder / "5_adc").glob("*.dcm")), stop_before_pixels=True)
    assert float(first.SliceThickness) == 5.0
    out = tmp_path / "out"
    convert_study(folder, out)
    for role in ("dwi", "adc", "flair"):
        zooms = nib.load(out / f"{role}.nii.gz").header.get_zooms()
        assert zooms == pytest.approx((3.0, 3.0, 6.0), abs=1e-4), role
        assert load_json(out)["roles"][role]["voxel_volume_mm3"] == pytest.approx(54.0, abs=1e-3)


@pytest.mark.parametrize("where", ["middle", "top"])
def test_deleted_dwi_slice_is_not_processed_with_its_position(where, axial_study, tmp_path):
    """A slice lost from the b=1000 trace, in the middle or at an end where no gap shows: DWI not processed."""
    case, folder = axial_study
    copy = tmp_path / "dicom"
    shutil.copytree(folder, copy)
    n_slices = case.images["adc"].shape[2]
    index = n_slices // 2 if where == "middle" else n_slices - 1
    deleted = copy / "4_dwi" / f"IM_{n_slices + index + 1:04d}.dcm"  # the second volume is the b=1000 trace
    dataset = pydicom.dcmread(deleted, stop_before_pixels=True)
    assert float(dataset.DiffusionBValue) == 1000.0
    slice_z = float(dataset.ImagePositionPatient[2])  # axial: the slice normal is +z (LPS S)
    deleted.unlink()

    out = tmp_path / "out"
    convert_study(folder, out)  # an earlier, complete run into the same folder
    written = convert_study(copy, out)
    assert [p.name for p in written] == ["adc.nii.gz", "flair.nii.gz", "study.json"]
    assert not (out / "dwi.nii.gz").exists()
    reason = load_json(out)["not_processed"]["dwi"]
    assert reason == (
        f"series 4: volume b=1000: 1 slice(s) missing at {slice_z:.2f} mm along the slice normal (present in volume b=0 "
        "of the series)"
    )


def test_single_volume_with_a_missing_middle_slice_names_the_gap(axial_study):
    """Without another volume to compare with, the gap between positions is reported, in mm along the normal."""
    _, folder = axial_study
    paths = sorted((folder / "5_adc").glob("*.dcm"))
    middle = len(paths) // 2
    datasets = [pydicom.dcmread(path) for i, path in enumerate(paths) if i != middle]
    slice_z = float(pydicom.dcmread(paths[middle], stop_before_pixels=True).ImagePositionPatient[2])
    with pytest.raises(VolumeNotProcessed) as error:
        series_volumes(datasets)
    assert str(error.value) == (
        "the volume: missing or unevenly spaced slices: expected 3.00 mm between slices along the normal, "
        f"gaps at {slice_z - 3:.2f}→{slice_z + 3:.2f} mm (6.00 mm)"
    )


def test_cli_writes_the_files_and_study_json(axial_study, tmp_path, capsys):
    _, folder = axial_study
    out = tmp_path / "out"
    assert fedlesion_main(["convert", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in ("dwi.nii.gz", "adc.nii.gz", "flair.nii.gz", "study.json")]
    summary = load_json(out)
    assert set(summary["roles"]) == {"dwi", "adc", "flair"}
    assert summary["files"] == ["dwi.nii.gz", "adc.nii.gz", "flair.nii.gz"]
    roles_by_number = {s["series_number"]: s["role"] for s in summary["series"]}
    assert roles_by_number == {2: "flair", 4: "dwi", 5: "adc"}


def test_cli_missing_path_fails_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedlesion", "convert", str(tmp_path / "missing"), str(tmp_path / "out")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"fedlesion: error: no such file or folder: {tmp_path / 'missing'}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["empty folder", "no image series"])
def test_cli_unusable_folder_fails_with_one_line(kind, tmp_path, capsys):
    source = tmp_path / "source"
    source.mkdir()
    if kind == "no image series":
        dataset = Dataset()
        dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: stored, never a role
        dataset.SOPInstanceUID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID = "1.2.3.1", "1.2.3", "1.2.3.2"
        dataset.Modality = "SR"
        dataset.save_as(source / "sr.dcm", implicit_vr=True, little_endian=True)
    assert fedlesion_main(["convert", str(source), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = "no DICOM instances found" if kind == "empty folder" else "no usable role (DWI, ADC or FLAIR)"
    assert len(lines) == 1 and lines[0].startswith(f"fedlesion: error: {expected}"), lines
    assert not (tmp_path / "out").exists()
