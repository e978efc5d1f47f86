"""ADC unit detection on the real ISLES'22 ADC (median ≈ 1.0 inside the head, i.e. 10⁻³ mm²/s) scaled to each unit."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import ISLES_ADC, ISLES_DWI, require

from models.adc import AdcUnit, detect_adc_unit, to_micrometre2_per_s
from models.manifest import ADC_UNIT
from models.preprocessing import head_mask


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
