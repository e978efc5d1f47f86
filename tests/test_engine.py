"""The ONNX Runtime engine: provider choice and options, session tuning, window layout, blending, batched windows,
flip TTA, and probabilities on the source grid."""

from __future__ import annotations

import math
import os
import platform

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import first_channel_sigmoid

from inference.engine import (
    FLIPS,
    Engine,
    choose_providers,
    gaussian_importance,
    physical_cores,
    provider_options,
    return_large_buffers_to_the_system,
    window_size,
    window_starts,
)
from models.manifest import LayerNormalization, NetworkInfo, Preprocessing, Task, default_manifest
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
        (onnxruntime.get_available_providers(), ["CPUExecutionProvider"]),  # this CPU-only build
    ],
)
def test_provider_choice(available: list[str], chosen: list[str]) -> None:
    assert choose_providers(available) == chosen


def test_provider_options_keep_fp32_and_suit_changing_shapes() -> None:
    cuda = provider_options("CUDAExecutionProvider", device_id=1)
    assert cuda["device_id"] == "1" and cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert provider_options("TensorrtExecutionProvider")["trt_fp16_enable"] == "False"
    assert provider_options("CPUExecutionProvider") == {}


@pytest.mark.parametrize(("size", "patch", "overlap"), [(100, 32, 0.5), (64, 64, 0.5), (20, 32, 0.5), (97, 40, 0.25)])
def test_windows_cover_every_voxel_and_stay_inside(size: int, patch: int, overlap: float) -> None:
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(max(size, patch), bool)
    for start in starts:
        assert 0 <= start and (start + patch <= size or size <= patch)
        covered[start:start + patch] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts))


def _passes(grid: tuple[int, ...], window: tuple[int, ...], overlap: float = 0.5) -> int:
    return math.prod(len(window_starts(g, w, overlap)) for g, w in zip(grid, window)) * math.prod(window)


@pytest.mark.parametrize(
    ("grid", "budget"),
    [((224, 224, 176), 160 * 160 * 128), ((192, 224, 192), 160 * 160 * 128), ((112, 112, 96), 10**6), ((64,) * 3, 0)],
)
def test_window_size_computes_fewer_voxels_within_the_budget(grid: tuple[int, ...], budget: int) -> None:
    patch = (96, 96, 48)
    window = window_size(grid, patch, 16, budget, 0.5)
    floor = tuple(min(p, g) for p, g in zip(patch, grid))
    assert all(f <= w <= g and (w == f or w % 16 == 0) for f, w, g in zip(floor, window, grid))
    assert math.prod(window) <= max(budget, math.prod(floor))
    assert _passes(grid, window) <= _passes(grid, floor)
    if budget >= 160 * 160 * 128:  # the MS grids: at least 2.5× fewer voxel-passes than the manifest's patch
        assert _passes(grid, window) * 2.5 < _passes(grid, floor)


def test_window_size_is_the_grid_when_it_fits() -> None:
    assert window_size((112, 112, 80), (96, 96, 64), 16, 112 * 112 * 80, 0.5) == (112, 112, 80)


def test_importance_peaks_in_the_centre_and_never_vanishes() -> None:
    weights = gaussian_importance((16, 12, 8))
    assert weights.shape == (16, 12, 8) and weights.min() > 0
    assert weights[8, 6, 4] > weights[0, 0, 0] * 10


def test_physical_cores_are_a_subset_of_the_cpus() -> None:
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


# The test graphs have no normalization layers: any window gives the same output, as the manifest says.
POINTWISE = NetworkInfo("test-graph", LayerNormalization.NONE, 1)


@pytest.fixture(scope="module")
def engine_package(tmp_path_factory: pytest.TempPathFactory):
    manifest = default_manifest(
        Task.STROKE_DWI_ADC, 1, plan_sha256="b" * 64, demo=True, description="test", network=POINTWISE
    )
    path = build_package(tmp_path_factory.mktemp("pkg") / "p", first_channel_sigmoid(2), manifest, demo_private_key())
    return load_package(path, TrustPolicy.demo())


def _conv_sigmoid(kernel: np.ndarray, *, batch: int | str) -> bytes:
    """probabilities = sigmoid(conv3d(image, kernel)), 'same' padding, one channel; `batch` fixed or symbolic."""
    pad = [k // 2 for k in kernel.shape] * 2
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "kernel"], ["logits"], pads=pad),
            helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
        ],
        "conv-sigmoid",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, "x", "y", "z"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 1, "x", "y", "z"])],
        [numpy_helper.from_array(kernel.astype(np.float32)[None, None], "kernel")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


SMALL_PATCH = Preprocessing(target_spacing_mm=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), size_divisible=16)


def _package(tmp_path, onnx_bytes: bytes, network: NetworkInfo | None = POINTWISE):
    manifest = default_manifest(
        Task.MS_FLAIR, 1, plan_sha256="c" * 64, demo=True, description="test", preprocessing=SMALL_PATCH,
        network=network,
    )
    return load_package(build_package(tmp_path / "p", onnx_bytes, manifest, demo_private_key()), TrustPolicy.demo())


