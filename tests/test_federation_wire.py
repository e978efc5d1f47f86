"""The weights wire format and its encrypted chunk streams (models/federation/wire.py), in process."""

from __future__ import annotations

import os
import pickle
import platform
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from models.federation import federation_pb2 as pb2
from models.federation.wire import (
    StreamBinding,
    StreamReceiver,
    WireError,
    chunk_stream,
    decode_weights,
    encode_weights,
    keep_freed_buffers,
    should_compress,
    weights_sha256,
    weights_spec,
)
from models.package import sha256_hex

KEY = bytes(range(32))
BINDING = StreamBinding(plan_sha256="p" * 64, round=4, base_sha256="b" * 64, site="site-a")


def sample_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "net.conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "net.norm.bias": rng.standard_normal(8).astype(np.float32),
        "net.norm.num_batches_tracked": np.array(1234567890123, dtype=np.int64),
    }


def receive(parts: list[pb2.StreamPart], site: str = "site-a", max_bytes: int = 1 << 24, **expected: object):
    return StreamReceiver(KEY, site, max_bytes, **expected).receive(parts)  # type: ignore[arg-type]


def stream(plaintext: bytes, **options: object) -> list[pb2.StreamPart]:
    return list(chunk_stream(plaintext, key=KEY, aad_fields=BINDING, **options))  # type: ignore[arg-type]


def test_weights_round_trip_canonically_with_an_integer_counter() -> None:
    weights = sample_weights()
    encoded = encode_weights(weights)
    assert encode_weights(dict(reversed(list(weights.items())))) == encoded  # names sorted: one encoding
    decoded = decode_weights(encoded, weights_spec(weights))
    assert list(decoded) == sorted(weights)
    for name, array in weights.items():
        assert decoded[name].dtype == array.dtype and np.array_equal(decoded[name], array)
    assert decoded["net.norm.num_batches_tracked"] == 1234567890123
    decoded["net.norm.bias"][0] = 0.0  # writable, not a view of the received bytes
    views = decode_weights(encoded, copy=False)  # the coordinator's: read-only views of the bytes it keeps
    assert all(np.array_equal(views[name], array) for name, array in weights.items())
    assert not views["net.norm.bias"].flags.writeable
    assert weights_sha256(weights) == weights_sha256(encoded) == sha256_hex(encoded)
    assert weights_sha256(sample_weights(1)) != weights_sha256(weights)
    big_endian = {name: array.astype(array.dtype.newbyteorder(">")) for name, array in weights.items()}
    assert encode_weights(big_endian) == encoded  # raw bytes are little-endian whatever the input's order


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda w: w["net.norm.bias"].__setitem__(2, np.nan), "net.norm.bias: NaN or Inf"),
        (lambda w: w["net.conv.weight"].__setitem__((0, 0, 0, 0), -np.inf), "net.conv.weight: NaN or Inf"),
        (lambda w: w.__setitem__("net.extra", np.zeros(2, np.float32)), "unexpected ['net.extra']"),
        (lambda w: w.pop("net.norm.bias"), "missing ['net.norm.bias']"),
        (lambda w: w.__setitem__("net.norm.bias", np.zeros(9, np.float32)), "shape (9,), expected (8,)"),
        (lambda w: w.__setitem__("net.norm.num_batches_tracked", np.array(3, np.int32)), "dtype int32, expected int64"),
    ],
)
def test_decoding_refuses_nan_inf_and_wrong_names_shapes_dtypes(change, reason: str) -> None:
    expected = weights_spec(sample_weights())
    weights = sample_weights()
    change(weights)
    with pytest.raises(WireError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as raised:
        decode_weights(encode_weights(weights), expected)
    assert raised.value.resend is False


def test_only_float32_and_normalization_counters_travel_and_pickles_are_refused() -> None:
    with pytest.raises(WireError, match="float64 is not float32"):
        encode_weights({"w": np.zeros(3, np.float64)})
    with pytest.raises(WireError, match="allowed only for num_batches_tracked"):
        encode_weights({"layer.steps": np.zeros(3, np.int64)})
    with pytest.raises(WireError, match="object"):
        encode_weights({"w": np.array([{"code": "x"}], dtype=object)})
    with pytest.raises(WireError, match="bad magic"):
        decode_weights(pickle.dumps(sample_weights()))
    encoded = encode_weights(sample_weights())
    with pytest.raises(WireError, match="ends inside"):
        decode_weights(encoded[:-5])
    with pytest.raises(WireError, match="after the last tensor"):
        decode_weights(encoded + b"\x00")


def test_a_stream_round_trips_over_several_chunks_with_its_counts_and_metrics() -> None:
    plaintext = encode_weights(sample_weights())
    parts = stream(plaintext, chunk_bytes=256, header_fields={"num_cases": 17, "metrics": {"loss": 0.25}})
    assert parts[0].header.chunk_count == len(parts) - 1 > 3
    assert all(plaintext[:64] not in part.chunk.payload for part in parts[1:])  # encrypted
    header, received = receive(parts, plan_sha256=BINDING.plan_sha256, round=4, base_sha256=BINDING.base_sha256)
    assert received == plaintext
    assert header.num_cases == 17 and dict(header.metrics) == {"loss": 0.25}
    assert header.total_sha256 == weights_sha256(plaintext)
    nonces = {part.chunk.payload[:12] for part in parts[1:]}
    assert len(nonces) == len(parts) - 1  # a fresh nonce per chunk


def flip(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 1]) + payload[at + 1 :]


