"""Issue 11's process-level scenario: a coordinator and three trainer sites as real `fedlesion` processes on
loopback (tiny network, FedAvg, quorum 2). A site killed with SIGKILL mid-round leaves its round to close at the
deadline with the quorum and rejoins the next round on restart; the coordinator killed with SIGKILL mid-round
resumes that round on restart, and its versions strictly increase without a gap or a repeat; a site revoked while
serve runs is refused at once; a released candidate is pulled, verified and served by a node that cannot import
torch, while the newer unreleased candidate never reaches it. A limited center's evaluator site, which cannot import
torch either, scores each candidate with the node's engine: its means and binned counts appear in status and, with
the release, in the manifest. The coordinator's per-round report (CSV, PNG) and its Prometheus /metrics show the
rounds. Assertions read `coordinator status --json`, the coordinator's and the node's files, HTTP and gRPC answers,
not log wording."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc as pb2_grpc
from models.federation.enrollment import EnrollmentBundle
from models.federation.transport import channel
from fedlesion.cli import main
from models.manifest import Task, parse_manifest
from tests.conftest import REPO_ROOT, WITHOUT_TORCH, write_labelled_cases
from training.federation import admin
from training.federation.plan import plan_for
from training.federation.policy import PolicyDataset, SitePolicy
from training.synthetic import generate_case, write_nifti_case

pytestmark = pytest.mark.slow

TASK = Task.STROKE_DWI_ADC
# Each site its own synthetic profile; two cases: one trains, one is held out for validation.
SITE_DATA = {
    "site-a": "synthetic:2:seed=1:site=1",
    "site-b": "synthetic:2:seed=2:site=5",
    "site-c": "synthetic:2:seed=3:site=9",
}
KILLED_SITE, REVOKED_SITE = "site-c", "site-b"
EVALUATOR, EVALUATOR_CASES = "site-e", 5  # a limited center: evaluates, never trains; enough cases for aggregates
DEADLINE_S = 45.0  # a round at two or three sites (imports, data, training, validation): 10-20 s on 2 cores, 50 s for
# the restarted site when another job shared them
WAIT_S = 150.0

# A limited center's node pulls (auto_install) and segments a case with what it serves.
_NODE_WITHOUT_TORCH = WITHOUT_TORCH + """
from fedlesion.cli import main
config, case, out = sys.argv[1:]
code = main(["--config", config, "model", "pull"])
sys.exit(code or main(["--config", config, "segment", case, "--out", out, "--task", "stroke-dwi-adc"]))
"""
# `fedlesion ARGS…` as a limited center runs it.
_FEDLESION_WITHOUT_TORCH = WITHOUT_TORCH + """
from fedlesion.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Processes:
    """`fedlesion` subprocesses with their logs; everything still running is killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1",
                        OMP_NUM_THREADS="1")  # five processes on two cores: no thread oversubscription
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def start(self, name: str, *args: str, torch_free: bool = False) -> None:
        self.starts[name] = self.starts.get(name, 0) + 1
        log = (self.root / f"{name}.{self.starts[name]}.log").open("wb")
        command = ["-c", _FEDLESION_WITHOUT_TORCH] if torch_free else ["-m", "fedlesion"]
        self.running[name] = subprocess.Popen([sys.executable, *command, *args], cwd=self.root,
                                              env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill9(self, name: str) -> None:
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def assert_alive(self) -> None:
        for name, process in self.running.items():
            assert process.poll() is None, f"{name} exited {process.returncode}:\n{self.tail(name)}"

    def tail(self, name: str) -> str:
        return (self.root / f"{name}.{self.starts[name]}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for process in self.running.values():
            process.kill()
            process.wait(timeout=30)
        self.running.clear()


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status(directory: Path) -> dict[str, Any]:
    """`fedlesion coordinator status --json`, as an operator reads it while serve runs."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["coordinator", "status", "--dir", str(directory), "--json"]) == 0
    return json.loads(printed.getvalue())


