"""Signed model packages: build them, pack them, and load them only when every trust rule holds (design.md §2).

A package is a directory (or a flat .tar of one) with `manifest.json`, `manifest.sig` and the files the manifest
lists by SHA-256, `model.onnx` first among them. `load_package` reads each file into memory once, checks the hash
on those bytes and hands them out (`LoadedPackage.onnx_bytes`): the ONNX Runtime session is created from exactly
the bytes that were verified, so nothing can swap the file between check and use. Each refusal has its own
`PackageRefused` subclass (`models.errors`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.durable import create_file, fsync_dir
from models.errors import (
    DemoPackageRefused,
    ExternalDataRefused,
    MalformedPackage,
    SymlinkInPackage,
    TamperedPackage,
    TaskNotAllowed,
    UnlistedFile,
    UnsignedPackage,
    UntrustedSigner,
    VersionNotNewer,
)
from models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, Task, parse_manifest
from models.signing import (
    demo_public_key,
    parse_signature,
    public_key_fingerprint,
    sign,
    signed_by_own_key,
)


class TrustMode(StrEnum):
    DEMO = "demo"  # no enrollment bundle: only the shipped demo key
    ENROLLED = "enrolled"  # the publisher's keys from the enrollment bundle; demo packages refused


@dataclass(frozen=True)
class TrustPolicy:
    """Whose packages a node (or registry) accepts, and for which tasks."""

    publisher_keys: tuple[Ed25519PublicKey, ...]
    mode: TrustMode
    allowed_tasks: frozenset[Task] = frozenset(Task)

    def __post_init__(self) -> None:
        if not self.publisher_keys:
            raise ValueError("publisher_keys: at least one trusted public key is required")
        if not all(isinstance(key, Ed25519PublicKey) for key in self.publisher_keys):
            raise ValueError("publisher_keys: every key must be an Ed25519 public key")
        object.__setattr__(self, "mode", TrustMode(self.mode))
        object.__setattr__(self, "allowed_tasks", frozenset(Task(task) for task in self.allowed_tasks))
        if not self.allowed_tasks:
            raise ValueError("allowed_tasks: at least one task is required")
        demo = public_key_fingerprint(demo_public_key())
        if self.mode is TrustMode.ENROLLED and demo in self.fingerprints:
            raise ValueError("publisher_keys: an enrolled node must not trust the demo key")

    @classmethod
    def demo(cls, allowed_tasks: Iterable[Task] = tuple(Task)) -> TrustPolicy:
        return cls((demo_public_key(),), TrustMode.DEMO, frozenset(allowed_tasks))

    @classmethod
    def enrolled(cls, keys: Iterable[Ed25519PublicKey], allowed_tasks: Iterable[Task] = tuple(Task)) -> TrustPolicy:
        return cls(tuple(keys), TrustMode.ENROLLED, frozenset(allowed_tasks))

    @property
    def fingerprints(self) -> frozenset[str]:
        return frozenset(public_key_fingerprint(key) for key in self.publisher_keys)


@dataclass(frozen=True)
class LoadedPackage:
    """A verified package held in memory: use these bytes, never re-read the files."""

    manifest: Manifest
    manifest_bytes: bytes = field(repr=False)
    manifest_sha256: str
    signature: bytes = field(repr=False)
    files: Mapping[str, bytes] = field(repr=False)
    signer_fingerprint: str
    demo: bool  # a demo manifest or signed by the demo key: outputs must say so

    @property
    def onnx_bytes(self) -> bytes:
        return self.files[self.manifest.onnx.file]

    def package_files(self) -> dict[str, bytes]:
        """Every file of the package, by name, as verified: what a registry writes."""
        return {**self.files, MANIFEST_FILE: self.manifest_bytes, SIGNATURE_FILE: self.signature}


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def build_package(out_dir: Path, onnx_bytes: bytes, manifest: Manifest, private_key: Ed25519PrivateKey) -> Path:
    """Write model.onnx, manifest.json (with `files` filled in) and manifest.sig into a new or empty `out_dir`."""
    out_dir = Path(out_dir)
    if not isinstance(manifest, Manifest):
        raise ValueError(f"manifest must be a Manifest, not {type(manifest).__name__}")
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError(f"private_key must be an Ed25519 private key, not {type(private_key).__name__}")
    if not isinstance(onnx_bytes, (bytes, bytearray)) or not onnx_bytes:
        raise ValueError("onnx_bytes must be the non-empty bytes of an ONNX model")
    external = external_data_tensors(bytes(onnx_bytes))
    if external:
        raise ValueError(f"onnx_bytes keeps tensors in external data ({', '.join(external)}): embed them")
    demo_signed = public_key_fingerprint(private_key.public_key()) == public_key_fingerprint(demo_public_key())
    if demo_signed and not manifest.demo:
        raise ValueError("the demo key signs only demo manifests (demo: true)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: must be a new or empty directory")
    manifest_bytes = manifest.with_files({manifest.onnx.file: sha256_hex(bytes(onnx_bytes))}).to_json_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_package(
        out_dir,
        {
            manifest.onnx.file: bytes(onnx_bytes),
            MANIFEST_FILE: manifest_bytes,
            SIGNATURE_FILE: sign(manifest_bytes, private_key),
        },
    )
    return out_dir


def write_package(directory: Path, files: Mapping[str, bytes]) -> None:
    """Create each file (never overwrite), fsync it, then fsync the directory so the entries are durable too."""
    for name, data in files.items():
        create_file(directory / name, data, sync_directory=False)
    fsync_dir(directory)


def pack_tar(package_dir: Path, tar_path: Path) -> Path:
    """A flat, uncompressed tar of the package's regular files (owner and times neutralized)."""
    package_dir, tar_path = Path(package_dir), Path(tar_path)
    if not package_dir.is_dir():
        raise ValueError(f"{package_dir}: not a package directory")
    entries = sorted(package_dir.iterdir())
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            raise ValueError(f"{entry}: a package holds only regular files")
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tar.gettarinfo(entry, arcname=entry.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with entry.open("rb") as handle:
                tar.addfile(info, handle)
    return tar_path


def load_package(path: Path, trust: TrustPolicy, *, served: Mapping[Task, int] | None = None) -> LoadedPackage:
    """Verify and load a package directory or .tar; `served` maps each task to the version the caller runs now."""
    path = Path(path)
    if not isinstance(trust, TrustPolicy):
        raise ValueError(f"trust must be a TrustPolicy, not {type(trust).__name__}")
    if path.is_symlink():
        raise SymlinkInPackage(f"{path}: the package path is a symbolic link")
    if path.is_dir():
        return _load_directory(path, trust, served or {})
    if path.is_file():
        return _load_tar(path, trust, served or {})
    raise FileNotFoundError(2, "no model package here", str(path))


def _load_tar(path: Path, trust: TrustPolicy, served: Mapping[Task, int]) -> LoadedPackage:
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                if member.issym() or member.islnk():
                    raise SymlinkInPackage(f"{path}: member {member.name!r} is a link")
            with tempfile.TemporaryDirectory(prefix="fedlesion-package-") as tmp:
                tar.extractall(tmp, filter="data")
                return _load_directory(Path(tmp), trust, served)
    except tarfile.TarError as error:
        raise MalformedPackage(f"{path}: not a usable package tar: {error}") from None


def _load_directory(root: Path, trust: TrustPolicy, served: Mapping[Task, int]) -> LoadedPackage:
    names = _scan(root)
    if SIGNATURE_FILE not in names:
        raise UnsignedPackage(f"{root}: no {SIGNATURE_FILE}: the package is unsigned")
    if MANIFEST_FILE not in names:
        raise MalformedPackage(f"{root}: no {MANIFEST_FILE}")
    manifest_bytes = _read_regular(root, MANIFEST_FILE)
    signature_bytes = _read_regular(root, SIGNATURE_FILE)
    try:
        signature = parse_signature(signature_bytes)
    except ValueError as error:
        raise MalformedPackage(str(error)) from None
    if not signed_by_own_key(manifest_bytes, signature):
        raise TamperedPackage(f"{MANIFEST_FILE} was changed after signing: its signature does not verify")
    signer = public_key_fingerprint(signature.public_key)
    signed_by_demo = signer == public_key_fingerprint(demo_public_key())
    if trust.mode is TrustMode.ENROLLED and signed_by_demo:
        raise DemoPackageRefused("package is signed with the demo key; an enrolled node runs only its publisher's")
    if signer not in trust.fingerprints:
        raise UntrustedSigner(f"package is signed by key {signer}, which this node does not trust")
    try:
        manifest = parse_manifest(manifest_bytes)
    except ValueError as error:
        raise MalformedPackage(f"{MANIFEST_FILE}: {error}") from None
    if trust.mode is TrustMode.ENROLLED and manifest.demo:
        raise DemoPackageRefused("package is a demo model (demo: true); an enrolled node refuses demo models")
    if manifest.task not in trust.allowed_tasks:
        raise TaskNotAllowed(f"package is for task {manifest.task.value}, which this node does not run")
    current = served.get(manifest.task)
    if current is not None and manifest.version <= current:
        raise VersionNotNewer(
            f"{manifest.task.value} version {manifest.version} is not newer than version {current} already served"
        )
    unlisted = sorted(set(names) - {MANIFEST_FILE, SIGNATURE_FILE} - set(manifest.files))
    if unlisted:
        raise UnlistedFile(f"{unlisted[0]!r} is not listed in the manifest")
    files: dict[str, bytes] = {}
    for name, digest in sorted(manifest.files.items()):
        if name not in names:
            raise TamperedPackage(f"{name} is listed in the manifest but missing from the package")
        data = _read_regular(root, name)
        actual = sha256_hex(data)
        if actual != digest:
            raise TamperedPackage(f"{name} was changed after signing: sha256 {actual} is not the manifest's {digest}")
        files[name] = data
    try:
        external = external_data_tensors(files[manifest.onnx.file])
    except ValueError as error:
        raise MalformedPackage(f"{manifest.onnx.file}: not an ONNX model: {error}") from None
    if external:
        raise ExternalDataRefused(
            f"{manifest.onnx.file} keeps tensor {external[0]!r} in external data; packages must embed every tensor"
        )
    return LoadedPackage(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        manifest_sha256=sha256_hex(manifest_bytes),
        signature=signature_bytes,
        files=MappingProxyType(files),
        signer_fingerprint=signer,
        demo=manifest.demo or signed_by_demo,
    )


def _scan(root: Path) -> set[str]:
    """Names at the top level; links anywhere and any subdirectory are refused before anything is read."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink():
                raise SymlinkInPackage(f"{entry.relative_to(root)} is a symbolic link")
    names: set[str] = set()
    for entry in root.iterdir():
        if not stat.S_ISREG(entry.lstat().st_mode):
            raise UnlistedFile(f"{entry.name!r} is not a regular file; a package holds only listed files")
        names.add(entry.name)
    return names


def _read_regular(root: Path, name: str) -> bytes:
    try:
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:  # swapped for a symlink after the scan
            raise SymlinkInPackage(f"{name} is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UnlistedFile(f"{name!r} is not a regular file")
        return handle.read()


# A minimal protobuf wire-format walk over the ONNX messages that can hold tensors, so the torch-free node can
# refuse external data without the `onnx` library. Field numbers are onnx.proto's.
_MODEL, _TRAINING, _FUNCTION, _GRAPH, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNCTION: {7: _NODE},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t g tensors graphs
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TENSOR: {},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1
_MODEL_GRAPH = 7


def external_data_tensors(model: bytes) -> list[str]:
    """Names of tensors stored outside the model file; a `ValueError` when the bytes are not an ONNX ModelProto."""
    buffer = memoryview(model)
    external: list[str] = []
    has_graph = False
    stack = [(_MODEL, 0, len(buffer))]
    while stack:
        kind, start, end = stack.pop()
        name, outside = "", False
        for number, wire, first, last in _fields(buffer, start, end):
            child = _CHILDREN[kind].get(number)
            if child is not None:
                if wire != 2:
                    raise ValueError(f"field {number} has wire type {wire}, expected a message")
                stack.append((child, first, last))
                has_graph |= kind == _MODEL and number == _MODEL_GRAPH
            elif kind == _TENSOR:
                if number == _TENSOR_NAME and wire == 2:
                    name = bytes(buffer[first:last]).decode("utf-8", "replace")
                outside |= number == _TENSOR_EXTERNAL_DATA or (
                    number == _TENSOR_DATA_LOCATION and wire == 0 and first == _EXTERNAL
                )
        if outside:
            external.append(name or "<unnamed>")
    if not has_graph:
        raise ValueError("no graph in the model")
    return external


def _fields(buffer: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b): a varint's value in `a`, a length-delimited field's span as [a, b)."""
    position = start
    while position < end:
        key, position = _varint(buffer, position, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {position}")
        if wire == 0:
            value, position = _varint(buffer, position, end)
            yield number, wire, value, value
        elif wire == 2:
            length, position = _varint(buffer, position, end)
            if position + length > end:
                raise ValueError(f"field {number} runs past its message at byte {position}")
            yield number, wire, position, position + length
            position += length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
            if position > end:
                raise ValueError(f"field {number} runs past its message")
            yield number, wire, 0, 0
        else:
            raise ValueError(f"unsupported wire type {wire} at byte {position}")


def _varint(buffer: memoryview, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise ValueError(f"truncated varint at byte {position}")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