@pytest.mark.parametrize("compress", [False, True])  # the receiver hashes an uncompressed body chunk by chunk
def test_a_stream_sent_with_its_known_sha256_is_received_and_a_wrong_one_is_refused(compress: bool) -> None:
    plaintext = encode_weights(sample_weights())
    options = {"compress": compress, "chunk_bytes": 256}
    header, received = receive(stream(plaintext, plaintext_sha256=weights_sha256(plaintext), **options))
    assert received == plaintext and header.total_sha256 == sha256_hex(plaintext)
    with pytest.raises(WireError, match="does not match the header's size and sha256") as refused:
        receive(stream(plaintext, plaintext_sha256=sha256_hex(plaintext[:-1]), **options))
    assert not refused.value.resend


def test_a_chunk_broken_in_transit_or_a_truncated_stream_asks_for_a_resend() -> None:
    parts = stream(encode_weights(sample_weights()), chunk_bytes=256)
    broken = [pb2.StreamPart() for _ in parts]
    for copy, part in zip(broken, parts, strict=True):
        copy.CopyFrom(part)
    broken[2].chunk.payload = flip(broken[2].chunk.payload, 40)
    receiver = StreamReceiver(KEY, "site-a", 1 << 24)
    with pytest.raises(WireError, match="chunk 1 is broken") as raised:
        receiver.receive(broken)
    assert raised.value.resend is True
    assert receiver.receive(parts)[1] == encode_weights(sample_weights())  # the resend, on the same receiver
    with pytest.raises(WireError, match=f"ended after {len(parts) - 2} of {len(parts) - 1} chunks") as raised:
        receive(parts[:-1])
    assert raised.value.resend is True
    with pytest.raises(WireError, match="does not start with a header") as raised:
        receive([])
    assert raised.value.resend is True
    with pytest.raises(WireError, match="chunk 2 arrived where chunk 1 was due") as raised:
        receive([parts[0], parts[1], *parts[3:]])
    assert raised.value.resend is True


def test_a_chunk_forged_with_a_matching_sha256_does_not_decrypt_and_is_not_resent() -> None:
    parts = stream(encode_weights(sample_weights()), chunk_bytes=256)
    parts[1].chunk.payload = flip(parts[1].chunk.payload, 30)
    parts[1].chunk.sha256 = sha256_hex(parts[1].chunk.payload)
    with pytest.raises(WireError, match="chunk 0 does not decrypt") as raised:
        receive(parts)
    assert raised.value.resend is False


@pytest.mark.parametrize("field", ["round", "plan_sha256", "base_sha256", "num_cases"])
def test_a_header_rewritten_for_another_round_plan_base_or_count_fails_to_decrypt(field: str) -> None:
    parts = stream(encode_weights(sample_weights()), header_fields={"num_cases": 5})
    setattr(parts[0].header, field, 6 if field in ("round", "num_cases") else "f" * 64)
    with pytest.raises(WireError, match="does not decrypt") as raised:
        receive(parts)
    assert raised.value.resend is False


def test_an_update_replayed_from_another_site_round_or_base_is_refused_without_resend() -> None:
    parts = stream(encode_weights(sample_weights()))
    with pytest.raises(WireError, match="does not decrypt for site 'site-b'") as raised:
        receive(parts, site="site-b")
    assert raised.value.resend is False
    for expected, reason in [
        ({"round": 5}, "round 4, expected 5"),
        ({"base_sha256": "c" * 64}, "base_sha256 'b{64}', expected 'c{64}'"),
        ({"plan_sha256": "q" * 64}, "plan_sha256"),
    ]:
        with pytest.raises(WireError, match=reason) as raised:
            receive(parts, **expected)
        assert raised.value.resend is False
    with pytest.raises(WireError, match="does not decrypt"):
        StreamReceiver(os.urandom(32), "site-a", 1 << 24).receive(parts)


