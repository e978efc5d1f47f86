"""Synthetic DICOM studies (training/synthetic/dicom_writer): geometry, role attributes, units, charsets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.geometry import swap_ras_lps
from training.synthetic.case import GroundTruthLesion, SyntheticCase
from training.synthetic.dicom_writer import slice_geometry, write_dicom_study
from training.synthetic.generate import generate_case

BRAIN_ADC = 800.0  # µm²/s
LESION_ADC = 400.0
LESION_CENTRE_RAS = np.array([-22.0, 10.0, 6.0])  # patient's left hemisphere (RAS x < 0)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# Columns are the RAS directions of array axes 0, 1, 2.
DIRECTIONS = {
    "axial": np.eye(3),
    "flipped": np.diag([1.0, -1.0, 1.0]),  # rows run posterior (row-flipped)
    "oblique": _rotation(2, 12.0) @ _rotation(0, 18.0),
    "sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # i → P, j → I, k → R
}


def make_case(
    geometry: str = "axial",
    *,
    seed: int = 7,
    shape: tuple[int, int, int] = (34, 38, 22),
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
    thickness: float | None = None,
) -> SyntheticCase:
    """A blob head centred on the origin with one infarct in the left hemisphere, on any voxel grid."""
    direction = DIRECTIONS[geometry]
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    head = ((ras / np.array([62.0, 70.0, 45.0])) ** 2).sum(-1) < 1.0
    lesion = head & (np.linalg.norm(ras - LESION_CENTRE_RAS, axis=-1) < 9.0)
    adc = np.where(head, BRAIN_ADC, 0.0)
    adc[lesion] = LESION_ADC
    b0 = np.where(head, 1.0, 0.0)
    b0[lesion] = 1.2
    flair = np.where(head, 1.0, 0.0)
    flair[lesion] = 1.8
    images = {
        "dwi_b0": b0.astype(np.float32),
        "dwi_b1000": (b0 * np.exp(-1000.0 * adc * 1e-6)).astype(np.float32),
        "adc": adc.astype(np.float32),
        "flair": flair.astype(np.float32),
    }
    centroid = tuple(float(x) for x in ras[lesion].mean(axis=0))
    volume_ml = float(lesion.sum() * np.prod(spacing) / 1000.0)
    return SyntheticCase(
        case_id=f"hand-{geometry}-{seed}",
        kind="stroke",
        seed=seed,
        geometry=geometry,  # type: ignore[arg-type]
        affine=affine,
        images=images,
        lesion_labels=lesion.astype(np.int16),
        lesions=[GroundTruthLesion(1, "infarct", "left", centroid, volume_ml)],
        slice_thickness_mm=thickness if thickness is not None else spacing[2],
    )


def read_series(paths: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    """Datasets grouped by their series directory name (`<SeriesNumber>_<role>`)."""
    series: dict[str, list[pydicom.Dataset]] = {}
    for path in paths:
        series.setdefault(path.parent.name, []).append(pydicom.dcmread(path))
    return series


def by_role(series: dict[str, list[pydicom.Dataset]], role: str) -> list[pydicom.Dataset]:
    (name,) = [name for name in series if name.split("_", 1)[1] == role]
    return series[name]


def dwi_volume(datasets: list[pydicom.Dataset], b_value: float) -> hd.Volume:
    return hd.get_volume_from_series([ds for ds in datasets if float(ds.DiffusionBValue) == b_value])


def assert_same_world(volume: hd.Volume, case: SyntheticCase, key: str, atol: float, high: float = np.inf) -> None:
    """Every read-back voxel sits, in patient space, exactly on a case voxel holding the same value.

    The writer stores [0, high]: ADC is clipped to [0, 5000] µm²/s, magnitudes at 0.
    """
    assert int(np.prod(volume.spatial_shape)) == int(np.prod(case.images[key].shape))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in volume.spatial_shape], indexing="ij"), -1).reshape(-1, 3)
    lps = idx @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    ras = swap_ras_lps(lps)
    inv = np.linalg.inv(case.affine)
    case_idx = ras @ inv[:3, :3].T + inv[:3, 3]
    rounded = np.rint(case_idx).astype(int)
    np.testing.assert_allclose(case_idx, rounded, atol=1e-3)
    expected = np.clip(case.images[key][rounded[:, 0], rounded[:, 1], rounded[:, 2]], 0.0, high)
    np.testing.assert_allclose(volume.array.reshape(-1), expected, atol=atol)


@pytest.mark.parametrize("geometry", list(DIRECTIONS))
def test_geometry_values_and_lesion_side_survive_read_back(tmp_path: Path, geometry: str) -> None:
    case = make_case(geometry)
    series = read_series(write_dicom_study(case, tmp_path))
    dwi = by_role(series, "dwi")
    slope = float(dwi[0].RescaleSlope)
    b1000 = dwi_volume(dwi, 1000.0)
    assert_same_world(b1000, case, "dwi_b1000", atol=slope / 2 + 1e-6)
    assert_same_world(dwi_volume(dwi, 0.0), case, "dwi_b0", atol=slope / 2 + 1e-6)
    assert_same_world(hd.get_volume_from_series(by_role(series, "adc")), case, "adc", atol=0.5)
    assert_same_world(hd.get_volume_from_series(by_role(series, "flair")), case, "flair", atol=0.5)

    # The infarct, found as DWI-bright voxels in the read-back, lies on the patient's left (LPS x > 0).
    lesion_idx = np.argwhere(b1000.array > 0.6).mean(axis=0)
    centroid_lps = b1000.affine[:3, :3] @ lesion_idx + b1000.affine[:3, 3]
    truth_lps = swap_ras_lps(case.lesions[0].centroid_ras_mm)
    assert centroid_lps[0] > 10.0
    assert np.linalg.norm(centroid_lps - truth_lps) < 2.0

    # PixelSpacing is [row spacing, column spacing]: rows step along array axis 1, columns along axis 0.
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    np.testing.assert_allclose([float(x) for x in dwi[0].PixelSpacing], [spacing[1], spacing[0]])
    assert (dwi[0].Rows, dwi[0].Columns) == (case.images["dwi_b0"].shape[1], case.images["dwi_b0"].shape[0])


def test_slice_gap_keeps_thickness_and_positions(tmp_path: Path) -> None:
    case = make_case(spacing=(4.0, 4.0, 6.0), thickness=5.0)
    series = read_series(write_dicom_study(case, tmp_path))
    flair = by_role(series, "flair")
    assert float(flair[0].SliceThickness) == 5.0
    assert float(flair[0].SpacingBetweenSlices) == 6.0
    volume = hd.get_volume_from_series(flair)
    assert volume.spacing_between_slices == pytest.approx(6.0)
    assert_same_world(volume, case, "flair", atol=0.5)


def test_series_attributes_b_values_and_adc_unit(tmp_path: Path) -> None:
    case = make_case()
    series = read_series(write_dicom_study(case, tmp_path, negatives=True))
    assert sorted(series) == ["10_flair_post", "2_flair", "3_t1_flair", "4_dwi", "5_adc", "6_eadc"]
    n = case.images["adc"].shape[2]

    dwi = by_role(series, "dwi")
    assert [ds.InstanceNumber for ds in dwi] == list(range(1, 2 * n + 1))
    b_values = [float(ds.DiffusionBValue) for ds in dwi]
    assert b_values == [0.0] * n + [1000.0] * n
    for ds in dwi:
        assert ds.ScanningSequence == "EP" and ds.SOPClassUID == pydicom.uid.MRImageStorage
        trace = float(ds.DiffusionBValue) > 0
        assert ds.ImageType[3] == ("TRACEW" if trace else "NONE")
        assert ds.DiffusionDirectionality == ("ISOTROPIC" if trace else "NONE")
        assert ds.SequenceName == ("*ep_b1000t" if trace else "*ep_b0")
    assert [ds.ImagePositionPatient for ds in dwi[:n]] == [ds.ImagePositionPatient for ds in dwi[n:]]

    adc = by_role(series, "adc")
    assert list(adc[0].ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    assert (float(adc[0].RescaleSlope), float(adc[0].RescaleIntercept)) == (1.0, 0.0)
    adc_volume = hd.get_volume_from_series(adc)
    brain = adc_volume.array[adc_volume.array > 0]
    assert np.median(brain) == pytest.approx(BRAIN_ADC)  # µm²/s, not mm²/s or 10⁻³ mm²/s
    assert adc[0].pixel_array.dtype == np.uint16

    flair = by_role(series, "flair")[0]
    assert (flair.ScanningSequence, flair.SeriesDescription, flair.MRAcquisitionType) == (
        ["SE", "IR"],
        "t2_tirm_tra_dark-fluid",
        "2D",
    )
    assert (float(flair.InversionTime), float(flair.RepetitionTime), float(flair.EchoTime)) == (2500, 9000, 90)
    assert "ContrastBolusAgent" not in flair

    t1 = by_role(series, "t1_flair")[0]
    assert (t1.SeriesDescription, float(t1.InversionTime), float(t1.RepetitionTime)) == ("t1_tirm_tra", 860, 2000)
    post = by_role(series, "flair_post")
    assert post[0].ContrastBolusAgent == "Gadobutrol"
    assert post[0].SeriesDescription == "t2_tirm_tra_dark-fluid_POST"
    eadc = by_role(series, "eadc")
    assert list(eadc[0].ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "EADC"]
    eadc_volume = hd.get_volume_from_series(eadc)
    assert np.median(eadc_volume.array[eadc_volume.array > 0]) == pytest.approx(np.exp(-0.8), abs=1e-3)

    # One study, one frame of reference, one patient; distinct series numbers and UIDs.
    every = [ds for datasets in series.values() for ds in datasets]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "PatientAge", "AccessionNumber", "StudyDescription", "StudyDate", "StudyTime"):
        assert len({str(ds.get(keyword)) for ds in every}) == 1, keyword
    assert len({ds.SeriesNumber for ds in every}) == len({ds.SeriesInstanceUID for ds in every}) == 6
    assert len({ds.SOPInstanceUID for ds in every}) == len(every)
    assert all(ds.Modality == "MR" and ds.Manufacturer == "fedlesion-synthetic" for ds in every)
    in_number_order = sorted(series.items(), key=lambda item: int(item[0].split("_")[0]))
    series_times = [datasets[0].SeriesTime for _, datasets in in_number_order]
    assert series_times == sorted(series_times)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    series = {}
    for path in write_dicom_study(make_case("oblique"), tmp_path, negatives=True, patient_name="Ødegård^Zoë"):
        series.setdefault(path.parent.name, path)  # one instance of each series
    for name, path in series.items():
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"


@pytest.mark.parametrize(
    ("charset", "name", "encoded"),
    [
        ("ISO_IR 100", "Müller^Jürgen", "Müller^Jürgen".encode("latin_1")),
        ("ISO_IR 192", "Ødegård^Zoë", "Ødegård^Zoë".encode("utf_8")),
        ("ISO_IR 192", "山田^太郎", "山田^太郎".encode("utf_8")),
    ],
)
def test_charset_round_trip(tmp_path: Path, charset: str, name: str, encoded: bytes) -> None:
    paths = write_dicom_study(make_case(shape=(8, 8, 3)), tmp_path, charset=charset, patient_name=name,
                              study_description="Schädel MRT")
    assert encoded in paths[0].read_bytes()
    ds = pydicom.dcmread(paths[0])
    assert ds.SpecificCharacterSet == charset
    assert str(ds.PatientName) == name
    assert ds.StudyDescription == "Schädel MRT"


def test_writing_is_deterministic(tmp_path: Path) -> None:
    case = make_case(shape=(10, 12, 4))
    first = write_dicom_study(case, tmp_path / "a", negatives=True)
    second = write_dicom_study(case, tmp_path / "b", negatives=True)
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))

    other = write_dicom_study(make_case(shape=(10, 12, 4), seed=8), tmp_path / "c")
    assert pydicom.dcmread(other[0]).StudyInstanceUID != pydicom.dcmread(first[0]).StudyInstanceUID
    given = write_dicom_study(case, tmp_path / "d", study_uid="1.2.826.0.1.3680043.2.1125.1")
    assert {pydicom.dcmread(p).StudyInstanceUID for p in given} == {"1.2.826.0.1.3680043.2.1125.1"}


def test_invalid_inputs_are_refused(tmp_path: Path) -> None:
    case = make_case(shape=(8, 8, 3))
    with pytest.raises(ValueError, match="cannot be encoded in ISO_IR 100"):
        write_dicom_study(case, tmp_path, charset="ISO_IR 100", patient_name="山田^太郎")
    with pytest.raises(ValueError, match="charset must be one of"):
        write_dicom_study(case, tmp_path, charset="GB18030")
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        write_dicom_study(case, tmp_path, study_uid="1.2.abc")
    sheared = np.eye(4)
    sheared[0, 2] = 0.5
    with pytest.raises(ValueError, match="not along the slice normal"):
        slice_geometry(sheared)
    with pytest.raises(ValueError, match="share one shape"):
        case.images["flair"] = case.images["flair"][:-1]
        write_dicom_study(case, tmp_path)


def test_t1_flair_pixels_come_from_the_case_when_present(tmp_path: Path) -> None:
    case = make_case(shape=(12, 12, 4))
    case.images["t1_flair"] = (2.0 * case.images["flair"]).astype(np.float32)
    series = read_series(write_dicom_study(case, tmp_path, negatives=True))
    slope = float(by_role(series, "t1_flair")[0].RescaleSlope)
    assert_same_world(hd.get_volume_from_series(by_role(series, "t1_flair")), case, "t1_flair", atol=slope / 2 + 1e-6)


@pytest.mark.parametrize("geometry", ["oblique", "sagittal"])
def test_generated_phantom_round_trips(tmp_path: Path, geometry: str) -> None:
    """The phantom generator's stroke cases (ADC and FLAIR among their images) write and read back on the same world
    grid."""
    case = generate_case("stroke", 3, geometry=geometry)
    assert {"adc", "flair"} <= case.images.keys()
    series = read_series(write_dicom_study(case, tmp_path))
    adc = hd.get_volume_from_series(by_role(series, "adc"))
    assert_same_world(adc, case, "adc", atol=0.5, high=5000.0)
    flair = by_role(series, "flair")
    slope = float(flair[0].RescaleSlope)
    assert_same_world(hd.get_volume_from_series(flair), case, "flair", atol=slope / 2 + 1e-6)
