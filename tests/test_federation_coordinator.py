"""The coordinator in-process over loopback mTLS (training/federation/coordinator.py, admin.py): a round with good
and refused updates, FedAvg on known numbers, candidate → release → pull, revocation without a restart, and the
quorum and deadline rules driven by `step(now)`."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc as pb2_grpc
from models.federation.enrollment import EnrollmentBundle
from models.federation.transport import PROTOCOL_VERSION, channel
from models.federation.wire import (
    StreamBinding,
    StreamReceiver,
    chunk_stream,
    decode_weights,
    encode_weights,
    weights_sha256,
)
from models.manifest import Task, parse_manifest
from models.signing import load_public_key, verify
from training.federation import admin
from training.federation.coordinator import Coordinator
from training.federation.evaluation import receive_candidate
from training.federation.plan import FederatedPlan, plan_for
from training.federation.screening import is_running_statistic
from training.federation.state import Round, RoundState

TASK = Task.STROKE_DWI_ADC


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeSite:
    """The protocol as a site speaks it, with the update's content chosen by the test."""

    def __init__(self, bundle: EnrollmentBundle) -> None:
        self.bundle = bundle
        self.channel = channel(bundle)
        self.stub = pb2_grpc.CoordinatorStub(self.channel)

    def hello(self) -> pb2.HelloReply:
        return self.stub.Hello(pb2.HelloRequest(protocol_version=PROTOCOL_VERSION, fedlesion_version="test"))

    def task(self) -> pb2.TaskReply:
        return self.stub.GetTask(pb2.TaskRequest(protocol_version=PROTOCOL_VERSION))

    def weights(self, task: pb2.TaskReply) -> dict[str, np.ndarray]:
        parts = self.stub.GetWeights(pb2.WeightsRequest(plan_sha256=task.plan_sha256, round=task.round))
        receiver = StreamReceiver(self.bundle.payload_key, self.bundle.site, task.max_update_bytes)
        return decode_weights(receiver.receive(parts)[1])

    def parts(self, task: pb2.TaskReply, weights: dict[str, np.ndarray], cases: int, *,
              base_sha256: str | None = None, threshold_dice: pb2.ThresholdDice | None = None
              ) -> list[pb2.StreamPart]:
        binding = StreamBinding(task.plan_sha256, task.round, base_sha256 or task.base_sha256, self.bundle.site)
        header = {"num_cases": cases, "metrics": {"loss": 0.5}}
        if threshold_dice is not None:
            header["threshold_dice"] = threshold_dice
        return list(chunk_stream(encode_weights(weights), key=self.bundle.payload_key, aad_fields=binding,
                                 header_fields=header, chunk_bytes=4096))

    def put(self, task: pb2.TaskReply, weights: dict[str, np.ndarray], cases: int, *,
            base_sha256: str | None = None, threshold_dice: pb2.ThresholdDice | None = None) -> pb2.UpdateReply:
        return self.stub.PutUpdate(iter(self.parts(task, weights, cases, base_sha256=base_sha256,
                                                   threshold_dice=threshold_dice)))


