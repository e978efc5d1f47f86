"""The node's pull client (issue 11 item 7): the newest released model of a task, from the coordinator, verified.

Torch-free: a limited center's node runs it. Over the bundle's mTLS channel it says hello (role `node`, the protocol
version), then streams `GetLatestModel`: a header (version, manifest, signature, ONNX size and sha256) and the ONNX
bytes in chunks. Sizes are checked before anything is buffered, the ONNX goes to disk as it arrives, and the folder
it builds (model.onnx, manifest.json, manifest.sig) is loaded with `models.package.load_package` under the bundle's
release keys only: a tampered manifest or model, a signer that is not a release key (a round's candidate key, the
demo key) or a version not newer is refused with the package's own `PackageRefused` class, and the caller stores
nothing. A coordinator that cannot be reached raises `grpc.RpcError`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from models.errors import MalformedPackage
from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc, transport
from models.federation.enrollment import EnrollmentBundle, release_trust
from models.federation.roles import SiteRole
from models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Task, parse_manifest
from models.package import LoadedPackage, load_package
from models.version import distribution_version

__all__ = ["MAX_MANIFEST_BYTES", "MAX_ONNX_BYTES", "PULL_TIMEOUT_S", "pull_latest"]

MAX_ONNX_BYTES = 2 << 30  # a model this node would load into memory anyway; the default ones are ~25 MB
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 64 << 10
PULL_TIMEOUT_S = 300.0  # the model's stream; a stalled coordinator fails it and the next interval tries again
HELLO_TIMEOUT_S = 30.0  # an unreachable coordinator costs the puller this much, not the whole pull's time
PACKAGE_DIR = "package"


def pull_latest(
    bundle: EnrollmentBundle, task: Task, newer_than: int, dest_dir: Path, *, timeout_s: float = PULL_TIMEOUT_S
) -> Path | None:
    """The released version of `task` newer than `newer_than` (0: any) as a verified package folder under
    `dest_dir`, or None when the coordinator has nothing newer."""
    task = Task(task)
    with transport.channel(bundle) as channel:
        stub = federation_pb2_grpc.CoordinatorStub(channel)
        hello = stub.Hello(
            pb2.HelloRequest(
                protocol_version=transport.PROTOCOL_VERSION,
                fedlesion_version=distribution_version(),
                role=SiteRole.NODE.value,
            ),
            timeout=min(timeout_s, HELLO_TIMEOUT_S),
        )
        if hello.protocol_version != transport.PROTOCOL_VERSION:
            raise ValueError(
                f"the coordinator speaks protocol {hello.protocol_version}, this node {transport.PROTOCOL_VERSION}"
            )
        parts = stub.GetLatestModel(pb2.ModelRequest(task=task.value, newer_than=newer_than), timeout=timeout_s)
        try:
            folder = _receive(parts, task, newer_than, Path(dest_dir) / PACKAGE_DIR)
        finally:
            parts.cancel()  # a refusal mid-stream stops the coordinator's sending too
    if folder is None:
        return None
    _verify(folder, bundle, task, newer_than)
    return folder


def _receive(parts: grpc.Call, task: Task, newer_than: int, folder: Path) -> Path | None:
    """Header first, then ONNX chunks straight to disk, cut off the moment they exceed the announced size."""
    stream = iter(parts)
    first = next(stream, None)
    if first is None:
        return None
    if first.WhichOneof("part") != "header":
        raise MalformedPackage("the model stream did not start with its header")
    header = first.header
    if header.task != task.value or header.version <= newer_than:
        raise MalformedPackage(
            f"asked for {task.value} newer than {newer_than}, the coordinator sent {header.task} version "
            f"{header.version}"
        )
    if header.onnx_bytes > MAX_ONNX_BYTES or len(header.manifest_json) > MAX_MANIFEST_BYTES:
        raise MalformedPackage(f"the model announced is too large ({header.onnx_bytes} bytes of ONNX)")
    if len(header.manifest_sig) > MAX_SIGNATURE_BYTES:
        raise MalformedPackage("the manifest signature announced is too large")
    try:
        onnx_name = parse_manifest(header.manifest_json).onnx.file  # a validated plain file name
    except ValueError as error:
        raise MalformedPackage(f"{MANIFEST_FILE}: {error}") from None
    folder.mkdir(parents=True)
    (folder / MANIFEST_FILE).write_bytes(header.manifest_json)
    (folder / SIGNATURE_FILE).write_bytes(header.manifest_sig)
    digest, received = hashlib.sha256(), 0
    with (folder / onnx_name).open("wb") as onnx:
        for part in stream:
            if part.WhichOneof("part") != "onnx_chunk":
                raise MalformedPackage("a second header in the model stream")
            received += len(part.onnx_chunk)
            if received > header.onnx_bytes:
                raise MalformedPackage(f"the ONNX stream runs past the {header.onnx_bytes} bytes announced")
            digest.update(part.onnx_chunk)
            onnx.write(part.onnx_chunk)
    if received != header.onnx_bytes or digest.hexdigest() != header.onnx_sha256:
        raise MalformedPackage(
            f"the ONNX stream ended after {received} of {header.onnx_bytes} bytes or does not match its sha256"
        )
    return folder


def _verify(folder: Path, bundle: EnrollmentBundle, task: Task, newer_than: int) -> LoadedPackage:
    """Signed by a release key of the bundle, every file as the manifest lists it, the task asked for, newer."""
    loaded = load_package(folder, release_trust(bundle, [task]), served={task: newer_than} if newer_than else None)
    if loaded.manifest.task is not task:
        raise MalformedPackage(f"asked for {task.value}, the package is {loaded.manifest.task.value}")
    return loaded
