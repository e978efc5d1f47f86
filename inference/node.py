"""`fedlesion node`: the composition root. Receiver, models, job workers, sender, web page and retention from the
settings sections the CLI hands over, started in dependency order and stopped in reverse (design.md §1, §5).

Start-up: the models are verified and warmed up first (a study must never wait for a model that cannot load), an
enrolled node starts pulling released models (`inference.model_pull`), crash debris of the spool is cleared and the studies table recovered, jobs of a killed node are queued again, the
sender and the web page start, and only then does the receiver (the same `Receiver` as `fedlesion receive`, with
`dicom.receiver_processes` SCP processes) accept associations. SIGTERM/SIGINT: stop accepting associations and let
open ones finish for up to 30 s, let each worker finish the job in hand (a job still running after `JOB_FINISH_S`
goes back to the queue without spending an attempt: a stop is no crash), drain the sender's pass, close the web
page, exit 0. Logs carry UIDs and job IDs only: nothing here logs a patient name or ID.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from dicom_gateway.outbox import Outbox
from dicom_gateway.receiver import ASSOCIATION_GRACE_S, LISTEN_HOST, Receiver
from dicom_gateway.roles import classify_study
from dicom_gateway.scu import Sender
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import StudyIndex
from inference.engine import Engine, return_large_buffers_to_the_system
from inference.jobs import JobQueue, enabled_tasks
from inference.model_pull import ModelPuller
from inference.models import (
    ModelService,
    ModelUnavailable,
    trust_from_bundle,
)
from inference.settings import InferenceSettings, NodeSettings, TasksSettings
from inference.study_plan import dwi_b_parameters
from inference.worker import installed_tasks, start_workers
from models.manifest import Task
from models.package import LoadedPackage
from models.settings import ModelSettings

LOG = logging.getLogger(__name__)

JOB_FINISH_S = 120.0  # a job still running after this goes back to the queue (its attempt returned), not waited for
RETENTION_EVERY_S = 3600.0
WEB_THREADS = 4
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def check_onnxruntime_install(installed: Callable[[str], bool] | None = None) -> str:
    """The one ONNX Runtime distribution installed; both or neither stop the node (design.md §1): the two share
    the `onnxruntime` module, and whichever was installed last silently wins."""
    installed = installed or _distribution_installed
    found = [name for name in ONNXRUNTIME_DISTRIBUTIONS if installed(name)]
    if len(found) != 1:
        problem = "both" if found else "neither"
        raise RuntimeError(
            f"{problem} of onnxruntime and onnxruntime-gpu installed; install exactly one "
            "(pip install '.[cpu]' or '.[gpu]')"
        )
    return found[0]


def _distribution_installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@dataclass
class Node:
    """A running node; `start()` then `wait()` (until SIGTERM/SIGINT, `request_stop()` or a dead SCP process), then
    `stop()`; `exit_status` says how it ended."""

    data_dir: Path
    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    tasks: TasksSettings = TasksSettings()
    inference: InferenceSettings = InferenceSettings()
    model_settings: ModelSettings = ModelSettings()
    log_level: str = "INFO"  # the SCP processes' (dicom.receiver_processes > 1)
    dicom_port: int | None = None  # override node.dicom_port (0: any free port)
    web_port: int | None = None  # override node.web_port (0: any free port)
    exit_status: int = field(init=False, default=0)
    models: ModelService = field(init=False)
    puller: ModelPuller | None = field(init=False, default=None)  # with models.enrollment_bundle
    receiver: Receiver = field(init=False)
    outbox: Outbox = field(init=False)
    jobs: JobQueue = field(init=False)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _workers_stop: threading.Event = field(init=False, default_factory=threading.Event)
    _threads: dict[str, list[threading.Thread]] = field(init=False, default_factory=dict)
    _closers: list[tuple[str, Callable[[], Any]]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    @property
    def index(self) -> StudyIndex:
        """The studies table the job queue and the web page read."""
        return self.receiver.index

    def start(self) -> None:
        """Everything up, the SCP last; on failure whatever started is stopped again before the error propagates."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        return_large_buffers_to_the_system()
        runtime = check_onnxruntime_install()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tasks = enabled_tasks(self.tasks)
        threads = self.inference.threads or None

        def engine(package: LoadedPackage) -> Engine:
            return Engine(package, threads=threads)

        self.models = ModelService(
            self.model_settings.registry_path(self.data_dir),
            trust_from_bundle(self.model_settings.enrollment_bundle, tasks),
            tasks,
            engine_factory=engine,
            poll_s=self.inference.registry_poll_s,
        )
        self.models.start()
        self._closers.append(("models", self.models.stop))
        self._start_puller()

        self.receiver = Receiver(
            self.data_dir, self.node.ae_title, self.dicom, describe_roles=self.describe_roles, log_level=self.log_level
        )
        self._closers.append(("receiver", self.receiver.close))
        self.receiver.recover()

        self.outbox = Outbox(self.data_dir)
        self._closers.append(("outbox", self.outbox.close))
        self.jobs = JobQueue(
            self.data_dir, tasks=self.tasks, inference=self.inference, dicom=self.dicom,
            installed=lambda: installed_tasks(self.models),
        )
        self._closers.append(("jobs", self.jobs.close))
        self._threads["workers"] = start_workers(
            self.jobs, self.index, self.models, self.outbox, self.data_dir, self._workers_stop,
            inference=self.inference, destinations=self.dicom.parsed_destinations,
            notify_not_processed=self.tasks.notify_not_processed,
        )
        sender = Sender.from_settings(self.outbox, self.dicom, self.node.ae_title)
        self._spawn("sender", sender.run, self._stop)
        self._spawn("retention", self._retention_loop)
        web_port = self._start_web()

        requested = self.node.dicom_port if self.dicom_port is None else self.dicom_port
        self.dicom_port = self.receiver.start(requested)
        self.web_port = web_port
        served = ", ".join(
            f"{task.value} v{version}" for task, version in sorted(self.models.served_versions().items())
        ) or "none"
        print(
            f"fedlesion node: AE {self.node.ae_title} on {LISTEN_HOST}:{self.dicom_port}, "
            f"web http://{self.node.web_host}:{web_port}/, models {served}"
            f"{' (DEMO MODE - NOT FOR CLINICAL USE)' if self.models.demo_mode else ''}, {runtime}, "
            f"data in {self.data_dir.resolve()}",
            flush=True,
        )

    def _start_puller(self) -> None:
        """An enrolled node pulls released models at start and every `models.pull_interval_s` (a thread: an
        unreachable coordinator never holds the node's start-up, and the node serves what it has meanwhile)."""
        if self.model_settings.enrollment_bundle is not None:
            self.puller = ModelPuller.from_settings(self.models, self.model_settings, self.data_dir)
            self._spawn("model-pull", self.puller.run, self._stop)

    def describe_roles(self, paths: list[Path]) -> Any:
        """Series roles with the b-value and range of the stroke model being served (the defaults without one)."""
        try:
            wanted = dwi_b_parameters(self.models.current(Task.STROKE_DWI_ADC).manifest)
        except ModelUnavailable:
            wanted = None
        return classify_study(paths) if wanted is None else classify_study(paths, *wanted)

    def _start_web(self) -> int:
        from waitress.server import create_server

        from inference.web.app import create_app

        app = create_app(
            self.data_dir, self.node, self.dicom, studies=self.index, jobs=self.jobs, models=self.models,
            outbox=self.outbox, puller=self.puller,
        )
        port = self.node.web_port if self.web_port is None else self.web_port
        server = create_server(
            app, host=self.node.web_host, port=port, threads=WEB_THREADS, ident="fedlesion",
            clear_untrusted_proxy_headers=True,
        )
        self._spawn("web", server.run)
        self._closers.append(("web", server.close))
        return int(server.effective_port)

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.setdefault(name, []).append(thread)

    def _retention_loop(self) -> None:
        """Retention purges (design.md §4) at start and hourly; a failure is logged and tried at the next turn."""
        while True:
            try:
                report = self.jobs.purge_expired(self.index, self.outbox)
                if report.results_purged or report.spool_purged or report.output_batches_purged:
                    LOG.info("retention: %s", report)
            except Exception:
                LOG.exception("retention purge failed")
            if self._stop.wait(RETENTION_EVERY_S):
                return

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        """Until SIGTERM/SIGINT (installed here, main thread only), `request_stop()` or an SCP process's death."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stop.wait(1.0):
                dead = self.receiver.failed_processes()
                if dead:
                    LOG.error("SCP worker %s ended unexpectedly; stopping the node", ", ".join(dead))
                    self.exit_status = 1
                    self._stop.set()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        LOG.info("signal %d: stopping", signum)
        self._stop.set()

    def stop(self) -> None:
        """design.md §5: no new associations (open ones finish up to 30 s), jobs finish or go back to the queue
        without spending an attempt, exit clean."""
        self._stop.set()
        receiver = getattr(self, "receiver", None)
        if receiver is not None:
            LOG.info("stopping: no new associations; open ones may finish for %.0f s", ASSOCIATION_GRACE_S)
            receiver.stop(grace_s=ASSOCIATION_GRACE_S)
        self._workers_stop.set()
        for thread in self._threads.get("workers", []):
            thread.join(JOB_FINISH_S)
            if thread.is_alive():
                LOG.warning("%s still runs a job after %.0f s; it goes back to the queue", thread.name, JOB_FINISH_S)
        if hasattr(self, "jobs"):
            try:
                self.jobs.release_running()
            except Exception:  # the next start's recovery requeues them instead (spending an attempt)
                LOG.exception("requeueing the jobs in hand failed")
        for name in ("sender", "retention", "model-pull"):
            for thread in self._threads.get(name, []):
                thread.join(60.0)
        for name, close in reversed(self._closers):
            try:
                close()
            except Exception:
                LOG.exception("stopping %s failed", name)
        self._closers.clear()
        for thread in self._threads.get("web", []):
            thread.join(10.0)
        self._threads.clear()
        LOG.info("node stopped")


def configure_logging(level: str) -> None:
    """logging.level for the node; the libraries' per-instance INFO lines (one per C-STORE, one per
    copied module) only at DEBUG, so the log stays readable and carries UIDs and job IDs, not headers."""
    root = logging.getLogger()
    if root.level != logging.DEBUG:  # `fedlesion -v` keeps everything
        root.setLevel(level.upper())
    library_level = logging.DEBUG if root.level == logging.DEBUG else logging.WARNING
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(library_level)


def run_node(node: Node) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0 after a clean stop)."""
    configure_logging(node.log_level)
    node.start()
    try:
        node.wait()
    finally:
        node.stop()
    return node.exit_status