def test_an_oversized_stream_is_cut_off_before_it_is_buffered() -> None:
    max_bytes, chunk = 10_000, 1_000
    honest = stream(os.urandom(3 * max_bytes), chunk_bytes=chunk)
    pulled: list[pb2.StreamPart] = []

    def counted(parts: list[pb2.StreamPart]) -> Iterator[pb2.StreamPart]:
        for part in parts:
            pulled.append(part)
            yield part

    with pytest.raises(WireError, match="announces 30000 bytes, more than the 10000 allowed") as raised:
        receive(counted(honest), max_bytes=max_bytes)  # type: ignore[arg-type]
    assert raised.value.resend is False and len(pulled) == 1  # the header alone

    # A lying header (small total, endless chunks), encrypted properly: the receiver stops at max_bytes.
    header = pb2.StreamHeader(
        plan_sha256=BINDING.plan_sha256, round=BINDING.round, base_sha256=BINDING.base_sha256,
        chunk_count=1_000_000, total_bytes=100, total_sha256="0" * 64,
    )  # fmt: skip
    receiver = StreamReceiver(KEY, "site-a", max_bytes)
    held: list[int] = []

    def endless() -> Iterator[pb2.StreamPart]:
        yield pb2.StreamPart(header=header)
        for index in range(1_000_000):
            held.append(receiver.held_bytes)
            nonce = os.urandom(12)
            sealed = nonce + AESGCM(KEY).encrypt(nonce, bytes(chunk), BINDING.associated_data(index, header))
            yield pb2.StreamPart(chunk=pb2.Chunk(index=index, payload=sealed, sha256=sha256_hex(sealed)))

    with pytest.raises(WireError, match="exceeds the 10000 bytes allowed: cut off at chunk 10") as raised:
        receiver.receive(endless())
    assert raised.value.resend is False
    assert max(held) <= max_bytes + chunk and receiver.held_bytes <= max_bytes and len(held) == 11


def test_a_compressed_stream_that_inflates_past_the_limit_is_refused() -> None:
    bomb = zlib.compress(bytes(200_000))
    header = pb2.StreamHeader(
        plan_sha256=BINDING.plan_sha256, round=BINDING.round, base_sha256=BINDING.base_sha256,
        chunk_count=1, total_bytes=100, total_sha256="0" * 64, compression="zlib",
    )  # fmt: skip
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(KEY).encrypt(nonce, bomb, BINDING.associated_data(0, header))
    chunk = pb2.Chunk(index=0, payload=sealed, sha256=sha256_hex(sealed))
    parts = [pb2.StreamPart(header=header), pb2.StreamPart(chunk=chunk)]
    with pytest.raises(WireError, match="inflates past the 100000 bytes allowed") as raised:
        receive(parts, max_bytes=100_000)
    assert raised.value.resend is False


def test_compression_is_used_only_when_it_pays() -> None:
    weights = encode_weights({"w": np.random.default_rng(3).standard_normal(100_000).astype(np.float32)})
    sparse = encode_weights({"w": np.repeat(np.float32([0.0, 1.0]), 50_000)})
    assert not should_compress(weights) and should_compress(sparse)
    plain, packed = stream(weights), stream(sparse)
    assert plain[0].header.compression == "" and packed[0].header.compression == "zlib"
    assert sum(len(p.chunk.payload) for p in packed[1:]) < len(sparse) / 10
    assert receive(packed)[1] == sparse and receive(plain)[1] == weights
    forced = stream(weights, compress=True)
    assert forced[0].header.compression == "zlib" and receive(forced)[1] == weights
    assert stream(sparse, compress=False)[0].header.compression == ""


def test_the_received_plaintext_is_a_read_only_view_that_decodes_without_a_copy() -> None:
    plaintext = encode_weights(sample_weights())
    _, received = receive(stream(plaintext, chunk_bytes=256))
    assert isinstance(received, memoryview) and received.readonly and received == plaintext
    assert weights_sha256(received) == weights_sha256(plaintext)
    arrays = decode_weights(received, copy=False)
    assert not any(array.flags.writeable for array in arrays.values())
    assert all(array.flags.writeable for array in decode_weights(received).values())  # copy=True: the site trains them


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_buffers_are_kept_for_the_next_round_on_glibc() -> None:
    assert keep_freed_buffers() is True
