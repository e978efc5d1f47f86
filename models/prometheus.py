"""Prometheus text exposition (format 0.0.4): one home for the node's `/metrics` and the coordinator's.

Why no client library: each side exposes a handful of gauges computed at scrape time from its SQLite state (which
survives restarts) plus a few process counters; the text format is simple, and neither a limited center's node nor
the coordinator needs another dependency for it. Label values are fixed vocabularies chosen by the caller; no
study, patient or free text belongs in a label.
"""

from __future__ import annotations

from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def sample(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    """One sample line: `name{key="value",...} value`."""
    text = ",".join(f'{key}="{_escape(val)}"' for key, val in (labels or {}).items())
    return f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"


def family(name: str, kind: str, help_text: str, lines: Iterable[str]) -> list[str]:
    """A metric family: its HELP and TYPE lines, then its samples."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]


def exposition(lines: Iterable[str]) -> str:
    """The whole scrape body (newline-terminated, as the format requires)."""
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


__all__ = ["CONTENT_TYPE", "exposition", "family", "sample"]
