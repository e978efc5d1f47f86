"""The site loop (`fedlesion site`): ask the coordinator for work, check it against the custodian's policy, train
with `LocalTrainer` or score a round's candidate with the node's engine (evaluation.py, torch-free: a limited center's
evaluator site runs without torch), send back the weights and aggregate metrics; never give up on the coordinator.

Every call goes over mTLS with the site's enrollment bundle; weights and candidates travel as encrypted chunk streams
(`models.federation.wire`) bound to (plan, round, base weights or candidate, site). What leaves a trainer: the trained
weights, the number of training (and validation) cases, the loss, the mean validation metrics over at least the
policy's `min_cases_per_mean` validation cases (default MIN_CASES_PER_BIN) and, over at least MIN_CASES_PER_BIN, the
mean validation Dice at each candidate threshold (`training.calibration`); what leaves an evaluator: its case count,
its means over as many cases as the policy asks, and histograms with at least MIN_CASES_PER_BIN cases per bin. Never
a case id, a file name, an image or a per-case value. A coordinator that is down or restarting costs the site a retry
with exponential backoff, forever; a site killed mid-round is a new site process that says hello and takes the next
task it is given. Under FedBN a site trains from the global weights with its own normalization layers, kept in its
state folder.
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from models.durable import create_file, write_atomic
from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc
from models.federation.enrollment import SITE_KEY_FILE, EnrollmentBundle
from models.federation.pki import generate_key, make_csr, private_key_pem
from models.federation.transport import PROTOCOL_VERSION, channel
from models.federation.wire import (
    StreamBinding,
    StreamReceiver,
    WireError,
    chunk_stream,
    decode_weights,
    encode_weights,
    keep_freed_buffers,
    weights_spec,
)
from models.package import LoadedPackage
from models.version import distribution_version
from training.calibration import THRESHOLD_CANDIDATES, DiceByThreshold
from training.datasets import TrainingCase, load_training_cases, split_cases
from training.federation.evaluation import receive_candidate, score_cases, summarize_scores
from training.federation.plan import FederatedPlan
from training.federation.policy import DatasetUse, PlanApproval, PolicyRole, SitePolicy
from training.fingerprint import MIN_CASES_PER_BIN

__all__ = ["Backoff", "LocalNormalization", "Site", "write_site_key"]

log = logging.getLogger(__name__)

SITE_CSR_FILE = "site.csr"
# The aggregate metrics an update or a report may carry; anything else a trainer returns stays at the site.
SHARED_METRICS = ("train_loss", "val_dice", "val_avd_ml", "val_lf1", "n_val_cases", "n_skipped_cases", "local_epochs")
# Of those, the means over validation cases: they leave only over the policy's `min_cases_per_mean` cases or more.
VALIDATION_MEANS = ("val_dice", "val_avd_ml", "val_lf1")
TRANSFER_ATTEMPTS = 3  # a weights stream broken in transit (a bad chunk, a resend reply) is tried this many times
IDLE_RETRY_S = 5.0  # an IDLE reply without retry_after_s
LOCAL_NORMALIZATION_DIR = "local-normalization"  # FedBN: each plan's own normalization layers, under STATE_DIR
REFUSED_RETRY_S = 30.0  # how soon a site that refused a task asks again (the plan or round may have changed)
RPC_TIMEOUT_S = 30.0  # unary calls; streams are bounded by the round's deadline instead


def write_site_key(out: Path, name: str) -> tuple[Path, Path]:
    """`site keygen`: the site's own TLS key (0600, never leaves the site) and a certificate request for it."""
    out.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    key_path = create_file(out / SITE_KEY_FILE, private_key_pem(key), mode=0o600)  # refuses to overwrite a key
    csr_path = out / SITE_CSR_FILE
    csr_path.write_bytes(make_csr(name, key))
    return key_path, csr_path


@dataclass
class Backoff:
    """Exponential backoff with jitter between `initial_s` and `maximum_s`; `reset` after a call that worked."""

    initial_s: float = 1.0
    maximum_s: float = 60.0
    factor: float = 2.0
    _next_s: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._next_s = 0.0

    def next_delay(self) -> float:
        self._next_s = min(self.maximum_s, self._next_s * self.factor if self._next_s else self.initial_s)
        return self._next_s * random.uniform(0.8, 1.0)


@dataclass(frozen=True)
class _Update:
    """A trained update kept until the coordinator has it: after a lost connection the same round gets it again
    without training twice."""

    key: tuple[str, int, str]  # (plan, round, base weights)
    plaintext: bytes
    n_cases: int
    metrics: dict[str, float]
    threshold_dice: DiceByThreshold | None


