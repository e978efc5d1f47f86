"""The node's model puller (issue 11 item 7): released models from the coordinator into the registry.

At start and every `[models] pull_interval_s` it asks the coordinator, task by task, for a released version newer
than the newest in the registry. A pulled package (already verified against the enrollment bundle's release keys by
`models.federation.pull`) is stored in the registry; with `[models] auto_install` it is installed at once, otherwise
the task is pinned to what serves now first, so the new version is pending on the models page until an admin
installs it. A coordinator that cannot be reached (or fails) is logged and tried again at the next interval: the
node keeps serving what it has. A refused package is recorded with the model service's other refusals.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from inference.models import ModelService
from models.errors import PackageRefused
from models.federation.enrollment import EnrollmentBundle
from models.federation.pull import pull_latest
from models.manifest import Task
from models.settings import ModelSettings

LOG = logging.getLogger(__name__)

# (task, newer_than, dest_dir) -> the pulled package folder, or None when the coordinator has nothing newer
PullFunction = Callable[[Task, int, Path], Path | None]
AUTO_INSTALL_USER = "auto-install"
PULL_USER = "pull"  # who pinned the serving version when a pulled one became pending
PULL_DIRNAME = "pull"  # scratch folders of pulls in progress, under the data directory


class ModelPuller:
    """Pulls released versions for the model service's tasks; `run(stop)` is the node's thread."""

    def __init__(
        self,
        models: ModelService,
        pull: PullFunction,
        *,
        coordinator: str,
        interval_s: float,
        auto_install: bool,
        work_dir: Path,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be greater than 0, got {interval_s}")
        self.models = models
        self.coordinator = coordinator
        self.interval_s = interval_s
        self.auto_install = auto_install
        self.work_dir = Path(work_dir)
        self._pull = pull
        self._lock = threading.Lock()
        self._last_time: str | None = None
        self._last_error: str | None = None

    @classmethod
    def from_settings(cls, models: ModelService, settings: ModelSettings, data_dir: Path) -> ModelPuller:
        """The puller `[models]` of an enrolled node asks for (without `enrollment_bundle`: ValueError)."""
        if settings.enrollment_bundle is None:
            raise ValueError("models.enrollment_bundle is not set: a node in demo mode pulls nothing")
        bundle = EnrollmentBundle.read(settings.enrollment_bundle)
        return cls(
            models, partial(pull_latest, bundle), coordinator=bundle.coordinator_address,
            interval_s=settings.pull_interval_s, auto_install=settings.auto_install,
            work_dir=Path(data_dir) / PULL_DIRNAME,
        )

    def run(self, stop: threading.Event) -> None:
        """Pull now, then every interval until `stop` is set."""
        while True:
            self.pull_once()
            if stop.wait(self.interval_s):
                return

    def pull_once(self) -> dict[Task, int]:
        """One pass over the tasks; returns the versions stored in the registry. Never raises: a failure is kept
        for the models page and logged, and the next pass tries again."""
        stored: dict[Task, int] = {}
        error: str | None = None
        for task in sorted(self.models.tasks):
            try:
                version = self._pull_task(task)
            except PackageRefused:
                continue  # recorded and logged by the model service; the other tasks still pull
            except Exception as failure:  # the coordinator unreachable or failing: keep serving, retry later
                error = describe_failure(failure)
                LOG.warning(
                    "pulling %s from %s failed (%s); still serving %s, next try in %.0f s",
                    task.value, self.coordinator, error, self.models.served_versions().get(task, "nothing"),
                    self.interval_s,
                )
                break
            if version is not None:
                stored[task] = version
        with self._lock:
            self._last_time = datetime.now(UTC).isoformat(timespec="seconds")
            self._last_error = error
        return stored

    def _pull_task(self, task: Task) -> int | None:
        newer_than = max(self.models.registry.versions(task), default=0)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pull-", dir=self.work_dir) as scratch:
            try:
                folder = self._pull(task, newer_than, Path(scratch))
            except PackageRefused as refused:
                self.models.record_refusal(task, None, f"pulled from {self.coordinator}", refused)
                raise
            if folder is None:
                return None
            if not self.auto_install:
                self.models.hold(task, PULL_USER)
            version = self.models.store(folder).manifest.version
        if self.auto_install:
            self.models.install_version(task, version, AUTO_INSTALL_USER)
            LOG.info("pulled and installed %s version %d from %s", task.value, version, self.coordinator)
        else:
            LOG.info("pulled %s version %d from %s: pending until an admin installs it", task.value, version,
                     self.coordinator)
        return version

    def status(self) -> dict[str, Any]:
        """For the models page: where from, how often, whether new versions install themselves, the last pass."""
        with self._lock:
            return {
                "coordinator": self.coordinator,
                "interval_s": self.interval_s,
                "auto_install": self.auto_install,
                "last_time": self._last_time,
                "last_error": self._last_error,
            }


def describe_failure(error: Exception) -> str:
    """One line: a gRPC error's status and details (its text carries several lines of debug context), else the
    exception's class and message."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):
        status = code()
        text = f"{getattr(status, 'name', status)}: {details() or ''}"
    else:
        text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:300]
