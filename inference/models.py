"""The models the node serves: one verified package per enabled task, hot-swapped when the registry grows.

Why a service and not a global: a job takes `current(task)` once and keeps that immutable `ServingModel` to the end,
so a swap in the middle of a job never mixes two models in one result (design.md §5). A new version is verified
against the trust policy and the versions served (older or equal refused), warmed up by one prediction on a small
dummy head, and only then swapped in under a lock. Every refusal (design.md §2) leaves the old model serving and is
kept with its time, path and reason for the models page.

Which version serves is the registry's pin (`models.registry.InstalledPin`) when the task has one: an admin's
install, an auto-install of a pulled release, or `fedlesion model rollback`; a newer version in the registry is then
pending until installed. Without a pin the newest verified version serves, as it did before pulling existed.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inference.engine import Engine
from models.errors import MalformedPackage, PackageRefused
from models.federation.enrollment import EnrollmentBundle, release_trust
from models.manifest import Manifest, Role, Task
from models.package import LoadedPackage, TrustMode, TrustPolicy, load_package
from models.preprocessing import Channel
from models.registry import Registry

LOG = logging.getLogger(__name__)

DEFAULTS_DIR = Path(__file__).resolve().parents[1] / "models" / "defaults"
MAX_REFUSALS = 200  # the models page shows the recent ones; the log keeps all

EngineFactory = Callable[[LoadedPackage], Engine]


class ModelUnavailable(LookupError):
    """No verified model serves this task (none in the registry, or every version was refused)."""


class WarmUpFailed(PackageRefused):
    """The package verified but could not run one prediction on a dummy input; the old model keeps serving."""


@dataclass(frozen=True)
class ServingModel:
    """One model as served: hold it for the whole job, never look the task up again halfway."""

    engine: Engine
    package: LoadedPackage
    manifest: Manifest
    version: int
    providers: tuple[str, ...]
    loaded_at: datetime

    @property
    def task(self) -> Task:
        return self.manifest.task

    def describe(self) -> dict[str, Any]:
        """Versions and provenance for the models page and the JSON API (no weights, no keys)."""
        manifest, training = self.manifest, self.manifest.training
        return {
            "task": manifest.task.value,
            "name": manifest.name,
            "version": self.version,
            "demo": self.package.demo,
            "description": manifest.description,
            "created": manifest.created.isoformat(),
            "loaded_at": self.loaded_at.isoformat(),
            "signer_fingerprint": self.package.signer_fingerprint,
            "manifest_sha256": self.package.manifest_sha256,
            "plan_sha256": training.plan_sha256,
            "federated_round": training.federated_round,
            "strategy": training.strategy,
            "validation_metrics": {site: dict(values) for site, values in training.site_metrics.items()},
            "providers": list(self.providers),
        }


class ModelSource(Protocol):
    """What a job needs from the models: `ModelService`, or one given package (`fedlesion segment --model`)."""

    def current(self, task: Task) -> ServingModel: ...

    def served_versions(self) -> dict[Task, int]: ...


@dataclass(frozen=True)
class Refusal:
    """A package the node would not serve, and why; `kind` is the refusal class (e.g. TamperedPackage)."""

    time: datetime
    task: str | None
    version: int | None
    path: str
    kind: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(),
            "task": self.task,
            "version": self.version,
            "path": self.path,
            "kind": self.kind,
            "reason": self.reason,
        }


def trust_from_bundle(bundle: Path | None, tasks: Iterable[Task]) -> TrustPolicy:
    """No bundle: demo mode. A bundle is the one enrollment file `fedlesion coordinator enroll` wrote: its release
    public keys (several, so keys can rotate) are the only ones trusted, and demo-signed packages are refused."""
    if bundle is None:
        return TrustPolicy.demo(tasks)
    return release_trust(EnrollmentBundle.read(bundle), tasks)


def warm_up_channels(manifest: Manifest) -> list[Channel]:
    """A small seeded dummy head (an ellipsoid with noise) in the manifest's channel order, 4 mm voxels: the
    engine pads it to the patch size, so the warm-up runs the same graph shapes a study's first window does."""
    shape, spacing = (24, 28, 16), 4.0
    grid = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    head = sum(axis**2 for axis in grid) < 0.8
    rng = np.random.default_rng(0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    levels = {Role.DWI: 400.0, Role.ADC: 800.0, Role.FLAIR: 300.0, Role.T1: 500.0}
    channels = []
    for channel in manifest.inputs:
        data = head * levels[channel.role] + rng.normal(0.0, 10.0, shape)
        channels.append(Channel(np.clip(data, 0, None).astype(np.float32), affine, channel.name))
    return channels


def warm_up(loaded: LoadedPackage, engine_factory: EngineFactory) -> ServingModel:
    """A verified package made ready to serve: its engine runs one prediction on a dummy head first, so a model
    that cannot run is refused (WarmUpFailed) before any study depends on it."""
    try:
        engine = engine_factory(loaded)
        channels = warm_up_channels(loaded.manifest)
        probabilities = np.asarray(engine.predict(channels).probabilities)
    except Exception as error:  # any failure of a new model is a refusal, never a crash of the node
        raise WarmUpFailed(f"warm-up prediction failed: {error.__class__.__name__}: {error}") from error
    if probabilities.shape != channels[0].data.shape or not np.all(np.isfinite(probabilities)):
        raise WarmUpFailed(
            f"warm-up prediction gave shape {probabilities.shape} or non-finite values "
            f"(expected {channels[0].data.shape})"
        )
    if probabilities.min() < 0.0 or probabilities.max() > 1.0:
        raise WarmUpFailed("warm-up prediction is not a probability map (values outside [0, 1])")
    return ServingModel(
        engine=engine,
        package=loaded,
        manifest=loaded.manifest,
        version=loaded.manifest.version,
        providers=tuple(engine.providers),
        loaded_at=datetime.now(UTC).replace(microsecond=0),
    )


class ModelService:
    """Serves the newest verified version per enabled task from `registry_dir` and watches it for new ones."""

    def __init__(
        self,
        registry_dir: Path,
        trust: TrustPolicy,
        tasks: Iterable[Task],
        *,
        defaults_dir: Path | None = DEFAULTS_DIR,
        engine_factory: EngineFactory | None = None,
        poll_s: float = 5.0,
    ) -> None:
        tasks = frozenset(Task(task) for task in tasks)
        if not tasks:
            raise ValueError("tasks: at least one task must be enabled")
        if not isinstance(trust, TrustPolicy):
            raise TypeError(f"trust must be a TrustPolicy, not {type(trust).__name__}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be greater than 0, got {poll_s}")
        self.tasks = tasks
        # A task the node does not run is refused even when the publisher signed it (design.md §2).
        self.trust = TrustPolicy(trust.publisher_keys, trust.mode, tasks)
        self.registry = Registry(Path(registry_dir), self.trust)
        self.defaults_dir = Path(defaults_dir) if defaults_dir is not None else None
        self._engine_factory = engine_factory or (lambda package: Engine(package))
        self.poll_s = poll_s
        self._serving: dict[Task, ServingModel] = {}
        self._refused: set[tuple[Task, int]] = set()  # registry versions already refused: not retried each poll
        self._refusals: deque[Refusal] = deque(maxlen=MAX_REFUSALS)
        self._lock = threading.Lock()  # guards _serving and _refusals
        self._poll_lock = threading.Lock()  # one verification pass at a time (watcher thread vs install)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def demo_mode(self) -> bool:
        return self.trust.mode is TrustMode.DEMO

    # -- serving ---------------------------------------------------------------------------------------------
    def current(self, task: Task) -> ServingModel:
        """The model serving `task` now; keep the returned object for the whole job."""
        task = Task(task)
        with self._lock:
            serving = self._serving.get(task)
        if serving is None:
            raise ModelUnavailable(f"no verified model serves {task.value}")
        return serving

    def served_versions(self) -> dict[Task, int]:
        with self._lock:
            return {task: model.version for task, model in self._serving.items()}

    def refusals(self) -> list[Refusal]:
        """Recent refusals, newest first."""
        with self._lock:
            return list(reversed(self._refusals))

    def pending(self, task: Task) -> list[int]:
        """Versions in the registry above the one served that wait for an install (only a pinned task has any:
        without a pin the watcher serves the newest itself)."""
        task = Task(task)
        if self.registry.installed(task) is None:
            return []
        served = self.served_versions().get(task, 0)
        return [v for v in self.registry.versions(task) if v > served and (task, v) not in self._refused]

    def status(self) -> dict[str, Any]:
        """Everything the models page and its JSON API show."""
        with self._lock:
            serving = dict(self._serving)
            refusals = list(reversed(self._refusals))
        tasks = {}
        for task in sorted(self.tasks):
            pin = self.registry.installed(task)
            tasks[task.value] = {
                "serving": serving[task].describe() if task in serving else None,
                "registry_versions": self.registry.versions(task),
                "installed": pin.as_dict() if pin else None,
                "pending": self.pending(task),
            }
        return {
            "demo_mode": self.demo_mode,
            "trust_mode": self.trust.mode.value,
            "registry": str(self.registry.root),
            "tasks": tasks,
            "refusals": [refusal.as_dict() for refusal in refusals],
        }

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self, *, watch: bool = True, seed: bool = True) -> None:
        """Serve the newest verified version of each task, then watch the registry.

        A task without any version in the registry gets the embedded default: published into the registry
        (`seed`, the node), or served from where it lies (`seed=False`: `fedlesion segment` reads a node's registry
        and leaves it as it found it)."""
        if seed:
            self.registry.root.mkdir(parents=True, exist_ok=True)
        empty = [task for task in sorted(self.tasks) if not self.registry.versions(task)]
        for task in empty if seed else ():
            self._seed(task)
        self.poll_once()
        for task in () if seed else empty:
            self._serve_default(task)
        missing = sorted(task.value for task in self.tasks - set(self.served_versions()))
        if missing:
            LOG.error("no verified model for %s; studies for it are not processed", ", ".join(missing))
        if watch and self._watcher is None:
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, name="model-registry-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception:  # a disk error must not end the watch; the next poll tries again
                LOG.exception("registry poll failed")

    def _default_package(self, task: Task) -> Path | None:
        source = self.defaults_dir / task.value if self.defaults_dir is not None else None
        if source is None or not source.is_dir():
            LOG.warning("registry has no %s model and no embedded default to seed it", task.value)
            return None
        return source

    def _serve_default(self, task: Task) -> None:
        source = self._default_package(task)
        if source is not None:
            self._try(task, source, None, None)

    def _seed(self, task: Task) -> None:
        source = self._default_package(task)
        if source is None:
            return
        try:
            loaded = self.registry.publish(source)
        except PackageRefused as error:
            self.record_refusal(task, None, source, error)
            return
        LOG.info("seeded the registry with the embedded %s version %d", task.value, loaded.manifest.version)

    # -- swapping --------------------------------------------------------------------------------------------
    def poll_once(self) -> dict[Task, int]:
        """A pinned task: swap in the pinned version (older ones too: a rollback) if it verifies and warms up.
        Otherwise try, newest first, every registry version above the one served; swap in the first that verifies
        and warms up. Returns the tasks that changed version."""
        swapped: dict[Task, int] = {}
        with self._poll_lock:
            for task in sorted(self.tasks):
                served = self.served_versions().get(task)
                pin = self.registry.installed(task)
                if pin is not None:
                    wanted = pin.version
                    if wanted is not None and wanted != served and (task, wanted) not in self._refused:
                        if self._try(task, self.registry.root / task.value / str(wanted), wanted, None):
                            swapped[task] = wanted
                        else:
                            self._refused.add((task, wanted))
                    continue
                candidates = [v for v in self.registry.versions(task) if served is None or v > served]
                for version in reversed(candidates):
                    if (task, version) in self._refused:
                        continue
                    if self._try(task, self.registry.root / task.value / str(version), version, served):
                        swapped[task] = version
                        break
                    self._refused.add((task, version))
        return swapped

    def store(self, source: Path) -> LoadedPackage:
        """Verify a package (directory or .tar, e.g. pulled from the coordinator) and publish it to the registry,
        without installing it. Raises the refusal, which is also recorded."""
        source = Path(source)
        try:
            return self.registry.publish(source)
        except PackageRefused as error:
            self.record_refusal(None, None, source, error)
            raise

    def install(self, source: Path, by: str = "install") -> ServingModel:
        """`store` a package and swap it in now (moving the task's pin, if it has one, to it). Raises the refusal,
        which is also recorded; the old model keeps serving."""
        loaded = self.store(source)
        task, version = loaded.manifest.task, loaded.manifest.version
        if self.registry.installed(task) is not None:
            return self.install_version(task, version, by)
        self.poll_once()
        serving = self.current(task)
        if serving.version != version:
            refusal = next((r for r in self.refusals() if (r.task, r.version) == (task.value, version)), None)
            raise WarmUpFailed(refusal.reason if refusal else f"{task.value} version {version} was not swapped in")
        return serving

    def install_version(self, task: Task, version: int, by: str) -> ServingModel:
        """Serve `version` of `task` from the registry now and pin it (an admin's install, an auto-install). Raises
        the refusal, which is also recorded; then the pin is unchanged and the old model keeps serving."""
        task = Task(task)
        if task not in self.tasks:
            raise ValueError(f"task {task.value} is not enabled on this node")
        if version not in self.registry.versions(task):
            raise ValueError(f"{task.value} version {version} is not in the registry")
        with self._poll_lock:
            if self.served_versions().get(task) != version:
                path = self.registry.root / task.value / str(version)
                try:
                    self._swap(task, path, version, None)
                except (PackageRefused, OSError) as error:
                    self.record_refusal(task, version, path, error)
                    self._refused.add((task, version))
                    raise
            self._refused.discard((task, version))
            self.registry.pin(task, version, by)
        LOG.info("%s version %d installed by %s", task.value, version, by)
        return self.current(task)

    def hold(self, task: Task, by: str) -> None:
        """Pin what serves now (or nothing) unless the task is pinned already, so a version about to be added to
        the registry waits for an install instead of being swapped in by the watcher."""
        task = Task(task)
        with self._poll_lock:
            if self.registry.installed(task) is None:
                self.registry.pin(task, self.served_versions().get(task), by)

    def _try(self, task: Task, path: Path, version: int | None, served: int | None) -> bool:
        """`_swap`, with a refusal recorded instead of raised."""
        try:
            self._swap(task, path, version, served)
        except (PackageRefused, OSError) as error:
            self.record_refusal(task, version, path, error)
            return False
        return True

    def _swap(self, task: Task, path: Path, version: int | None, served: int | None) -> None:
        """Verify, warm up and swap in the package at `path`; `version`: what its registry path says (None for
        the embedded default served in place); `served`: refuse anything not newer (None: a pin chose it)."""
        loaded = load_package(path, self.trust, served={task: served} if served is not None else None)
        if loaded.manifest.task is not task or version not in (None, loaded.manifest.version):
            raise MalformedPackage(
                f"{path} holds {loaded.manifest.task.value} version {loaded.manifest.version}, "
                "not what its path says"
            )
        serving = warm_up(loaded, self._engine_factory)
        with self._lock:
            previous = self._serving.get(task)
            self._serving[task] = serving
        LOG.info(
            "serving %s version %d%s on %s (was %s)",
            task.value, serving.version, " (DEMO)" if loaded.demo else "", ", ".join(serving.providers),
            previous.version if previous else "none",
        )

    def record_refusal(self, task: Task | None, version: int | None, path: Path | str, error: Exception) -> None:
        """Keep a refusal for the models page and log it; also for packages refused outside the registry (a pulled
        release that failed verification)."""
        refusal = Refusal(
            time=datetime.now(UTC).replace(microsecond=0),
            task=task.value if task is not None else None,
            version=version,
            path=str(path),
            kind=error.__class__.__name__,
            reason=str(error),
        )
        with self._lock:
            self._refusals.append(refusal)
        LOG.warning(
            "refused model package %s (%s%s): %s: %s",
            path, refusal.task or "task unknown", f" v{version}" if version else "", refusal.kind, refusal.reason,
        )
