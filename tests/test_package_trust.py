"""Model packages: build, pack, load from the verified bytes, and one test per refusal (design.md §2)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, external_data_helper, helper, numpy_helper  # noqa: E402

from fedlesion.cli import main  # noqa: E402
from onnx_graphs import first_channel_sigmoid  # noqa: E402
from models.errors import (  # noqa: E402
    DemoPackageRefused,
    ExternalDataRefused,
    MalformedPackage,
    PackageRefused,
    SymlinkInPackage,
    TamperedPackage,
    TaskNotAllowed,
    UnlistedFile,
    UnsignedPackage,
    UntrustedSigner,
    VersionNotNewer,
)
from models.manifest import Manifest, Task, default_manifest  # noqa: E402
from models.package import (  # noqa: E402
    TrustMode,
    TrustPolicy,
    build_package,
    external_data_tensors,
    load_package,
    pack_tar,
)
from models.signing import (  # noqa: E402
    demo_private_key,
    demo_public_key,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_fingerprint,
    public_key_pem,
    sign,
    verify,
)

PLAN = "d" * 64


def external_model(tmp_path: Path, in_attribute: bool) -> bytes:
    """A model whose bias tensor lives in an external file: as an initializer, or inside a Constant node."""
    bias = numpy_helper.from_array(np.full((1, 2, 1, 1, 1), 0.5, np.float32), "bias")
    nodes = [helper.make_node("Add", ["image", "bias"], ["sum"]), helper.make_node("Sigmoid", ["sum"], ["p"])]
    initializers = [bias]
    if in_attribute:
        nodes.insert(0, helper.make_node("Constant", [], ["bias"], value=bias))
        initializers = []
    shape = [1, 2, 4, 4, 4]
    graph = helper.make_graph(
        nodes,
        "external",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    external_data_helper.convert_model_to_external_data(
        model, location="weights.bin", size_threshold=0, convert_attribute=True
    )
    return model.SerializeToString()


def manifest(task: Task = Task.STROKE_DWI_ADC, version: int = 1, demo: bool = True) -> Manifest:
    return default_manifest(task, version, plan_sha256=PLAN, demo=demo, description="test package")


def write_signed(directory: Path, files: dict[str, bytes], listed: Manifest, key: Ed25519PrivateKey) -> Path:
    """Hand-made package, bypassing build_package's own checks, to test the loader's."""
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    body = listed.with_files({name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    (directory / "manifest.json").write_bytes(body.to_json_bytes())
    (directory / "manifest.sig").write_bytes(sign(body.to_json_bytes(), key))
    return directory


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return build_package(tmp_path / "pkg", first_channel_sigmoid(), manifest(), demo_private_key())


@pytest.fixture
def publisher() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def run_session(onnx_bytes: bytes) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    image = np.zeros((1, 2, 3, 4, 5), np.float32)
    return session.run(["probabilities"], {"image": image})[0]


def test_round_trip_directory(package: Path) -> None:
    loaded = load_package(package, TrustPolicy.demo())
    assert loaded.manifest.version == 1 and loaded.manifest.task is Task.STROKE_DWI_ADC
    assert loaded.manifest_bytes == (package / "manifest.json").read_bytes()
    assert loaded.manifest_sha256 == hashlib.sha256(loaded.manifest_bytes).hexdigest()
    assert loaded.manifest.files == {"model.onnx": hashlib.sha256(loaded.onnx_bytes).hexdigest()}
    assert loaded.signer_fingerprint == public_key_fingerprint(demo_public_key())
    assert loaded.demo is True
    probabilities = run_session(loaded.onnx_bytes)
    assert probabilities.shape == (1, 1, 3, 4, 5)
    np.testing.assert_allclose(probabilities, 0.5)


def test_round_trip_tar(package: Path, tmp_path: Path) -> None:
    tar_path = pack_tar(package, tmp_path / "pkg.tar")
    with tarfile.open(tar_path) as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "manifest.sig", "model.onnx"]
    loaded = load_package(tar_path, TrustPolicy.demo())
    assert loaded.manifest == load_package(package, TrustPolicy.demo()).manifest
    assert run_session(loaded.onnx_bytes).shape == (1, 1, 3, 4, 5)


def test_enrolled_node_loads_its_publishers_package(tmp_path: Path, publisher: Ed25519PrivateKey) -> None:
    path = build_package(tmp_path / "pkg", first_channel_sigmoid(), manifest(demo=False), publisher)
    loaded = load_package(path, TrustPolicy.enrolled([publisher.public_key()]))
    assert loaded.demo is False
    assert loaded.signer_fingerprint == public_key_fingerprint(publisher.public_key())


def test_unsigned(package: Path) -> None:
    (package / "manifest.sig").unlink()
    with pytest.raises(UnsignedPackage, match="unsigned"):
        load_package(package, TrustPolicy.demo())


def test_tampered_model_file(package: Path) -> None:
    (package / "model.onnx").write_bytes(first_channel_sigmoid() + b"\x00")
    with pytest.raises(TamperedPackage, match=r"model\.onnx was changed after signing: sha256"):
        load_package(package, TrustPolicy.demo())


def test_tampered_manifest(package: Path) -> None:
    text = (package / "manifest.json").read_text()
    (package / "manifest.json").write_text(text.replace('"version": 1', '"version": 9'))
    with pytest.raises(TamperedPackage, match=r"manifest\.json was changed after signing"):
        load_package(package, TrustPolicy.demo())


def test_listed_file_missing(tmp_path: Path) -> None:
    files = {"model.onnx": first_channel_sigmoid(), "notes.txt": b"x"}
    path = write_signed(tmp_path / "pkg", files, manifest(), demo_private_key())
    assert load_package(path, TrustPolicy.demo()).files["notes.txt"] == b"x"
    (path / "notes.txt").unlink()
    with pytest.raises(TamperedPackage, match="notes.txt is listed in the manifest but missing"):
        load_package(path, TrustPolicy.demo())


def test_wrongly_signed(tmp_path: Path, publisher: Ed25519PrivateKey) -> None:
    path = build_package(tmp_path / "pkg", first_channel_sigmoid(), manifest(), publisher)
    fingerprint = public_key_fingerprint(publisher.public_key())
    with pytest.raises(UntrustedSigner, match=f"signed by key {fingerprint}, which this node does not trust"):
        load_package(path, TrustPolicy.demo())
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(UntrustedSigner):
        load_package(path, TrustPolicy.enrolled([other]))


def test_unlisted_file(package: Path) -> None:
    (package / "README.txt").write_text("hello")
    with pytest.raises(UnlistedFile, match="'README.txt' is not listed"):
        load_package(package, TrustPolicy.demo())


def test_unlisted_directory(package: Path) -> None:
    (package / "extra").mkdir()
    with pytest.raises(UnlistedFile, match="'extra' is not a regular file"):
        load_package(package, TrustPolicy.demo())


def test_symlinked_model(package: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.onnx"
    (package / "model.onnx").rename(real)
    (package / "model.onnx").symlink_to(real)
    with pytest.raises(SymlinkInPackage, match=r"model\.onnx is a symbolic link"):
        load_package(package, TrustPolicy.demo())


def test_symlink_anywhere(package: Path, tmp_path: Path) -> None:
    (package / "sub").mkdir()
    (package / "sub" / "link").symlink_to("/etc/passwd")
    with pytest.raises(SymlinkInPackage, match="link is a symbolic link"):
        load_package(package, TrustPolicy.demo())
    link = tmp_path / "link-to-package"
    link.symlink_to(package)
    with pytest.raises(SymlinkInPackage, match="package path is a symbolic link"):
        load_package(link, TrustPolicy.demo())


def test_symlink_in_tar(package: Path, tmp_path: Path) -> None:
    tar_path = pack_tar(package, tmp_path / "pkg.tar")
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo("weights.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "model.onnx"
        tar.addfile(info)
    with pytest.raises(SymlinkInPackage, match="'weights.bin' is a link"):
        load_package(tar_path, TrustPolicy.demo())


def test_tar_path_traversal(package: Path, tmp_path: Path) -> None:
    tar_path = pack_tar(package, tmp_path / "pkg.tar")
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(MalformedPackage, match="not a usable package tar"):
        load_package(tar_path, TrustPolicy.demo())
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("in_attribute", [False, True], ids=["initializer", "constant-attribute"])
def test_external_data(tmp_path: Path, in_attribute: bool) -> None:
    model = external_model(tmp_path, in_attribute)
    assert external_data_tensors(model) == ["bias"]
    with pytest.raises(ValueError, match="external data"):
        build_package(tmp_path / "refused", model, manifest(), demo_private_key())
    files = {"model.onnx": model, "weights.bin": np.full(2, 0.5, np.float32).tobytes()}
    path = write_signed(tmp_path / "pkg", files, manifest(), demo_private_key())
    with pytest.raises(ExternalDataRefused, match="keeps tensor 'bias' in external data"):
        load_package(path, TrustPolicy.demo())


def test_external_data_walker_on_plain_and_broken_bytes() -> None:
    assert external_data_tensors(first_channel_sigmoid()) == []
    for broken in (b"", b"\x3a\xff\xff\xff\xff\x0f", b"not a protobuf at all"):
        with pytest.raises(ValueError):
            external_data_tensors(broken)


def test_not_an_onnx_model(tmp_path: Path) -> None:
    path = write_signed(tmp_path / "pkg", {"model.onnx": b"\x3a\x05abc"}, manifest(), demo_private_key())
    with pytest.raises(MalformedPackage, match=r"model\.onnx: not an ONNX model"):
        load_package(path, TrustPolicy.demo())


def test_version_not_newer(tmp_path: Path) -> None:
    path = build_package(tmp_path / "pkg", first_channel_sigmoid(), manifest(version=3), demo_private_key())
    for served in (3, 4):
        with pytest.raises(VersionNotNewer, match=f"version 3 is not newer than version {served}"):
            load_package(path, TrustPolicy.demo(), served={Task.STROKE_DWI_ADC: served})
    assert load_package(path, TrustPolicy.demo(), served={Task.STROKE_DWI_ADC: 2, Task.MS_FLAIR: 7})


def test_demo_signed_refused_when_enrolled(package: Path, publisher: Ed25519PrivateKey) -> None:
    with pytest.raises(DemoPackageRefused, match="signed with the demo key"):
        load_package(package, TrustPolicy.enrolled([publisher.public_key()]))


def test_demo_manifest_refused_when_enrolled(tmp_path: Path, publisher: Ed25519PrivateKey) -> None:
    path = build_package(tmp_path / "pkg", first_channel_sigmoid(), manifest(demo=True), publisher)
    with pytest.raises(DemoPackageRefused, match="demo: true"):
        load_package(path, TrustPolicy.enrolled([publisher.public_key()]))


def test_task_not_allowed(package: Path) -> None:
    with pytest.raises(TaskNotAllowed, match="task stroke-dwi-adc, which this node does not run"):
        load_package(package, TrustPolicy.demo(allowed_tasks=[Task.MS_FLAIR]))


def test_refusals_are_value_errors() -> None:
    refusals = (UnsignedPackage, TamperedPackage, UntrustedSigner, UnlistedFile, SymlinkInPackage,
                ExternalDataRefused, VersionNotNewer, DemoPackageRefused, TaskNotAllowed, MalformedPackage)
    for refusal in refusals:
        assert issubclass(refusal, PackageRefused) and issubclass(refusal, ValueError)


def test_trust_policy_validation(publisher: Ed25519PrivateKey) -> None:
    assert TrustPolicy.demo().mode is TrustMode.DEMO
    assert TrustPolicy.enrolled([publisher.public_key()]).mode is TrustMode.ENROLLED
    with pytest.raises(ValueError, match="must not trust the demo key"):
        TrustPolicy.enrolled([demo_public_key()])
    with pytest.raises(ValueError, match="at least one trusted public key"):
        TrustPolicy.enrolled([])
    with pytest.raises(ValueError, match="allowed_tasks"):
        TrustPolicy.demo(allowed_tasks=[])


def test_build_package_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="demo key signs only demo manifests"):
        build_package(tmp_path / "a", first_channel_sigmoid(), manifest(demo=False), demo_private_key())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(ValueError, match="new or empty directory"):
        build_package(tmp_path / "b", first_channel_sigmoid(), manifest(), demo_private_key())
    with pytest.raises(ValueError, match="onnx_bytes"):
        build_package(tmp_path / "c", b"", manifest(), demo_private_key())


def test_signing_keys_round_trip(publisher: Ed25519PrivateKey) -> None:
    again = load_private_key(private_key_pem(publisher))
    public = load_public_key(public_key_pem(publisher.public_key()))
    assert public_key_fingerprint(again.public_key()) == public_key_fingerprint(public)
    signature = sign(b"manifest", again)
    assert verify(b"manifest", signature, public)
    assert not verify(b"manifest!", signature, public)
    assert not verify(b"manifest", signature, demo_public_key())
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(b"junk")
    with pytest.raises(ValueError, match="signature document"):
        verify(b"manifest", b"\xff" * 64, public)


def test_demo_key_pair_matches() -> None:
    assert public_key_fingerprint(demo_private_key().public_key()) == public_key_fingerprint(demo_public_key())


def test_cli_verify(
    package: Path, publisher: Ed25519PrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "verify", str(package)]) == 0
    out = capsys.readouterr().out
    assert "task: stroke-dwi-adc" in out and "version: 1" in out and "demo: yes" in out
    assert public_key_fingerprint(demo_public_key()) in out
    key_file = tmp_path / "publisher.pem"
    key_file.write_bytes(public_key_pem(publisher.public_key()))
    assert main(["model", "verify", str(package), "--public-key", str(key_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "signed with the demo key" in err


def test_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "publisher"
    assert main(["model", "keygen", str(prefix)]) == 0
    private = load_private_key(Path(f"{prefix}.private.pem"))
    public = load_public_key(Path(f"{prefix}.public.pem"))
    assert public_key_fingerprint(private.public_key()) == public_key_fingerprint(public)
    assert os.stat(f"{prefix}.private.pem").st_mode & 0o077 == 0
    assert public_key_fingerprint(public) in capsys.readouterr().out
    assert main(["model", "keygen", str(prefix)]) == 2
    assert "exists" in capsys.readouterr().err
