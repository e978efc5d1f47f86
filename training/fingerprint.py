"""Dataset fingerprint (design.md §7): what a site may tell the coordinator about its data, aggregates only.

Medians and 5th/95th percentiles over cases, and histograms whose every bin holds at least `min_cases_per_bin`
cases, so no single case can be read off; with fewer cases than that, only the count (any statistic over so few
cases is close to one case's own value). Histogram edges sit on a coarse 1-2-5 grid rather than at the data's own
minimum and maximum, which would give away the most extreme case. Never case IDs, file names, per-case values or
pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.geometry import affine_spacing, voxel_volume_ml
from models.preprocessing import head_mask
from training.datasets import TrainingCase, mask_on

__all__ = ["MIN_CASES_PER_BIN", "fingerprint", "histogram"]

MIN_CASES_PER_BIN = 5
# Initial histogram resolution before bins are merged to hold enough cases each.
_INITIAL_BINS = 10


def fingerprint(cases: Sequence[TrainingCase], *, min_cases_per_bin: int = MIN_CASES_PER_BIN) -> dict[str, Any]:
    """A JSON-safe summary: per channel the distribution of per-case median intensities inside the head mask,
    voxel spacing and grid size per axis, lesion volume (ml)."""
    if min_cases_per_bin < 1:
        raise ValueError(f"min_cases_per_bin must be at least 1, got {min_cases_per_bin}")
    if not cases:
        raise ValueError("no cases to fingerprint")
    names = [channel.name for channel in cases[0].channels]
    if any([channel.name for channel in case.channels] != names for case in cases):
        raise ValueError(f"every case must have the channels {names} in this order")

    result: dict[str, Any] = {"n_cases": len(cases), "min_cases_per_bin": min_cases_per_bin, "channel_names": names}
    if len(cases) < min_cases_per_bin:
        note = f"no statistics or histograms: {len(cases)} case(s), fewer than the {min_cases_per_bin} every bin must hold"
        result["notes"] = [note]
        return result

    medians: dict[str, list[float]] = {name: [] for name in names}
    spacings, shapes, volumes = [], [], []
    for case in cases:
        first = case.channels[0]
        mask = head_mask(first.data)
        for channel in case.channels:
            medians[channel.name].append(float(np.median(channel.data[mask_on(mask, first, channel)])))
        spacings.append(affine_spacing(first.affine))
        shapes.append(first.data.shape)
        volumes.append(float(np.count_nonzero(case.mask)) * voxel_volume_ml(first.affine))

    result |= {
        "channels": {
            name: {"median_intensity_in_head": _summary(values, min_cases_per_bin)} for name, values in medians.items()
        },
        "spacing_mm": _percentiles(np.array(spacings, dtype=np.float64), axis=0),
        "shape": _percentiles(np.array(shapes, dtype=np.float64), axis=0),
        "lesion_volume_ml": _summary(volumes, min_cases_per_bin),
        "notes": [],
    }
    return result


def _percentiles(values: np.ndarray, axis: int | None = None) -> dict[str, Any]:
    stats = {name: np.percentile(values, q, axis=axis) for name, q in (("median", 50), ("p5", 5), ("p95", 95))}
    return {name: _rounded(value) for name, value in stats.items()}


def _summary(values: Sequence[float], min_cases_per_bin: int) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("a case has a non-finite intensity or volume")
    return _percentiles(array) | {"histogram": histogram(array, min_cases_per_bin)}


def histogram(values: Sequence[float] | np.ndarray, min_count: int = MIN_CASES_PER_BIN) -> dict[str, list[Any]]:
    """{"edges", "counts"} of finite per-case `values` (one per case): bins on a 1-2-5 grid, merged left to right
    until each holds `min_count` cases; a short remainder joins the last bin. The dataset fingerprint's and an
    evaluator site's (training/federation/evaluation.py) one binning rule."""
    values = np.asarray(values, dtype=np.float64)
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if values.ndim != 1 or values.size < min_count or not np.all(np.isfinite(values)):
        raise ValueError(f"a histogram needs at least {min_count} finite values, one per case; got {values.size}")
    step = _nice_step(values)
    grid = np.floor(values / step + 1e-9).astype(np.int64)  # bin index on the step grid (1e-9: 0.3/0.1 is 2.99…)
    first = int(grid.min())
    edges, counts, running = [first], [], 0  # edges in steps
    for offset, count in enumerate(np.bincount(grid - first).tolist(), start=1):
        running += count
        if running >= min_count:
            edges.append(first + offset)
            counts.append(running)
            running = 0
    if running:
        counts[-1] += running
        edges[-1] = int(grid.max()) + 1
    decimals = max(0, -math.floor(math.log10(step)))
    return {"edges": [round(edge * step, decimals) for edge in edges], "counts": counts}


def _nice_step(values: np.ndarray) -> float:
    """A 1, 2 or 5 × 10^k width giving about `_INITIAL_BINS` bins over the values' range (or their magnitude)."""
    span = float(values.max() - values.min()) or abs(float(values.max())) or 1.0
    raw = span / _INITIAL_BINS
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _rounded(value: Any) -> Any:
    """Plain floats (4 significant digits) or lists of them: JSON-safe and no more precise than an aggregate needs."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim:
        return [_rounded(v) for v in array]
    return float(f"{float(array):.4g}")
