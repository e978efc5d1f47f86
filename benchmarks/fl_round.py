"""Overhead of one federated round: the real coordinator, three sites on loopback, local training a no-op.

The coordinator is `training.federation.coordinator.Coordinator` (the round loop and servicer `coordinator serve`
runs) in its own process, on a directory made with `coordinator init` and three `coordinator enroll --generate`
bundles, with the issue's reference network: the default `NetworkPlan()`'s DynUNet (5.7 M parameters, 22.8 MB in
fp32; `--network cpu-plan` takes the default CPU plan's 1.4 M-parameter one instead). The three sites are processes
of their own, as separate hospitals are (threads of one process would share one GIL and time each other's hashing and
encryption), that speak the real protocol over mTLS (`models.federation.transport.channel`, encrypted chunk streams
of `models.federation.wire`) as `fedlesion site` does, including its polling (an IDLE reply's `retry_after_s`), but
their local training is a fixed no-op: the global weights plus DELTA on every float tensor. Each site sends its
trace of each round to this process as the round ends.

Prints, first line first:
- `round overhead`: round opened → aggregate committed (the candidate's version row and the round closed in one
  transaction), median over the rounds, export excluded; then its parts (median): the sites' wait for their next
  GetTask poll, global weights down, the no-op and the update up, and the close (decode, aggregate, commit).
- bytes each site sent and received per round (every gRPC message's serialized size; TLS and HTTP/2 framing not
  counted) as a multiple of the fp32 model size (parameters and buffers, each counted once).
- export + sign: the last round alone runs the real export (ONNX with export.py's parity check, manifest, round-key
  signature); the other rounds record an empty package folder, so that the round figures hold no export.
- the coordinator process's peak RSS (`ru_maxrss`) after the rounds and after the export.

Goals: overhead < 0.5 s (Flower ≈ 10 s), ≤ 2.1× the model size per site and round; the whole run < 4 min on 2 cores.
Progress goes to stderr.

    .venv/bin/python benchmarks/fl_round.py [--rounds 8] [--network reference|cpu-plan] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from models.federation import federation_pb2 as pb2  # noqa: E402
from models.federation import federation_pb2_grpc  # noqa: E402
from models.federation.enrollment import EnrollmentBundle  # noqa: E402
from models.federation.transport import PROTOCOL_VERSION, channel  # noqa: E402
from models.federation.wire import (  # noqa: E402
    StreamBinding,
    StreamReceiver,
    chunk_stream,
    decode_weights,
    encode_weights,
    keep_freed_buffers,
)
from models.manifest import Task  # noqa: E402

SITES = ("site-a", "site-b", "site-c")
# The no-op's "training": every float tensor moves by this much. Small on purpose: the default network's logits
# grow about tenfold when 1e-3 is added to every weight of its initialisation, and a few rounds of that fail the
# export's parity check.
DELTA = np.float32(1e-6)
IDLE_RETRY_S = 5.0  # as training.federation.site: an IDLE reply without retry_after_s
RPC_TIMEOUT_S = 60.0


def peak_rss_mib() -> float:
    """This process's high-water RSS (ru_maxrss is KiB on Linux, bytes on macOS)."""
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the coordinator process -----------------------------------------------------------------------------------------
def run_coordinator(directory: Path, plan_toml: str, conn: Connection) -> None:
    """The real Coordinator, with `_export` a stub before the last round; sends each round's times, then the peaks."""
    logging.basicConfig(filename=directory / "coordinator.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from training.federation.coordinator import Coordinator
    from training.federation.plan import FederatedPlan

    plan = FederatedPlan.from_toml(plan_toml)
    finished = threading.Event()

    class TimedCoordinator(Coordinator):
        export_s = 0.0
        rss_before_export_mib = 0.0

        def _close(self, current: Any) -> None:
            super()._close(current)
            committed = time.time()
            conn.send(("round", current.round, current.opened_at, committed, self.export_s, time.process_time()))
            if current.round == self.plan.rounds:
                finished.set()

        def _export(self, current: Any, weights: Any, updates: Any, version: int, round_dir: Path) -> Path:
            if current.round < self.plan.rounds:
                target = self.state.versions_dir(current.task) / str(version)
                target.mkdir(parents=True)
                self.export_s = 0.0
                return target
            self.rss_before_export_mib = peak_rss_mib()
            started = time.perf_counter()
            target = super()._export(current, weights, updates, version, round_dir)
            self.export_s = time.perf_counter() - started
            return target

    coordinator = TimedCoordinator(directory, plan)
    coordinator.start()
    conn.send(("listening",))
    finished.wait()
    conn.send(("peaks", coordinator.rss_before_export_mib, peak_rss_mib()))
    coordinator.stop()


# -- the sites -------------------------------------------------------------------------------------------------------
@dataclass
class RoundTrace:
    """One site's view of one round: when it got the task, the weights, the update's answer; bytes each way; the
    process's CPU seconds so far when the update was accepted."""

    task_at: float = 0.0
    weights_at: float = 0.0
    accepted_at: float = 0.0
    sent: int = 0
    received: int = 0
    cpu_s: float = 0.0


def run_site(bundle: EnrollmentBundle, conn: Connection) -> None:
    """One site's process: sends ("trace", round, RoundTrace fields, wire elements) per round, or ("error", text)."""
    try:
        NoOpSite(bundle, conn).run()
    except BaseException as error:  # noqa: BLE001 - reported by the main process
        conn.send(("error", f"{bundle.site}: {error!r}"))


@dataclass
class NoOpSite:
    """A site that speaks the protocol as `fedlesion site` does but returns the global weights plus DELTA."""

    bundle: EnrollmentBundle
    conn: Connection
    wire_elements: int = 0  # tensor elements of the global weights as they travel

    def run(self) -> None:
        keep_freed_buffers()  # as `fedlesion site` does
        with channel(self.bundle) as grpc_channel:
            self._loop(federation_pb2_grpc.CoordinatorStub(grpc_channel))

    def _loop(self, stub: federation_pb2_grpc.CoordinatorStub) -> None:
        stub.Hello(pb2.HelloRequest(protocol_version=PROTOCOL_VERSION, role="trainer"), timeout=RPC_TIMEOUT_S)
        done: set[int] = set()
        while True:  # until the main process ends this one
            request = pb2.TaskRequest(protocol_version=PROTOCOL_VERSION)
            task = stub.GetTask(request, timeout=RPC_TIMEOUT_S)
            if task.kind != pb2.TaskReply.TRAIN or task.round in done:
                time.sleep(float(task.retry_after_s or IDLE_RETRY_S))
                continue
            trace = RoundTrace(task_at=time.time(), sent=request.ByteSize(), received=task.ByteSize())
            self._train(stub, task, trace)
            done.add(task.round)
            self.conn.send(("trace", task.round, dataclasses.asdict(trace), self.wire_elements))

    def _train(self, stub: federation_pb2_grpc.CoordinatorStub, task: pb2.TaskReply, trace: RoundTrace) -> None:
        request = pb2.WeightsRequest(plan_sha256=task.plan_sha256, round=task.round)
        trace.sent += request.ByteSize()
        receiver = StreamReceiver(self.bundle.payload_key, self.bundle.site, task.max_update_bytes,
                                  plan_sha256=task.plan_sha256, round=task.round, base_sha256=task.base_sha256)
        _, plaintext = receiver.receive(_counted(stub.GetWeights(request, timeout=RPC_TIMEOUT_S), trace, "received"))
        trace.weights_at = time.time()
        weights = decode_weights(plaintext)  # writable copies, as the real site's: the no-op moves them in place
        for array in weights.values():
            if array.dtype == np.float32:
                array += DELTA
        self.wire_elements = sum(int(array.size) for array in weights.values())
        binding = StreamBinding(task.plan_sha256, task.round, task.base_sha256, self.bundle.site)
        parts = chunk_stream(encode_weights(weights), key=self.bundle.payload_key, aad_fields=binding,
                             header_fields={"num_cases": 1, "metrics": {"train_loss": 0.5}})
        reply = stub.PutUpdate(_counted(parts, trace, "sent"), timeout=RPC_TIMEOUT_S)
        trace.received += reply.ByteSize()
        if not reply.accepted:
            raise RuntimeError(f"{self.bundle.site}: update for round {task.round} refused: {reply.reason}")
        trace.accepted_at = time.time()
        trace.cpu_s = time.process_time()


def _counted(parts: Iterable[Any], trace: RoundTrace, direction: str) -> Iterator[Any]:
    for part in parts:
        setattr(trace, direction, getattr(trace, direction) + part.ByteSize())
        yield part


# -- the run ---------------------------------------------------------------------------------------------------------
def model_elements(plan: Any) -> int:
    """Parameters and buffers of the plan's network, each counted once (its fp32 size is 4 bytes each)."""
    from models.networks import build_network

    network = build_network(plan.training.in_channels, 1, plan.training.network)
    return sum(tensor.numel() for tensor in [*network.parameters(), *network.buffers()])


def enroll_sites(directory: Path, port: int) -> list[EnrollmentBundle]:
    from training.federation import admin

    admin.init(directory, f"127.0.0.1:{port}")
    return [admin.enroll(directory, name, "trainer", directory / f"{name}.bundle") for name in SITES]


def progress(text: str) -> None:
    print(f"\r{text:<78}", end="", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds to run; the last one also exports (default 8)")
    parser.add_argument("--network", choices=("reference", "cpu-plan"), default="reference",
                        help="reference: NetworkPlan()'s 5.7 M-parameter DynUNet (default); cpu-plan: the CPU plan's")
    parser.add_argument("--keep", type=Path, help="run in this new directory and keep it (coordinator.log)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the last round's export is timed apart)")

    from models.networks import NetworkPlan
    from training.federation.plan import plan_for

    started = time.perf_counter()
    plan = plan_for(Task.STROKE_DWI_ADC, network="default", rounds=args.rounds, quorum=len(SITES), deadline_s=120)
    if args.network == "reference":
        plan = dataclasses.replace(plan, training=dataclasses.replace(plan.training, network=NetworkPlan()))
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="fl_round-"))
    try:
        return run(plan, workdir, started)
    finally:
        print(file=sys.stderr, flush=True)
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(plan: Any, workdir: Path, started: float) -> int:
    directory = workdir / "coordinator"
    bundles = enroll_sites(directory, free_port())
    parent_conn, child_conn = multiprocessing.get_context("spawn").Pipe()
    coordinator = multiprocessing.get_context("spawn").Process(
        target=run_coordinator, args=(directory, plan.to_toml(), child_conn), name="coordinator")
    coordinator.start()
    progress("starting the coordinator (torch import, initial weights)")
    if not parent_conn.poll(120) or parent_conn.recv()[0] != "listening":
        raise RuntimeError("the coordinator did not start; see coordinator.log")

    site_conns, site_processes = {}, []
    for bundle in bundles:
        receiving, sending = multiprocessing.get_context("spawn").Pipe(duplex=False)
        site_conns[receiving] = bundle.site
        site_processes.append(multiprocessing.get_context("spawn").Process(
            target=run_site, args=(bundle, sending), name=bundle.site, daemon=True))
        site_processes[-1].start()
    traces: dict[str, dict[int, RoundTrace]] = {site: {} for site in site_conns.values()}
    wire_elements = 0
    rounds: dict[int, tuple[float, float, float, float]] = {}
    peaks: tuple[float, float] | None = None
    failure: str | None = None
    while peaks is None and failure is None and coordinator.is_alive():
        ready = multiprocessing.connection.wait([parent_conn, *site_conns], timeout=0.5)
        if not ready:
            progress(f"round {len(rounds) + 1}/{plan.rounds} open, {time.perf_counter() - started:.0f} s elapsed"
                     + (" (the last round exports)" if len(rounds) + 1 == plan.rounds else ""))
        for conn in ready:
            try:
                message = conn.recv()
            except EOFError:
                failure = f"{site_conns.get(conn, 'the coordinator')} ended unexpectedly"
                break
            if message[0] == "round":
                rounds[message[1]] = message[2:]
            elif message[0] == "peaks":
                peaks = message[1:]
            elif message[0] == "trace":
                traces[site_conns[conn]][message[1]] = RoundTrace(**message[2])
                wire_elements = message[3]
            elif message[0] == "error":
                failure = message[1]
    for process in site_processes:
        process.terminate()
        process.join(10)
    coordinator.join(30)
    if peaks is None or failure is not None:
        print(file=sys.stderr)
        print(f"failed after {len(rounds)} round(s): {failure or 'the coordinator stopped'}; "
              f"see {directory / 'coordinator.log'}", file=sys.stderr)
        return 1
    progress("done")
    print(file=sys.stderr, flush=True)
    report(plan, rounds, traces, wire_elements, peaks, model_elements(plan), time.perf_counter() - started)
    return 0