def _image(seed: int = 0, shape: tuple[int, ...] = (1, 48, 40, 32)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_buffers_threshold_is_set_on_glibc() -> None:
    assert return_large_buffers_to_the_system() is True


def test_session_options_are_applied(engine_package) -> None:
    engine = Engine(engine_package, threads=1)
    applied = engine.session.get_session_options()
    assert applied.intra_op_num_threads == 1 and applied.inter_op_num_threads == 1
    assert applied.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert applied.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert not applied.enable_cpu_mem_arena and applied.enable_mem_pattern
    assert Engine(engine_package, threads=0).session.get_session_options().intra_op_num_threads == physical_cores()
    with pytest.raises(ValueError, match="threads"):
        Engine(engine_package, threads=-1)
    with pytest.raises(ValueError, match="window_voxels"):
        Engine(engine_package, window_voxels=0)
    described = engine.describe()
    assert described["providers"] == engine.providers == ["CPUExecutionProvider"]
    assert described["threads"] == 1 and described["io_binding"] is False and described["batched_windows"] is False


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


def test_larger_windows_mean_fewer_windows_and_the_same_blend(tmp_path) -> None:
    engine = Engine(_package(tmp_path, first_channel_sigmoid(1)), threads=1, whole_volume_voxels=0)
    image = _image()
    small = engine.predict_grid(image)  # by default the manifest's patch
    engine.window_voxels = 32 * 32 * 32
    large = engine.predict_grid(image)
    assert small.window == (16, 16, 16) and small.windows == 5 * 4 * 3
    assert math.prod(large.window) <= 32**3 and large.windows < small.windows
    expected = 1 / (1 + np.exp(-image[0]))
    for result in (small, large):
        assert np.abs(result.probabilities - expected).max() < 1e-5


@pytest.mark.parametrize(
    ("network", "expected_windows"),
    [
        (None, 5 * 4 * 3),  # a package that does not say: the manifest's 16³ patch, as it was trained
        (NetworkInfo("dynunet", LayerNormalization.INSTANCE, 1), 5 * 4 * 3),
        (NetworkInfo("dynunet", LayerNormalization.BATCH, 1), 1),  # a fixed map: the whole volume in one pass
    ],
)
def test_only_a_window_invariant_model_runs_the_whole_volume(tmp_path, network, expected_windows) -> None:
    engine = Engine(_package(tmp_path, first_channel_sigmoid(1), network), threads=1)
    result = engine.predict_grid(_image())
    assert result.windows == expected_windows
    assert engine.describe()["window_invariant"] is (expected_windows == 1)
    engine.window_voxels = 48 * 40 * 32  # an explicit budget wins either way
    assert engine.predict_grid(_image()).windows == 1


def test_a_batched_graph_runs_flips_together_with_the_same_result(tmp_path) -> None:
    kernel = np.random.default_rng(1).normal(size=(3, 3, 3))
    single = Engine(_package(tmp_path / "a", _conv_sigmoid(kernel, batch=1)), threads=1, flip_tta=True)
    batched = Engine(
        _package(tmp_path / "b", _conv_sigmoid(kernel, batch="n")), threads=1, flip_tta=True,
        whole_volume_voxels=4 * 32**3,  # the whole 32³ grid four times per run
    )
    assert not single.batched and batched.batched and batched.describe()["batched_windows"] is True
    image = _image(2, (1, 32, 32, 32))
    one, four = single.predict_grid(image), batched.predict_grid(image)
    assert one.windows == four.windows == 1 and one.runs == 8 and four.runs == 2
    assert np.abs(one.probabilities - four.probabilities).max() < 1e-5


def test_flip_tta_of_a_flip_equivariant_graph_changes_nothing(tmp_path) -> None:
    box = np.ones((3, 3, 3)) / 27  # mirror-symmetric kernel: conv commutes with every flip
    package = _package(tmp_path, _conv_sigmoid(box, batch=1))
    image = _image(3, (1, 32, 32, 32))
    plain = Engine(package, threads=1).predict_grid(image)
    tta = Engine(package, threads=1, flip_tta=True).predict_grid(image)
    assert plain.runs == 1 and tta.flips == len(FLIPS) == 8 and tta.runs == 8
    assert np.abs(plain.probabilities - tta.probabilities).max() < 1e-5


def test_flip_tta_averages_the_flipped_back_passes(tmp_path) -> None:
    kernel = np.random.default_rng(4).normal(size=(3, 3, 3))  # no symmetry: every flip gives another answer
    package = _package(tmp_path, _conv_sigmoid(kernel, batch=1))
    image = _image(5, (1, 32, 32, 48))
    plain = Engine(package, threads=1)
    manual = np.mean(
        [np.flip(plain.predict_grid(np.flip(image, [a + 1 for a in axes])).probabilities, axes) for axes in FLIPS],
        axis=0,
    )
    tta = Engine(package, threads=1, flip_tta=True)
    whole = tta.predict_grid(image)
    assert np.abs(whole.probabilities - manual).max() < 1e-5
    assert np.abs(whole.probabilities - plain.predict_grid(image).probabilities).max() > 0.01
    tta.whole_volume_voxels = 0  # windows and TTA together: 16³ windows, 8 passes each
    windowed = tta.predict_grid(image)
    assert windowed.windows == 3 * 3 * 5 and windowed.runs == 8 * windowed.windows


def test_channels_must_match_the_manifest(engine_package) -> None:
    data = np.ones((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="expects channels"):
        Engine(engine_package).predict([Channel(data, np.eye(4), "flair")])
