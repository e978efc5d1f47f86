"""Model hot-swap (issue 5, item 4) with real signed packages, a real registry and onnxruntime sessions.

Each package is the smallest real ONNX graph (sigmoid of the first channel) signed with the demo key or a fresh
publisher key; versions are told apart by their manifests, and swaps are observed through `current(task)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_graphs import first_channel_sigmoid

from inference.engine import Engine
from inference.models import (
    ModelService,
    ModelUnavailable,
    WarmUpFailed,
    trust_from_bundle,
    warm_up_channels,
)
from models.errors import DemoPackageRefused, TaskNotAllowed, VersionNotNewer
from models.federation import pki
from models.manifest import Task, default_manifest
from models.package import TrustPolicy, build_package
from models.signing import (
    demo_private_key,
    generate_key_pair,
    load_private_key,
    load_public_key,
)
from tests.test_federation_pki import site_bundle

STROKE = Task.STROKE_DWI_ADC


def darker_than_mean(channels: int = 2) -> bytes:
    """sigmoid(−image[:, 0]): a second, different real model, so a swap shows in the predictions."""
    nodes = [
        helper.make_node("Split", ["image"], ["first", *(f"rest{c}" for c in range(1, channels))], axis=1,
                         num_outputs=channels),
        helper.make_node("Neg", ["first"], ["negated"]),
        helper.make_node("Sigmoid", ["negated"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes, "darker-than-mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, channels, "x", "y", "z"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 1, "x", "y", "z"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def make_package(
    out: Path, version: int, *, task: Task = STROKE, key=None, demo: bool = True, onnx: bytes | None = None
) -> Path:
    manifest = default_manifest(
        task, version, plan_sha256="a" * 64, demo=demo, description=f"test model v{version}",
        federated_round=version, site_metrics={"site-a": {"dice": 0.5 + version / 100}},
    )
    channels = len(manifest.inputs)
    return build_package(out, onnx or first_channel_sigmoid(channels), manifest, key or demo_private_key())


def service(tmp_path: Path, trust: TrustPolicy | None = None, **kwargs) -> ModelService:
    return ModelService(
        tmp_path / "registry", trust or TrustPolicy.demo(), {STROKE},
        engine_factory=lambda package: Engine(package, threads=1), poll_s=0.05, **kwargs,
    )


def drop_into_registry(package: Path, registry: Path, task: Task, version: int) -> Path:
    """What a careless admin or a broken sync does: copy a directory straight into the registry tree."""
    target = registry / task.value / str(version)
    shutil.copytree(package, target)
    return target


def test_swap_while_a_job_holds_the_old_model(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults"
    make_package(defaults / STROKE.value, 1)
    models = service(tmp_path, defaults_dir=defaults)
    models.start(watch=False)
    job_model = models.current(STROKE)  # a "job" takes the model once
    assert job_model.version == 1 and models.status()["demo_mode"] is True
    channels = warm_up_channels(job_model.manifest)
    before = job_model.engine.predict(channels).probabilities

    served = models.install(make_package(tmp_path / "v2", 2, onnx=darker_than_mean()))
    assert served.version == 2 and models.current(STROKE) is served
    # the job in flight still predicts on v1's own session and gets v1's answer, not v2's
    assert job_model.version == 1 and job_model.engine is not served.engine
    np.testing.assert_array_equal(job_model.engine.predict(channels).probabilities, before)
    after = served.engine.predict(channels).probabilities
    np.testing.assert_allclose(after, 1.0 - before, atol=1e-5)
    assert np.abs(after - before).max() > 0.3
    status = models.status()["tasks"][STROKE.value]
    assert status["serving"]["version"] == 2 and status["registry_versions"] == [1, 2]
    assert status["serving"]["federated_round"] == 2
    assert status["serving"]["validation_metrics"] == {"site-a": {"dice": 0.52}}
    assert status["serving"]["providers"] == ["CPUExecutionProvider"]
    assert models.refusals() == []


def test_watcher_swaps_a_published_version_in(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start()
    try:
        assert models.current(STROKE).version == 1
        models.registry.publish(make_package(tmp_path / "v2", 2))
        for _ in range(200):
            if models.current(STROKE).version == 2:
                break
            models._stop.wait(0.05)
        assert models.current(STROKE).version == 2
    finally:
        models.stop()


def test_tampered_package_is_refused_and_the_old_model_keeps_serving(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v2", 2))
    models.start(watch=False)
    serving = models.current(STROKE)
    tampered = drop_into_registry(make_package(tmp_path / "v3", 3), models.registry.root, STROKE, 3)
    onnx = bytearray((tampered / "model.onnx").read_bytes())
    onnx[-1] ^= 0x01  # one byte after signing
    (tampered / "model.onnx").write_bytes(bytes(onnx))

    assert models.poll_once() == {}
    assert models.current(STROKE) is serving and serving.version == 2
    (refusal,) = models.refusals()
    assert (refusal.kind, refusal.task, refusal.version) == ("TamperedPackage", STROKE.value, 3)
    assert "model.onnx was changed after signing" in refusal.reason and refusal.path == str(tampered)
    models.poll_once()  # a refused version is not retried (and re-recorded) on every poll
    assert len(models.refusals()) == 1
    assert models.status()["refusals"][0]["kind"] == "TamperedPackage"


def test_older_and_equal_versions_are_refused(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v2", 2))
    models.start(watch=False)
    with pytest.raises(VersionNotNewer):
        models.install(make_package(tmp_path / "v1", 1))
    with pytest.raises(VersionNotNewer):
        models.install(make_package(tmp_path / "v2-again", 2))
    # an old package dropped under a newer version number is refused by its manifest's version
    drop_into_registry(make_package(tmp_path / "v1-dropped", 1), models.registry.root, STROKE, 5)
    models.poll_once()
    assert models.current(STROKE).version == 2
    assert [r.kind for r in models.refusals()] == ["VersionNotNewer"] * 3
    assert "version 1 is not newer than version 2" in models.refusals()[0].reason


def test_an_enrolled_node_refuses_demo_packages(tmp_path: Path) -> None:
    private_pem, public_pem = generate_key_pair()
    bundle = site_bundle(pki.create_ca(), public_pem, "node-a", role="node").write(tmp_path / "node-a.bundle")
    trust = trust_from_bundle(bundle, {STROKE})
    defaults = tmp_path / "defaults"
    make_package(defaults / STROKE.value, 1)  # the embedded demo model cannot seed an enrolled node
    models = service(tmp_path, trust, defaults_dir=defaults)
    models.start(watch=False)
    with pytest.raises(ModelUnavailable):
        models.current(STROKE)
    assert models.refusals()[0].kind == "DemoPackageRefused"

    publisher = load_private_key(private_pem)
    assert models.install(make_package(tmp_path / "v4", 4, key=publisher, demo=False)).version == 4
    with pytest.raises(DemoPackageRefused):
        models.install(make_package(tmp_path / "v5-demo", 5))
    assert models.current(STROKE).version == 4
    status = models.status()
    assert status["demo_mode"] is False and status["tasks"][STROKE.value]["serving"]["demo"] is False
    assert load_public_key(public_pem)  # the bundle key is a real Ed25519 key


def test_a_task_the_node_does_not_run_is_refused(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    with pytest.raises(TaskNotAllowed):
        models.install(make_package(tmp_path / "ms", 1, task=Task.MS_FLAIR))
    with pytest.raises(ModelUnavailable):
        models.current(Task.MS_FLAIR)
    assert models.refusals()[0].kind == "TaskNotAllowed"


def test_a_model_that_fails_its_warm_up_is_refused(tmp_path: Path) -> None:
    """A signed package whose graph expects 3 channels where the manifest feeds 2: it verifies, then cannot run."""
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    manifest = default_manifest(STROKE, 2, plan_sha256="b" * 64, demo=True, description="wrong graph")
    broken = build_package(tmp_path / "v2", first_channel_sigmoid(3), manifest, demo_private_key())
    with pytest.raises(WarmUpFailed):
        models.install(broken)
    assert models.current(STROKE).version == 1
    assert models.refusals()[0].kind == "WarmUpFailed" and models.refusals()[0].version == 2
