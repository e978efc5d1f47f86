"""UIDs: validation before any use, deterministic output UIDs, spool file names, and our own outputs' identity.

Why deterministic: an output's Series/SOP Instance UIDs must be the same on every retry and after a crash
(design.md §4), so they are derived from what identifies the output, never drawn at random.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from pydicom.uid import UID

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64
# Our outputs carry Manufacturer == OWN_MANUFACTURER; the SCP ignores them when they come back. Matched exactly:
# synthetic studies say "fedlesion-synthetic" and must be processed.
OWN_MANUFACTURER = "fedlesion"
_OUTPUT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "outputs.fedlesion")


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: dotted digits, at most 64 characters (no `../`, no spaces, no empty components)."""
    return isinstance(value, str) and len(value) <= UID_MAX_LENGTH and UID_PATTERN.match(value) is not None


def output_uid(*parts: str) -> UID:
    """`2.25.` + a name-based UUID of `parts`: the same parts give the same UID on every run and machine."""
    return UID(f"2.25.{uuid.uuid5(_OUTPUT_NAMESPACE, chr(31).join(parts)).int}")


def spool_name(uid: str) -> str:
    """A file or folder name for a (validated) UID: its SHA-256, so no UID text ever reaches a path."""
    if not is_valid_uid(uid):
        raise ValueError(f"not a valid DICOM UID: {uid!r}")
    return hashlib.sha256(uid.encode("ascii")).hexdigest()
