"""The audit log: who viewed or downloaded which study, and who installed which model version, when (design.md §6).

Append-only JSON lines in `<data_dir>/audit/audit.jsonl`, one object per event with the user, the UTC time, the
action and the Study Instance UID; never a patient name or ID. Each line is written with one `write` on a file
opened with O_APPEND and flushed, so lines from several threads never interleave and a crash loses at most the
line being written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any


class AuditAction(StrEnum):
    VIEW = "view"  # the study page or its JSON
    VIEW_IMAGES = "view-images"  # a volume of the study opened in the viewer
    DOWNLOAD = "download"
    REPROCESS = "reprocess"
    LOGIN = "login"
    LOGIN_FAILED = "login-failed"
    LOGOUT = "logout"
    MODEL_INSTALL = "model-install"  # a pending version installed (web page, admin) or a rollback (CLI)
    MODEL_ROLLBACK = "model-rollback"


class AuditLog:
    def __init__(self, data_dir: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(data_dir) / "audit" / "audit.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()

    def record(self, user: str, action: AuditAction, study_uid: str | None = None, **detail: str | int) -> None:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds"),
            "user": user,
            "action": AuditAction(action).value,
            "study_uid": study_uid,
            **detail,
        }
        line = (json.dumps(event, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, line)
            finally:
                os.close(descriptor)

    def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first (for tests and an administrator's review)."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