def wait_for(processes: Processes, condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        processes.assert_alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def report_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def round_row(directory: Path, number: int) -> dict[str, Any] | None:
    return next((row for row in status(directory)["rounds"] if row["round"] == number), None)


def test_sites_and_coordinator_survive_kills_a_revoked_site_is_refused_and_a_torch_free_node_serves_the_release(
    tmp_path: Path, processes: Processes
) -> None:
    coordinator = tmp_path / "coordinator"
    admin.init(coordinator, f"127.0.0.1:{free_port()}")
    bundles = {name: tmp_path / name / "site.bundle" for name in SITE_DATA}
    plan = plan_for(TASK, network="tiny", rounds=2, quorum=2, deadline_s=DEADLINE_S)
    (tmp_path / "plan.toml").write_text(plan.to_toml())
    for name, spec in SITE_DATA.items():
        (tmp_path / name).mkdir()
        admin.enroll(coordinator, name, "trainer", bundles[name])
        policy = SitePolicy(role="train", datasets=(PolicyDataset("local", spec),), approved_plans=(plan.sha256,),
                            min_cases_per_mean=1)  # synthetic cases: a mean over one validation case may leave
        (tmp_path / name / "policy.toml").write_text(policy.to_toml())
    node_bundle = tmp_path / "node.bundle"
    admin.enroll(coordinator, "node-limited", "node", node_bundle)
    (tmp_path / EVALUATOR).mkdir()
    admin.enroll(coordinator, EVALUATOR, "evaluator", tmp_path / EVALUATOR / "site.bundle")
    cases = write_labelled_cases(tmp_path / EVALUATOR / "cases", EVALUATOR_CASES)
    policy = SitePolicy(role="evaluate", datasets=(PolicyDataset("local", str(cases)),), approved_plans=(plan.sha256,))
    (tmp_path / EVALUATOR / "policy.toml").write_text(policy.to_toml())

    def start_site(name: str) -> None:
        processes.start(name, "site", "--bundle", str(bundles[name]), "--policy", str(tmp_path / name / "policy.toml"))

    metrics_port = free_port()

    def serve() -> None:
        processes.start("coordinator", "coordinator", "serve", "--dir", str(coordinator), "--plan",
                        str(tmp_path / "plan.toml"), "--metrics-port", str(metrics_port))

    serve()
    for name in SITE_DATA:
        start_site(name)
    processes.start(EVALUATOR, "site", "--bundle", str(tmp_path / EVALUATOR / "site.bundle"), "--policy",
                    str(tmp_path / EVALUATOR / "policy.toml"), torch_free=True)

    # Round 1: once all three sites are in it, one is killed. The others' updates are accepted, and the coordinator,
    # killed while the round waits for the dead site, is restarted: it resumes the round with those updates, and the
    # round closes at its deadline with the quorum.
    wait_for(processes, lambda: (row := round_row(coordinator, 1)) and set(row["invited"]) == set(SITE_DATA),
             "all three sites in round 1")
    processes.kill9(KILLED_SITE)
    alive = sorted(set(SITE_DATA) - {KILLED_SITE})
    wait_for(processes, lambda: sorted(round_row(coordinator, 1)["contributors"]) == alive, "the live sites' updates")
    processes.kill9("coordinator")
    killed_in = round_row(coordinator, 1)
    serve()
    state = admin.CoordinatorDir(coordinator).state()
    try:
        deadline = state.round(plan.sha256, 1).deadline
    finally:
        state.close()
    time.sleep(max(0.0, deadline - time.time()))
    start_site(KILLED_SITE)  # round 1 is past its deadline: the restarted site joins round 2
    wait_for(processes, lambda: (row := round_row(coordinator, 1)) and row["state"] == "closed", "round 1 to close")
    first = round_row(coordinator, 1)
    assert killed_in["state"] == "open" and first["attempt"] == killed_in["attempt"] == 1  # resumed, not retried
    assert set(first["invited"]) == set(SITE_DATA) and first["version"] == 1
    assert sorted(first["contributors"]) == alive and first["metrics"].keys() == set(alive)

    # Round 2: the restarted site is back; the round closes as soon as all three have answered.
    wait_for(processes, lambda: (row := round_row(coordinator, 2)) and row["state"] == "closed", "round 2 to close")
    second = round_row(coordinator, 2)
    assert sorted(second["contributors"]) == sorted(SITE_DATA) and second["version"] == 2, second

    # The operators' view: each round's report, rewritten by the restarted coordinator too, and /metrics.
    report = admin.CoordinatorDir(coordinator).rounds(plan.sha256)
    rows = wait_for(processes, lambda: (rows := report_rows(report / "metrics.csv")) and len(rows) == 7 and rows,
                    "the report of both rounds, the evaluator's scores included")
    assert sorted((r["round"], r["site"], r["role"]) for r in rows) == sorted(
        [("1", name, "trainer") for name in alive] + [("2", name, "trainer") for name in SITE_DATA]
        + [("1", EVALUATOR, "evaluator"), ("2", EVALUATOR, "evaluator")])
    assert all(0 <= float(r["val_dice"]) <= 1 for r in rows)
    assert (report / "val_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        scraped = response.read().decode()
    assert "fedlesion_federation_rounds_closed 2" in scraped and 'fedlesion_federation_sites_alive{role="trainer"} 3' \
        in scraped and 'fedlesion_federation_sites_alive{role="evaluator"} 1' in scraped

    final = status(coordinator)
    assert [(v["version"], v["state"]) for v in final["versions"]] == [(1, "candidate"), (2, "candidate")]
    assert sorted(p.name for p in (coordinator / "versions" / TASK.value).iterdir()) == ["1", "2"]
    for version in (1, 2):
        manifest = parse_manifest((coordinator / "versions" / TASK.value / str(version) / "manifest.json").read_bytes())
        assert manifest.training.federated_round == version and manifest.training.plan_sha256 == plan.sha256
    assert manifest.training.sites_contributed == 3

    # Revoked while serve runs: the site's next call is refused by the running coordinator, with the reason.
    assert main(["coordinator", "revoke", REVOKED_SITE, "--dir", str(coordinator), "--reason", "left"]) == 0
    revoked = EnrollmentBundle.read(bundles[REVOKED_SITE])
    with channel(revoked) as revoked_channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb2_grpc.CoordinatorStub(revoked_channel).Heartbeat(pb2.HeartbeatRequest(state="idle"), timeout=30)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED and "revoked" in refused.value.details()
    assert next(s for s in status(coordinator)["sites"] if s["name"] == REVOKED_SITE)["state"] == "revoked"

    # The evaluator scored version 1 with the engine: means and bins of ≥ 5 cases, never a case's own value.
    scored = wait_for(processes, lambda: round_row(coordinator, 1)["evaluations"].get(EVALUATOR),
                      "the evaluator's scores of version 1")
    assert scored["cases"] == EVALUATOR_CASES and 0.0 <= scored["val_dice"] <= 1.0, scored
    assert scored["histograms"]["val_dice"]["counts"] == [EVALUATOR_CASES]
    assert EVALUATOR not in first["metrics"] and EVALUATOR not in first["invited"]  # it never trains

    # A node without torch: version 1 is released, version 2 (newer) stays a candidate and never reaches the node.
    node_dir = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{node_dir}"\n[tasks]\nms = false\n'
                      f'[models]\nenrollment_bundle = "{node_bundle}"\nauto_install = true\n')
    case_dir = tmp_path / "case"
    write_nifti_case(generate_case("stroke", seed=5, size="small", pattern="single"), case_dir)
    registry = node_dir / "registry" / TASK.value
    assert main(["coordinator", "release", TASK.value, "1", "--dir", str(coordinator), "--by", "scenario"]) == 0
    assert [(v["version"], v["state"]) for v in status(coordinator)["versions"]] == [(1, "released"), (2, "candidate")]
    released = parse_manifest((coordinator / "versions" / TASK.value / "1" / "manifest.json").read_bytes())
    evaluated = released.training.site_metrics[EVALUATOR]
    assert evaluated["evaluated_cases"] == EVALUATOR_CASES and evaluated["val_dice"] == scored["val_dice"]
    assert set(released.training.site_metrics) == {*alive, EVALUATOR}  # beside round 1's two trainers
    out = tmp_path / "segmented"
    node = subprocess.run([sys.executable, "-c", _NODE_WITHOUT_TORCH, str(config), str(case_dir), str(out)],
                          env=processes.env, capture_output=True, text=True, timeout=120)
    assert node.returncode == 0, node.stderr[-3000:]
    assert sorted(p.name for p in registry.iterdir() if p.name.isdigit()) == ["1"]  # never the candidate
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["version"] == 1 and not report["model"]["demo"]
    assert report["model"]["federated_round"] == 1
    processes.assert_alive()