@dataclass(frozen=True)
class _Prepared:
    """A plan's LocalTrainer on the policy's cases (preprocessed once; each round starts it afresh at its place on
    the learning-rate schedule) and how many cases were skipped (a count that may leave the site)."""

    plan_sha256: str
    trainer: Any  # training.trainer.LocalTrainer: imported when the first task arrives (torch is slow to load)
    n_skipped: int


@dataclass(frozen=True)
class LocalNormalization:
    """FedBN at a site: its own normalization layers (`names`), kept in a file of its state folder per plan, so that
    they last across rounds and restarts; the global weights never overwrite them."""

    path: Path
    names: frozenset[str]

    def starting_weights(self, global_weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global weights with the site's own normalization layers in place (the global ones before its first
        round)."""
        if not self.path.is_file():
            return dict(global_weights)
        spec = weights_spec({name: global_weights[name] for name in self.names})
        return {**global_weights, **decode_weights(self.path.read_bytes(), spec)}

    def keep(self, weights: Mapping[str, np.ndarray]) -> None:
        data = encode_weights({name: weights[name] for name in self.names})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda temp: temp.write_bytes(data))


class TaskRefused(Exception):
    """This site will not run the task; the reason goes to the coordinator."""


class Site:
    """One site process: `run()` loops until `stop` is set (the CLI never sets it)."""

    def __init__(
        self,
        bundle: EnrollmentBundle,
        policy: SitePolicy,
        state_dir: str | Path,
        *,
        device: str = "cpu",
        backoff: Backoff | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if policy.role is PolicyRole.PULL:
            raise ValueError("the policy's role is pull: a pull-only site runs no training; name the bundle in the "
                             "node's [models] enrollment_bundle instead")
        self.bundle = bundle
        self.policy = policy
        self.role = policy.hello_role(bundle.role)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.approval = PlanApproval(policy, self.state_dir)
        self.device = device
        self.backoff = backoff or Backoff()
        self.stop = stop or threading.Event()
        self.state = "idle"
        self.round = 0
        self.heartbeat_interval_s = 10.0
        self._prepared: _Prepared | None = None
        self._evaluation_cases: tuple[str, list[TrainingCase], int] | None = None  # (plan, cases, skipped)
        self._done: tuple[str, int, str] | None = None  # (plan, round, base) of the last task finished
        self._pending: _Update | None = None
        self._refused: tuple[str, int] | None = None
        self._channel: grpc.Channel | None = None
        self._stub: federation_pb2_grpc.CoordinatorStub | None = None
        self._heartbeat: threading.Thread | None = None

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Hello, then tasks, until `stop`; any failure to reach the coordinator is retried with backoff."""
        keep_freed_buffers()  # every round frees and allocates model-sized buffers again
        try:
            while not self.stop.is_set():
                try:
                    self._hello()
                    while not self.stop.is_set():
                        self.stop.wait(self._next_task())
                except grpc.RpcError as error:
                    self._reconnect_after(error)
        finally:
            self.stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join(timeout=5)
            if self._channel is not None:
                self._channel.close()

    def _reconnect_after(self, error: grpc.RpcError) -> None:
        delay = self.backoff.next_delay()
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            log.warning("coordinator %s unreachable (%s); retrying in %.1f s", self.bundle.coordinator_address,
                        code.name if code else "error", delay)
        else:
            log.error("coordinator refused the site: %s %s; retrying in %.1f s", code.name if code else "",
                      details, delay)
        self._set_state("idle")
        self.stop.wait(delay)

    def _hello(self) -> None:
        if self._channel is None:
            self._channel = channel(self.bundle)
            self._stub = federation_pb2_grpc.CoordinatorStub(self._channel)
        reply = self._rpc.Hello(
            pb2.HelloRequest(protocol_version=PROTOCOL_VERSION, fedlesion_version=distribution_version(),
                             role=str(self.role)),
            timeout=RPC_TIMEOUT_S,
        )
        self.backoff.reset()
        self.heartbeat_interval_s = float(reply.heartbeat_interval_s or self.heartbeat_interval_s)
        log.info("hello: coordinator knows this site as %s (%s), protocol %d", reply.site, reply.role,
                 reply.protocol_version)
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeats, name="site-heartbeat", daemon=True)
            self._heartbeat.start()

    @property
    def _rpc(self) -> federation_pb2_grpc.CoordinatorStub:
        assert self._stub is not None, "hello first"
        return self._stub

    def _heartbeats(self) -> None:
        """Tell the coordinator the site is alive (and what it is doing) until stopped; failures only wait."""
        while not self.stop.wait(self.heartbeat_interval_s):
            try:
                self._rpc.Heartbeat(pb2.HeartbeatRequest(state=self.state, round=self.round), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as error:
                log.debug("heartbeat failed: %s", error)

    def _set_state(self, state: str, round_: int | None = None) -> None:
        self.state = state
        if round_ is not None:
            self.round = round_

    def _next_task(self) -> float:
        """Ask for a task and run it; returns how long to wait before asking again."""
        task = self._rpc.GetTask(
            pb2.TaskRequest(protocol_version=PROTOCOL_VERSION,
                            approved_plan_sha256=self.approval.approved_sha256() or ""),
            timeout=RPC_TIMEOUT_S,
        )
        self.backoff.reset()
        if task.kind == pb2.TaskReply.IDLE:
            self._set_state("idle")
            return float(task.retry_after_s or IDLE_RETRY_S)
        key = (task.plan_sha256, task.round, task.base_sha256)
        if self._done == key or self._refused == key[:2]:
            return float(task.retry_after_s or IDLE_RETRY_S)  # done (or refused) already: wait for the next round
        if self._pending is not None and self._pending.key == key:
            self._upload(task, self._pending)
            return 0.0
        training = task.kind == pb2.TaskReply.TRAIN
        try:
            plan = self._approved_plan(task, training=training)
            self._set_state("training" if training else "evaluating", task.round)
            if training:
                self._train(task, plan, self._prepare(plan))
            else:
                self._evaluate(task, plan)
            return 0.0
        except TaskRefused as refusal:
            reason = str(refusal)
        except (ValueError, OSError, RuntimeError) as error:  # e.g. training diverged, a case the network refuses
            log.exception("round %d failed at this site", task.round)
            reason = f"the site failed the task ({type(error).__name__}; its log says more)"  # no paths leave
        finally:
            self._set_state("idle")
        log.error("refused round %d of plan %s: %s", task.round, task.plan_sha256[:12], reason)
        self._rpc.ReportMetrics(
            pb2.MetricsReport(plan_sha256=task.plan_sha256, round=task.round, kind="refused", reason=reason),
            timeout=RPC_TIMEOUT_S,
        )
        self._refused = key[:2]
        return max(float(task.retry_after_s), REFUSED_RETRY_S)

    # -- one task ----------------------------------------------------------------------------------------------
    def _approved_plan(self, task: pb2.TaskReply, *, training: bool) -> FederatedPlan:
        try:
            plan = FederatedPlan.from_toml(task.plan_toml)
        except ValueError as error:
            raise TaskRefused(f"the plan does not read: {error}") from None
        if plan.sha256 != task.plan_sha256:
            raise TaskRefused(f"the plan's sha256 is {plan.sha256}, the task says {task.plan_sha256}")
        if task.task and task.task != str(plan.task):
            raise TaskRefused(f"the task says {task.task}, its plan trains {plan.task}")
        reason = self.approval.refusal(plan, training=training)
        if reason:
            raise TaskRefused(reason)
        return plan

    def _load_cases(self, plan: FederatedPlan) -> tuple[dict[DatasetUse, list[TrainingCase]], int]:
        """The policy's datasets for the plan's task by use, and how many cases were skipped: an unreadable case is
        skipped (logged here, counted for the coordinator)."""
        cases: dict[DatasetUse, list[TrainingCase]] = {DatasetUse.TRAIN: [], DatasetUse.VAL: []}
        n_skipped = 0
        for dataset in self.policy.datasets_for(plan.task):
            try:
                loaded, skipped = load_training_cases(dataset.spec, plan.task, self.policy.seed)
            except (ValueError, OSError) as error:
                log.error("dataset %s not used: %s", dataset.name, error)
                continue
            cases[dataset.use] += loaded
            n_skipped += len(skipped)
            log.info("dataset %s: %d case(s), %d skipped", dataset.name, len(loaded), len(skipped))
        return cases, n_skipped

    def _prepare(self, plan: FederatedPlan) -> _Prepared:
        """The plan's trainer on the policy's cases, built once per plan."""
        if self._prepared is not None and self._prepared.plan_sha256 == plan.sha256:
            return self._prepared
        from training.trainer import LocalTrainer

        self._prepared = None
        cases, n_skipped = self._load_cases(plan)
        train, val = cases[DatasetUse.TRAIN], cases[DatasetUse.VAL]
        if not val:
            train, val = split_cases(train, self.policy.holdout_fraction, self.policy.seed)
        if not train:
            raise TaskRefused(f"no usable training case in the policy's datasets for task {plan.task}")
        trainer = LocalTrainer(plan.training, train, val, self.device, progress=False,
                               schedule_epochs=plan.rounds * plan.local_epochs)
        self._prepared = _Prepared(plan.sha256, trainer, n_skipped)
        return self._prepared

    def _global_weights(self, task: pb2.TaskReply, trainer: Any) -> dict[str, Any]:
        """The round's global weights, checked against the network the plan builds and the task's base sha256."""
        spec_weights = trainer.get_weights()
        receiver = StreamReceiver(self.bundle.payload_key, self.bundle.site, len(encode_weights(spec_weights)),
                                  plan_sha256=task.plan_sha256, round=task.round, base_sha256=task.base_sha256)
        header, plaintext = pb2.StreamHeader(), b""
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            parts = self._rpc.GetWeights(pb2.WeightsRequest(plan_sha256=task.plan_sha256, round=task.round),
                                         timeout=self._stream_timeout(task))
            try:
                header, plaintext = receiver.receive(parts)
                break
            except WireError as error:
                if not error.resend or attempt == TRANSFER_ATTEMPTS:
                    raise TaskRefused(f"the global weights were refused: {error.reason}") from None
                log.warning("global weights broken in transit (%s); fetching again", error.reason)
        # `receive` proved sha256(plaintext) == the header's total_sha256: no second pass over the weights.
        if header.total_sha256 != task.base_sha256:
            raise TaskRefused("the global weights do not match the task's base sha256")
        try:
            return decode_weights(plaintext, weights_spec(spec_weights))
        except WireError as error:
            raise TaskRefused(f"the global weights do not fit the plan's network: {error.reason}") from None

    def _train(self, task: pb2.TaskReply, plan: FederatedPlan, prepared: _Prepared) -> None:
        trainer = prepared.trainer
        weights = self._global_weights(task, trainer)
        local = self._local_normalization(plan, trainer) if plan.local_normalization else None
        start = weights if local is None else local.starting_weights(weights)
        budget_s = self.policy.max_hours_per_round * 3600
        if task.deadline_unix:
            budget_s = min(budget_s, task.deadline_unix - time.time())
        trainer.start_round((task.round - 1) * plan.local_epochs)
        started, epochs_done, update = time.monotonic(), 0, None
        while epochs_done < plan.local_epochs:
            # Stop adding epochs when the next would end past the round's deadline or the custodian's cap.
            elapsed = time.monotonic() - started
            if epochs_done and elapsed + elapsed / epochs_done > budget_s:
                log.warning("round %d: stopping after %d of %d local epochs (time budget %.0f s)", task.round,
                            epochs_done, plan.local_epochs, budget_s)
                break
            update = trainer.train(start if epochs_done == 0 else None, 1, global_weights=weights,
                                   prox_mu=plan.prox_mu)
            epochs_done += 1
        assert update is not None
        if local is not None:
            local.keep(update.weights)
        trained_s = time.monotonic() - started
        validation = trainer.evaluate(thresholds=THRESHOLD_CANDIDATES)
        metrics = {"train_loss": update.metrics["train_loss"], "local_epochs": epochs_done,
                   "n_skipped_cases": prepared.n_skipped, **validation}
        log.info("round %d: %d local epoch(s) in %.1f s, validation in %.1f s", task.round, epochs_done, trained_s,
                 time.monotonic() - started - trained_s)
        self._pending = _Update((task.plan_sha256, task.round, task.base_sha256), encode_weights(update.weights),
                                update.n_cases, _shared(metrics, self.policy.min_cases_per_mean),
                                _threshold_dice(validation))
        self._upload(task, self._pending)

    def _local_normalization(self, plan: FederatedPlan, trainer: Any) -> LocalNormalization:
        from models.networks import normalization_weight_names

        return LocalNormalization(self.state_dir / LOCAL_NORMALIZATION_DIR / f"{plan.sha256[:16]}.weights",
                                  frozenset(normalization_weight_names(trainer.model)))

    def _upload(self, task: pb2.TaskReply, update: _Update) -> None:
        """PutUpdate, again while the coordinator answers resend (a chunk broken in transit)."""
        self._set_state("uploading", task.round)
        binding = StreamBinding(*update.key, self.bundle.site)
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            header_fields: dict[str, Any] = {"num_cases": update.n_cases, "metrics": update.metrics}
            if update.threshold_dice is not None:
                header_fields["threshold_dice"] = update.threshold_dice.to_message()
            parts = chunk_stream(update.plaintext, key=self.bundle.payload_key, aad_fields=binding,
                                 header_fields=header_fields)
            reply = self._rpc.PutUpdate(parts, timeout=self._stream_timeout(task))
            if reply.accepted or not reply.resend:
                if reply.accepted:
                    log.info("round %d: update accepted (%d training cases)", task.round, update.n_cases)
                else:  # sending the same update again would be refused again
                    log.error("round %d: update refused: %s", task.round, reply.reason)
                self._done, self._pending = update.key, None
                return
            log.warning("round %d: update broken in transit (%s); sending again (%d/%d)", task.round, reply.reason,
                        attempt, TRANSFER_ATTEMPTS)
        log.error("round %d: the update did not get through after %d attempts", task.round, TRANSFER_ATTEMPTS)

    def _evaluate(self, task: pb2.TaskReply, plan: FederatedPlan) -> None:
        """Score the round's candidate on all of the policy's cases for its task (an evaluator never trains, so none
        is held out) with the node's engine, and report what `summarize_scores` lets leave."""
        with tempfile.TemporaryDirectory(prefix="fedlesion-candidate-") as folder:
            package = self._candidate(task, Path(folder) / "package")  # held in memory once verified
        if self._evaluation_cases is None or self._evaluation_cases[0] != plan.sha256:
            cases, n_skipped = self._load_cases(plan)
            self._evaluation_cases = (plan.sha256, cases[DatasetUse.TRAIN] + cases[DatasetUse.VAL], n_skipped)
        _, cases, n_skipped = self._evaluation_cases
        if not cases:
            raise TaskRefused(f"no usable case in the policy's datasets for task {plan.task}")
        started = time.monotonic()
        summary = summarize_scores(score_cases(package, cases), min_cases_per_mean=self.policy.min_cases_per_mean)
        log.info("round %d: candidate version %d scored on %d case(s) in %.1f s", task.round,
                 package.manifest.version, len(cases), time.monotonic() - started)
        self._rpc.ReportMetrics(
            pb2.MetricsReport(plan_sha256=task.plan_sha256, round=task.round, kind="evaluate",
                              num_cases=summary.num_cases,
                              values=_shared({**summary.values, "n_skipped_cases": n_skipped}),
                              histograms=summary.histogram_messages()),
            timeout=RPC_TIMEOUT_S,
        )
        self._done = (task.plan_sha256, task.round, task.base_sha256)

    def _candidate(self, task: pb2.TaskReply, folder: Path) -> LoadedPackage:
        """The round's candidate package, verified (`receive_candidate`), fetched again while broken in transit."""
        attempt = 1
        while True:
            parts = self._rpc.GetCandidate(pb2.CandidateRequest(plan_sha256=task.plan_sha256, round=task.round),
                                           timeout=self._stream_timeout(task))
            try:
                return receive_candidate(parts, task, self.bundle.payload_key, self.bundle.site, folder)
            except WireError as error:
                if not error.resend or attempt == TRANSFER_ATTEMPTS:
                    raise TaskRefused(f"the candidate was refused: {error.reason}") from None
                log.warning("candidate broken in transit (%s); fetching again", error.reason)
                attempt += 1
            except ValueError as error:  # models.errors.PackageRefused: signature, files, plan or round
                raise TaskRefused(f"the candidate was refused: {error}") from None

    @staticmethod
    def _stream_timeout(task: pb2.TaskReply) -> float:
        return max(RPC_TIMEOUT_S, task.deadline_unix - time.time()) if task.deadline_unix else 10 * RPC_TIMEOUT_S


def _shared(metrics: dict[str, Any], min_cases_per_mean: int | None = None) -> dict[str, float]:
    """Only the aggregate numbers in SHARED_METRICS leave the site (the trainer's per-case rows never do), and a
    trainer's validation means only over at least `min_cases_per_mean` cases (its policy's)."""
    too_few = min_cases_per_mean is not None and int(metrics.get("n_val_cases") or 0) < min_cases_per_mean
    withheld = VALIDATION_MEANS if too_few else ()
    return {name: float(metrics[name]) for name in SHARED_METRICS
            if metrics.get(name) is not None and name not in withheld}


def _threshold_dice(validation: dict[str, Any]) -> DiceByThreshold | None:
    """The mean validation Dice per candidate threshold, when it is a mean over at least MIN_CASES_PER_BIN cases
    (over fewer it is too close to one case's own Dice to leave the site)."""
    dice, cases = validation.get("dice_by_threshold"), int(validation.get("n_val_cases", 0))
    if not dice or cases < MIN_CASES_PER_BIN:
        return None
    return DiceByThreshold(tuple(dice), tuple(dice.values()), cases)

