"""Overhead of one federated round: the real coordinator, N sites on loopback (3 by default), local training a no-op.

The coordinator is `training.federation.coordinator.Coordinator` (the round loop and servicer `coordinator serve`
runs) in its own process, on a directory made with `coordinator init` and N `coordinator enroll --generate` bundles,
with the issue's reference network: the default `NetworkPlan()`'s DynUNet (5.7 M parameters, 22.8 MB in fp32;
`--network cpu-plan` takes the default CPU plan's 1.4 M-parameter one instead). By default each of the three sites is
a process of its own, as separate hospitals are (threads of one process would share one GIL and time each other's
hashing and encryption); `--sites 50` spreads 50 sites over `--site-processes` processes (default 3), a thread per
site, to load the coordinator as 50 hospitals would. Every site speaks the real protocol over its own mTLS channel
(`models.federation.transport.channel`, encrypted chunk streams of `models.federation.wire`) as `fedlesion site`
does, including its polling (an IDLE reply's `retry_after_s`), but its local training is a fixed no-op: the global
weights plus DELTA on every float tensor (made once per process and round: the sites of one process send the same
update, each encrypted with its own key). Each site sends its trace of each round to this process as the round ends.

Prints, first line first:
- `round time`: round opened → aggregate committed (the candidate's version row and the round closed in one
  transaction), median over the rounds, export excluded: the round's overhead, as the training is a no-op; then its
  parts (median): the last site's wait for its next GetTask poll, global weights down, the no-op and the update up
  (the slowest site each), and the close (screening, aggregate, commit).
- bytes each site sent and received per round (every gRPC message's serialized size; TLS and HTTP/2 framing not
  counted) as a multiple of the fp32 model size (parameters and buffers, each counted once).
- export + sign: the last round alone runs the real export (ONNX with export.py's parity check, manifest, round-key
  signature); the other rounds record an empty package folder, so that the round figures hold no export.
- the coordinator process's peak RSS (`ru_maxrss`) after the rounds and after the export.

Goals: with 3 sites overhead < 0.5 s (Flower ≈ 10 s), ≤ 2.1× the model size per site and round, the whole run < 4
min on 2 cores; with 50 sites a round < 10 s. Progress goes to stderr.

    .venv/bin/python benchmarks/fl_round.py [--rounds 8] [--sites 3] [--site-processes 3]
                                            [--network reference|cpu-plan] [--keep DIR]
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
from collections.abc import Callable, Iterable, Iterator
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


def run_sites(bundles: list[EnrollmentBundle], conn: Connection) -> None:
    """A process of sites, a thread each: sends ("trace", site, round, RoundTrace fields, wire elements) per site
    and round, or ("error", text)."""
    keep_freed_buffers()  # as `fedlesion site` does
    sending = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    def run(site: NoOpSite) -> None:
        try:
            site.run()
        except BaseException as error:  # noqa: BLE001 - reported by the main process
            send(("error", f"{site.bundle.site}: {error!r}"))

    updates = NoOpUpdates()
    threads = [threading.Thread(target=run, args=(NoOpSite(bundle, send, updates),), daemon=True)
               for bundle in bundles]
    for thread in threads:
        thread.start()
    for thread in threads:  # until the main process ends this one
        thread.join()


@dataclass
class NoOpUpdates:
    """The no-op's result, the global weights plus DELTA, encoded once per base for all the sites of a process."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    by_base: dict[str, tuple[bytes, int]] = field(default_factory=dict)

    def update(self, base_sha256: str, plaintext: memoryview) -> tuple[bytes, int]:
        """(the encoded update, tensor elements as they travel)."""
        with self.lock:
            if base_sha256 not in self.by_base:
                weights = decode_weights(plaintext)  # writable copies, as the real site's: moved in place
                for array in weights.values():
                    if array.dtype == np.float32:
                        array += DELTA
                self.by_base = {base_sha256: (encode_weights(weights), sum(int(a.size) for a in weights.values()))}
            return self.by_base[base_sha256]


