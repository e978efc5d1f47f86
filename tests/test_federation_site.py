"""The site loop against a small coordinator on real mTLS loopback: it waits out a coordinator that is not there yet,
trains a round with the plan's network, re-sends an update the coordinator asks for again, reports only aggregates,
skips an unreadable case, and refuses a plan its custodian did not approve, telling the coordinator why. An evaluator
site scores a candidate package with the node's engine and reports means and histograms, never a case's value."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnx_graphs import first_channel_sigmoid

from fedlesion.cli import main
from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc, pki, transport
from models.federation.enrollment import EnrollmentBundle
from models.federation.wire import (
    StreamBinding,
    StreamReceiver,
    chunk_stream,
    decode_weights,
    encode_weights,
    weights_sha256,
    weights_spec,
)
from models.manifest import default_manifest
from models.networks import build_network, network_weights, normalization_weight_names
from models.package import build_package, sha256_hex
from models.signing import generate_key_pair, load_private_key
from tests.conftest import write_labelled_cases
from training.federation.plan import FederatedPlan, plan_for
from training.federation.policy import PINNED_PLAN_FILE, PolicyDataset, SitePolicy
from training.federation.site import SHARED_METRICS, Backoff, Site, _Prepared
from training.trainer import LocalUpdate

PAYLOAD_KEY = bytes(range(32))
ROUND = 3


class FakeCoordinator(federation_pb2_grpc.CoordinatorServicer):
    """One plan: TRAIN round 3 until an update is accepted (the first upload is asked for again), then IDLE; `done`
    is set by the accepted update or by a report."""

    def __init__(self, plan: FederatedPlan) -> None:
        self.plan = plan
        network = build_network(plan.training.in_channels, 1, plan.training.network)
        self.global_weights = {name: value.numpy().copy() for name, value in network_weights(network).items()}
        self.base_sha256 = weights_sha256(self.global_weights)
        self.calls: list[str] = []
        self.hellos: list[pb2.HelloRequest] = []
        self.heartbeats: list[pb2.HeartbeatRequest] = []
        self.reports: list[pb2.MetricsReport] = []
        self.update: tuple[pb2.StreamHeader, dict[str, np.ndarray]] | None = None
        self.done = threading.Event()

    def Hello(self, request, context):  # noqa: N802 - the generated servicer's method names
        self.calls.append("Hello")
        self.hellos.append(request)
        return pb2.HelloReply(protocol_version=transport.PROTOCOL_VERSION, site=transport.peer_name(context),
                              role=request.role, heartbeat_interval_s=1)

    def Heartbeat(self, request, context):  # noqa: N802
        self.heartbeats.append(request)
        return pb2.HeartbeatReply(current_round=ROUND)

    def GetTask(self, request, context):  # noqa: N802
        self.calls.append("GetTask")
        if self.reports or self.update is not None:
            return pb2.TaskReply(kind=pb2.TaskReply.IDLE, retry_after_s=1)
        return pb2.TaskReply(
            kind=pb2.TaskReply.TRAIN, plan_toml=self.plan.to_toml(), plan_sha256=self.plan.sha256, round=ROUND,
            base_sha256=self.base_sha256, task=str(self.plan.task), deadline_unix=time.time() + 600,
        )

    def GetWeights(self, request, context) -> Iterator[pb2.StreamPart]:  # noqa: N802
        self.calls.append("GetWeights")
        binding = StreamBinding(self.plan.sha256, request.round, self.base_sha256, transport.peer_name(context))
        yield from chunk_stream(encode_weights(self.global_weights), key=PAYLOAD_KEY, aad_fields=binding,
                                chunk_bytes=4096)

    def PutUpdate(self, request_iterator, context):  # noqa: N802
        self.calls.append("PutUpdate")
        size = len(encode_weights(self.global_weights))
        receiver = StreamReceiver(PAYLOAD_KEY, transport.peer_name(context), size, plan_sha256=self.plan.sha256,
                                  round=ROUND, base_sha256=self.base_sha256)
        header, plaintext = receiver.receive(request_iterator)
        if self.calls.count("PutUpdate") == 1:
            return pb2.UpdateReply(accepted=False, reason="chunk 0 is broken (sha256 mismatch)", resend=True)
        self.update = header, decode_weights(plaintext, weights_spec(self.global_weights))
        self.done.set()
        return pb2.UpdateReply(accepted=True)

    def ReportMetrics(self, request, context):  # noqa: N802
        self.calls.append("ReportMetrics")
        self.reports.append(request)
        self.done.set()
        return pb2.MetricsReply(accepted=True)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bundle(ca: pki.CertificateAuthority, port: int, name: str = "site-a") -> EnrollmentBundle:
    key = pki.generate_key()
    cert = pki.issue_certificate(ca, pki.make_csr(name, key), name, "trainer", 1)
    return EnrollmentBundle(
        site=name, role=pki.certificate_role(cert), coordinator_address=f"127.0.0.1:{port}", ca_cert_pem=ca.cert_pem,
        cert_pem=cert, key_pem=pki.private_key_pem(key), release_public_keys=(generate_key_pair()[1],),
        payload_key=PAYLOAD_KEY,
    )


def _serve(ca: pki.CertificateAuthority, servicer: FakeCoordinator, port: int) -> grpc.Server:
    server_key, server_cert = pki.issue_server_certificate(ca, f"127.0.0.1:{port}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    transport.add_coordinator_servicer(server, servicer, lambda fingerprint, name, method: None)
    assert server.add_secure_port(f"127.0.0.1:{port}", transport.server_credentials(ca.cert_pem, server_cert,
                                                                                   server_key)) == port
    server.start()
    return server


def _run_site(site: Site) -> threading.Thread:
    thread = threading.Thread(target=site.run, name="test-site", daemon=True)
    thread.start()
    return thread


def _first_report(ca: pki.CertificateAuthority, coordinator: FakeCoordinator, policy: SitePolicy,
                  state_dir: Path) -> pb2.MetricsReport:
    """Run a site against `coordinator` until it sends its one report (a refusal, in the tests that use this)."""
    port = _free_port()
    server = _serve(ca, coordinator, port)
    stop = threading.Event()
    thread = _run_site(Site(_bundle(ca, port), policy, state_dir, stop=stop))
    try:
        assert coordinator.done.wait(30), f"no report; calls: {coordinator.calls}"
    finally:
        stop.set()
        thread.join(10)
        server.stop(grace=None)
    (report,) = coordinator.reports
    return report


def test_site_waits_for_the_coordinator_trains_resends_and_shares_only_aggregates(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    plan = plan_for("stroke-dwi-adc", local_epochs=2, strategy="fedprox")
    broken = tmp_path / "broken.csv"
    broken.write_text("case_id,dwi,adc,mask\nunreadable,nowhere_dwi.nii.gz,nowhere_adc.nii.gz,mask.nii.gz\n")
    policy = SitePolicy(role="train", datasets=(PolicyDataset("local", "synthetic:2:seed=1:site=4"),
                                                PolicyDataset("archive", str(broken))),
                        approved_plans=(plan.sha256,))
    port = _free_port()
    stop = threading.Event()
    site = Site(_bundle(ca, port), policy, tmp_path / "state", backoff=Backoff(0.2, 0.5), stop=stop)
    thread = _run_site(site)
    time.sleep(1.0)  # the coordinator is not up yet: the site keeps retrying
    assert thread.is_alive()
    coordinator = FakeCoordinator(plan)
    server = _serve(ca, coordinator, port)
    try:
        assert coordinator.done.wait(120), f"no update; calls: {coordinator.calls}"
        time.sleep(0.5)  # the IDLE round trip that follows
    finally:
        stop.set()
        thread.join(10)
        server.stop(grace=None)
    assert not thread.is_alive()
    assert coordinator.hellos[0].protocol_version == transport.PROTOCOL_VERSION
    assert coordinator.hellos[0].role == "trainer" and coordinator.hellos[0].fedlesion_version
    assert coordinator.calls[:5] == ["Hello", "GetTask", "GetWeights", "PutUpdate", "PutUpdate"]
    assert set(coordinator.calls[5:]) <= {"GetTask"}  # done: nothing run twice
    assert coordinator.heartbeats and not coordinator.reports
    header, weights = coordinator.update
    assert header.num_cases == 1  # two synthetic cases: one trains, one is held out
    metrics = dict(header.metrics)
    assert set(metrics) <= set(SHARED_METRICS)
    assert metrics["n_skipped_cases"] == 1 and metrics["local_epochs"] == 2 and metrics["n_val_cases"] == 1
    assert np.isfinite(metrics["train_loss"])
    # A mean over one validation case is that case's own value: the default policy lets only the count leave.
    assert not set(metrics) & {"val_dice", "val_avd_ml", "val_lf1"} and not header.HasField("threshold_dice")
    moved = [name for name in weights if not np.array_equal(weights[name], coordinator.global_weights[name])]
    assert moved, "the update must be trained weights, not the global ones"


@pytest.mark.parametrize("pinned, approved, reason", [
    (None, "other", "is not approved by the site's policy"),
    ("pinned", None, "which the site approved on first sight"),
])
def test_unapproved_plan_is_refused_and_the_coordinator_told_why(
    ca: pki.CertificateAuthority, tmp_path: Path, pinned: str | None, approved: str | None, reason: str
) -> None:
    plan, other = plan_for("stroke-dwi-adc"), plan_for("stroke-dwi-adc", local_epochs=2)
    if pinned:
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / PINNED_PLAN_FILE).write_text(other.sha256 + "\n")
    policy = SitePolicy(role="train", datasets=(PolicyDataset("local", "synthetic:2"),),
                        approved_plans=(other.sha256,) if approved else (), approve_first_sight=pinned is not None)
    coordinator = FakeCoordinator(plan)
    report = _first_report(ca, coordinator, policy, tmp_path / "state")
    assert (report.kind, report.plan_sha256, report.round) == ("refused", plan.sha256, ROUND)
    assert reason in report.reason and plan.sha256 in report.reason
    assert "GetWeights" not in coordinator.calls and coordinator.update is None


def test_keygen_writes_a_private_key_and_a_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "keygen", "--out", str(tmp_path / "keys"), "--name", "hospital-a"]) == 0
    key, csr = tmp_path / "keys" / "site.key", tmp_path / "keys" / "site.csr"
    assert key.stat().st_mode & 0o777 == 0o600 and str(key) in capsys.readouterr().out
    ca = pki.create_ca()
    cert = pki.issue_certificate(ca, csr.read_bytes(), "hospital-a", "trainer", 30)
    assert pki.key_matches_certificate(key.read_bytes(), cert)
    assert main(["site", "keygen", "--out", str(tmp_path / "keys")]) == 2  # never overwrites a site's key
    assert "site.key" in capsys.readouterr().err


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial_s=1.0, maximum_s=8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, nominal in zip(delays, (1, 2, 4, 8, 8, 8)):
        assert 0.8 * nominal <= delay <= nominal
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_site_command_refuses_a_policy_wider_than_the_certificate(
    ca: pki.CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = pki.generate_key()
    cert = pki.issue_certificate(ca, pki.make_csr("x", key), "ward", "evaluator", 1)
    bundle = dataclasses.replace(_bundle(ca, 1), site="ward", role=pki.certificate_role(cert), cert_pem=cert,
                                 key_pem=pki.private_key_pem(key))
    bundle.write(tmp_path / "ward.bundle")
    policy = SitePolicy(role="train", datasets=(PolicyDataset("local", "synthetic:2"),), approve_first_sight=True)
    (tmp_path / "policy.toml").write_text(policy.to_toml())
    assert main(["site", "--bundle", str(tmp_path / "ward.bundle"), "--policy", str(tmp_path / "policy.toml")]) == 2
    err = capsys.readouterr().err
    assert "needs a trainer certificate; this site's certificate has role evaluator" in err and err.count("\n") == 1


class SwappedWeightsCoordinator(FakeCoordinator):
    """Announces one base sha256 but streams other weights (bound to that base, so they decrypt): a coordinator bug
    or a swapped file that the site must not train on."""

    def GetWeights(self, request, context) -> Iterator[pb2.StreamPart]:  # noqa: N802
        self.calls.append("GetWeights")
        other = {name: (value + 1).astype(value.dtype) for name, value in self.global_weights.items()}
        binding = StreamBinding(self.plan.sha256, request.round, self.base_sha256, transport.peer_name(context))
        yield from chunk_stream(encode_weights(other), key=PAYLOAD_KEY, aad_fields=binding, chunk_bytes=4096)


def test_global_weights_other_than_the_tasks_base_are_refused_and_reported(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    plan = plan_for("stroke-dwi-adc")
    policy = SitePolicy(role="train", datasets=(PolicyDataset("local", "synthetic:2:seed=1"),),
                        approved_plans=(plan.sha256,))
    coordinator = SwappedWeightsCoordinator(plan)
    report = _first_report(ca, coordinator, policy, tmp_path / "state")
    assert (report.kind, report.round) == ("refused", ROUND)
    assert "do not match the task's base sha256" in report.reason
    assert "GetWeights" in coordinator.calls and "PutUpdate" not in coordinator.calls and coordinator.update is None


class RecordingTrainer:
    """A trainer on a conv + batch norm network that records the weights each round starts from and moves every
    tensor by one."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.BatchNorm3d(1))
        self.started_from: list[dict[str, np.ndarray]] = []
        self.first_epochs: list[int] = []

    def start_round(self, first_epoch: int) -> None:
        self.first_epochs.append(first_epoch)

    def train(self, weights, epochs, *, global_weights=None, prox_mu=0.0) -> LocalUpdate:
        self.started_from.append({name: np.array(value) for name, value in weights.items()})
        return LocalUpdate({name: (value + 1).astype(value.dtype) for name, value in weights.items()}, 1,
                           {"train_loss": 0.5})

    def evaluate(self, **_: object) -> dict[str, float]:
        return {}


