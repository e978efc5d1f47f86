"""Manifest schema v1: parsing, canonical bytes, task defaults, and a named ValueError for every bad field."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any, Callable

import pytest

from models.manifest import (
    ADC_UNIT,
    Manifest,
    Normalization,
    NormalizationMethod,
    Role,
    Task,
    default_manifest,
    default_preprocessing,
    parse_manifest,
)

EXAMPLE: dict[str, Any] = {
    "schema_version": 1,
    "name": "fedlesion-stroke-dwi-adc",
    "task": "stroke-dwi-adc",
    "version": 3,
    "created": "2026-11-22T06:00:00Z",
    "demo": True,
    "description": "trained on synthetic data; not for clinical use",
    "inputs": [
        {"name": "dwi", "role": "dwi", "b_value": 1000, "b_value_range": [700, 1500]},
        {"name": "adc", "role": "adc", "unit": "1e-6 mm2/s"},
    ],
    "preprocessing": {
        "target_spacing_mm": [2.0, 2.0, 2.0],
        "patch_size": [96, 96, 64],
        "size_divisible": 16,
        "normalization": {"method": "zscore-head-mask", "clip_percentiles": [0.5, 99.5]},
    },
    "onnx": {"file": "model.onnx", "input_name": "image", "output_name": "probabilities", "opset": 18},
    "output": {"kind": "probabilities", "activation": "sigmoid", "threshold": 0.5},
    "postprocessing": {"min_lesion_ml": 0.01},
    "training": {"plan_sha256": "a" * 64, "federated_round": None, "strategy": None, "site_metrics": {}},
    "files": {"model.onnx": "b" * 64},
}


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def test_example_parses_into_typed_fields() -> None:
    manifest = parse_manifest(encode(EXAMPLE))
    assert manifest.task is Task.STROKE_DWI_ADC
    assert manifest.version == 3
    assert manifest.created == datetime(2026, 11, 22, 6, 0, tzinfo=timezone.utc)
    assert [channel.role for channel in manifest.inputs] == [Role.DWI, Role.ADC]
    assert manifest.inputs[0].b_value_range == (700, 1500)
    assert manifest.preprocessing.patch_size == (96, 96, 64)
    assert manifest.output.threshold == 0.5
    assert manifest.files == {"model.onnx": "b" * 64}


def test_canonical_bytes_round_trip() -> None:
    manifest = parse_manifest(encode(EXAMPLE))
    data = manifest.to_json_bytes()
    assert data == (json.dumps(EXAMPLE, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    assert parse_manifest(data) == manifest
    assert parse_manifest(data).to_json_bytes() == data


def test_task_defaults() -> None:
    stroke = default_manifest(Task.STROKE_DWI_ADC, 1, plan_sha256="c" * 64, demo=True, description="demo")
    assert stroke.preprocessing.target_spacing_mm == (2.0, 2.0, 2.0)
    assert stroke.postprocessing.min_lesion_ml == 0.01
    assert [(c.role, c.b_value, c.b_value_range, c.unit) for c in stroke.inputs] == [
        (Role.DWI, 1000, (700, 1500), None),
        (Role.ADC, None, None, ADC_UNIT),
    ]
    ms = default_manifest("ms-flair", 2, plan_sha256="c" * 64, demo=False, description="")
    assert ms.task is Task.MS_FLAIR and ms.name == "fedlesion-ms-flair"
    assert ms.preprocessing.target_spacing_mm == (1.0, 1.0, 1.0)
    assert ms.postprocessing.min_lesion_ml == 0.003
    assert [c.role for c in ms.inputs] == [Role.FLAIR]
    assert ms.files == {}
    assert default_preprocessing(Task.MS_FLAIR).size_divisible == 16


def test_federated_provenance_is_recorded_only_when_set() -> None:
    data = copy.deepcopy(EXAMPLE)
    data["training"].update(federated_round=3, strategy="fedavg", sites_contributed=2, sites_invited=3,
                            fedlesion_version="0.1.0", site_metrics={"site-a": {"cases": 12.0, "loss": 0.4}})
    manifest = parse_manifest(encode(data))
    training = manifest.training
    assert (training.sites_contributed, training.sites_invited, training.fedlesion_version) == (2, 3, "0.1.0")
    assert parse_manifest(manifest.to_json_bytes()) == manifest
    assert "sites_invited" not in json.loads(parse_manifest(encode(EXAMPLE)).to_json_bytes())["training"]
    data["training"]["sites_contributed"] = 4
    with pytest.raises(ValueError, match=r"training\.sites_contributed: 4 of 3"):
        parse_manifest(encode(data))


def test_local_training_provenance_round_trips_and_is_checked() -> None:
    data = copy.deepcopy(EXAMPLE)
    data["training"].update(data="synthetic-stream:8", patches_seen=5600, hours=1.25, hardware="2 CPU cores")
    manifest = parse_manifest(encode(data))
    training = manifest.training
    assert (training.data, training.patches_seen, training.hours, training.hardware) == \
        ("synthetic-stream:8", 5600, 1.25, "2 CPU cores")
    assert parse_manifest(manifest.to_json_bytes()) == manifest
    assert "hours" not in json.loads(parse_manifest(encode(EXAMPLE)).to_json_bytes())["training"]
    data["training"]["hours"] = -1
    with pytest.raises(ValueError, match=r"training\.hours"):
        parse_manifest(encode(data))


@pytest.mark.parametrize(
    ("network", "window_invariant"),
    [
        (None, False),  # packages exported before the field existed: run as trained
        ({"architecture": "dynunet", "normalization": "instance", "parameters": 1_400_000}, False),
        ({"architecture": "dynunet", "normalization": "batch", "parameters": 1_400_000}, True),
        ({"architecture": "unet", "normalization": "none", "parameters": 10}, True),
    ],
)
def test_network_normalization_decides_window_invariance(network, window_invariant) -> None:
    data = copy.deepcopy(EXAMPLE)
    if network is not None:
        data["network"] = network
    manifest = parse_manifest(encode(data))
    assert manifest.window_invariant is window_invariant
    assert parse_manifest(manifest.to_json_bytes()) == manifest
    assert ("network" in json.loads(manifest.to_json_bytes())) is (network is not None)


def test_constructed_manifest_is_validated_and_normalized() -> None:
    manifest = default_manifest(Task.MS_FLAIR, 1, plan_sha256="c" * 64, demo=True, description="x")
    fields = {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}
    assert Manifest(**{**fields, "task": "ms-flair"}).task is Task.MS_FLAIR
    with pytest.raises(ValueError, match=r"manifest\.version"):
        Manifest(**{**fields, "version": 0})
    with pytest.raises(ValueError, match=r"manifest\.created"):
        Manifest(**{**fields, "created": datetime(2026, 1, 1)})


_DELETE = object()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        elif value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


@pytest.mark.parametrize("method, clip_values, scale", [
    (NormalizationMethod.FIXED_SCALE, (0.0, 4000.0), 0.001), (NormalizationMethod.MEDIAN_RATIO, (100.0, 1500.0), 1.0)])
def test_channel_normalization_round_trips_and_applies_per_channel(method, clip_values, scale) -> None:
    data = copy.deepcopy(EXAMPLE)
    data["preprocessing"]["channel_normalization"] = {
        "adc": {"method": method.value, "clip_values": list(clip_values), "scale": scale}}
    manifest = parse_manifest(encode(data))
    pre = manifest.preprocessing
    assert pre.normalization_of("adc") == Normalization(method, clip_values=clip_values, scale=scale)
    assert pre.normalization_of("dwi") is pre.normalization
    assert manifest.to_dict()["preprocessing"] == data["preprocessing"]
    assert "channel_normalization" not in parse_manifest(encode(EXAMPLE)).to_dict()["preprocessing"]


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("schema_version", 2, r"manifest\.schema_version"),
        ("version", 0, r"manifest\.version: must be ≥ 1"),
        ("version", "3", r"manifest\.version: must be an integer"),
        ("version", True, r"manifest\.version: must be an integer"),
        ("task", "brain-tumour", r"manifest\.task: 'brain-tumour' is not one of"),
        ("name", "", r"manifest\.name"),
        ("demo", "yes", r"manifest\.demo"),
        ("created", "2026-11-22T06:00:00", r"manifest\.created: .* time zone"),
        ("created", "yesterday", r"manifest\.created"),
        ("extra", 1, r"manifest\.extra: unknown key"),
        ("inputs", [], r"manifest\.inputs"),
        ("inputs.0.role", "t2", r"manifest\.inputs\[0\]\.role"),
        ("inputs.0.b_value", _DELETE, r"manifest\.inputs\[0\]: a dwi channel needs b_value"),
        ("inputs.0.b_value", 2000, r"manifest\.inputs\[0\]\.b_value_range: .* must contain"),
        ("inputs.1.unit", "mm2/s", r"manifest\.inputs\[1\]\.unit"),
        ("inputs.1.name", "dwi", r"manifest\.inputs: channel names must be unique"),
        ("inputs.0.role", "flair", r"manifest\.inputs\[0\]"),
        ("preprocessing.target_spacing_mm", [2.0, 0.0, 2.0], r"target_spacing_mm\[1\]: must be > 0"),
        ("preprocessing.patch_size", [96, 96], r"preprocessing\.patch_size: must be a list of 3"),
        ("preprocessing.patch_size", [96, 96, 60], r"preprocessing\.patch_size: .* multiples of size_divisible"),
        ("preprocessing.size_divisible", 0, r"preprocessing\.size_divisible"),
        ("preprocessing.normalization.method", "minmax", r"normalization\.method"),
        ("preprocessing.normalization.clip_percentiles", [99, 1], r"normalization\.clip_percentiles"),
        ("preprocessing.channel_normalization", {"adc": {"method": "fixed-scale", "clip_values": [0, 4000]}},
         r"channel_normalization\.adc\.scale: missing"),
        ("preprocessing.channel_normalization", {"adc": {"method": "fixed-scale", "clip_values": [4000, 0],
                                                         "scale": 0.001}}, r"adc\.clip_values: need low < high"),
        ("preprocessing.channel_normalization", {"t2": {"method": "zscore-head-mask", "clip_percentiles": [1, 99]}},
         r"channel_normalization\.t2: not an input channel"),
        ("onnx.file", "../model.onnx", r"manifest\.onnx\.file"),
        ("onnx.opset", 5, r"manifest\.onnx\.opset"),
        ("onnx.input_name", "", r"manifest\.onnx\.input_name"),
        ("output.threshold", 1.0, r"manifest\.output\.threshold: must be < 1"),
        ("output.threshold", 0, r"manifest\.output\.threshold: must be > 0"),
        ("output.kind", "logits", r"manifest\.output\.kind"),
        ("output.activation", "relu", r"manifest\.output\.activation"),
        ("postprocessing.min_lesion_ml", -1, r"postprocessing\.min_lesion_ml"),
        ("training.plan_sha256", "abc", r"training\.plan_sha256"),
        ("training.federated_round", -1, r"training\.federated_round"),
        ("training.strategy", _DELETE, r"training\.strategy: missing"),
        ("training.site_metrics", {"site-a": {"dice": "high"}}, r"site_metrics\.site-a\.dice"),
        ("files", {}, r"manifest\.files: must list the ONNX file"),
        ("files", {"model.onnx": "XYZ"}, r"manifest\.files\.model\.onnx"),
        ("files", {"model.onnx": "b" * 64, "manifest.sig": "b" * 64}, r"manifest\.files\.manifest\.sig"),
        ("network", {"architecture": "dynunet", "normalization": "layer", "parameters": 1}, r"network\.normalization"),
        ("network", {"architecture": "dynunet", "normalization": "batch"}, r"network\.parameters: missing"),
        ("network", {"architecture": "dynunet", "normalization": "batch", "parameters": 0}, r"network\.parameters"),
        ("network", [], r"manifest\.network: must be an object"),
    ],
)
def test_bad_field_is_named(path: str, value: Any, message: str) -> None:
    data = copy.deepcopy(EXAMPLE)
    _set(path, value)(data)
    with pytest.raises(ValueError, match=message):
        parse_manifest(encode(data))


@pytest.mark.parametrize("data", [b"\xff\xfe", b"[1, 2]", b"{", "text"])
def test_not_a_manifest(data: Any) -> None:
    with pytest.raises(ValueError, match="manifest"):
        parse_manifest(data)
