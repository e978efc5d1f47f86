"""ADC units: detection on the real ISLES'22 ADC (median ≈ 1.0 inside the head, i.e. 10⁻³ mm²/s) scaled to each
unit, and the one rule (`adc_in_micrometres`) on every real ADC in ../shared/data, each stored in its own unit."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ISLES_ADC, ISLES_DWI, SHARED_DATA, require

from dicom_gateway.adc_maps import scanner_adc
from dicom_gateway.study_files import read_path
from dicom_gateway.volumes import series_volumes
from models.adc import AdcUnit, adc_in_micrometres, detect_adc_unit, to_micrometre2_per_s
from models.manifest import ADC_UNIT, Task
from models.preprocessing import head_mask
from training.datasets import CaseFiles, load_case

BRAIN_MEDIAN = (600.0, 1150.0)  # µm²/s: grey and white matter, a little CSF
WATER_MEDIAN = (1700.0, 2300.0)  # µm²/s: free water at room temperature (the XA30 phantom)


def _isles(case: int, kind: str) -> Path:
    folder = "derivatives" if kind == "msk" else "rawdata"
    name = f"sub-strokecase{case:04d}_ses-0001"
    return (SHARED_DATA / f"nifti/isles22/case{case:04d}_dwi_adc_plus_gt" / folder / f"sub-strokecase{case:04d}"
            / "ses-0001" / f"{name}_{kind}.nii.gz")


@pytest.fixture(scope="module")
def isles_adc() -> tuple[np.ndarray, np.ndarray]:
    require(ISLES_ADC, ISLES_DWI)
    return nib.load(ISLES_ADC).get_fdata(dtype=np.float32), head_mask(nib.load(ISLES_DWI).get_fdata(dtype=np.float32))


@pytest.mark.parametrize(
    ("scale", "unit"),
    [(1e-3, AdcUnit.MM2_PER_S), (1.0, AdcUnit.MILLI_MM2_PER_S), (1e3, AdcUnit.MICRO_MM2_PER_S)],
)
def test_each_unit_detected_on_scaled_isles_adc(isles_adc, scale: float, unit: AdcUnit) -> None:
    adc, mask = isles_adc
    assert detect_adc_unit(adc * np.float32(scale), mask) is unit
    converted = to_micrometre2_per_s(adc * np.float32(scale), unit)
    assert 800 < np.median(converted[mask]) < 1200  # brain tissue, in 10⁻⁶ mm²/s


@pytest.mark.parametrize("scale", [1e-2, 10.0, 1e5])
def test_out_of_range_median_refused_with_the_median(isles_adc, scale: float) -> None:
    adc, mask = isles_adc
    median = float(np.median(adc[mask] * np.float32(scale)))
    with pytest.raises(ValueError, match=f"median inside the head is {median:.6g}"):
        detect_adc_unit(adc * np.float32(scale), mask)


def test_empty_or_mismatched_mask_refused() -> None:
    adc = np.ones((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="no finite ADC value"):
        detect_adc_unit(adc, np.zeros_like(adc, dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        detect_adc_unit(adc, np.ones((4, 4, 3), bool))


def test_conversion_factors_exact() -> None:
    values = np.array([1e-3, 0.5e-3, 2.5e-3])
    assert to_micrometre2_per_s(values, "mm2/s").tolist() == np.float32([1000, 500, 2500]).tolist()
    assert to_micrometre2_per_s(np.array([1.0, 0.7, 3.0]), AdcUnit.MILLI_MM2_PER_S).tolist() == np.float32(
        [1000, 700, 3000]).tolist()
    micro = to_micrometre2_per_s(np.array([812.5]), ADC_UNIT)
    assert micro.dtype == np.float32 and micro.tolist() == [812.5]
    with pytest.raises(ValueError):
        to_micrometre2_per_s(values, "mm^2/s")


@pytest.mark.parametrize(("case", "stored_in"), [(1, AdcUnit.MILLI_MM2_PER_S), (2, AdcUnit.MM2_PER_S),
                                                 (3, AdcUnit.MM2_PER_S)])
def test_real_isles_adc_in_its_own_unit_lands_in_brain_range(case: int, stored_in: AdcUnit) -> None:
    """Judged on the ADC alone; the median is checked inside the brain as the DWI shows it."""
    require(_isles(case, "adc"), _isles(case, "dwi"))
    adc = nib.load(_isles(case, "adc")).get_fdata(dtype=np.float32)
    brain = head_mask(nib.load(_isles(case, "dwi")).get_fdata(dtype=np.float32))
    converted = adc_in_micrometres(adc)
    assert converted.unit is stored_in
    assert converted.values.dtype == np.float32 and converted.values.shape == adc.shape
    assert BRAIN_MEDIAN[0] <= float(np.median(converted.values[brain])) <= BRAIN_MEDIAN[1]


def test_real_xa30_dicom_adc_in_micrometres_lands_in_water_range() -> None:
    """The scanner's ADC (no Real World Value Mapping) goes through the same rule on a (slices, rows, columns) array."""
    folder = SHARED_DATA / "dicom/dcm_qa_xa30i/dicom/12001_DWI_dir80_AP"  # gzipped files, read as they are
    require(folder)
    study = read_path(folder).only_study()
    (volume,) = series_volumes(study.series[0].datasets)
    raw = np.asarray(volume.real.array, dtype=np.float64)
    phantom = raw > 0  # the scanner writes 0 outside the water
    conversion = scanner_adc(volume)
    assert (conversion.unit, conversion.unit_source) == (AdcUnit.MICRO_MM2_PER_S, "median inside the head")
    assert adc_in_micrometres(raw, slice_axis=0).unit is AdcUnit.MICRO_MM2_PER_S
    assert WATER_MEDIAN[0] <= float(np.median(np.asarray(conversion.adc.array)[phantom])) <= WATER_MEDIAN[1]


def test_training_loader_uses_the_one_rule(tmp_path: Path) -> None:
    """Training's loader gives the values of the one rule (case 0002 in mm²/s), whatever its DWI looks like."""
    require(_isles(2, "adc"), _isles(2, "dwi"), _isles(2, "msk"))
    files = CaseFiles("case0002", {"dwi": _isles(2, "dwi"), "adc": _isles(2, "adc")}, _isles(2, "msk"))
    loaded = load_case(files, Task.STROKE_DWI_ADC)
    expected = adc_in_micrometres(nib.load(_isles(2, "adc")).get_fdata(dtype=np.float32))
    assert loaded.adc_unit_detected == expected.unit.value == "mm2/s"
    assert np.array_equal(loaded.channels[1].data, expected.values)


def test_no_head_in_the_adc_refused() -> None:
    with pytest.raises(ValueError, match="cannot tell the ADC unit"):
        adc_in_micrometres(np.full((8, 8, 8), 0.8, np.float32))
