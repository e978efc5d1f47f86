"""The `[storage]` and `[models]` settings sections, and the field validators every package's sections use.

Each package owns the sections it reads (`dicom_gateway.settings`, `inference.settings`); `fedlesion.settings`
composes them and loads them from TOML and the environment. A validator returns None for a good value, else the
problem as text, which the loader puts after the key's name; `checked(validator)` attaches one to a field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Validator = Callable[[Any], str | None]

_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")  # DICOM AE: ≤16 chars, no backslash
REGISTRY_DIRNAME = "registry"


def checked(validator: Validator) -> dict[str, Any]:
    """Field metadata naming the validator the settings loader runs on the field's value."""
    return {"validator": validator}


def tcp_port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port between 0 and 65535"


def ae_title(value: str) -> str | None:
    return None if _AE_TITLE.match(value) and value.strip() else "must be a DICOM AE title (1-16 characters)"


def ae_titles(values: tuple[str, ...]) -> str | None:
    bad = [value for value in values if ae_title(value)]
    return f"holds {bad[0]!r}, which is not a DICOM AE title" if bad else None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


@dataclass(frozen=True)
class StorageSettings:
    """Everything the node keeps lives under one data directory (design.md §1)."""

    data_dir: Path = Path("fedlesion-data")


@dataclass(frozen=True)
class ModelSettings:
    """Where signed model packages are kept, which releases the node trusts and pulls (design.md §2, §7)."""

    registry_dir: Path | None = None  # default: <data_dir>/registry
    # one enrollment bundle file (`fedlesion coordinator enroll … --role node`): its release keys are the only ones
    # trusted, and the node pulls released models from its coordinator; none: demo mode, only the demo key
    enrollment_bundle: Path | None = None
    pull_interval_s: float = field(default=300.0, metadata=checked(positive))
    auto_install: bool = False  # false: a pulled version is pending until an admin installs it

    def registry_path(self, data_dir: Path) -> Path:
        return self.registry_dir or Path(data_dir) / REGISTRY_DIRNAME
