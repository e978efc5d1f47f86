"""The ONNX Runtime engine: provider choice, window layout, blending, and probabilities on the source grid."""

from __future__ import annotations


import numpy as np
import pytest
from onnx_graphs import first_channel_sigmoid

from inference.engine import Engine, choose_providers, gaussian_importance, window_starts
from models.manifest import Task, default_manifest
from models.package import TrustPolicy, build_package, load_package
from models.preprocessing import Channel
from models.signing import demo_private_key
from training.synthetic import generate_case


@pytest.mark.parametrize(
    ("available", "chosen"),
    [
        (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
        ([], ["CPUExecutionProvider"]),
    ],
)
def test_provider_choice(available: list[str], chosen: list[str]) -> None:
    assert choose_providers(available) == chosen


@pytest.mark.parametrize(("size", "patch", "overlap"), [(100, 32, 0.5), (64, 64, 0.5), (20, 32, 0.5), (97, 40, 0.25)])
def test_windows_cover_every_voxel_and_stay_inside(size: int, patch: int, overlap: float) -> None:
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(max(size, patch), bool)
    for start in starts:
        assert 0 <= start and (start + patch <= size or size <= patch)
        covered[start:start + patch] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts))


def test_importance_peaks_in_the_centre_and_never_vanishes() -> None:
    weights = gaussian_importance((16, 12, 8))
    assert weights.shape == (16, 12, 8) and weights.min() > 0
    assert weights[8, 6, 4] > weights[0, 0, 0] * 10


@pytest.fixture(scope="module")
def engine_package(tmp_path_factory: pytest.TempPathFactory):
    manifest = default_manifest(Task.STROKE_DWI_ADC, 1, plan_sha256="b" * 64, demo=True, description="test")
    path = build_package(tmp_path_factory.mktemp("pkg") / "p", first_channel_sigmoid(2), manifest, demo_private_key())
    return load_package(path, TrustPolicy.demo())


def test_sliding_windows_blend_to_the_whole_volume_result(engine_package) -> None:
    case = generate_case("stroke", seed=4, size="medium", pattern="single")
    channels = [Channel(case.images["dwi_b1000"], case.affine, "dwi"), Channel(case.images["adc"], case.affine, "adc")]
    whole = Engine(engine_package, threads=1).predict(channels)
    windowed = Engine(engine_package, threads=1, whole_volume_voxels=0).predict(channels)
    assert whole.windows == 1 and windowed.windows >= 8
    assert whole.probabilities.shape == case.mask.shape  # back on the source grid
    # A pointwise model makes every window agree, so blending must reproduce the single pass exactly.
    assert np.abs(whole.probabilities - windowed.probabilities).max() < 1e-5
    # Bright DWI lesion: sigmoid(z-scored DWI) > 0.5 over nearly all of it.
    assert (whole.probabilities[case.mask > 0] > 0.5).mean() > 0.9


def test_channels_must_match_the_manifest(engine_package) -> None:
    data = np.ones((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="expects channels"):
        Engine(engine_package).predict([Channel(data, np.eye(4), "flair")])
