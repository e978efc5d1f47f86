"""ADC in one unit (10⁻⁶ mm²/s, float32), computed ADC, computed trace and the mean b0 (design.md §4).

Why: scanners store ADC in mm²/s, 10⁻³ mm²/s or 10⁻⁶ mm²/s, sometimes saying so in a Real World Value Mapping and
often not at all; the model was trained on µm²/s. A mapping's UCUM unit is trusted when it names a diffusivity;
otherwise the unit is read off the median inside the head with the same ranges as NIfTI input (models/adc.py), so
a DICOM ADC and a NIfTI ADC of one patient get the same numbers. Where the scanner made no ADC, it is computed from
the mean b0 and the trace at one b: 10⁶·ln(S0/Sb)/b, clipped to [0, 5000], 0 where S0 is background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np

from dicom_gateway.volumes import SeriesVolume
from models.adc import AdcUnit, adc_in_micrometres, to_micrometre2_per_s

__all__ = [
    "ADC_MAX",
    "AdcConversion",
    "background_threshold",
    "computed_adc",
    "geometric_mean",
    "mean_volume",
    "scanner_adc",
]

ADC_MAX = 5000.0  # µm²/s, the clip of design.md §4
# UCUM code values a Real World Value Mapping may give for a diffusivity, and the unit each means.
_UCUM_UNITS: dict[str, AdcUnit] = {
    "mm2/s": AdcUnit.MM2_PER_S,
    "mm^2/s": AdcUnit.MM2_PER_S,
    "10-3.mm2/s": AdcUnit.MILLI_MM2_PER_S,
    "10*-3.mm2/s": AdcUnit.MILLI_MM2_PER_S,
    "um2/s": AdcUnit.MICRO_MM2_PER_S,
    "um^2/s": AdcUnit.MICRO_MM2_PER_S,
    "10-6.mm2/s": AdcUnit.MICRO_MM2_PER_S,
    "10*-6.mm2/s": AdcUnit.MICRO_MM2_PER_S,
}


@dataclass(frozen=True)
class AdcConversion:
    """A scanner ADC in µm²/s and how its unit was decided (for study.json and the logs)."""

    adc: hd.Volume  # float32, 10⁻⁶ mm²/s
    unit: AdcUnit  # the unit the scanner stored
    unit_source: str  # "real world value mapping units <code>" or "median inside the head"


def scanner_adc(volume: SeriesVolume) -> AdcConversion:
    """The scanner's ADC series volume (real values) in µm²/s; negative values (none in a true ADC) become 0.

    Without a diffusivity unit in the mapping, the unit is `models.adc`'s rule, the one NIfTI input gets.
    """
    values = np.asarray(volume.real.array, dtype=np.float64)
    unit_code = (volume.unit or "").strip()
    if unit_code in _UCUM_UNITS:
        unit = _UCUM_UNITS[unit_code]
        source = f"real world value mapping units {unit_code}"
        micro = to_micrometre2_per_s(values, unit)
    else:
        converted = adc_in_micrometres(values, slice_axis=0)  # a highdicom volume is (slices, rows, columns)
        unit, micro = converted.unit, converted.values
        source = "median inside the head"
    return AdcConversion(volume.real.with_array(np.clip(micro, 0.0, None).astype(np.float32)), unit, source)


def mean_volume(volumes: Sequence[hd.Volume]) -> hd.Volume:
    """Voxel-wise arithmetic mean (the b0 from several b≈0 volumes), float32."""
    stack = _stack(volumes)
    return volumes[0].with_array(stack.mean(axis=0).astype(np.float32))


def geometric_mean(volumes: Sequence[hd.Volume]) -> hd.Volume:
    """Voxel-wise geometric mean (the trace from the directions at one b), float32; 0 where any input is ≤ 0."""
    stack = _stack(volumes)
    with np.errstate(divide="ignore"):
        logs = np.log(np.where(stack > 0, stack, 0.0))
    trace = np.exp(logs.mean(axis=0))
    return volumes[0].with_array(np.nan_to_num(trace, nan=0.0).astype(np.float32))


def background_threshold(b0: np.ndarray) -> float:
    """Otsu's threshold over the positive b0 values: the head is bright on b0 (water), air is noise."""
    values = np.asarray(b0, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return float("inf")
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def computed_adc(b0: hd.Volume, dwi: hd.Volume, b_value: float) -> hd.Volume:
    """10⁶·ln(S0/Sb)/b in µm²/s, clipped to [0, ADC_MAX]; 0 where S0 is at or below the background threshold.

    Where Sb ≤ 0 inside the head the signal has fully decayed: the clip gives ADC_MAX.
    """
    if not np.isfinite(b_value) or b_value <= 0:
        raise ValueError(f"b-value for a computed ADC must be positive, got {b_value}")
    s0 = np.asarray(_stack([b0, dwi])[0], dtype=np.float64)
    sb = np.asarray(dwi.array, dtype=np.float64)
    head = s0 > background_threshold(s0)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = 1e6 * np.log(s0 / np.where(sb > 0, sb, 0.0)) / b_value
    adc = np.where(head, np.clip(np.nan_to_num(adc, nan=0.0, posinf=ADC_MAX), 0.0, ADC_MAX), 0.0)
    return b0.with_array(adc.astype(np.float32))


def _stack(volumes: Sequence[hd.Volume]) -> np.ndarray:
    if not volumes:
        raise ValueError("no volumes given")
    first = volumes[0]
    for other in volumes[1:]:
        if not first.geometry_equal(other):
            raise ValueError("volumes differ in geometry: cannot combine them voxel by voxel")
    return np.stack([np.asarray(v.array, dtype=np.float64) for v in volumes])