@dataclass
class NoOpSite:
    """A site that speaks the protocol as `fedlesion site` does but returns the global weights plus DELTA."""

    bundle: EnrollmentBundle
    send: Callable[[tuple[Any, ...]], None]
    updates: NoOpUpdates
    wire_elements: int = 0  # tensor elements of the global weights as they travel

    def run(self) -> None:
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
            self.send(("trace", self.bundle.site, task.round, dataclasses.asdict(trace), self.wire_elements))

    def _train(self, stub: federation_pb2_grpc.CoordinatorStub, task: pb2.TaskReply, trace: RoundTrace) -> None:
        request = pb2.WeightsRequest(plan_sha256=task.plan_sha256, round=task.round)
        trace.sent += request.ByteSize()
        receiver = StreamReceiver(self.bundle.payload_key, self.bundle.site, task.max_update_bytes,
                                  plan_sha256=task.plan_sha256, round=task.round, base_sha256=task.base_sha256)
        _, plaintext = receiver.receive(_counted(stub.GetWeights(request, timeout=RPC_TIMEOUT_S), trace, "received"))
        trace.weights_at = time.time()
        update, self.wire_elements = self.updates.update(task.base_sha256, plaintext)
        binding = StreamBinding(task.plan_sha256, task.round, task.base_sha256, self.bundle.site)
        parts = chunk_stream(update, key=self.bundle.payload_key, aad_fields=binding,
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


def enroll_sites(directory: Path, port: int, count: int) -> list[EnrollmentBundle]:
    from training.federation import admin

    admin.init(directory, f"127.0.0.1:{port}")
    names = [f"site-{number:0{len(str(count))}d}" for number in range(1, count + 1)]
    return [admin.enroll(directory, name, "trainer", directory / f"{name}.bundle") for name in names]


def progress(text: str) -> None:
    print(f"\r{text:<78}", end="", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds to run; the last one also exports (default 8)")
    parser.add_argument("--network", choices=("reference", "cpu-plan"), default="reference",
                        help="reference: NetworkPlan()'s 5.7 M-parameter DynUNet (default); cpu-plan: the CPU plan's")
    parser.add_argument("--sites", type=int, default=3, help="no-op trainer sites, each its own mTLS client (default 3)")
    parser.add_argument("--site-processes", type=int, default=3,
                        help="processes the sites are spread over, a thread per site (default 3; at most --sites)")
    parser.add_argument("--keep", type=Path, help="run in this new directory and keep it (coordinator.log)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the last round's export is timed apart)")
    if args.sites < 1 or args.site_processes < 1:
        parser.error("--sites and --site-processes must be at least 1")

    from models.network_plan import NetworkPlan
    from training.federation.plan import plan_for

    started = time.perf_counter()
    # Every site in every round (a round opens once all have said hello); a deadline no run reaches, so no retry
    # blurs the timing.
    plan = plan_for(Task.STROKE_DWI_ADC, network="default", rounds=args.rounds, quorum=args.sites, deadline_s=3600)
    if args.network == "reference":
        plan = dataclasses.replace(plan, training=dataclasses.replace(plan.training, network=NetworkPlan()))
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="fl_round-"))
    try:
        return run(plan, workdir, started, args.sites, min(args.site_processes, args.sites))
    finally:
        print(file=sys.stderr, flush=True)
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(plan: Any, workdir: Path, started: float, sites: int, site_processes: int) -> int:
    directory = workdir / "coordinator"
    progress(f"enrolling {sites} sites")
    bundles = enroll_sites(directory, free_port(), sites)
    parent_conn, child_conn = multiprocessing.get_context("spawn").Pipe()
    coordinator = multiprocessing.get_context("spawn").Process(
        target=run_coordinator, args=(directory, plan.to_toml(), child_conn), name="coordinator")
    coordinator.start()
    progress("starting the coordinator (torch import, initial weights)")
    if not parent_conn.poll(120) or parent_conn.recv()[0] != "listening":
        raise RuntimeError("the coordinator did not start; see coordinator.log")

    site_conns: dict[Connection, int] = {}  # → the process's index
    processes = []
    for index in range(site_processes):
        receiving, sending = multiprocessing.get_context("spawn").Pipe(duplex=False)
        site_conns[receiving] = index
        processes.append(multiprocessing.get_context("spawn").Process(
            target=run_sites, args=(bundles[index::site_processes], sending), name=f"sites-{index}", daemon=True))
        processes[-1].start()
    process_of = {bundle.site: index for index in range(site_processes) for bundle in bundles[index::site_processes]}
    traces: dict[str, dict[int, RoundTrace]] = {bundle.site: {} for bundle in bundles}
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
                failure = "the coordinator" if conn is parent_conn else f"site process {site_conns[conn]}"
                failure += " ended unexpectedly"
                break
            if message[0] == "round":
                rounds[message[1]] = message[2:]
            elif message[0] == "peaks":
                peaks = message[1:]
            elif message[0] == "trace":
                traces[message[1]][message[2]] = RoundTrace(**message[3])
                wire_elements = message[4]
            elif message[0] == "error":
                failure = message[1]
    for process in processes:
        process.terminate()
        process.join(10)
    coordinator.join(30)
    if coordinator.is_alive():  # a failed run: it still waits for its last round
        coordinator.terminate()
        coordinator.join(10)
    if peaks is None or failure is not None:
        print(file=sys.stderr)
        print(f"failed after {len(rounds)} round(s): {failure or 'the coordinator stopped'}; "
              f"see {directory / 'coordinator.log'}", file=sys.stderr)
        return 1
    progress("done")
    print(file=sys.stderr, flush=True)
    report(plan, rounds, traces, process_of, wire_elements, peaks, model_elements(plan),
           time.perf_counter() - started)
    return 0