def test_a_fedbn_site_trains_with_its_own_normalization_layers_across_rounds_and_restarts(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    def train_round(plan: FederatedPlan, site: Site, trainer: RecordingTrainer, round_: int, value: float) -> None:
        global_weights = {name: np.full_like(tensor.detach().numpy(), value)
                          for name, tensor in network_weights(trainer.model).items()}
        site._global_weights = lambda task, _: global_weights  # what the coordinator streams: all `value`
        site._upload = lambda task, update: None
        task = pb2.TaskReply(plan_sha256=plan.sha256, round=round_, base_sha256="b" * 64)
        site._train(task, plan, _Prepared(plan.sha256, trainer, 0))

    def site_for(plan: FederatedPlan) -> Site:
        policy = SitePolicy(role="train", datasets=(PolicyDataset("local", "synthetic:2"),),
                            approved_plans=(plan.sha256,))
        return Site(_bundle(ca, 1), policy, tmp_path / "state")

    fedbn, trainer = plan_for("stroke-dwi-adc", network="tiny", strategy="fedbn"), RecordingTrainer()
    norm = {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert normalization_weight_names(trainer.model) == norm
    site = site_for(fedbn)
    train_round(fedbn, site, trainer, 1, 5.0)  # no local layers yet: the global ones
    train_round(fedbn, site, trainer, 2, 7.0)
    first, second = trainer.started_from
    assert all(np.all(value == 5) for value in first.values())
    assert all(np.all(second[name] == (6 if name in norm else 7)) for name in second)  # round 1's own layers
    train_round(fedbn, site_for(fedbn), trainer, 3, 9.0)  # a restarted site: its layers come from its state folder
    assert all(np.all(trainer.started_from[-1][name] == (7 if name in norm else 9)) for name in norm | {"0.weight"})
    fedavg = plan_for("stroke-dwi-adc", network="tiny")
    train_round(fedavg, site_for(fedavg), trainer, 1, 3.0)  # FedAvg: the global weights as they come
    assert all(np.all(value == 3) for value in trainer.started_from[-1].values())
    assert trainer.first_epochs == [0, 1, 2, 0]  # each round at its place on the schedule, a restart included


def test_the_normalization_layers_of_the_plans_network_are_found_by_module_type() -> None:
    plan = plan_for("stroke-dwi-adc", network="tiny", strategy="fedbn")
    network = build_network(plan.training.in_channels, 1, plan.training.network)
    names = normalization_weight_names(network)
    assert names and names < set(network_weights(network))
    assert all(".norm" in name for name in names) and any(name.endswith("running_var") for name in names)
    assert not any(name.endswith("conv.weight") for name in names)


class CandidateCoordinator(FakeCoordinator):
    """EVALUATE round 4 of the plan with a candidate package (a sigmoid of the first channel, signed by a key no
    bundle holds, as a round key is) until a report arrives; `candidate_round` is what the manifest claims."""

    def __init__(self, plan: FederatedPlan, folder: Path, candidate_round: int = ROUND + 1) -> None:
        super().__init__(plan)
        manifest = default_manifest(plan.task, 4, plan_sha256=plan.sha256, demo=False, description="candidate",
                                    federated_round=candidate_round)
        self.package = build_package(folder, first_channel_sigmoid(channels=2), manifest, load_private_key(generate_key_pair()[0]))
        self.onnx = (self.package / "model.onnx").read_bytes()

    def GetTask(self, request, context):  # noqa: N802
        self.calls.append("GetTask")
        if self.reports:
            return pb2.TaskReply(kind=pb2.TaskReply.IDLE, retry_after_s=1)
        return pb2.TaskReply(kind=pb2.TaskReply.EVALUATE, plan_toml=self.plan.to_toml(), plan_sha256=self.plan.sha256,
                             round=ROUND + 1, base_sha256=sha256_hex(self.onnx), task=str(self.plan.task),
                             max_update_bytes=len(self.onnx))

    def GetCandidate(self, request, context) -> Iterator[pb2.StreamPart]:  # noqa: N802
        self.calls.append("GetCandidate")
        header = pb2.ModelHeader(version=4, task=str(self.plan.task),
                                 manifest_json=(self.package / "manifest.json").read_bytes(),
                                 manifest_sig=(self.package / "manifest.sig").read_bytes())
        binding = StreamBinding(self.plan.sha256, request.round, sha256_hex(self.onnx), transport.peer_name(context))
        yield from chunk_stream(self.onnx, key=PAYLOAD_KEY, aad_fields=binding, header_fields={"candidate": header},
                                chunk_bytes=4096)


def test_an_evaluator_site_scores_the_candidate_with_the_engine_and_reports_only_means_and_binned_counts(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    plan = plan_for("stroke-dwi-adc")
    cases = write_labelled_cases(tmp_path / "cases", 5)
    policy = SitePolicy(role="evaluate", datasets=(PolicyDataset("local", str(cases)),), approved_plans=(plan.sha256,))
    coordinator = CandidateCoordinator(plan, tmp_path / "candidate")
    report = _first_report(ca, coordinator, policy, tmp_path / "state")
    assert coordinator.hellos[0].role == "evaluator" and "GetWeights" not in coordinator.calls
    assert (report.kind, report.round, report.num_cases, report.reason) == ("evaluate", ROUND + 1, 5, "")
    assert set(report.values) == {"val_dice", "val_avd_ml", "val_lf1", "n_skipped_cases"}
    assert 0.0 <= report.values["val_dice"] <= 1.0 and report.values["n_skipped_cases"] == 0
    assert {h.metric for h in report.histograms} == {"val_dice", "val_avd_ml", "val_lf1"}
    for histogram in report.histograms:  # five cases: one bin of five, edges around the values
        assert list(histogram.counts) == [5] and len(histogram.edges) == 2
    dice = next(h for h in report.histograms if h.metric == "val_dice")
    assert dice.edges[0] <= report.values["val_dice"] < dice.edges[1]


def test_an_evaluator_site_refuses_a_candidate_of_another_round(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    plan = plan_for("stroke-dwi-adc")
    policy = SitePolicy(role="evaluate", datasets=(PolicyDataset("local", "synthetic:2"),),
                        approved_plans=(plan.sha256,))
    coordinator = CandidateCoordinator(plan, tmp_path / "candidate", candidate_round=ROUND)
    report = _first_report(ca, coordinator, policy, tmp_path / "state")
    assert (report.kind, report.round) == ("refused", ROUND + 1)
    assert f"the candidate was refused: the candidate is round {ROUND} of plan" in report.reason
