"""The coordinator (`fedlesion coordinator serve`): the gRPC servicer and the round loop (design.md §7).

A round invites the active trainer sites (enrolled, neither paused nor revoked, seen within the heartbeat timeout;
a site that becomes active while the round is open joins it) that the strategy chooses: all of them, but under a
sequential rule (IIL, cyclic IIL) the one whose turn it is, so the model passes from site to site. It collects
their updates, and closes when every invited site has answered with at least the quorum accepted, or at the
deadline with the quorum; below the quorum at the deadline it is retried with the sites active then (the updates
it accepted stay: same base weights), so a dead site never stalls it. Closing aggregates with the plan's strategy,
exports to ONNX with export.py's parity check, signs with the round key and records the next version as a
candidate, read at the threshold with the best validation Dice pooled over its contributors' reports
(training.calibration; the plan's threshold when none reported). An evaluator (by its certificate, or a trainer
whose hello narrows to evaluator) is given the newest round's candidate it has not scored (`GetCandidate`); the
aggregates it reports (means, histograms with at least 5 cases per bin) are kept with the round, and `coordinator
release` writes them into the released manifest. After the last round the server keeps answering heartbeats,
status and pulls. The weight and candidate streams' bytes are recorded per round, site and direction.

Operators (monitoring.py): after each close and each evaluation a thread of its own rewrites the plan's report,
`DIR/rounds/<plan>/metrics.csv` and `val_dice.png` (the round loop never waits for matplotlib; until the last round
closes the plot is redrawn at most every PLOT_INTERVAL_S, as each drawing takes CPU from the round); with a metrics
port, Prometheus `/metrics` is served over plain HTTP, on loopback unless told otherwise.

Every call passes `check` first (transport.add_coordinator_servicer): the peer certificate's fingerprint is looked
up in the state database on each call, so `coordinator revoke` in another process takes effect at once. Refusals are
logged with their reason; refused updates are recorded with theirs (`coordinator status`).

Before aggregating, a round's accepted updates are screened against each other (screening.py: case count, norm,
direction): a refused one is recorded as refused with its reason, and a site refused twice in a row is suspended
until `coordinator resume`. If fewer than the quorum pass, the round stays open (its deadline retries it).

A site whose custodian's policy refuses the task reports metrics of kind `refused` with the reason: the refusal is
recorded in the open round (status shows it), and the site is paused with that reason until the next round opens
or the round's retry (each asks it again: its custodian may have approved the plan meanwhile) or it says hello
again.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch

from models.durable import fsync_dir, write_atomic
from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc as pb2_grpc
from models.federation.roles import SiteRole
from models.federation.transport import (
    MESSAGE_OPTIONS,
    PROTOCOL_VERSION,
    add_coordinator_servicer,
    peer_name,
    server_credentials,
)
from models.federation.wire import (
    StreamBinding,
    StreamReceiver,
    WireError,
    chunk_stream,
    decode_weights,
    encode_weights,
    keep_freed_buffers,
    weights_sha256,
    weights_spec,
)
from models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, Task, parse_manifest
from models.networks import build_network, load_network_weights, network_weights
from models.package import sha256_hex
from models.signing import load_private_key
from models.version import distribution_version
from training.calibration import DiceByThreshold, best_threshold, pooled_dice
from training.checkpoint import save_checkpoint
from training.export import export_package
from training.federation.admin import CoordinatorDir
from training.federation.aggregation import SiteUpdate
from training.federation.evaluation import histograms_from_messages
from training.federation.monitoring import MetricsServer, Traffic, render_metrics, write_round_report
from training.federation.plan import FederatedPlan
from training.federation.screening import screen
from training.federation.state import DOWN, INCOMING_PREFIX, UP, AcceptedUpdate, Round, RoundState, SiteState
from training.fingerprint import MIN_CASES_PER_BIN

log = logging.getLogger(__name__)

REFUSED = "refused"  # the MetricsReport kind of a site whose policy refused the task
HEARTBEAT_INTERVAL_S = 5
MODEL_CHUNK_BYTES = 1 << 20
SERVER_THREADS = 16
# Until the plan's last round closes, val_dice.png is redrawn at most this often: a drawing costs about 0.1 CPU-s,
# as much as moving one site's 23 MB of weights, and rounds of a few seconds (no-op training, tiny networks) would
# otherwise pay it every round. A round of real training takes minutes, so each still gets its plot; the CSV is
# always current.
PLOT_INTERVAL_S = 30.0
# At most this many GetTask calls hold an idle answer at once (a long poll), so heartbeats, uploads and pulls always
# find a free server thread; a site beyond it gets its idle answer at once and polls as before.
TASK_WAITERS = SERVER_THREADS // 2
# The narrowest role each call needs (SiteRole.permits: trainer ⊃ evaluator ⊃ node).
CALL_ROLES = {
    "Hello": SiteRole.NODE,
    "Heartbeat": SiteRole.NODE,
    "GetLatestModel": SiteRole.NODE,
    "GetTask": SiteRole.EVALUATOR,
    "GetCandidate": SiteRole.EVALUATOR,
    "ReportMetrics": SiteRole.EVALUATOR,
    "GetWeights": SiteRole.TRAINER,
    "PutUpdate": SiteRole.TRAINER,
}


def initial_weights(plan: FederatedPlan) -> dict[str, np.ndarray]:
    """Round 1's base: the plan's network initialised from the plan's seed (the same on every restart), each tensor
    once (`network_weights`)."""
    torch.manual_seed(plan.training.seed)
    network = build_network(plan.training.in_channels, 1, plan.training.network)
    return {name: value.detach().cpu().numpy().copy() for name, value in network_weights(network).items()}


class Coordinator(pb2_grpc.CoordinatorServicer):
    """One plan's rounds over the coordinator directory's state; `start` serves, `step` advances the rounds."""

    def __init__(self, directory: Path, plan: FederatedPlan, *, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 tick_s: float = 0.2) -> None:
        self.layout = CoordinatorDir(Path(directory))
        self.state = self.layout.state()
        self.plan = plan
        self.plan_toml = plan.to_toml()
        self.strategy = plan.rule()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = 3 * heartbeat_interval_s
        self.idle_retry_s = max(1, int(heartbeat_interval_s) // 2)  # an idle site's retry_after_s
        self.tick_s = tick_s
        self.rounds_dir = self.layout.rounds(plan.sha256)
        self._round_key = load_private_key(self.layout.round_key)
        self._weights_cache: dict[Path, tuple[bytes, dict[str, np.ndarray]]] = {}
        # Accepted updates of the open round as PutUpdate decoded them, by file: the close need not read and decode
        # them again (after a restart it reads the files).
        self._decoded_updates: dict[Path, dict[str, np.ndarray]] = {}
        self._hello_roles: dict[str, SiteRole] = {}  # the role each site's last hello asked for (narrowing only)
        self._closing_lock = threading.Lock()  # an update is recorded wholly before or wholly after a close starts
        self._closing: int | None = None  # the round being aggregated: updates arriving meanwhile are refused
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._work = threading.Condition()  # notified when a round opens, is retried or closes
        self._work_generation = 0
        self._task_waiters = 0
        self._server: grpc.Server | None = None
        self._loop: threading.Thread | None = None
        self.traffic = Traffic()
        self.metrics_server: MetricsServer | None = None
        self._report_due = threading.Event()  # a round closed or an evaluation came: rewrite the report
        self._reporter: threading.Thread | None = None
        self._resume()

    # -- start-up, loop, shutdown -----------------------------------------------------------------------------
    def _resume(self) -> None:
        """Adopt the plan, repair what a crash left, and say which round resumes."""
        if self.state.adopt_plan(self.plan_toml, self.plan.sha256, actor="serve"):
            log.info("serving plan %s (%s, %d rounds)", self.plan.sha256[:12], self.plan.strategy, self.plan.rounds)
        for line in self.state.reconcile(actor="serve"):
            log.warning("after a crash: %s", line)
        current = self.state.current_round(self.plan.sha256)
        if current is not None:
            self.state.audit("serve", "resume", f"round {current.round}", attempt=current.attempt)
            log.info("resuming round %d (attempt %d)", current.round, current.attempt)

    def start(self, listen: str | None = None, *, metrics_port: int | None = None,
              metrics_host: str = "127.0.0.1") -> int:
        """Serve on `listen` (default: the address in DIR/server) and run the round loop; returns the port. With
        `metrics_port` (0: any free one, see `metrics_server.port`), Prometheus `/metrics` on `metrics_host`."""
        if metrics_port is not None:
            self.metrics_server = MetricsServer(self.render_metrics, metrics_port, metrics_host)
        keep_freed_buffers()  # every round frees and allocates model-sized buffers again
        server_dir = self.layout.server
        credentials = server_credentials((server_dir / "ca.pem").read_bytes(), (server_dir / "server.pem").read_bytes(),
                                         (server_dir / "server.key").read_bytes())
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS), options=MESSAGE_OPTIONS)
        add_coordinator_servicer(self._server, self, self.check, self.traffic.add)
        port = self._server.add_secure_port(listen or self.layout.address, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {listen or self.layout.address}")
        self._server.start()
        self._loop = threading.Thread(target=self._run, name="rounds", daemon=True)
        self._loop.start()
        self._report_due.set()  # a restarted serve reports the rounds closed before
        self._reporter = threading.Thread(target=self._report_rounds, name="reports", daemon=True)
        self._reporter.start()
        log.info("coordinator listening on port %d", port)
        if self.metrics_server is not None:
            self.metrics_server.start()
            log.info("Prometheus metrics on http://%s:%d/metrics", self.metrics_server.host, self.metrics_server.port)
        return port

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._work_changed()
        self._report_due.set()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._server is not None:
            self._server.stop(grace=1).wait()
        for thread in (self._loop, self._reporter):
            if thread is not None:
                thread.join()
        self.state.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a failed step (export, disk) is retried at the next tick, never the end of serve
                log.exception("round step failed; retrying")
                self._stop.wait(5.0)
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def _report_rounds(self) -> None:
        """Rewrite the plan's report whenever one is due (monitoring.write_round_report), until stopped: the CSV at
        once; the plot too once the plan's last round has closed or PLOT_INTERVAL_S has passed since the last
        drawing, else as soon as it has."""
        plotted_at, plot_pending = -math.inf, False
        while True:
            wait_s = max(0.0, plotted_at + PLOT_INTERVAL_S - time.monotonic()) if plot_pending else None
            self._report_due.wait(wait_s)
            if self._stop.is_set():
                return
            self._report_due.clear()
            now = time.monotonic()
            plot = now - plotted_at >= PLOT_INTERVAL_S or self._rounds_finished()
            try:
                written = write_round_report(self.state.status(), self.plan.sha256, self.rounds_dir, plot=plot)
            except Exception:  # a report that cannot be written (disk, plotting) never stops the rounds
                log.exception("writing the round report failed")
                written = None  # tried again at the next close or score, not in a loop
            if written is not None and written[1] is not None:
                plotted_at = now
            plot_pending = written is not None and not plot

    def _rounds_finished(self) -> bool:
        last = self.state.last_round(self.plan.sha256)
        return last is not None and last.round >= self.plan.rounds and last.state is RoundState.CLOSED

    def render_metrics(self) -> str:
        """The `/metrics` body, from the state database as it is now."""
        now = time.time()
        return render_metrics(self.state.status(), self.plan.sha256, self.plan.rounds, self.traffic,
                              alive_after=now - self.heartbeat_timeout_s, now=now)

    def step(self, now: float | None = None) -> None:
        """Advance the rounds once: open the next round, close or retry the open one."""
        now = time.time() if now is None else now
        current = self.state.current_round(self.plan.sha256)
        if current is None:
            last = self.state.last_round(self.plan.sha256)
            number = 1 if last is None else last.round + 1
            if number <= self.plan.rounds:
                self._open(number, now)
            return
        answered = self.state.answered(current.id)
        accepted = len(self.state.accepted_updates(current.id))
        gone = {name for name in current.invited if self.state.site(name).state is not SiteState.ACTIVE}
        if set(current.invited) <= answered | gone and accepted >= self.plan.quorum:
            self._close(current)
        elif now >= current.deadline:
            if accepted >= self.plan.quorum:
                self._close(current)
            else:
                self._retry(current, accepted, now)

    def _chosen(self, number: int) -> set[str]:
        """The trainers the strategy lets train round `number`: every one, but under a sequential rule the one whose
        turn it is."""
        return set(self.strategy.participants(number, self.plan.rounds,
                                           self.state.enrolled_sites(SiteRole.TRAINER.value)))

    def _invitable(self, number: int, now: float) -> list[str]:
        """The trainers round `number` invites: the chosen ones that are active (seen within the heartbeat
        timeout)."""
        chosen = self._chosen(number)
        active = self.state.active_sites(SiteRole.TRAINER.value, seen_after=now - self.heartbeat_timeout_s)
        return [name for name in active if name in chosen]

    def _open(self, number: int, now: float) -> None:
        self.state.unpause()
        invited = self._invitable(number, now)
        if len(invited) < self.plan.quorum:
            return  # wait for enough sites: a round that cannot reach its quorum is not opened
        base_path = self.rounds_dir / str(number - 1) / "aggregate.weights"
        if number == 1:
            base_path = self.rounds_dir / "initial.weights"
            if not base_path.is_file():
                self.rounds_dir.mkdir(parents=True, exist_ok=True)
                data = encode_weights(initial_weights(self.plan))
                write_atomic(base_path, lambda temp: temp.write_bytes(data))
        base, _ = self._weights(base_path)
        opened = self.state.open_round(self.plan.sha256, number, self.plan.task, invited, weights_sha256(base),
                                       base_path, now + self.plan.deadline_s)
        self._work_changed()
        log.info("round %d opened: invited %s", opened.round, ", ".join(invited))

    def _retry(self, current: Round, accepted: int, now: float) -> None:
        self.state.unpause()
        invited = sorted(set(self._invitable(current.round, now))
                         | set(u.site for u in self.state.accepted_updates(current.id)))
        note = f"attempt {current.attempt}: {accepted} of quorum {self.plan.quorum} accepted by the deadline"
        self.state.retry_round(current.id, invited, now + self.plan.deadline_s, note)
        self._work_changed()
        log.warning("round %d retried (%s); invited %s", current.round, note, ", ".join(invited) or "nobody yet")

    def _close(self, current: Round) -> None:
        """Aggregate, export, sign, write the package whole, then record the version and close the round."""
        for line in self.state.reconcile(actor="serve"):  # a package an earlier failed close left unrecorded
            log.warning("before closing round %d: %s", current.round, line)
        if self.state.current_round(self.plan.sha256) is None:
            return
        started = time.perf_counter()
        with self._closing_lock:
            self._closing = current.id
            updates = self.state.accepted_updates(current.id)
            decoded, self._decoded_updates = self._decoded_updates, {}
        try:
            updates, site_updates = self._screened(current, updates, decoded)
            if len(updates) < self.plan.quorum:
                log.warning("round %d: %d update(s) passed screening, below the quorum of %d; the round waits",
                            current.round, len(updates), self.plan.quorum)
                return
            self._aggregate_and_export(current, updates, site_updates, started)
        finally:
            with self._closing_lock:
                self._closing = None

    def _screened(self, current: Round, updates: list[AcceptedUpdate], decoded: dict[Path, dict[str, np.ndarray]]
                  ) -> tuple[list[AcceptedUpdate], list[SiteUpdate]]:
        """The round's accepted updates that pass screening (screening.py), as recorded and with their arrays; the
        refused ones become refusals with their reason, and a site refused twice in a row is suspended."""
        _, base = self._base(current)
        spec = weights_spec(base)

        def arrays(update: AcceptedUpdate) -> dict[str, np.ndarray]:  # decoded on arrival, or read after a restart
            if update.path in decoded:
                return decoded[update.path]
            return decode_weights(update.path.read_bytes(), spec, copy=False)

        site_updates = [SiteUpdate(u.site, arrays(u), u.num_cases, u.metrics) for u in updates]
        refused = screen(base, site_updates, self.plan.screening, self.state.declared_cases(), self.strategy)
        for site, reason in refused.items():
            log.warning("refused update from %s for round %d at screening: %s", site, current.round, reason)
        passed = [u.site for u in updates if u.site not in refused]
        for site in self.state.record_screening(current.id, refused, passed, actor="serve"):
            log.warning("site %s suspended: %s", site, self.state.site(site).reason)
        return ([u for u in updates if u.site not in refused],
                [u for u in site_updates if u.site not in refused])

    def _aggregate_and_export(self, current: Round, updates: list[AcceptedUpdate], site_updates: list[SiteUpdate],
                              started: float) -> None:
        """The version is built from exactly `updates`, the ones the round's record lists as contributors."""
        _, base = self._base(current)
        weights = self.strategy.aggregate(base, site_updates)
        round_dir = self.rounds_dir / str(current.round)
        round_dir.mkdir(parents=True, exist_ok=True)
        aggregate = encode_weights(weights)
        aggregate_path = round_dir / "aggregate.weights"
        write_atomic(aggregate_path, lambda temp: temp.write_bytes(aggregate), keep_cached=False)
        self._remember_weights(aggregate_path, (aggregate, weights))  # the next round's base
        aggregated = time.perf_counter()
        version = self.state.next_version(current.task)
        target = self._export(current, weights, updates, version, round_dir)
        self.state.commit_candidate(current.task, version, target, round_id=current.id, actor="serve")
        self._wake.set()  # open the next round at once
        self._work_changed()  # an evaluator has a new aggregate to score
        self._report_due.set()
        log.info("round %d closed: %d of %d sites, %s version %d is a candidate (aggregate %.2f s, export %.1f s)",
                 current.round, len(updates), len(current.invited), current.task.value, version,
                 aggregated - started, time.perf_counter() - aggregated)

    def _export(self, current: Round, weights: dict[str, np.ndarray], updates: list[AcceptedUpdate], version: int,
                round_dir: Path) -> Path:
        target = self.state.versions_dir(current.task) / str(version)
        incoming = target.with_name(f"{INCOMING_PREFIX}{version}")
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.parent.mkdir(parents=True, exist_ok=True)
        site_metrics = {u.site: {**u.metrics, "cases": float(u.num_cases)} for u in updates}
        threshold, calibration = self._threshold(updates)
        network = build_network(self.plan.training.in_channels, 1, self.plan.training.network)
        load_network_weights(network, weights)  # the checkpoint holds the whole state dict, shared tensors included
        normalization = (" (each site trains with its own normalization layers; this model's are their FedAvg "
                         "average)") if self.strategy.local_normalization else ""
        with tempfile.TemporaryDirectory(dir=round_dir) as tmp:
            checkpoint = save_checkpoint(
                Path(tmp) / "aggregate.pt", plan=self.plan.training, epoch=current.round * self.plan.local_epochs,
                model=network.state_dict(),
                history=[{"site_metrics": site_metrics}], federated_round=current.round, strategy=self.plan.strategy,
                threshold=threshold,
            )
            export_package(
                checkpoint, incoming, private_key=self._round_key, version=version,
                description=(f"federated round {current.round} of plan {self.plan.sha256[:12]}: {len(updates)} of "
                             f"{len(current.invited)} sites, {self.plan.strategy}{normalization}{calibration}, "
                             f"fedlesion {distribution_version()}"),
                sites_contributed=len(updates), sites_invited=len(current.invited),
            )
        os.rename(incoming, target)
        fsync_dir(target.parent)
        return target

    def _threshold(self, updates: list[AcceptedUpdate]) -> tuple[float | None, str]:
        """The threshold with the best validation Dice pooled over the contributors' reports, weighted by their
        validation cases, and what the manifest's description says of it; (None, "") without reports: the plan's."""
        reports = [u.threshold_dice for u in updates if u.threshold_dice is not None]
        pooled = pooled_dice(reports) if reports else {}
        if not pooled:
            return None, ""
        threshold = best_threshold(pooled, self.plan.training.threshold)
        cases = sum(report.num_cases for report in reports)
        return threshold, (f", threshold {threshold:g} (validation Dice {pooled[threshold]:.3f} over {cases} cases "
                           f"at {len(reports)} sites)")

    def _base(self, current: Round) -> tuple[bytes, dict[str, np.ndarray]]:
        return self._weights(current.base_path)

    def _weights(self, path: Path) -> tuple[bytes, dict[str, np.ndarray]]:
        """A weights file (canonical encoding) and its arrays, read once; the last two files read are kept."""
        cached = self._weights_cache.get(path)
        if cached is None:
            data = path.read_bytes()
            cached = (data, decode_weights(data, copy=False))
            self._remember_weights(path, cached)
        return cached

    def _remember_weights(self, path: Path, weights: tuple[bytes, dict[str, np.ndarray]]) -> None:
        self._weights_cache = {**dict(list(self._weights_cache.items())[-1:]), path: weights}

    # -- the per-call check -----------------------------------------------------------------------------------
    def check(self, fingerprint: str, name: str, method: str) -> str | None:
        """None to let the call through, else why not (transport logs it and answers PERMISSION_DENIED)."""
        site, reason = self.state.certificate_site(fingerprint)
        if reason is not None:
            return reason
        if site.name != name:
            return f"the certificate names {name!r}, enrolled as {site.name!r}"
        needed = CALL_ROLES.get(method)
        if needed is None or not SiteRole(site.role).permits(needed):
            return f"role {site.role} may not call {method}"
        return None

    # -- the protocol -----------------------------------------------------------------------------------------
    def Hello(self, request: pb2.HelloRequest, context: grpc.ServicerContext) -> pb2.HelloReply:  # noqa: N802
        name = peer_name(context)
        if request.protocol_version != PROTOCOL_VERSION:
            reason = f"protocol version {request.protocol_version}; this coordinator speaks {PROTOCOL_VERSION}"
            log.warning("refused hello from %s (fedlesion %s): %s", name, request.fedlesion_version, reason)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        site = self.state.site(name)
        role = SiteRole(site.role)
        if request.role:
            if not role.permits(request.role):
                reason = f"role {request.role!r} is wider than the certificate's {role.value}"
                log.warning("refused hello from %s: %s", name, reason)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            role = SiteRole(request.role)
        self._hello_roles[name] = role
        self.state.unpause(name)
        self.state.seen(name, "hello")
        log.info("hello from %s (fedlesion %s, role %s)", name, request.fedlesion_version, role.value)
        return pb2.HelloReply(protocol_version=PROTOCOL_VERSION, site=name, role=role.value,
                              heartbeat_interval_s=int(self.heartbeat_interval_s))

    def Heartbeat(self, request: pb2.HeartbeatRequest, context: grpc.ServicerContext) -> pb2.HeartbeatReply:  # noqa: N802
        name = peer_name(context)
        self.state.seen(name, request.state[:200])
        current = self.state.current_round(self.plan.sha256) or self.state.last_round(self.plan.sha256)
        return pb2.HeartbeatReply(current_round=0 if current is None else current.round)

    def _work_changed(self) -> None:
        with self._work:
            self._work_generation += 1
            self._work.notify_all()

    def _wait_for_work(self, generation: int, timeout_s: float) -> bool:
        """Wait until the rounds change after `generation` (True) or `timeout_s` passes (False); False at once when
        TASK_WAITERS calls wait already or the coordinator stops."""
        with self._work:
            if timeout_s <= 0 or self._task_waiters >= TASK_WAITERS:
                return False
            self._task_waiters += 1
            try:
                changed = self._work.wait_for(lambda: self._work_generation != generation or self._stop.is_set(),
                                              timeout_s)
            finally:
                self._task_waiters -= 1
        return changed and not self._stop.is_set()

    def GetTask(self, request: pb2.TaskRequest, context: grpc.ServicerContext) -> pb2.TaskReply:  # noqa: N802
        """The site's task; an idle answer is held for up to its retry_after_s while nothing changes (a long poll),
        so a site hears of a new round when it opens rather than at its next poll (that wait was most of a round's
        overhead: benchmarks/fl_round.py)."""
        name = peer_name(context)
        self.state.seen(name, "asking")
        give_up = time.monotonic() + self.idle_retry_s
        while True:
            generation = self._work_generation
            task = self._task(name)
            if task.kind != pb2.TaskReply.IDLE or not self._wait_for_work(generation, give_up - time.monotonic()):
                return task

    def _task(self, name: str) -> pb2.TaskReply:
        idle = pb2.TaskReply(kind=pb2.TaskReply.IDLE, retry_after_s=self.idle_retry_s,
                             plan_sha256=self.plan.sha256, task=self.plan.task.value)
        site = self.state.site(name)
        role = self._hello_roles.get(name, SiteRole(site.role))
        if role is SiteRole.EVALUATOR:
            return self._evaluate_task(name) or idle
        current = self.state.current_round(self.plan.sha256)
        # A closing round hands out no more work: whatever the site sent back would come too late for it.
        if current is None or current.id == self._closing or role is not SiteRole.TRAINER \
                or site.state is not SiteState.ACTIVE:
            return idle
        if name in self.state.answered(current.id):
            return idle
        if name not in current.invited:
            if name not in self._chosen(current.round):
                return idle
            self.state.invite(current.id, name)
            log.info("site %s joins round %d", name, current.round)
        data, _ = self._base(current)
        return pb2.TaskReply(kind=pb2.TaskReply.TRAIN, plan_toml=self.plan_toml, plan_sha256=self.plan.sha256,
                             round=current.round, base_sha256=current.base_sha256, task=current.task.value,
                             max_update_bytes=len(data), deadline_unix=current.deadline)

    def _evaluate_task(self, name: str) -> pb2.TaskReply | None:
        """An evaluator's task: the newest round's candidate it has not scored yet, named by its ONNX sha256."""
        closed = self.state.round_to_evaluate(self.plan.sha256, name)
        if closed is None:
            return None
        manifest, _, onnx_path = self._candidate_files(closed)
        return pb2.TaskReply(kind=pb2.TaskReply.EVALUATE, plan_toml=self.plan_toml, plan_sha256=self.plan.sha256,
                             round=closed.round, base_sha256=manifest.files[manifest.onnx.file],
                             task=closed.task.value, max_update_bytes=onnx_path.stat().st_size)

    def _candidate_files(self, closed: Round) -> tuple[Manifest, bytes, Path]:
        """A closed round's candidate: its manifest (parsed, and its bytes) and where its ONNX lies."""
        version = self.state.version(closed.task, closed.version)
        if version is None:
            raise ValueError(f"round {closed.round}'s {closed.task.value} version {closed.version} is not recorded")
        data = (version.path / MANIFEST_FILE).read_bytes()
        manifest = parse_manifest(data)
        return manifest, data, version.path / manifest.onnx.file

    def _open_round_for(self, name: str, plan_sha256: str, number: int, context: grpc.ServicerContext) -> Round:
        current = self.state.current_round(self.plan.sha256)
        if current is None or plan_sha256 != current.plan_sha256 or number != current.round:
            reason = f"plan {plan_sha256[:12]} round {number} is not open"
            log.warning("refused a call from %s: %s", name, reason)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        if name not in current.invited:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"site {name} is not invited to round {number}")
        return current

    def GetWeights(self, request: pb2.WeightsRequest, context: grpc.ServicerContext) -> Iterator[pb2.StreamPart]:  # noqa: N802
        name = peer_name(context)
        self.state.seen(name, "downloading")
        current = self._open_round_for(name, request.plan_sha256, request.round, context)
        data, _ = self._base(current)
        binding = StreamBinding(current.plan_sha256, current.round, current.base_sha256, name)
        yield from self._counted(current.id, name, chunk_stream(data, key=self.state.site(name).payload_key,
                                                                aad_fields=binding,
                                                                plaintext_sha256=binding.base_sha256))

    def GetCandidate(self, request: pb2.CandidateRequest, context: grpc.ServicerContext) -> Iterator[pb2.StreamPart]:  # noqa: N802
        """A closed round's candidate for an evaluator: manifest and signature in the header, the ONNX encrypted in
        chunks bound to (plan, round, ONNX sha256, site)."""
        name = peer_name(context)
        self.state.seen(name, "downloading")
        closed = self.state.round(request.plan_sha256, request.round)
        if closed is None or closed.version is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"plan {request.plan_sha256[:12]} round {request.round} has no candidate")
        manifest, data, onnx_path = self._candidate_files(closed)
        onnx = onnx_path.read_bytes()
        header = pb2.ModelHeader(version=manifest.version, task=manifest.task.value, manifest_json=data,
                                 manifest_sig=(onnx_path.parent / SIGNATURE_FILE).read_bytes(),
                                 onnx_bytes=len(onnx), onnx_sha256=manifest.files[manifest.onnx.file])
        binding = StreamBinding(closed.plan_sha256, closed.round, header.onnx_sha256, name)
        yield from self._counted(closed.id, name, chunk_stream(onnx, key=self.state.site(name).payload_key,
                                                               aad_fields=binding, header_fields={"candidate": header}))

    def _counted(self, round_id: int, name: str, parts: Iterable[pb2.StreamPart]) -> Iterator[pb2.StreamPart]:
        """`parts` on their way to site `name`, their bytes recorded with the round (a stream the site broke off
        counts what went out)."""
        tally = _Tally()
        try:
            yield from tally.count(parts)
        finally:
            self.state.record_traffic(round_id, name, DOWN, tally.bytes)

    def PutUpdate(self, request_iterator: Iterator[pb2.StreamPart], context: grpc.ServicerContext) -> pb2.UpdateReply:  # noqa: N802
        name = peer_name(context)
        self.state.seen(name, "uploading")
        current = self.state.current_round(self.plan.sha256)
        tally = _Tally()
        try:
            return self._put_update(name, current, tally.count(request_iterator))
        finally:
            if current is not None and tally.bytes:
                self.state.record_traffic(current.id, name, UP, tally.bytes)

    def _put_update(self, name: str, current: Round | None, parts: Iterator[pb2.StreamPart]) -> pb2.UpdateReply:
        """An update for the open round `current`, checked, stored and recorded; or refused with why."""

        if current is None:
            return self._refuse(name, None, "no round is open")
        if name not in current.invited:
            return self._refuse(name, current, f"not invited to round {current.round}")
        first = next(parts, None)
        if first is not None and first.HasField("header") and first.header.round != current.round:
            # Trained for a round that closed meanwhile: refused, but it does not answer the open round, whose
            # task the site has yet to run.
            reason = f"the update is for round {first.header.round}, round {current.round} is open"
            log.warning("refused update from %s: %s", name, reason)
            return pb2.UpdateReply(accepted=False, reason=reason)
        data, base = self._base(current)
        receiver = StreamReceiver(self.state.site(name).payload_key, name, len(data), plan_sha256=current.plan_sha256,
                                  round=current.round, base_sha256=current.base_sha256)
        try:
            header, plaintext = receiver.receive(itertools.chain([] if first is None else [first], parts))
            weights = decode_weights(plaintext, weights_spec(base), copy=False)
        except WireError as error:
            if error.resend:
                log.warning("update from %s for round %d broken in transit, asked to resend: %s", name,
                            current.round, error)
                return pb2.UpdateReply(accepted=False, reason=str(error), resend=True)
            return self._refuse(name, current, str(error))
        if header.num_cases < 1:
            return self._refuse(name, current, "the update reports no training cases")
        threshold_dice = None
        if header.HasField("threshold_dice"):
            try:
                threshold_dice = DiceByThreshold.from_message(header.threshold_dice)
            except ValueError as error:
                return self._refuse(name, current, f"the update's Dice per threshold: {error}")
            if threshold_dice.num_cases < MIN_CASES_PER_BIN:
                return self._refuse(name, current, f"the update's Dice per threshold is a mean over "
                                    f"{threshold_dice.num_cases} case(s), fewer than {MIN_CASES_PER_BIN}")
        updates_dir = self.rounds_dir / str(current.round) / "updates"
        updates_dir.mkdir(parents=True, exist_ok=True)
        path = updates_dir / f"{sha256_hex(name.encode())[:16]}-{current.attempt}.weights"
        write_atomic(path, lambda temp: temp.write_bytes(plaintext), keep_cached=False)  # read after a restart
        metrics = {key: float(value) for key, value in header.metrics.items() if np.isfinite(value)}
        with self._closing_lock:
            if self._closing == current.id:  # the version being built cannot include it: never report it as used
                return self._refuse(name, current, f"round {current.round} is closing; the update came too late")
            refused = self.state.record_update(current.id, name, accepted=True, num_cases=int(header.num_cases),
                                               metrics=metrics, path=path, threshold_dice=threshold_dice)
            if refused is None:
                self._decoded_updates[path] = weights
        if refused is not None:
            log.warning("refused update from %s for round %d: %s", name, current.round, refused)
            return pb2.UpdateReply(accepted=False, reason=refused)
        log.info("update from %s for round %d accepted (%d cases)", name, current.round, header.num_cases)
        self._wake.set()
        return pb2.UpdateReply(accepted=True)

    def _refuse(self, name: str, current: Round | None, reason: str) -> pb2.UpdateReply:
        log.warning("refused update from %s%s: %s", name, "" if current is None else f" for round {current.round}",
                    reason)
        if current is not None:
            self.state.record_update(current.id, name, accepted=False, reason=reason)
            self._wake.set()
        return pb2.UpdateReply(accepted=False, reason=reason)

    def ReportMetrics(self, request: pb2.MetricsReport, context: grpc.ServicerContext) -> pb2.MetricsReply:  # noqa: N802
        name = peer_name(context)
        self.state.seen(name, "reporting")
        if request.kind == REFUSED:
            reason = f"the site's policy refused the task: {request.reason[:500] or 'no reason given'}"
            log.warning("site %s: %s", name, reason)
            current = self.state.current_round(self.plan.sha256)
            if current is not None and name in current.invited:
                self.state.record_update(current.id, name, accepted=False, reason=reason)
            self.state.pause(name, reason)
            self._wake.set()
            return pb2.MetricsReply(accepted=True)
        if request.kind == "evaluate":
            closed = self.state.round(request.plan_sha256, request.round)
            if closed is None or closed.version is None:
                return pb2.MetricsReply(accepted=False, reason=f"round {request.round} has no candidate to evaluate")
            try:
                histograms = histograms_from_messages(request.histograms, int(request.num_cases))
            except ValueError as error:
                log.warning("refused the evaluation of round %d from %s: %s", request.round, name, error)
                return pb2.MetricsReply(accepted=False, reason=str(error))
            values = {key: float(value) for key, value in request.values.items() if np.isfinite(value)}
            self.state.record_evaluation(closed.id, name, int(request.num_cases), values, histograms)
            self._report_due.set()
        log.info("metrics from %s, round %d (%s, %d cases): %s", name, request.round, request.kind,
                 request.num_cases, dict(request.values))
        return pb2.MetricsReply(accepted=True)

    def GetLatestModel(self, request: pb2.ModelRequest, context: grpc.ServicerContext) -> Iterator[pb2.ModelPart]:  # noqa: N802
        """The newest *released* version of the task when it is newer than the node's; candidates never leave."""
        name = peer_name(context)
        self.state.seen(name, "pulling")
        try:
            task = Task(request.task)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown task {request.task!r}")
        released = self.state.latest_released(task)
        if released is None or released.version <= request.newer_than:
            return
        manifest, signature = (released.path / MANIFEST_FILE).read_bytes(), (released.path / SIGNATURE_FILE).read_bytes()
        onnx = (released.path / "model.onnx").read_bytes()
        log.info("site %s pulls %s version %d", name, task.value, released.version)
        yield pb2.ModelPart(header=pb2.ModelHeader(
            version=released.version, task=task.value, manifest_json=manifest, manifest_sig=signature,
            onnx_bytes=len(onnx), onnx_sha256=sha256_hex(onnx),
        ))
        for start in range(0, len(onnx), MODEL_CHUNK_BYTES):
            yield pb2.ModelPart(onnx_chunk=onnx[start:start + MODEL_CHUNK_BYTES])


class _Tally:
    """The bytes of the stream messages (weights, updates, candidates) that pass through `count`, as serialized
    (what gRPC carries, less its own framing and TLS's): a round's traffic, per site and direction (`coordinator
    status`)."""

    def __init__(self) -> None:
        self.bytes = 0

    def count(self, parts: Iterable[pb2.StreamPart]) -> Iterator[pb2.StreamPart]:
        for part in parts:
            self.bytes += part.ByteSize()
            yield part


def serve(directory: Path, plan: FederatedPlan, *, listen: str | None = None, metrics_port: int | None = None,
          metrics_host: str = "127.0.0.1") -> None:
    """Run the coordinator until SIGTERM or Ctrl-C; after the last round it keeps serving."""
    coordinator = Coordinator(directory, plan)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    coordinator.start(listen, metrics_port=metrics_port, metrics_host=metrics_host)
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        coordinator.stop()


__all__ = ["CALL_ROLES", "Coordinator", "REFUSED", "initial_weights", "serve"]
