"""Model registry: verified publish, monotonic versions, atomic visibility, crash debris, concurrent publishers."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from fedlesion.cli import main  # noqa: E402
from models.errors import DemoPackageRefused, MalformedPackage, VersionNotNewer  # noqa: E402
from models.manifest import Task, default_manifest  # noqa: E402
from onnx_graphs import first_channel_sigmoid  # noqa: E402
from models.package import TrustPolicy, build_package, pack_tar  # noqa: E402
from models.registry import INCOMING, Registry  # noqa: E402
from models.signing import demo_private_key  # noqa: E402


def make_package(where: Path, version: int, task: Task = Task.MS_FLAIR) -> Path:
    manifest = default_manifest(task, version, plan_sha256="e" * 64, demo=True, description=f"v{version}")
    return build_package(where / f"{task.value}-{version}", first_channel_sigmoid(channels=1), manifest, demo_private_key())


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", TrustPolicy.demo())


def test_publish_and_read_back(registry: Registry, tmp_path: Path) -> None:
    assert registry.versions(Task.MS_FLAIR) == [] and registry.latest(Task.MS_FLAIR) is None
    published = registry.publish(make_package(tmp_path, 1))
    registry.publish(pack_tar(make_package(tmp_path, 2), tmp_path / "v2.tar"))
    registry.publish(make_package(tmp_path, 1, Task.STROKE_DWI_ADC))
    assert registry.versions(Task.MS_FLAIR) == [1, 2]
    assert registry.versions(Task.STROKE_DWI_ADC) == [1]
    assert sorted(p.name for p in (registry.root / "ms-flair" / "2").iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.onnx",
    ]
    latest = registry.latest(Task.MS_FLAIR)
    assert latest is not None and latest.manifest.version == 2
    assert registry.load(Task.MS_FLAIR, 1).manifest_bytes == published.manifest_bytes
    session = ort.InferenceSession(latest.onnx_bytes, providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((1, 1, 2, 2, 2), np.float32)})[0]
    np.testing.assert_allclose(out, 0.5)


def test_older_or_equal_version_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish(make_package(tmp_path, 2))
    for version in (1, 2):
        with pytest.raises(VersionNotNewer, match=f"version {version} is not newer than version 2"):
            registry.publish(make_package(tmp_path / str(version), version))
    assert registry.versions(Task.MS_FLAIR) == [2]


def test_enrolled_registry_refuses_demo_package(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry", TrustPolicy.enrolled([Ed25519PrivateKey.generate().public_key()]))
    with pytest.raises(DemoPackageRefused):
        registry.publish(make_package(tmp_path, 1))
    assert registry.versions(Task.MS_FLAIR) == []


def test_debris_is_ignored_then_cleaned(registry: Registry, tmp_path: Path) -> None:
    registry.publish(make_package(tmp_path, 1))
    debris = registry.root / INCOMING / "deadbeef"
    debris.mkdir()
    (debris / "model.onnx").write_bytes(b"half a package")
    (registry.root / "ms-flair" / "notes").mkdir()
    (registry.root / "ms-flair" / "07").mkdir()
    assert registry.versions(Task.MS_FLAIR) == [1]
    registry.publish(make_package(tmp_path, 2))
    assert not debris.exists()
    assert list((registry.root / INCOMING).iterdir()) == []
    assert registry.versions(Task.MS_FLAIR) == [1, 2]


def test_package_in_wrong_place_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish(make_package(tmp_path, 1))
    shutil.copytree(registry.root / "ms-flair" / "1", registry.root / "ms-flair" / "5")
    with pytest.raises(MalformedPackage, match="holds ms-flair version 1, not what its path says"):
        registry.latest(Task.MS_FLAIR)


def test_tampered_on_disk_refused_on_read(registry: Registry, tmp_path: Path) -> None:
    registry.publish(make_package(tmp_path, 1))
    (registry.root / "ms-flair" / "1" / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(ValueError, match="changed after signing"):
        registry.load(Task.MS_FLAIR, 1)


def test_concurrent_publishers_of_one_version(registry: Registry, tmp_path: Path) -> None:
    packages = [make_package(tmp_path / f"publisher{i}", 1) for i in range(4)]
    barrier = threading.Barrier(len(packages))
    outcomes: list[str] = []
    messages: list[str] = []

    def publish(source: Path) -> None:
        barrier.wait()
        try:
            registry.publish(source)
            outcomes.append("won")
        except VersionNotNewer as error:
            outcomes.append("refused")
            messages.append(str(error))

    threads = [threading.Thread(target=publish, args=(package,)) for package in packages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["won"]
    assert all("ms-flair version 1" in message for message in messages)
    assert registry.versions(Task.MS_FLAIR) == [1]
    assert registry.load(Task.MS_FLAIR, 1).manifest.version == 1


def test_rename_never_replaces_an_existing_version(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop when the lock does not hold (another host on a shared disk): the rename itself refuses."""
    first = registry.publish(make_package(tmp_path, 1))
    monkeypatch.setattr(registry, "_served", lambda: {})
    with pytest.raises(VersionNotNewer, match="ms-flair version 1 already exists"):
        registry.publish(make_package(tmp_path / "again", 1))
    assert registry.load(Task.MS_FLAIR, 1).manifest_bytes == first.manifest_bytes
    assert list((registry.root / INCOMING).iterdir()) == []


def test_reader_never_sees_half_a_package(registry: Registry, tmp_path: Path) -> None:
    sources = [make_package(tmp_path, version) for version in range(1, 9)]
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not done.is_set():
            try:
                latest = registry.latest(Task.MS_FLAIR)
                if latest is not None:
                    assert latest.onnx_bytes == first_channel_sigmoid(channels=1)
                    seen.append(latest.manifest.version)
            except BaseException as error:  # any failure, reported below
                errors.append(error)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for source in sources:
            registry.publish(source)
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen == sorted(seen) and len(seen) > 0
    assert registry.versions(Task.MS_FLAIR) == list(range(1, 9))


def test_cli_publish_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    assert main(["model", "publish", str(make_package(tmp_path, 3)), "--registry", str(root)]) == 0
    assert "published ms-flair version 3" in capsys.readouterr().out
    assert main(["model", "publish", str(make_package(tmp_path / "again", 3)), "--registry", str(root)]) == 2
    assert "not newer than version 3" in capsys.readouterr().err
    assert main(["model", "list", "--registry", str(root)]) == 0
    assert capsys.readouterr().out == "stroke-dwi-adc: -\nms-flair: 3\n"
