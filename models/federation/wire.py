"""Weights on the wire: a canonical, pickle-free encoding and encrypted chunk streams (design.md §7).

Weights travel as named arrays (name, dtype, shape, raw little-endian bytes; names sorted) so that two parties
encoding the same weights produce the same bytes: their sha256 (`weights_sha256`) names a round's base weights.
A stream is one `StreamHeader` then `Chunk`s: each chunk is AES-GCM with a fresh nonce, and its associated data binds
it to (plan, round, base weights, site, chunk index, the header), so an update replayed from another round or site,
computed on other base weights or under a tampered header fails to decrypt and is refused, while a chunk broken in
transit fails its sha256 first and is re-sent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from models.federation import federation_pb2 as pb2
from models.package import sha256_hex

__all__ = [
    "CHUNK_BYTES",
    "StreamBinding",
    "StreamReceiver",
    "WireError",
    "WeightSpec",
    "chunk_stream",
    "decode_weights",
    "encode_weights",
    "keep_freed_buffers",
    "should_compress",
    "weights_sha256",
    "weights_spec",
]

MAGIC = b"FLW1"
CHUNK_BYTES = 1 << 20
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
ZLIB = "zlib"
FLOAT = np.dtype("<f4")
# Integers only for the step counters of normalization layers (torch's BatchNorm), which are not averaged as weights.
COUNTERS = ("num_batches_tracked",)
COUNTER_DTYPES = (np.dtype("<i8"), np.dtype("<i4"))
DTYPE_CODES = {"float32": FLOAT, "int64": COUNTER_DTYPES[0], "int32": COUNTER_DTYPES[1]}
# Compression must shrink a sample to this fraction to pay for itself: float32 weights rarely do (≈ 0.93).
COMPRESSION_PAYS = 0.8
SAMPLE_BYTES = 64 << 10

WeightSpec = tuple[tuple[int, ...], np.dtype[Any] | str]
# glibc's mallopt options, and the values `keep_freed_buffers` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_buffers() -> bool:
    """Let this process reuse the memory of the buffers it frees (glibc only; True where it took effect).

    Every round allocates and frees several model-sized buffers (chunks, plaintext, decoded and encoded weights).
    By default glibc maps a large block afresh and unmaps it on free, or trims the heap's free top, so each round
    pays page faults on fresh memory again (≈ 21,000 per 22.8 MB round at a site; on this VM first-touch memory is
    slow). Blocks up to 32 MiB from the heap, and a free heap top kept up to 1 GiB: a site's data path per round
    128 -> 82 ms with no page fault after the first round. Inference wants the opposite
    (inference.engine.return_large_buffers_to_the_system): a node's studies differ in size and come rarely.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # no C library found, or one without mallopt (musl)
        return False


