"""The node's pull client against a minimal GetLatestModel servicer over real mTLS on loopback (issue 11 item 7).

A good release is pulled, verified against the bundle's release keys and installed by the node's puller; a tampered
manifest or model, a candidate signed with the round key, a demo package and a truncated stream are refused and
nothing changes; an unreachable coordinator leaves the node serving what it has.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import grpc
import pytest
from onnx_graphs import first_channel_sigmoid

from inference.model_pull import ModelPuller
from models.errors import DemoPackageRefused, MalformedPackage, TamperedPackage, UntrustedSigner
from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc, pki, transport
from models.federation.enrollment import EnrollmentBundle, release_trust
from models.federation.pull import pull_latest
from models.federation.roles import SiteRole
from models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Task, default_manifest
from models.package import build_package
from models.signing import demo_private_key, generate_key_pair, load_private_key
from tests.test_federation_pki import site_bundle
from tests.test_model_service import service

STROKE = Task.STROKE_DWI_ADC
CHUNK = 1000  # small chunks, so even the tiny test model arrives in several


@dataclass
class Release:
    version: int
    manifest_json: bytes
    manifest_sig: bytes
    onnx: bytes
    announced_bytes: int | None = None  # a header that lies about the size (a truncated stream)


def release(tmp_path: Path, version: int, key, *, demo: bool = False) -> Release:
    manifest = default_manifest(STROKE, version, plan_sha256="b" * 64, demo=demo, description=f"released v{version}")
    folder = build_package(tmp_path / f"built-{version}-{id(key)}", first_channel_sigmoid(2), manifest, key)
    return Release(version, (folder / MANIFEST_FILE).read_bytes(), (folder / SIGNATURE_FILE).read_bytes(),
                   (folder / "model.onnx").read_bytes())


class ReleasesServicer(federation_pb2_grpc.CoordinatorServicer):
    """Hello and GetLatestModel only: the newest release above `newer_than`, header then ONNX chunks."""

    def __init__(self) -> None:
        self.releases: dict[int, Release] = {}
        self.hellos: list[str] = []

    def Hello(self, request: pb2.HelloRequest, context: grpc.ServicerContext) -> pb2.HelloReply:  # noqa: N802
        self.hellos.append(request.role)
        return pb2.HelloReply(protocol_version=transport.PROTOCOL_VERSION, site=transport.peer_name(context),
                              role=request.role)

    def GetLatestModel(  # noqa: N802 - the generated servicer's method name
        self, request: pb2.ModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb2.ModelPart]:
        newer = [v for v in self.releases if v > request.newer_than]
        if request.task != STROKE.value or not newer:
            return
        chosen = self.releases[max(newer)]
        yield pb2.ModelPart(header=pb2.ModelHeader(
            version=chosen.version, task=request.task, manifest_json=chosen.manifest_json,
            manifest_sig=chosen.manifest_sig, onnx_bytes=chosen.announced_bytes or len(chosen.onnx),
            onnx_sha256=hashlib.sha256(chosen.onnx).hexdigest(),
        ))
        for start in range(0, len(chosen.onnx), CHUNK):
            yield pb2.ModelPart(onnx_chunk=chosen.onnx[start:start + CHUNK])


@dataclass
class Federation:
    servicer: ReleasesServicer
    bundle: EnrollmentBundle
    release_key: object
    round_key: object


@pytest.fixture(scope="module")
def federation() -> Iterator[Federation]:
    ca = pki.create_ca()
    release_private, release_public = generate_key_pair()
    round_private, _ = generate_key_pair()  # signs candidates; not among the bundle's release keys
    _, older_release_public = generate_key_pair()  # a rotated-out key still listed: several keys are trusted
    server_key, server_cert = pki.issue_server_certificate(ca, "127.0.0.1:0")
    servicer = ReleasesServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    transport.add_coordinator_servicer(server, servicer, lambda fingerprint, name, method: None)
    port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(ca.cert_pem, server_cert, server_key))
    server.start()
    bundle = replace(
        site_bundle(ca, release_public, "node-a", f"127.0.0.1:{port}", role=SiteRole.NODE),
        release_public_keys=(older_release_public, release_public),
    )
    yield Federation(servicer, bundle, load_private_key(release_private), load_private_key(round_private))
    server.stop(grace=None)


def closed_address() -> str:
    """A loopback port that was bound and released again: nobody listens there."""
    gone = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = gone.add_insecure_port("127.0.0.1:0")
    gone.stop(grace=None)
    return f"127.0.0.1:{port}"


def enrolled_node(tmp_path: Path, federation: Federation, *, auto_install: bool = True):
    models = service(tmp_path, release_trust(federation.bundle, [STROKE]), defaults_dir=None)
    models.start(watch=False)
    puller = ModelPuller(models, partial(pull_latest, federation.bundle, timeout_s=10),
                         coordinator=federation.bundle.coordinator_address, interval_s=1,
                         auto_install=auto_install, work_dir=tmp_path / "pull")
    return models, puller


def test_a_released_model_is_pulled_verified_and_installed(tmp_path: Path, federation: Federation) -> None:
    federation.servicer.releases = {3: release(tmp_path, 3, federation.release_key)}
    assert pull_latest(federation.bundle, STROKE, 3, tmp_path / "none") is None  # nothing newer than 3
    models, puller = enrolled_node(tmp_path, federation)
    assert puller.pull_once() == {STROKE: 3}
    serving = models.current(STROKE)
    assert serving.version == 3 and not serving.package.demo
    assert serving.package.onnx_bytes == federation.servicer.releases[3].onnx
    assert puller.pull_once() == {} and puller.status()["last_error"] is None
    assert set(federation.servicer.hellos) == {SiteRole.NODE.value}


def tampered_manifest(good: Release) -> Release:
    return replace(good, manifest_json=good.manifest_json.replace(b"released v", b"released V"))


def tampered_onnx(good: Release) -> Release:
    onnx = bytearray(good.onnx)
    onnx[-1] ^= 0xFF
    return replace(good, onnx=bytes(onnx))  # the header's sha256 follows the bytes; the signed manifest does not


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        (lambda tmp, fed: tampered_manifest(release(tmp, 2, fed.release_key)), TamperedPackage),
        (lambda tmp, fed: tampered_onnx(release(tmp, 2, fed.release_key)), TamperedPackage),
        (lambda tmp, fed: release(tmp, 2, fed.round_key), UntrustedSigner),
        (lambda tmp, fed: release(tmp, 2, demo_private_key(), demo=True), DemoPackageRefused),
        (lambda tmp, fed: replace(release(tmp, 2, fed.release_key), announced_bytes=10**6), MalformedPackage),
    ],
    ids=["tampered-manifest", "tampered-onnx", "round-key-signer", "demo-signed", "truncated-stream"],
)
def test_a_bad_release_is_refused_and_nothing_changes(tmp_path: Path, federation: Federation, make, refusal) -> None:
    models, puller = enrolled_node(tmp_path, federation)
    federation.servicer.releases = {1: release(tmp_path, 1, federation.release_key)}
    assert puller.pull_once() == {STROKE: 1}
    federation.servicer.releases[2] = make(tmp_path, federation)
    with pytest.raises(refusal):
        pull_latest(federation.bundle, STROKE, 1, tmp_path / "direct")
    assert puller.pull_once() == {}
    assert models.current(STROKE).version == 1 and models.registry.versions(STROKE) == [1]
    assert models.refusals()[0].kind == refusal.__name__
    assert not any((tmp_path / "pull").iterdir())


def test_an_unreachable_coordinator_leaves_the_node_serving(tmp_path: Path, federation: Federation) -> None:
    models, puller = enrolled_node(tmp_path, federation, auto_install=False)
    federation.servicer.releases = {1: release(tmp_path, 1, federation.release_key)}
    assert puller.pull_once() == {STROKE: 1}
    assert models.pending(STROKE) == [1]  # without auto_install it waits for an admin
    models.install_version(STROKE, 1, "admin")
    offline = replace(federation.bundle, coordinator_address=closed_address())
    puller = ModelPuller(models, partial(pull_latest, offline, timeout_s=1), coordinator=offline.coordinator_address,
                         interval_s=1, auto_install=True, work_dir=tmp_path / "pull")
    assert puller.pull_once() == {}
    assert puller.status()["last_error"].split(":")[0] in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert models.current(STROKE).version == 1 and models.refusals() == []


def test_an_enrolled_node_pulls_at_start_and_serves_the_release(tmp_path: Path, federation: Federation) -> None:
    from inference.node import Node
    from inference.settings import TasksSettings
    from models.settings import ModelSettings

    federation.servicer.releases = {5: release(tmp_path, 5, federation.release_key)}
    settings = ModelSettings(enrollment_bundle=federation.bundle.write(tmp_path / "node-a.bundle"),
                             auto_install=True, pull_interval_s=60)
    node = Node(tmp_path / "data", tasks=TasksSettings(ms=False), model_settings=settings, dicom_port=0, web_port=0)
    node.start()
    try:
        for _ in range(200):
            if node.models.served_versions():
                break
            threading.Event().wait(0.05)
        assert node.models.served_versions() == {STROKE: 5} and not node.models.demo_mode
        assert node.models.refusals()[-1].kind == "DemoPackageRefused"  # the embedded default cannot seed it
        assert node.puller is not None and node.puller.status()["last_error"] is None
    finally:
        node.stop()


def test_model_pull_command_pulls_once_as_the_node_would(
    tmp_path: Path, federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlesion.cli import main

    federation.servicer.releases = {4: release(tmp_path, 4, federation.release_key)}
    config = tmp_path / "node.toml"
    bundle = federation.bundle.write(tmp_path / "node-a.bundle")
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[tasks]\nms = false\n'
                      f'[models]\nenrollment_bundle = "{bundle}"\n')
    assert main(["--config", str(config), "model", "pull"]) == 0
    assert capsys.readouterr().out == "stroke-dwi-adc: pulled version 4, serving nothing, pending 4\n"
    assert main(["--config", str(config), "model", "pull"]) == 0
    assert capsys.readouterr().out == "stroke-dwi-adc: nothing new, serving nothing, pending 4\n"

    address = closed_address()
    replace(federation.bundle, coordinator_address=address).write(bundle)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("models.federation.pull.HELLO_TIMEOUT_S", 1.0)
        assert main(["--config", str(config), "model", "pull"]) == 1
    captured = capsys.readouterr()
    assert f"pulling from {address} failed" in captured.err
    assert "serving nothing, pending 4" in captured.out