def _shifted(weights: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {name: (value + by).astype(value.dtype) for name, value in weights.items()}


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture()
def coordinator_dir(tmp_path: Path) -> tuple[Path, dict[str, EnrollmentBundle]]:
    directory = tmp_path / "coordinator"
    admin.init(directory, f"127.0.0.1:{_free_port()}")
    bundles = {
        name: admin.enroll(directory, name, role, tmp_path / f"{name}.bundle")
        for name, role in (("alpha", "trainer"), ("beta", "trainer"), ("gamma", "trainer"), ("judge", "evaluator"),
                           ("ward", "node"))
    }
    return directory, bundles


def _dice(thresholds: list[float], dice: list[float], cases: int) -> pb2.ThresholdDice:
    return pb2.ThresholdDice(thresholds=thresholds, mean_dice=dice, num_cases=cases)


def test_a_round_aggregates_good_updates_refuses_bad_ones_and_only_a_release_is_pulled(coordinator_dir,
                                                                                        tmp_path) -> None:
    """… and its candidate is read at the threshold its trainers' validation Dice, pooled by case, favours; an
    evaluator scores the candidate itself and its aggregates reach status and, with the release, the manifest."""
    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=1, quorum=2, deadline_s=120)
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=2, tick_s=0.05)
    coordinator.start()
    sites = {name: FakeSite(bundle) for name, bundle in bundles.items()}
    try:
        for name in ("alpha", "beta", "gamma"):
            assert sites[name].hello().role == "trainer"
        _wait(lambda: coordinator.state.current_round(plan.sha256) is not None)
        tasks = {name: sites[name].task() for name in ("alpha", "beta", "gamma")}
        assert {t.kind for t in tasks.values()} == {pb2.TaskReply.TRAIN}
        assert FederatedPlan.from_toml(tasks["alpha"].plan_toml) == plan
        base = sites["alpha"].weights(tasks["alpha"])
        counter = next(n for n in base if n.endswith("num_batches_tracked"))

        # Validation Dice per threshold: alpha 0.2 | 0.6 over 5 cases, gamma 0.6 | 0.4 over 15; pooled by case
        # 0.3: (5·0.2 + 15·0.6) / 20 = 0.5, 0.5: (5·0.6 + 15·0.4) / 20 = 0.45 → 0.3 (the sites' plain mean: 0.5).
        alpha_update = sites["alpha"].parts(tasks["alpha"], _shifted(base, 1.0), cases=1,
                                            threshold_dice=_dice([0.3, 0.5], [0.2, 0.6], 5))
        assert sites["alpha"].stub.PutUpdate(iter(alpha_update)).accepted
        second = sites["alpha"].put(tasks["alpha"], _shifted(base, 1.0), cases=1)
        assert not second.accepted and "second update" in second.reason
        beta, task = sites["beta"], tasks["beta"]
        name = next(n for n in base if base[n].dtype == np.float32 and base[n].ndim > 1)
        refusals = {
            "NaN or Inf": dict(base, **{name: np.full_like(base[name], np.nan)}),
            "wrong tensor names": {("~" + n[1:] if n == name else n): v for n, v in base.items()},  # same size
            f"{name}: shape": dict(base, **{name: base[name].reshape(-1)}),
            f"{counter}: dtype": dict(base, **{counter: base[counter].astype(np.int32)}),
            "more than the": dict(base, extra=np.zeros(1000, dtype=np.float32)),  # oversized
        }
        for expected, weights in refusals.items():
            reply = beta.put(task, weights, cases=2)
            assert not reply.accepted and not reply.resend and expected in reply.reason, (expected, reply.reason)
        for expected, curve in (("a mean over 4 case(s), fewer than 5", _dice([0.3, 0.5], [0.2, 0.6], 4)),
                                ("must lie in [0, 1]", _dice([0.3, 0.5], [0.2, 1.5], 9))):
            reply = beta.put(task, base, cases=2, threshold_dice=curve)
            assert not reply.accepted and expected in reply.reason, reply.reason
        replay = beta.put(task, base, cases=2, base_sha256="0" * 64)  # computed on other base weights
        assert not replay.accepted and "base_sha256" in replay.reason
        replayed = beta.stub.PutUpdate(iter(alpha_update))  # alpha's accepted stream, sent again by beta
        assert not replayed.accepted and not replayed.resend and "does not decrypt" in replayed.reason
        broken = sites["gamma"].parts(tasks["gamma"], _shifted(base, 3.0), cases=3)
        payload = broken[1].chunk.payload
        broken[1].chunk.payload = bytes([payload[0] ^ 1]) + payload[1:]  # one bit flipped in transit
        in_transit = sites["gamma"].stub.PutUpdate(iter(broken))
        assert not in_transit.accepted and in_transit.resend and "broken" in in_transit.reason
        assert sites["gamma"].put(tasks["gamma"], _shifted(base, 3.0), cases=3,
                                  threshold_dice=_dice([0.3, 0.5], [0.6, 0.4], 15)).accepted  # the resend

        _wait(lambda: coordinator.state.round(plan.sha256, 1).state is RoundState.CLOSED)
        aggregate = decode_weights((coordinator.rounds_dir / "1" / "aggregate.weights").read_bytes())
        # FedAvg: (1 · (w + 1) + 3 · (w + 3)) / 4 = w + 2.5; counters (1 · (c + 1) + 3 · (c + 3)) / 4 = c + 2.5 → c + 2
        np.testing.assert_allclose(aggregate[name], base[name] + 2.5, rtol=0, atol=1e-5)
        assert int(aggregate[counter]) == int(base[counter]) + 2

        status = coordinator.state.status()
        [round_] = status["rounds"]
        assert round_["contributors"] == ["alpha", "gamma"] and round_["version"] == 1
        refused = [r["reason"] for r in round_["rejected"] if r["site"] == "beta"]
        assert len(refused) == 9 and "NaN or Inf" in refused[0]
        assert not [r for r in round_["rejected"] if r["site"] == "gamma"]  # a resend is not a refusal
        assert status["versions"] == [dict(task=TASK.value, version=1, state="candidate", round_id=1,
                                           released_by=None, released_at=None, threshold=0.3)]
        manifest = parse_manifest((directory / "versions" / TASK.value / "1" / "manifest.json").read_bytes())
        assert (manifest.training.sites_contributed, manifest.training.sites_invited) == (2, 3)
        assert manifest.training.site_metrics["gamma"]["cases"] == 3.0
        assert manifest.training.plan_sha256 == plan.sha256 and manifest.training.federated_round == 1
        assert manifest.output.threshold == 0.3 and "threshold 0.3 (validation Dice 0.500 over 20 cases at 2 sites)" \
            in manifest.description

        judge = sites["judge"]
        assert judge.hello().role == "evaluator"
        evaluate = judge.task()
        assert evaluate.kind == pb2.TaskReply.EVALUATE and evaluate.round == 1
        assert evaluate.base_sha256 == manifest.files["model.onnx"]
        with pytest.raises(grpc.RpcError) as weights_refused:
            judge.weights(evaluate)  # an evaluator gets the candidate, never the weights
        assert weights_refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        parts = judge.stub.GetCandidate(pb2.CandidateRequest(plan_sha256=plan.sha256, round=1))
        candidate = receive_candidate(parts, evaluate, judge.bundle.payload_key, "judge", tmp_path / "candidate")
        assert candidate.manifest.version == 1 and candidate.manifest.output.threshold == 0.3
        binned = pb2.Histogram(metric="val_dice", edges=[0.0, 0.5, 1.0], counts=[5, 7])
        report = pb2.MetricsReport(plan_sha256=plan.sha256, round=1, kind="evaluate", num_cases=12,
                                   values={"val_dice": 0.25}, histograms=[binned])
        too_fine = pb2.MetricsReport()
        too_fine.CopyFrom(report)
        too_fine.histograms[0].counts[:] = [8, 4]
        refused_report = judge.stub.ReportMetrics(too_fine)
        assert not refused_report.accepted and "a bin holds 4 case(s), fewer than 5" in refused_report.reason
        assert judge.stub.ReportMetrics(report).accepted
        assert coordinator.state.status()["rounds"][0]["evaluations"] == {"judge": {
            "val_dice": 0.25, "cases": 12,
            "histograms": {"val_dice": {"edges": [0.0, 0.5, 1.0], "counts": [5, 7]}},
        }}
        assert judge.task().kind == pb2.TaskReply.IDLE  # nothing newer to score

        node = sites["ward"]
        pull = pb2.ModelRequest(task=TASK.value, newer_than=0)
        assert list(node.stub.GetLatestModel(pull)) == []  # a candidate never reaches a node
        with pytest.raises(grpc.RpcError) as refused_call:
            node.task()
        assert refused_call.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "role node may not call GetTask" in refused_call.value.details()

        admin.release(directory, TASK, 1, by="dr-test")
        parts = list(node.stub.GetLatestModel(pull))
        header = parts[0].header
        assert header.version == 1 and b"".join(p.onnx_chunk for p in parts[1:]) != b""
        release_key = load_public_key(bundles["ward"].release_public_keys[0])
        assert verify(header.manifest_json, header.manifest_sig, release_key)
        released = parse_manifest(header.manifest_json)  # the evaluator's means beside the trainers' metrics
        assert released.training.site_metrics["judge"] == {"val_dice": 0.25, "evaluated_cases": 12.0}
        assert released.training.site_metrics["gamma"] == manifest.training.site_metrics["gamma"]
        assert list(node.stub.GetLatestModel(pb2.ModelRequest(task=TASK.value, newer_than=1))) == []

        admin.revoke(directory, "gamma", "left the consortium")  # another process's state, same database
        with pytest.raises(grpc.RpcError) as revoked:
            sites["gamma"].hello()
        assert revoked.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "revoked: left the consortium" in revoked.value.details()
        actions = [entry["action"] for entry in coordinator.state.audit_log()]
        assert actions[:5] == ["enroll"] * 5 and {"plan", "publish", "release", "revoke"} <= set(actions)
    finally:
        for site in sites.values():
            site.channel.close()
        coordinator.stop()


