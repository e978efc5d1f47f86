"""Dataset fingerprint: aggregates only, histogram bins of ≥ 5 cases, nothing that names or pins down a case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MS_CASE, MS_FLAIR, MS_MASK, require

from fedlesion.cli import main
from models.preprocessing import Channel
from training.datasets import TrainingCase
from training.fingerprint import fingerprint


def _case(index: int) -> TrainingCase:
    """A small head: a bright ball in noise with a lesion blob; size, spacing and intensity vary per case."""
    rng = np.random.default_rng(index)
    shape = (28 + index % 3 * 2, 30, 24)
    grid = np.indices(shape).transpose(1, 2, 3, 0) - np.array(shape) / 2
    ball = np.linalg.norm(grid, axis=-1) < 10
    dwi = (rng.normal(0, 5, shape) + ball * (300 + 17 * index)).astype(np.float32)
    adc = (ball * (800.7 + 13.3 * index)).astype(np.float32)
    lesion = np.linalg.norm(grid - [2, 1, 0], axis=-1) < 1 + index * 0.3
    affine = np.diag([1.5 + index * 0.05, 1.5, 3.0 + index * 0.1, 1.0])
    channels = [Channel(dwi, affine, "dwi"), Channel(adc, affine, "adc")]
    return TrainingCase(f"secret-case-{index:03d}", channels, lesion.astype(np.uint8), "1e-3 mm2/s")


@pytest.fixture(scope="module")
def twelve() -> list[TrainingCase]:
    return [_case(i) for i in range(12)]


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [value] if isinstance(value, float) else []


def test_twelve_cases_every_bin_holds_five(twelve: list[TrainingCase]) -> None:
    result = fingerprint(twelve)
    text = json.dumps(result, allow_nan=False)
    histograms = [result["lesion_volume_ml"]["histogram"]]
    histograms += [result["channels"][name]["median_intensity_in_head"]["histogram"] for name in ("dwi", "adc")]
    for histogram in histograms:
        assert all(count >= 5 for count in histogram["counts"]) and sum(histogram["counts"]) == 12
        assert len(histogram["edges"]) == len(histogram["counts"]) + 1
        assert histogram["edges"] == sorted(histogram["edges"])
    assert result["n_cases"] == 12 and result["notes"] == []
    assert result["shape"]["median"] == [30.0, 30.0, 24.0]
    assert result["spacing_mm"]["p5"][1] == 1.5
    assert "secret" not in text and "case" not in text.replace("n_cases", "").replace("min_cases", "")
    # No per-case value is shared: neither ADC medians nor lesion volumes of single cases appear.
    volumes = {float(f"{c.mask.sum() * abs(np.linalg.det(c.channels[0].affine)) / 1000:.4g}") for c in twelve}
    assert not volumes & set(_numbers(result))
    assert not {float(f"{800.7 + 13.3 * i:.4g}") for i in range(12)} & set(_numbers(result))


def test_fewer_than_five_cases_share_only_the_count(twelve: list[TrainingCase]) -> None:
    result = fingerprint(twelve[:3])
    assert "\"histogram\"" not in json.dumps(result)
    assert set(result) == {"n_cases", "min_cases_per_bin", "channel_names", "notes"}
    assert "3 case(s), fewer than the 5" in result["notes"][0]


def test_mismatched_channels_and_empty_input_refused(twelve: list[TrainingCase]) -> None:
    with pytest.raises(ValueError, match="no cases"):
        fingerprint([])
    odd = TrainingCase("x", twelve[0].channels[:1], twelve[0].mask, None)
    with pytest.raises(ValueError, match="channels"):
        fingerprint([twelve[0], odd])


def test_cli_on_the_ms_folder_prints_json_without_names(capsys) -> None:
    require(MS_FLAIR, MS_MASK)
    assert main(["fingerprint", "--task", "ms-flair", "--data", str(MS_CASE.parent), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["n_cases"] == 1 and result["channel_names"] == ["flair"]
    assert "patient07" not in out and "FLAIR_N4" not in out
