"""The model registry on disk: `root/<task>/<version>/` holding verified packages (design.md §2, §5).

Publishing verifies the whole package first, writes it under `root/.incoming/<random>/`, fsyncs it and renames it
into place, so a reader sees either no version directory or a complete one, and a crash leaves only `.incoming`
debris that listings ignore and the next publish removes. Of two publishers of the same version exactly one wins;
the other gets `VersionNotNewer`. Every read verifies again: a registry on disk is trusted no more than a download.

`<task>/installed.json` pins the version a node serves (an admin's install, an auto-install, a rollback): with a
pin, a newer version in the registry is only pending; without one, the newest verified version serves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Iterator

from models.durable import fsync_dir, write_text_atomic
from models.errors import MalformedPackage, VersionNotNewer
from models.manifest import Task
from models.package import LoadedPackage, TrustPolicy, load_package, write_package

INCOMING = ".incoming"
_LOCK_FILE = ".lock"
_VERSION_DIR = re.compile(r"^[1-9][0-9]{0,17}$")
INSTALLED_FILE = "installed.json"
PIN_HISTORY = 20  # earlier installs kept for rollback


@dataclass(frozen=True)
class InstalledPin:
    """The version of a task chosen to serve, by whom and when; `history`: the versions installed before it,
    oldest first, which a rollback walks back along. `version` None: nothing installed yet (a pulled version
    waits for an admin)."""

    version: int | None
    history: tuple[int, ...]
    by: str
    at: str

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "history": list(self.history), "by": self.by, "at": self.at}

    @classmethod
    def from_dict(cls, data: Any) -> InstalledPin:
        def version_or_none(value: Any) -> bool:
            return value is None or (type(value) is int and value >= 1)

        if (
            not isinstance(data, dict)
            or not version_or_none(data.get("version"))
            or not isinstance(data.get("history"), list)
            or not all(type(v) is int and v >= 1 for v in data["history"])
            or not isinstance(data.get("by"), str)
            or not isinstance(data.get("at"), str)
        ):
            raise ValueError(f"{INSTALLED_FILE} must hold version (integer or null), history, by and at")
        return cls(data["version"], tuple(data["history"]), data["by"], data["at"])


class Registry:
    """Verified model packages by task and version, safe for concurrent readers and publishers on one host."""

    def __init__(self, root: Path, trust: TrustPolicy) -> None:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"registry root {root} is not a directory")
        if not isinstance(trust, TrustPolicy):
            raise ValueError(f"trust must be a TrustPolicy, not {type(trust).__name__}")
        self.root = root
        self.trust = trust

    def versions(self, task: Task) -> list[int]:
        """Published versions, ascending; anything that is not a complete version directory is ignored."""
        task_dir = self.root / Task(task).value
        try:
            entries = list(os.scandir(task_dir))
        except FileNotFoundError:
            return []
        return sorted(
            int(entry.name)
            for entry in entries
            if _VERSION_DIR.match(entry.name) and entry.is_dir(follow_symlinks=False)
        )

    def latest(self, task: Task) -> LoadedPackage | None:
        versions = self.versions(task)
        return self.load(task, versions[-1]) if versions else None

    def load(self, task: Task, version: int) -> LoadedPackage:
        """Verify and load one version; the manifest must agree with where the package sits."""
        task = Task(task)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version must be an integer ≥ 1, got {version!r}")
        path = self.root / task.value / str(version)
        loaded = load_package(path, self.trust)
        if (loaded.manifest.task, loaded.manifest.version) != (task, version):
            raise MalformedPackage(
                f"{path} holds {loaded.manifest.task.value} version {loaded.manifest.version}, not what its path says"
            )
        return loaded

    def publish(self, source: Path) -> LoadedPackage:
        """Verify `source` (directory or .tar) against the trust policy and the latest version, then add it.

        Verification runs unlocked; staging, the version check and the rename run under one exclusive lock, so
        versions only ever grow and whatever `.incoming` holds when the lock is taken is crash debris.
        """
        loaded = load_package(Path(source), self.trust, served=self._served())
        task, version = loaded.manifest.task, loaded.manifest.version
        with self._locked():
            served = self._served().get(task)
            if served is not None and version <= served:
                raise VersionNotNewer(
                    f"{task.value} version {version} is not newer than version {served} already served"
                )
            incoming = self.root / INCOMING
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.mkdir()
            staging = incoming / secrets.token_hex(8)
            staging.mkdir()
            try:
                write_package(staging, loaded.package_files())
                task_dir = self.root / task.value
                task_dir.mkdir(exist_ok=True)
                fsync_dir(self.root)
                try:
                    os.rename(staging, task_dir / str(version))  # atomic; fails onto an existing version directory
                except OSError as error:
                    if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise VersionNotNewer(f"{task.value} version {version} already exists") from None
                fsync_dir(task_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return loaded

    def installed(self, task: Task) -> InstalledPin | None:
        """The task's pin, or None when the newest verified version serves."""
        path = self.root / Task(task).value / INSTALLED_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return InstalledPin.from_dict(json.loads(text))
        except ValueError as error:  # json.JSONDecodeError included
            raise ValueError(f"{path}: {error}") from None

    def pin(self, task: Task, version: int | None, by: str) -> InstalledPin:
        """Serve `version` (one in the registry; None: nothing yet) from now on; the version pinned before goes
        onto the history a rollback returns along."""
        task = Task(task)
        with self._locked():
            if version is not None and version not in self.versions(task):
                raise ValueError(f"{task.value} version {version} is not in the registry")
            previous = self.installed(task)
            history = previous.history if previous else ()
            if previous and previous.version is not None and previous.version != version:
                history = (*history, previous.version)
            return self._write_pin(task, version, history[-PIN_HISTORY:], by)

    def rollback(self, task: Task, by: str) -> InstalledPin:
        """Back to the version installed before the current one (without a pin: before the newest); that
        version's own predecessor becomes the next rollback's target. The target is verified first: a refused
        one raises and leaves the pin as it was."""
        task = Task(task)
        with self._locked():
            versions = self.versions(task)
            pin = self.installed(task)
            current = pin.version if pin else (versions[-1] if versions else None)
            if current is None:
                raise ValueError(f"{task.value}: no version is installed, nothing to roll back")
            history = [v for v in (pin.history if pin else ()) if v in versions and v != current]
            if not history:
                history = [v for v in versions if v < current][-1:]
            if not history:
                raise ValueError(f"{task.value}: no version before {current} to roll back to")
            self.load(task, history[-1])
            return self._write_pin(task, history[-1], tuple(history[:-1]), by)

    def _write_pin(self, task: Task, version: int | None, history: tuple[int, ...], by: str) -> InstalledPin:
        pin = InstalledPin(version, history, by, datetime.now(UTC).isoformat(timespec="seconds"))
        task_dir = self.root / task.value
        task_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(task_dir / INSTALLED_FILE, json.dumps(pin.as_dict(), sort_keys=True) + "\n")
        return pin

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self.root / _LOCK_FILE):
            yield

    def _served(self) -> dict[Task, int]:
        return {task: versions[-1] for task in Task if (versions := self.versions(task))}


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """One publisher at a time, across threads and processes on this host (flock is per open file)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