def report(plan: Any, rounds: dict[int, tuple[float, float, float, float]], traces: dict[str, dict[int, RoundTrace]],
           wire_elements: int, peaks: tuple[float, float], elements: int, wall_s: float) -> None:
    def median(values: Iterable[float]) -> float:
        return statistics.median(list(values))

    overhead, poll, down, up, close = [], [], [], [], []
    for number, (opened, committed, export_s, _) in sorted(rounds.items()):
        site_traces = [by_round[number] for by_round in traces.values()]
        overhead.append(committed - opened - export_s)
        poll.append(max(t.task_at for t in site_traces) - opened)
        down.append(max(t.weights_at - t.task_at for t in site_traces))
        up.append(max(t.accepted_at - t.weights_at for t in site_traces))
        close.append(committed - export_s - max(t.accepted_at for t in site_traces))
    export_s = rounds[plan.rounds][2]
    model_bytes = 4 * elements
    traffic = [(t.sent, t.received) for by_round in traces.values() for t in by_round.values()]
    total = [sent + received for sent, received in traffic]
    print(f"round overhead {median(overhead):.2f} s (median of {len(overhead)} rounds, range "
          f"{min(overhead):.2f}-{max(overhead):.2f} s; goal < 0.5 s, Flower ≈ 10 s)", flush=True)
    print(f"  of which (medians): waiting for the sites' next poll {median(poll):.2f} s, global weights down "
          f"{median(down):.2f} s, no-op + update up {median(up):.2f} s, close (decode, aggregate, commit) "
          f"{median(close):.2f} s", flush=True)
    # CPU seconds between one round's end and the next's (the first and the exporting last round left out): on 2
    # shared cores this moves less with other people's load than the wall-clock overhead does.
    steady = range(2, plan.rounds)
    coordinator_cpu = [rounds[n][3] - rounds[n - 1][3] for n in steady]
    sites_cpu = [sum(by_round[n].cpu_s - by_round[n - 1].cpu_s for by_round in traces.values()) for n in steady]
    print(f"  CPU per round (medians of rounds 2-{plan.rounds - 1}): coordinator {median(coordinator_cpu):.2f} s, "
          f"the {len(traces)} sites {median(sites_cpu):.2f} s", flush=True)
    print(f"bytes per site per round {median(total) / model_bytes:.2f}x the fp32 model ({model_bytes / 1e6:.2f} MB, "
          f"{elements:,} parameters and buffers): sent {median(s for s, _ in traffic) / model_bytes:.2f}x, received "
          f"{median(r for _, r in traffic) / model_bytes:.2f}x (goal <= 2.1x); the weights travel as "
          f"{wire_elements:,} tensor elements ({wire_elements / elements:.2f}x the model's)", flush=True)
    print(f"export + sign {export_s:.1f} s (ONNX export with the parity check, manifest, round-key signature; "
          f"the last round only)", flush=True)
    print(f"coordinator peak RSS {peaks[0]:.0f} MiB over the rounds, {peaks[1]:.0f} MiB with the export", flush=True)
    print(f"whole run {wall_s:.0f} s ({len(SITES)} sites, {plan.rounds} rounds, plan {plan.sha256[:12]})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
