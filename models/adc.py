"""ADC units (design.md §4): NIfTI carries no unit, so it is inferred from the median ADC inside the head.

Normal brain tissue has an ADC of about 0.7–1.2 × 10⁻³ mm²/s and CSF about 3 × 10⁻³ mm²/s, so the median over
the head lands in one of three ranges that are three decades apart; anything else is refused rather than guessed.
Internally every ADC is float32 in 10⁻⁶ mm²/s (µm²/s), the unit the manifest names.

`adc_in_micrometres` is the one rule training, `fedlesion segment` and the DICOM gateway use, over one head mask
(preprocessing's, computed on the ADC itself), so the same file gets the same unit everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from models.manifest import ADC_UNIT
from models.preprocessing import head_mask

__all__ = ["AdcInMicrometres", "AdcUnit", "adc_in_micrometres", "detect_adc_unit", "to_micrometre2_per_s"]


class AdcUnit(StrEnum):
    MM2_PER_S = "mm2/s"
    MILLI_MM2_PER_S = "1e-3 mm2/s"
    MICRO_MM2_PER_S = ADC_UNIT  # "1e-6 mm2/s", the internal unit


# Inclusive ranges of the median inside the head mask, and the factor to 10⁻⁶ mm²/s.
_MEDIAN_RANGES: dict[AdcUnit, tuple[float, float]] = {
    AdcUnit.MM2_PER_S: (2e-4, 3e-3),
    AdcUnit.MILLI_MM2_PER_S: (0.2, 3.0),
    AdcUnit.MICRO_MM2_PER_S: (200.0, 3000.0),
}
_TO_MICRO: dict[AdcUnit, float] = {
    AdcUnit.MM2_PER_S: 1e6,
    AdcUnit.MILLI_MM2_PER_S: 1e3,
    AdcUnit.MICRO_MM2_PER_S: 1.0,
}


def detect_adc_unit(adc: np.ndarray, head_mask: np.ndarray) -> AdcUnit:
    """The unit whose plausible range holds the median ADC inside `head_mask` (non-finite voxels ignored)."""
    adc = np.asarray(adc)
    head_mask = np.asarray(head_mask, dtype=bool)
    if adc.shape != head_mask.shape:
        raise ValueError(f"ADC shape {adc.shape} differs from the head mask's {head_mask.shape}")
    values = adc[head_mask]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite ADC value inside the head mask: cannot tell the ADC unit")
    median = float(np.median(values))
    for unit, (low, high) in _MEDIAN_RANGES.items():
        if low <= median <= high:
            return unit
    ranges = "; ".join(f"{low:g}…{high:g} → {unit.value}" for unit, (low, high) in _MEDIAN_RANGES.items())
    raise ValueError(f"ADC unit not recognised: median inside the head is {median:.6g}, expected one of {ranges}")


def to_micrometre2_per_s(adc: np.ndarray, unit: AdcUnit | str) -> np.ndarray:
    """ADC in 10⁻⁶ mm²/s as float32; scaled in float64 first so the factor itself adds no rounding."""
    factor = _TO_MICRO[AdcUnit(unit)]
    return (np.asarray(adc, dtype=np.float64) * factor).astype(np.float32)


@dataclass(frozen=True)
class AdcInMicrometres:
    """An ADC converted to 10⁻⁶ mm²/s and the unit it was stored in."""

    values: np.ndarray  # float32, 10⁻⁶ mm²/s, same shape as the input
    unit: AdcUnit


def _adc_head_mask(adc: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Preprocessing's head mask computed on the ADC itself (non-finite voxels count as background).

    The ADC's own mask needs no second image on the same grid; `slice_axis` is the axis across slices (2 for a
    NIfTI array, 0 for a highdicom volume), along which the mask's per-slice hole filling runs.
    """
    finite = np.nan_to_num(np.asarray(adc, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    try:
        mask = head_mask(np.moveaxis(finite, slice_axis, -1))
    except ValueError as error:  # constant volume, nothing above the threshold
        raise ValueError(f"no head in the ADC ({error}): cannot tell the ADC unit") from error
    return np.moveaxis(mask, -1, slice_axis)


def adc_in_micrometres(adc: np.ndarray, slice_axis: int = 2) -> AdcInMicrometres:
    """The ADC in 10⁻⁶ mm²/s, its unit judged from the median inside the ADC's own head mask.

    Raises ValueError when no head is found or the median fits no unit.
    """
    unit = detect_adc_unit(adc, _adc_head_mask(adc, slice_axis))
    return AdcInMicrometres(to_micrometre2_per_s(adc, unit), unit)
