"""Helpers for DICOM tests: decompressed copies of the shared vendor data, free ports, dcmtk's environment.

The shared vendor files are gzip-compressed (design.md §10); `unpack_shared` copies a folder into a temp dir once
per test session, gunzipping `*.gz`, so every test reads plain DICOM files as a PACS would send them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
from pathlib import Path

from tests.conftest import SHARED_DATA, require

SHARED_DICOM = SHARED_DATA / "dicom"


def unpack_shared(relative: str, cache_root: Path) -> Path:
    """`relative` (under shared/data/dicom) as plain files under `cache_root`; skips the test when it is missing."""
    source = SHARED_DICOM / relative
    require(source)
    target = cache_root / relative
    done = target.with_name(target.name + ".unpacked")
    if done.exists():
        return target
    for path in sorted(source.rglob("*")) if source.is_dir() else [source]:
        if not path.is_file():
            continue
        rel = path.relative_to(source) if source.is_dir() else Path(path.name)
        out = target / rel if source.is_dir() else target
        if path.suffix == ".gz":
            out = out.with_suffix("")
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as compressed, out.open("wb") as plain:
                shutil.copyfileobj(compressed, plain)
        else:
            shutil.copyfile(path, out)
    done.touch()
    return target


def free_port() -> int:
    """A loopback TCP port the OS just handed out (bind 0); the caller binds it right away."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """dcmtk stalls on delayed ACKs without TCP_NODELAY (design.md §4)."""
    return {**os.environ, "TCP_NODELAY": "1"}