class PeerContext:
    """What a servicer method reads of its gRPC context: the peer certificate (transport checked it already)."""

    def __init__(self, bundle: EnrollmentBundle) -> None:
        self.bundle = bundle

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.bundle.cert_pem]}


def test_a_round_waits_for_its_quorum_and_retries_at_the_deadline(coordinator_dir) -> None:
    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=2, quorum=2, deadline_s=10)
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=2)
    state, now = coordinator.state, time.time()
    try:
        state.seen("alpha", "idle", now=now)
        coordinator.step(now)
        assert state.current_round(plan.sha256) is None  # one active site cannot reach a quorum of two
        state.seen("beta", "idle", now=now)
        state.seen("gamma", "idle", now=now - 60)  # not seen within the heartbeat timeout
        coordinator.step(now)
        round_ = state.current_round(plan.sha256)
        assert round_.round == 1 and round_.invited == ("alpha", "beta")
        state.record_update(round_.id, "alpha", accepted=True, num_cases=2, path=directory / "u")
        state.record_update(round_.id, "beta", accepted=False, reason="tensor holds NaN")
        coordinator.step(now + 5)  # everyone answered, but below the quorum: wait for the deadline
        assert state.current_round(plan.sha256).attempt == 1
        state.seen("gamma", "idle", now=now + 10)
        coordinator.step(now + 11)
        retried = state.current_round(plan.sha256)
        assert retried.attempt == 2 and retried.deadline == pytest.approx(now + 21)
        assert set(retried.invited) == {"alpha", "gamma"}  # beta was last seen at `now`: timed out by now + 11
        assert state.answered(retried.id) == {"alpha"}  # beta may try again in the new attempt
        [row] = state.status()["rounds"]
        assert "1 of quorum 2" in row["note"] and row["state"] == "open"
        assert json.loads(json.dumps(state.status()))["sites"][0]["name"] == "alpha"

        # gamma's custodian refuses the plan: recorded in the round, gamma paused until the next round asks again
        refusal = pb2.MetricsReport(plan_sha256=plan.sha256, round=1, kind="refused", reason="plan not approved")
        assert coordinator.ReportMetrics(refusal, PeerContext(bundles["gamma"])).accepted
        assert state.site("gamma").state.value == "paused" and "plan not approved" in state.site("gamma").reason
        assert state.answered(retried.id) == {"alpha", "gamma"}
        assert coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles["gamma"])).kind == pb2.TaskReply.IDLE
        assert "plan not approved" in state.status()["rounds"][0]["rejected"][-1]["reason"]
    finally:
        state.close()