class WireError(ValueError):
    """A payload refused, with the reason; `resend` says whether sending the same payload again can succeed."""

    def __init__(self, reason: str, resend: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.resend = resend


def _wire_dtype(name: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The little-endian wire dtype of a tensor, or WireError when the name may not carry that dtype."""
    dtype = dtype.newbyteorder("<") if dtype.byteorder not in "<|" else dtype
    if dtype == FLOAT:
        return FLOAT
    if dtype in COUNTER_DTYPES:
        if name.rsplit(".", 1)[-1] in COUNTERS:
            return dtype
        raise WireError(f"{name}: integer dtype {dtype.name} is allowed only for {', '.join(COUNTERS)}")
    raise WireError(f"{name}: dtype {dtype.name} is not float32 (nor an int64/int32 normalization counter)")


def encode_weights(weights: Mapping[str, np.ndarray]) -> bytes:
    """The canonical bytes of `weights`; finiteness is the receiver's check, so a diverged update is refused there.

    The tensors join as buffers (no per-tensor copy): one copy of the weights is made, into the result.
    """
    parts: list[bytes | memoryview] = [MAGIC, struct.pack("<I", len(weights))]
    for name in sorted(weights):
        array = np.asarray(weights[name])
        if not isinstance(name, str) or not name:
            raise WireError(f"tensor name {name!r} is not a non-empty string")
        dtype = _wire_dtype(name, array.dtype)
        encoded_name = name.encode("utf-8")
        parts += [
            struct.pack("<H", len(encoded_name)),
            encoded_name,
            struct.pack("<B", list(DTYPE_CODES.values()).index(dtype)),
            struct.pack("<B", array.ndim),
            struct.pack(f"<{array.ndim}Q", *array.shape),
            memoryview(np.ascontiguousarray(array, dtype=dtype)),
        ]
    return b"".join(parts)


class _Reader:
    """Bounds-checked reads over the encoded bytes: a short or malformed payload is a WireError, never an IndexError."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.view = memoryview(data)
        self.position = 0

    def take(self, size: int, what: str) -> memoryview:
        if size > len(self.view) - self.position:
            raise WireError(f"weights encoding ends inside {what}")
        piece = self.view[self.position : self.position + size]
        self.position += size
        return piece

    def unpack(self, layout: str, what: str) -> tuple[int, ...]:
        return struct.unpack(layout, self.take(struct.calcsize(layout), what))


def decode_weights(
    data: bytes | memoryview, expected: Mapping[str, WeightSpec] | None = None, *, copy: bool = True
) -> dict[str, np.ndarray]:
    """Parse `encode_weights` bytes; WireError names the first wrong name, shape, dtype, NaN/Inf or malformed byte.

    `copy=False` returns read-only views of `data` (on a little-endian machine), for a reader that keeps `data`
    anyway and only reads the arrays (the coordinator's updates and base weights): no second copy of the weights.
    """
    reader = _Reader(data)
    if bytes(reader.take(len(MAGIC), "the magic")) != MAGIC:
        raise WireError("not a fedlesion weights encoding (bad magic)")
    (count,) = reader.unpack("<I", "the tensor count")
    weights: dict[str, np.ndarray] = {}
    previous = ""
    for _ in range(count):
        (name_length,) = reader.unpack("<H", "a tensor name length")
        try:
            name = bytes(reader.take(name_length, "a tensor name")).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("a tensor name is not UTF-8") from None
        if not name or name <= previous:
            raise WireError(f"tensor {name!r}: names must be non-empty, unique and sorted")
        previous = name
        code, ndim = reader.unpack("<BB", f"{name}'s dtype")
        if code >= len(DTYPE_CODES):
            raise WireError(f"{name}: unknown dtype code {code}")
        dtype = _wire_dtype(name, list(DTYPE_CODES.values())[code])
        shape = reader.unpack(f"<{ndim}Q", f"{name}'s shape")
        size = math.prod(shape) * dtype.itemsize
        array = np.frombuffer(reader.take(size, f"{name}'s values"), dtype=dtype).reshape(shape)
        if dtype == FLOAT and not np.isfinite(array).all():
            raise WireError(f"{name}: NaN or Inf values")
        weights[name] = array.astype(dtype.newbyteorder("="), copy=copy)
    if reader.position != len(reader.view):
        raise WireError(f"{len(reader.view) - reader.position} bytes after the last tensor")
    if expected is not None:
        _check_expected(weights, expected)
    return weights


def _check_expected(weights: Mapping[str, np.ndarray], expected: Mapping[str, WeightSpec]) -> None:
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise WireError(f"wrong tensor names: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (shape, dtype) in expected.items():
        array = weights[name]
        if array.shape != tuple(shape):
            raise WireError(f"{name}: shape {array.shape}, expected {tuple(shape)}")
        if array.dtype != np.dtype(dtype):
            raise WireError(f"{name}: dtype {array.dtype.name}, expected {np.dtype(dtype).name}")


def weights_spec(weights: Mapping[str, np.ndarray]) -> dict[str, WeightSpec]:
    """name → (shape, dtype) of `weights`: what `decode_weights` expects of an update to these (global) weights."""
    return {name: (tuple(np.shape(array)), np.asarray(array).dtype) for name, array in weights.items()}


def weights_sha256(weights: Mapping[str, np.ndarray] | bytes | memoryview) -> str:
    """sha256 hex of the canonical encoding (pass the encoded bytes when you have them, to skip re-encoding)."""
    return sha256_hex(weights if isinstance(weights, bytes | memoryview) else encode_weights(weights))


@dataclass(frozen=True)
class StreamBinding:
    """What a stream's chunks are bound to: a chunk encrypted for other values does not decrypt."""

    plan_sha256: str
    round: int
    base_sha256: str
    site: str

    def associated_data(self, index: int, header: pb2.StreamHeader) -> bytes:
        """The AES-GCM associated data of chunk `index` (JSON: unambiguous whatever the site's name holds)."""
        header_digest = sha256_hex(header.SerializeToString(deterministic=True))
        fields = [self.plan_sha256, self.round, self.base_sha256, self.site, index, header_digest]
        return json.dumps(["fedlesion-wire-v1", *fields], separators=(",", ":")).encode("utf-8")


def _binding(fields: StreamBinding | Mapping[str, Any]) -> StreamBinding:
    return fields if isinstance(fields, StreamBinding) else StreamBinding(**fields)


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"the payload key must be {KEY_BYTES} bytes")
    return AESGCM(key)


def should_compress(plaintext: bytes) -> bool:
    """zlib pays only when a sample (start, middle, end) shrinks to COMPRESSION_PAYS: float weights rarely do."""
    if len(plaintext) <= SAMPLE_BYTES:
        sample = plaintext
    else:
        third = SAMPLE_BYTES // 3
        starts = (0, len(plaintext) // 2, len(plaintext) - third)
        sample = b"".join(plaintext[start : start + third] for start in starts)
    return bool(sample) and len(zlib.compress(sample, 1)) <= COMPRESSION_PAYS * len(sample)


def chunk_stream(
    plaintext: bytes,
    *,
    key: bytes,
    aad_fields: StreamBinding | Mapping[str, Any],
    header_fields: Mapping[str, Any] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    compress: bool | None = None,
    plaintext_sha256: str | None = None,
) -> Iterator[pb2.StreamPart]:
    """The header then the encrypted chunks of `plaintext`; `header_fields` adds num_cases and metrics.

    `compress=None` decides with `should_compress`. The chunk count is at least one, so every stream has a chunk.
    `plaintext_sha256` is `plaintext`'s sha256 hex where the caller holds it already (the coordinator sends the same
    weights to every site): a wrong one makes every receiver refuse the stream.
    """
    binding, aead = _binding(aad_fields), _aead(key)
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    extra = dict(header_fields or {})
    for name in ("plan_sha256", "round", "base_sha256"):
        if name in extra and extra.pop(name) != getattr(binding, name):
            raise ValueError(f"header_fields[{name!r}] differs from the stream's binding")
    compressed = should_compress(plaintext) if compress is None else compress
    body = zlib.compress(plaintext, 1) if compressed else plaintext
    header = pb2.StreamHeader(
        plan_sha256=binding.plan_sha256,
        round=binding.round,
        base_sha256=binding.base_sha256,
        chunk_count=max(1, math.ceil(len(body) / chunk_bytes)),
        total_bytes=len(plaintext),
        total_sha256=plaintext_sha256 or sha256_hex(plaintext),
        compression=ZLIB if compressed else "",
        **extra,
    )
    yield pb2.StreamPart(header=header)
    for index in range(header.chunk_count):
        nonce = os.urandom(NONCE_BYTES)
        piece = memoryview(body)[index * chunk_bytes : (index + 1) * chunk_bytes]
        payload = nonce + aead.encrypt(nonce, piece, binding.associated_data(index, header))
        yield pb2.StreamPart(chunk=pb2.Chunk(index=index, payload=payload, sha256=sha256_hex(payload)))


class StreamReceiver:
    """Consumes one stream for `site`: checks, decrypts and reassembles it, never holding more than `max_bytes`.

    Given `plan_sha256`, `round` or `base_sha256`, a header that names other values is refused by name (a replay or
    an update on other base weights); the chunks are decrypted under the header's values either way. One receiver
    may take several streams in turn (a resend): each `receive` starts empty.
    """

    def __init__(
        self,
        key: bytes,
        site: str,
        max_bytes: int,
        *,
        plan_sha256: str | None = None,
        round: int | None = None,  # noqa: A002 - the protocol's word
        base_sha256: str | None = None,
    ) -> None:
        self._aead = _aead(key)
        self.site = site
        self.max_bytes = max_bytes
        self.expected = {"plan_sha256": plan_sha256, "round": round, "base_sha256": base_sha256}
        self.held_bytes = 0  # decrypted bytes buffered so far (the tests watch it)

    def receive(self, parts: Iterable[pb2.StreamPart]) -> tuple[pb2.StreamHeader, memoryview]:
        """(header, plaintext) of the stream, or WireError: resend=True for broken or missing chunks.

        The plaintext is a read-only view of one buffer the chunks are decrypted into (no join, no per-chunk
        plaintext objects: fresh memory is the dearest part of a round on a small VM); it accepts what bytes do for
        `decode_weights`, `weights_sha256` and a file write.
        """
        self.held_bytes = 0
        iterator = iter(parts)
        first = next(iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise WireError("the stream does not start with a header", resend=first is None)
        header = first.header
        self._check_header(header)
        binding = StreamBinding(header.plan_sha256, header.round, header.base_sha256, self.site)
        compressed = header.compression == ZLIB
        # An uncompressed body is the plaintext: decrypted in place into a buffer of the announced size (at most
        # max_bytes) and hashed chunk by chunk while each is fresh in the cache, no second pass.
        body = memoryview(np.empty(0 if compressed else header.total_bytes, np.uint8))
        pieces: list[bytes | memoryview] = []  # a compressed body's chunks, inflated once whole
        hasher = hashlib.sha256()
        for part in iterator:
            if part.WhichOneof("part") != "chunk":
                raise WireError("a second header inside the stream")
            into = None if compressed else body[self.held_bytes :]
            piece = self._open(part.chunk, len(pieces), header, binding, into)
            pieces.append(piece)
            if not compressed:
                hasher.update(piece)
        if len(pieces) < header.chunk_count:
            raise WireError(f"the stream ended after {len(pieces)} of {header.chunk_count} chunks", resend=True)
        received = self.held_bytes
        if compressed:
            body = memoryview(self._inflate(b"".join(pieces)))
            hasher.update(body)
            received = len(body)
        if received != header.total_bytes or hasher.hexdigest() != header.total_sha256:
            raise WireError("the reassembled payload does not match the header's size and sha256")
        return header, body.toreadonly()

    def _check_header(self, header: pb2.StreamHeader) -> None:
        for name, value in self.expected.items():
            if value is not None and getattr(header, name) != value:
                raise WireError(f"the stream is for {name} {getattr(header, name)!r}, expected {value!r}")
        if header.total_bytes > self.max_bytes:
            raise WireError(f"the stream announces {header.total_bytes} bytes, more than the {self.max_bytes} allowed")
        if header.compression not in ("", ZLIB):
            raise WireError(f"unknown compression {header.compression!r}")

    def _open(self, chunk: pb2.Chunk, index: int, header: pb2.StreamHeader, binding: StreamBinding,
              into: memoryview | None) -> memoryview | bytes:
        """Chunk `index` checked and decrypted: into the start of `into` where it fits (the view is returned),
        else as new bytes (a compressed body, or chunks that overrun the announced size: that stream is refused)."""
        if index >= header.chunk_count:
            raise WireError(f"more chunks than the {header.chunk_count} the header announced")
        if chunk.index != index:
            raise WireError(f"chunk {chunk.index} arrived where chunk {index} was due", resend=True)
        payload = chunk.payload  # each read of a bytes field copies it
        if sha256_hex(payload) != chunk.sha256:
            raise WireError(f"chunk {index} is broken (sha256 mismatch)", resend=True)
        size = len(payload) - NONCE_BYTES - TAG_BYTES
        if self.held_bytes + size > self.max_bytes:
            raise WireError(f"the stream exceeds the {self.max_bytes} bytes allowed: cut off at chunk {index}")
        view = memoryview(payload)
        nonce, sealed, associated = view[:NONCE_BYTES], view[NONCE_BYTES:], binding.associated_data(index, header)
        try:
            if into is not None and 0 <= size <= len(into):
                self._aead.decrypt_into(nonce, sealed, associated, into[:size])
                piece: memoryview | bytes = into[:size]
            else:
                piece = self._aead.decrypt(nonce, sealed, associated)
        except InvalidTag:
            raise WireError(
                f"chunk {index} does not decrypt for site {self.site!r}, plan, round {header.round} and base weights "
                "of its header: a replay, an update on other weights, or another key"
            ) from None
        self.held_bytes += len(piece)
        return piece

    def _inflate(self, body: bytes) -> bytes:
        inflater = zlib.decompressobj()
        try:
            plaintext = inflater.decompress(body, self.max_bytes + 1)
        except zlib.error as error:
            raise WireError(f"the payload does not decompress: {error}") from None
        if len(plaintext) > self.max_bytes or inflater.unconsumed_tail:
            raise WireError(f"the payload inflates past the {self.max_bytes} bytes allowed")
        return plaintext
