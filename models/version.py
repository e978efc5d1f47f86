"""The installed fedlesion distribution's version, for the packages below the CLI (`/healthz`)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "fedlesion"


def distribution_version() -> str:
    """The version pyproject.toml declares, as installed; "unknown" when run from a tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