def test_a_site_waiting_for_a_round_gets_its_task_when_the_round_opens_not_at_its_next_poll(coordinator_dir) -> None:
    """GetTask holds an idle answer (a long poll): the round's opening answers it, well before its retry_after_s."""
    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=1, quorum=1, deadline_s=60)
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=20)  # idle sites would ask again after 10 s
    state, now = coordinator.state, time.time()
    replies: list[tuple[pb2.TaskReply, float]] = []

    def ask() -> None:
        asked = time.monotonic()
        replies.append((coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles["alpha"])), time.monotonic() - asked))

    try:
        state.seen("alpha", "idle", now=now)
        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.3)  # no round yet: the call waits
        assert not replies
        coordinator.step(now)  # the round opens
        asking.join(5)
        [(task, waited)] = replies
        assert task.kind == pb2.TaskReply.TRAIN and task.round == 1
        assert waited < coordinator.idle_retry_s / 2
    finally:
        state.close()


def test_an_update_arriving_while_the_round_closes_or_after_is_refused_not_counted(coordinator_dir) -> None:
    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=2, quorum=1, deadline_s=10)
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=2)
    state, now = coordinator.state, time.time()

    def put(name: str, by: float, trained_for: Round | None = None) -> pb2.UpdateReply:
        on = trained_for or round_
        binding = StreamBinding(plan.sha256, on.round, on.base_sha256, name)
        parts = chunk_stream(encode_weights(_shifted(base, by)), key=bundles[name].payload_key, aad_fields=binding,
                             header_fields={"num_cases": 1, "metrics": {}})
        return coordinator.PutUpdate(parts, PeerContext(bundles[name]))

    late: list[pb2.UpdateReply] = []

    def export(current, weights, updates, version, round_dir) -> Path:  # beta's update lands during the export
        late.append(put("beta", 2.0))
        target = state.versions_dir(current.task) / str(version)
        target.mkdir(parents=True)
        return target

    try:
        for name in ("alpha", "beta"):
            state.seen(name, "idle", now=now)
        coordinator.step(now)
        round_ = state.current_round(plan.sha256)
        base = decode_weights(coordinator._base(round_)[0])
        assert put("alpha", 1.0).accepted
        coordinator._export = export
        coordinator.step(now + 11)  # the deadline, with the quorum of one: the round closes without beta
        [reply] = late
        assert not reply.accepted and "round 1 is closing" in reply.reason
        [row] = state.status()["rounds"]
        assert row["contributors"] == ["alpha"] and row["version"] == 1 and row["state"] == "closed"

        for name in ("alpha", "beta"):
            state.seen(name, "idle", now=now + 12)
        coordinator.step(now + 12)  # round 2 opens; beta's round-1 update, trained past the deadline, arrives now
        first, round_ = round_, state.current_round(plan.sha256)
        assert round_.round == 2 and "beta" in round_.invited
        stale = put("beta", 2.0, trained_for=first)
        assert not stale.accepted and not stale.resend
        assert coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles["beta"])).kind == pb2.TaskReply.TRAIN
        assert "for round 1, round 2 is open" in stale.reason
        assert put("beta", 2.0).accepted  # its round-2 update still counts
    finally:
        state.close()


