"""The model registry on disk: `root/<task>/<version>/` holding verified packages (design.md §2, §5).

Publishing verifies the whole package first, writes it under `root/.incoming/<random>/`, fsyncs it and renames it
into place, so a reader sees either no version directory or a complete one, and a crash leaves only `.incoming`
debris that listings ignore and the next publish removes. Of two publishers of the same version exactly one wins;
the other gets `VersionNotNewer`. Every read verifies again: a registry on disk is trusted no more than a download.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from models.errors import MalformedPackage, VersionNotNewer
from models.manifest import Task
from models.durable import fsync_dir
from models.package import LoadedPackage, TrustPolicy, load_package, write_package

INCOMING = ".incoming"
_LOCK_FILE = ".lock"
_VERSION_DIR = re.compile(r"^[1-9][0-9]{0,17}$")


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
        self.root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self.root / _LOCK_FILE):
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
