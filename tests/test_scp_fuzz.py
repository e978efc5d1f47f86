"""Fuzz the SCP with damaged datasets sent as raw bytes (design.md §10): seeded, bounded in time.

Each case is a small valid instance, then truncated, bit-flipped, given lying element lengths, `../` or oversized
UIDs, oversized or endlessly nested headers, or replaced by garbage; pynetdicom sends the bytes after the File Meta
group unchanged. Every C-STORE must be answered, with Success (and the instance then lies in the spool) or a
failure status; the association survives, C-ECHO answers afterwards and nothing is written outside the spool.
"""

from __future__ import annotations

import random
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from tests.test_scp import (
    RunningScp,
    dataset_bytes,
    instance,
    launch_scp,
    pynetdicom_scu,
    send_raw,
)

SEED = 20261122
CASES = 1200
TIME_BUDGET_S = 110.0
FAILURE_STATUSES = range(0xA700, 0xA7FF + 1), range(0xA900, 0xA9FF + 1), range(0xC000, 0xCFFF + 1), (0x0110,)
ESCAPE_NAME = "fuzz-escaped"
SPOOL_FILE = re.compile(r"^spool/[0-9a-f]{64}/[0-9a-f]{64}\.dcm$")


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element with a 2-byte length (a 4-byte one for OB/SQ/UN)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"SQ", b"UN"):
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _with_uid(rng: random.Random, ds: Dataset) -> Dataset:
    evil = rng.choice(
        [
            f"../../../../{ESCAPE_NAME}",
            f"1.2.3/../../{ESCAPE_NAME}",
            "1.2.840.." + "9" * 10,
            "1." + "2" * 200,  # oversized
            "",
            "1.2.3\\1.2.4",
            "/etc/passwd",
            "1.2.\xe9",  # not ASCII
            "1.2\x003",
        ]
    )
    setattr(ds, rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]), evil)
    return ds


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(0, len(data))]


def _flip(rng: random.Random, data: bytes) -> bytes:
    mutable = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        mutable[rng.randrange(len(mutable))] ^= 1 << rng.randrange(8)
    return bytes(mutable)


def _lying_length(rng: random.Random, data: bytes, offsets: list[int]) -> bytes:
    """Overwrite the length field of one element with a value that does not match its value."""
    mutable = bytearray(data)
    offset = rng.choice(offsets)
    vr = bytes(mutable[offset + 4 : offset + 6])
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        struct.pack_into("<I", mutable, offset + 8, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, len(data) * 2, 3]))
    else:
        struct.pack_into("<H", mutable, offset + 6, rng.choice([0xFFFF, len(data) % 0xFFFF, 1, 0]))
    return bytes(mutable)


def _oversized_header(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:  # one huge private value in front of everything
        return _element(0x00090010, b"LO", b"FUZZ") + _element(0x00091001, b"OB", b"\x00" * rng.choice([65536, 1 << 20])) + data
    if kind == 1:  # thousands of private elements
        block = b"".join(_element(0x00091000 | (i % 0xFF), b"LO", b"X" * 16) for i in range(5000))
        return _element(0x00090010, b"LO", b"FUZZ") + block + data
    depth = rng.choice([20, 200, 2000])  # undefined-length sequences nested deeper than any real header
    item, seq = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HH", 0x0008, 0x1115) + b"SQ\x00\x00\xff\xff\xff\xff"
    return (seq + item) * depth + data


def _garbage(rng: random.Random, data: bytes) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 512)))


def _element_offsets(data: bytes) -> list[int]:
    """Offsets of the top-level element headers of a valid explicit VR little endian dataset."""
    offsets, position = [], 0
    while position + 8 <= len(data):
        offsets.append(position)
        vr = data[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"OD", b"OL", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", data, position + 8)
            position += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            position += 8 + length
    return offsets


def make_case(rng: random.Random, folder: Path, index: int) -> tuple[Path, str]:
    """Write case `index` as a Part-10 file: valid File Meta (the C-STORE command's UIDs and transfer syntax)
    followed by the mutated dataset bytes; returns (path, kind)."""
    ds = instance(rows=rng.choice([2, 8, 32]), columns=rng.choice([2, 8, 32]))
    kind = rng.choice(["valid", "uid", "truncate", "flip", "length", "oversized", "garbage", "implicit"])
    path = folder / f"case{index:05d}.dcm"
    implicit = kind == "implicit"
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    data = dataset_bytes(path)
    meta = path.read_bytes()[: -len(data)]
    if kind == "uid":
        _with_uid(rng, ds).save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
        data = dataset_bytes(path)
    mutate: dict[str, Callable[[], bytes]] = {
        "valid": lambda: data,
        "uid": lambda: data,
        "truncate": lambda: _truncate(rng, data),
        "flip": lambda: _flip(rng, data),
        "length": lambda: _lying_length(rng, data, _element_offsets(data)),
        "oversized": lambda: _oversized_header(rng, data),
        "garbage": lambda: _garbage(rng, data),
        "implicit": lambda: _truncate(rng, data) if rng.random() < 0.5 else _flip(rng, data),
    }
    path.write_bytes(meta + mutate[kind]())
    return path, kind


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningScp]:
    scp = launch_scp(tmp_path / "data")
    yield scp
    scp.stop()


@pytest.mark.slow  # 15-30 s alone, more on a busy machine
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")  # the bad UIDs are the point
def test_fuzzed_datasets_get_a_status_and_never_escape_the_spool(tmp_path: Path, running: RunningScp) -> None:
    rng = random.Random(SEED)
    cases = tmp_path / "cases"
    cases.mkdir()
    started = time.monotonic()
    answers: list[tuple[str, int]] = []
    assoc = pynetdicom_scu(running.port)
    try:
        for index in range(CASES):
            if time.monotonic() - started > TIME_BUDGET_S:
                break
            path, kind = make_case(rng, cases, index)
            answers.append((kind, send_raw(assoc, path)))
            path.unlink()
            assert assoc.is_established, f"the association died on case {index} ({kind})"
        assert assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()

    assert len(answers) >= 1000, f"only {len(answers)} cases in {TIME_BUDGET_S} s"
    unanswered = [(kind, status) for kind, status in answers if status != 0 and not _is_failure(status)]
    assert unanswered == [], "every case is answered Success or with a failure status"
    successes = sum(1 for _, status in answers if status == 0)
    kinds_failed = {kind for kind, status in answers if status != 0}
    assert {"uid", "truncate", "length", "oversized", "garbage"} <= kinds_failed
    assert successes == len(running.sink.instances) >= sum(1 for kind, _ in answers if kind == "valid")
    for record in running.sink.instances:
        assert record.path.is_file() and running.spool.root in record.path.parents
    data_dir = running.spool.root.parent
    written = [path.relative_to(data_dir).as_posix() for path in data_dir.rglob("*") if path.is_file()]
    assert all(SPOOL_FILE.match(name) for name in written), "only <hash>/<hash>.dcm files, all under the spool"
    assert len(written) == successes
    assert not list(tmp_path.parent.rglob(f"*{ESCAPE_NAME}*")) and not Path(f"/{ESCAPE_NAME}").exists()
    echo = pynetdicom_scu(running.port)
    try:
        assert echo.send_c_echo().Status == 0, "a fresh association is still served"
    finally:
        echo.release()


def _is_failure(status: int) -> bool:
    return any(status in statuses for statuses in FAILURE_STATUSES)