def test_a_sequential_rule_invites_the_site_whose_turn_it_is_and_counts_the_bytes_streamed(coordinator_dir) -> None:
    """Cyclic IIL over alpha, beta, gamma: each round one site trains from the model the one before sent, and the
    round's model is its update. The bytes each stream carried are what the coordinator records."""
    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=4, strategy="cyclic-iil", deadline_s=10)
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=2)
    state, now = coordinator.state, time.time()
    coordinator._export = lambda current, weights, updates, version, round_dir: _empty_package(state, current, version)

    def train(name: str, by: float) -> tuple[dict[str, np.ndarray], int, int]:
        """The site's round as a site runs it: the global weights down, its update (shifted by `by`) up."""
        task = coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles[name]))
        assert task.kind == pb2.TaskReply.TRAIN
        received = list(coordinator.GetWeights(pb2.WeightsRequest(plan_sha256=plan.sha256, round=task.round),
                                               PeerContext(bundles[name])))
        receiver = StreamReceiver(bundles[name].payload_key, name, task.max_update_bytes)
        base = decode_weights(receiver.receive(iter(received))[1])
        update = _shifted(base, by)
        binding = StreamBinding(plan.sha256, task.round, task.base_sha256, name)
        sent = list(chunk_stream(encode_weights(update), key=bundles[name].payload_key, aad_fields=binding,
                                 header_fields={"num_cases": 2, "metrics": {}}, chunk_bytes=4096))
        assert coordinator.PutUpdate(iter(sent), PeerContext(bundles[name])).accepted
        return update, sum(part.ByteSize() for part in received), sum(part.ByteSize() for part in sent)

    try:
        for name in ("alpha", "beta", "gamma"):
            state.seen(name, "idle", now=now)
        coordinator.step(now)
        first = state.current_round(plan.sha256)
        assert first.invited == ("alpha",)  # all three are active; it is alpha's turn
        assert coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles["beta"])).kind == pb2.TaskReply.IDLE
        assert state.current_round(plan.sha256).invited == ("alpha",)  # beta did not join
        alpha_model, down, up = train("alpha", 1.0)
        coordinator.step(now + 1)  # alpha answered: the round closes with its one update
        published = decode_weights((coordinator.rounds_dir / "1" / "aggregate.weights").read_bytes())
        assert all(np.array_equal(published[tensor], alpha_model[tensor]) for tensor in alpha_model)
        assert state.status()["rounds"][0]["bytes"] == {"alpha": {"down": down, "up": up}}

        state.seen("gamma", "idle", now=now + 9)
        coordinator.step(now + 9)  # beta was last seen at `now`: timed out, and gamma may not take its turn
        assert state.current_round(plan.sha256) is None
        state.seen("beta", "idle", now=now + 9)
        coordinator.step(now + 9)
        second = state.current_round(plan.sha256)
        assert second.round == 2 and second.invited == ("beta",)
        assert second.base_sha256 == weights_sha256(encode_weights(alpha_model))  # beta starts from alpha's model
        beta_model, _, _ = train("beta", 2.0)
        coordinator.step(now + 10)
        state.seen("alpha", "idle", now=now + 10)
        coordinator.step(now + 10)
        assert state.current_round(plan.sha256).invited == ("gamma",)
        assert [row["contributors"] for row in state.status()["rounds"]] == [["alpha"], ["beta"], []]
        published = decode_weights((coordinator.rounds_dir / "2" / "aggregate.weights").read_bytes())
        assert all(np.array_equal(published[tensor], beta_model[tensor]) for tensor in beta_model)
    finally:
        state.close()


def _empty_package(state, current: Round, version: int) -> Path:
    """An export that writes nothing: the rounds' logic under test, not ONNX."""
    target = state.versions_dir(current.task) / str(version)
    target.mkdir(parents=True)
    return target