def report(plan: Any, rounds: dict[int, tuple[float, float, float, float]], traces: dict[str, dict[int, RoundTrace]],
           process_of: dict[str, int], wire_elements: int, peaks: tuple[float, float], elements: int,
           wall_s: float) -> None:
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
    goal = "goal < 10 s with 50 sites" if len(traces) > 3 else "goal < 0.5 s, Flower ≈ 10 s"
    print(f"round time {median(overhead):.2f} s with {len(traces)} sites (median of {len(overhead)} rounds, range "
          f"{min(overhead):.2f}-{max(overhead):.2f} s; {goal})", flush=True)
    print(f"  of which (medians): waiting for the sites' next poll {median(poll):.2f} s, global weights down "
          f"{median(down):.2f} s, no-op + update up {median(up):.2f} s, close (screen, aggregate, commit) "
          f"{median(close):.2f} s", flush=True)
    # CPU seconds between one round's end and the next's (the first and the exporting last round left out): on 2
    # shared cores this moves less with other people's load than the wall-clock overhead does. A site process's
    # CPU at a round's end: its clock when the last of its sites was done.
    steady = range(2, plan.rounds)
    if steady:
        coordinator_cpu = [rounds[n][3] - rounds[n - 1][3] for n in steady]
        members: dict[int, list[str]] = {}
        for site, process in process_of.items():
            members.setdefault(process, []).append(site)
        at_end = {(process, n): max(traces[site][n].cpu_s for site in sites)
                  for process, sites in members.items() for n in range(1, plan.rounds + 1)}
        sites_cpu = [sum(at_end[p, n] - at_end[p, n - 1] for p in members) for n in steady]
        print(f"  CPU per round (medians of rounds 2-{plan.rounds - 1}): coordinator {median(coordinator_cpu):.2f} s, "
              f"the {len(traces)} sites ({len(members)} processes) {median(sites_cpu):.2f} s", flush=True)
    print(f"bytes per site per round {median(total) / model_bytes:.2f}x the fp32 model ({model_bytes / 1e6:.2f} MB, "
          f"{elements:,} parameters and buffers): sent {median(s for s, _ in traffic) / model_bytes:.2f}x, received "
          f"{median(r for _, r in traffic) / model_bytes:.2f}x (goal <= 2.1x); the weights travel as "
          f"{wire_elements:,} tensor elements ({wire_elements / elements:.2f}x the model's)", flush=True)
    print(f"export + sign {export_s:.1f} s (ONNX export with the parity check, manifest, round-key signature; "
          f"the last round only)", flush=True)
    print(f"coordinator peak RSS {peaks[0]:.0f} MiB over the rounds, {peaks[1]:.0f} MiB with the export", flush=True)
    print(f"whole run {wall_s:.0f} s ({len(traces)} sites, {plan.rounds} rounds, plan {plan.sha256[:12]})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