def test_screening_refuses_hostile_updates_at_the_close_and_suspends_a_site_refused_twice_until_resumed(
        coordinator_dir, capsys) -> None:
    """Round 1: gamma's change ×100 (norm); round 2: gamma's change sign-flipped (direction), its second refusal in a
    row: suspended, not invited, until `coordinator resume`. Round 3: alpha reports more cases than it declared and
    beta 10⁶: refused, and one update left is below the quorum, so the round waits. FedBN's manifest says how its
    normalization was made."""
    from fedlesion.cli import main

    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=3, quorum=2, deadline_s=30, strategy="fedbn")
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=2)
    state, now = coordinator.state, time.time()
    rng = np.random.default_rng(3)
    shared: dict[str, np.ndarray] = {}

    def put(name: str, factor: float, cases: int = 10) -> pb2.UpdateReply:
        """The round's base moved by `factor` times a change shared by all sites plus the site's own noise (running
        statistics left as they are: a scaled or flipped variance could turn negative, refused before norm and
        direction are looked at)."""
        round_ = state.current_round(plan.sha256)
        base = decode_weights(coordinator._base(round_)[0])
        weights = {}
        for key, value in base.items():
            if value.dtype.kind != "f" or is_running_statistic(key):
                weights[key] = value
                continue
            change = shared.setdefault(key, rng.normal(0, 0.01, value.shape)) + rng.normal(0, 0.003, value.shape)
            weights[key] = (value + factor * change).astype(value.dtype)
        binding = StreamBinding(plan.sha256, round_.round, round_.base_sha256, name)
        parts = chunk_stream(encode_weights(weights), key=bundles[name].payload_key, aad_fields=binding,
                             header_fields={"num_cases": cases, "metrics": {}})
        return coordinator.PutUpdate(parts, PeerContext(bundles[name]))

    def run_round(at: float, factors: dict[str, float], cases: dict[str, int] | None = None) -> Round:
        for name in ("alpha", "beta", "gamma"):
            state.seen(name, "idle", now=at)
        coordinator.step(at)
        opened = state.current_round(plan.sha256)
        for name, factor in factors.items():
            assert put(name, factor, (cases or {}).get(name, 10)).accepted  # screening comes at the close
        coordinator.step(at + 1)
        return opened

    try:
        first = run_round(now, {"alpha": 1.0, "beta": 1.0, "gamma": 100.0})
        [row] = state.status()["rounds"]
        assert row["state"] == "closed" and row["contributors"] == ["alpha", "beta"]
        [scaled] = row["rejected"]
        assert scaled["site"] == "gamma" and "× the median of the others'" in scaled["reason"]
        manifest = parse_manifest((directory / "versions" / TASK.value / "1" / "manifest.json").read_bytes())
        assert manifest.training.strategy == "fedbn" and manifest.training.sites_contributed == 2
        assert "own normalization layers; this model's are their FedAvg average" in manifest.description
        assert first.round == 1 and state.site("gamma").state.value == "active"

        def export(current, weights, updates, version, round_dir) -> Path:  # no ONNX needed from here on
            target = state.versions_dir(current.task) / str(version)
            target.mkdir(parents=True)
            return target

        coordinator._export = export
        run_round(now + 2, {"alpha": 1.0, "beta": 1.0, "gamma": -1.0})
        flipped = state.status()["rounds"][1]
        assert flipped["contributors"] == ["alpha", "beta"] and flipped["state"] == "closed"
        assert "points away from the others'" in flipped["rejected"][0]["reason"]
        gamma = state.site("gamma")
        assert gamma.state.value == "suspended" and "refused 2 updates in a row" in gamma.reason

        for name in ("alpha", "beta", "gamma"):
            state.seen(name, "idle", now=now + 4)
        coordinator.step(now + 4)
        third = state.current_round(plan.sha256)
        assert third.round == 3 and third.invited == ("alpha", "beta")  # a suspended site is not invited
        assert coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles["gamma"])).kind == pb2.TaskReply.IDLE
        capsys.readouterr()
        assert main(["coordinator", "status", "--dir", str(directory)]) == 0
        shown = capsys.readouterr().out
        assert "suspended (screening refused 2 updates in a row" in shown
        assert "refused from gamma: screening: the change of its learned parameters from the global weights points " \
               "away" in shown

        assert main(["coordinator", "resume", "gamma", "--dir", str(directory)]) == 0
        assert main(["coordinator", "declare", "alpha", "--cases", "5", "--dir", str(directory)]) == 0
        assert "resumed gamma" in capsys.readouterr().out and state.site("gamma").state.value == "active"
        assert coordinator.GetTask(pb2.TaskRequest(), PeerContext(bundles["gamma"])).kind == pb2.TaskReply.TRAIN
        for name, cases in (("alpha", 6), ("beta", 10**6), ("gamma", 10)):
            assert put(name, 1.0, cases).accepted
        coordinator.step(now + 5)
        claims = state.status()["rounds"][2]
        assert claims["state"] == "open" and claims["contributors"] == ["gamma"]  # below the quorum: it waits
        assert {r["site"]: r["reason"] for r in claims["rejected"]} == {
            "alpha": "screening: it reports 6 training cases, above its declared dataset size of 5",
            "beta": "screening: it reports 1000000 training cases, above the plan's cap of 100000",
        }
        actions = [(entry["action"], entry["subject"]) for entry in state.audit_log()]
        assert ("suspend", "gamma") in actions and ("resume", "gamma") in actions and ("declare", "alpha") in actions
    finally:
        state.close()


def test_the_command_line_sets_up_a_coordinator_and_reports_status(tmp_path: Path, capsys) -> None:
    from fedlesion.cli import main

    directory = tmp_path / "c"
    assert main(["coordinator", "init", "--dir", str(directory), "--address", "127.0.0.1:50123"]) == 0
    assert oct((directory / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert not (directory / "server" / "ca.key").exists() and not list((directory / "server").glob("release*"))
    out = tmp_path / "alpha.bundle"
    assert main(["coordinator", "enroll", "alpha", "--dir", str(directory), "--role", "trainer", "--generate",
                 "--out", str(out)]) == 0
    assert oct(out.stat().st_mode & 0o777) == "0o600" and EnrollmentBundle.read(out).role.value == "trainer"
    assert main(["coordinator", "revoke", "alpha", "--dir", str(directory), "--reason", "test"]) == 0
    capsys.readouterr()
    assert main(["coordinator", "plan", "--task", TASK.value, "--rounds", "2", "--strategy", "fedprox", "--mu", "0.1",
                 "--network", "tiny"]) == 0
    printed = FederatedPlan.from_toml(capsys.readouterr().out)
    assert (printed.rounds, printed.strategy, printed.prox_mu) == (2, "fedprox", 0.1)
    assert main(["coordinator", "status", "--dir", str(directory), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["sites"][0]["name"] == "alpha" and status["sites"][0]["state"] == "revoked"
    assert status["rounds"] == [] and status["versions"] == []
    assert main(["coordinator", "release", TASK.value, "1", "--dir", str(directory)]) == 2
    assert "no stroke-dwi-adc version 1" in capsys.readouterr().err


def test_renewal_and_publish_keep_sites_and_versions_consistent(coordinator_dir, tmp_path: Path) -> None:
    from models.manifest import default_manifest
    from models.package import build_package
    from models.signing import demo_private_key, generate_key_pair, load_private_key
    from tests.onnx_graphs import first_channel_sigmoid

    directory, bundles = coordinator_dir
    old = tmp_path / "alpha.bundle"
    renewed = admin.renew(directory, "alpha", tmp_path / "alpha-2.bundle", old_bundle=old, lifetime_days=30)
    assert renewed.fingerprint != bundles["alpha"].fingerprint and renewed.key_pem == bundles["alpha"].key_pem
    assert renewed.payload_key == bundles["alpha"].payload_key
    state = admin.CoordinatorDir(directory).state()
    assert state.certificate_site(renewed.fingerprint)[0].name == "alpha"

    def package(version: int, key, demo: bool = False) -> Path:
        manifest = default_manifest(TASK, version, plan_sha256="d" * 64, demo=demo, description="central")
        return build_package(tmp_path / f"p{version}-{demo}", first_channel_sigmoid(), manifest, key)

    central = load_private_key(generate_key_pair()[0])
    with pytest.raises(ValueError, match="next stroke-dwi-adc version here is 1"):
        admin.publish(directory, package(3, central))
    with pytest.raises(ValueError, match="demo"):
        admin.publish(directory, package(1, demo_private_key(), demo=True))
    assert admin.publish(directory, package(1, central)).manifest.version == 1
    assert [(v["version"], v["state"]) for v in state.status()["versions"]] == [(1, "candidate")]
    released = admin.release(directory, TASK, 1, by="dr-test")
    assert verify((released / "manifest.json").read_bytes(), (released / "manifest.sig").read_bytes(),
                  load_public_key(bundles["ward"].release_public_keys[0]))
    with pytest.raises(ValueError, match="already released"):
        admin.release(directory, TASK, 1)
    state.close()


def test_each_round_rewrites_the_operators_report_and_metrics_are_served_on_loopback_without_patient_data(
        coordinator_dir) -> None:
    """Two rounds of two trainers and an evaluator's score, over mTLS: after each close (and the score) the plan's
    metrics.csv holds every (round, site, role) so far; val_dice.png is drawn at the first close, not redrawn within
    PLOT_INTERVAL_S while rounds remain, and drawn again once the last round closes; /metrics answers on loopback
    with the rounds, sites alive, bytes, round duration and refused updates, labelled only by role, state and
    direction."""
    directory, bundles = coordinator_dir
    plan = plan_for(TASK, network="tiny", rounds=2, quorum=2, deadline_s=120)
    coordinator = Coordinator(directory, plan, heartbeat_interval_s=2, tick_s=0.05)

    def export(current, weights, updates, version, round_dir) -> Path:  # the report needs no ONNX
        target = coordinator.state.versions_dir(current.task) / str(version)
        target.mkdir(parents=True)
        return target

    coordinator._export = export
    coordinator.start(metrics_port=0)
    sites = {name: FakeSite(bundles[name]) for name in ("alpha", "beta", "judge")}
    report_csv, plot = coordinator.rounds_dir / "metrics.csv", coordinator.rounds_dir / "val_dice.png"
    url = f"http://127.0.0.1:{coordinator.metrics_server.port}"

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        for name in ("alpha", "beta", "judge", "gamma", "ward", "val_dice"):
            assert name not in text  # no site, let alone a patient: labels are roles, states, directions
        samples = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
        labels = {key for sample, _ in samples for key in re.findall(r'(\w+)="', sample)}
        assert labels <= {"role", "state", "direction"}, labels
        return {sample: float(value) for sample, value in samples}

    def rows() -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(report_csv.read_text()))) if report_csv.exists() else []

    def train(name: str, dice: float) -> tuple[pb2.TaskReply, int]:
        task = sites[name].task()
        base = sites[name].weights(task)
        binding = StreamBinding(task.plan_sha256, task.round, task.base_sha256, name)
        update = encode_weights(_shifted(base, 0.01))
        parts = chunk_stream(update, key=bundles[name].payload_key, aad_fields=binding,
                             header_fields={"num_cases": 2, "metrics": {"val_dice": dice, "train_loss": 0.4}})
        assert sites[name].stub.PutUpdate(parts).accepted
        return task, len(update)

    try:
        assert coordinator.metrics_server.host == "127.0.0.1"
        with pytest.raises(urllib.error.HTTPError) as elsewhere:
            urllib.request.urlopen(url + "/", timeout=10)
        assert elsewhere.value.code == 404
        for site in sites.values():
            site.hello()
        _wait(lambda: coordinator.state.current_round(plan.sha256) is not None)
        before = scrape()
        assert before["fedlesion_federation_round"] == 1 and before["fedlesion_federation_round_open"] == 1
        assert before['fedlesion_federation_sites_alive{role="trainer"}'] == 2
        assert before['fedlesion_federation_sites_alive{role="evaluator"}'] == 1
        assert before['fedlesion_federation_sites{role="trainer",state="active"}'] == 3
        assert not report_csv.exists()  # nothing closed yet

        first_task, update_bytes = train("alpha", 0.2)
        assert not sites["alpha"].put(first_task, {}, cases=1).accepted  # refused (and recorded)
        train("beta", 0.4)
        _wait(lambda: [(r["round"], r["site"]) for r in rows()] == [("1", "alpha"), ("1", "beta")])
        _wait(plot.exists)  # the first close draws at once
        first_plot = plot.stat().st_ino
        report = pb2.MetricsReport(plan_sha256=plan.sha256, round=1, kind="evaluate", num_cases=3,
                                   values={"val_dice": 0.3})
        assert sites["judge"].stub.ReportMetrics(report).accepted
        _wait(lambda: len(rows()) == 3)
        assert plot.stat().st_ino == first_plot  # within PLOT_INTERVAL_S of the last drawing, rounds still to run
        _wait(lambda: coordinator.state.current_round(plan.sha256) is not None)
        train("alpha", 0.5)
        train("beta", 0.6)
        _wait(lambda: len(rows()) == 5)

        table = {(r["round"], r["site"]): r for r in rows()}
        assert {key: (r["role"], r["val_dice"], r["cases"]) for key, r in table.items()} == {
            ("1", "alpha"): ("trainer", "0.2", "2"), ("1", "beta"): ("trainer", "0.4", "2"),
            ("1", "judge"): ("evaluator", "0.3", "3"), ("2", "alpha"): ("trainer", "0.5", "2"),
            ("2", "beta"): ("trainer", "0.6", "2"),
        }
        assert table[("2", "alpha")]["version"] == "2" and float(table[("1", "alpha")]["round_seconds"]) > 0
        _wait(lambda: plot.stat().st_ino != first_plot)  # the last round closed: drawn at once
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        after = scrape()
        assert after["fedlesion_federation_round"] == 2 and after["fedlesion_federation_round_open"] == 0
        assert after["fedlesion_federation_rounds_closed"] == 2 and after["fedlesion_federation_rounds_planned"] == 2
        assert after["fedlesion_federation_refused_updates"] == 1
        assert 0 < after["fedlesion_federation_round_duration_seconds"] < 60
        # four updates up, four base weights down (and the chunks' framing, the small messages)
        assert after['fedlesion_federation_bytes_total{direction="received"}'] > 4 * update_bytes
        assert after['fedlesion_federation_bytes_total{direction="sent"}'] > 4 * update_bytes
    finally:
        for site in sites.values():
            site.channel.close()
        coordinator.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/metrics", timeout=5)
