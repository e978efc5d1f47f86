"""Ingest speed of the deployed node against dcmtk's `storescp`, in one run, as a ratio of instances per second.

With no arguments: `fedlesion node` at default settings (models loaded and warmed up, workers idle; a temporary
data directory, free ports) receives the shared Siemens XA30 study (1,110 instances of about 170 kB, gunzipped into
a temporary directory) over 4 parallel associations (4 `storescu` processes with TCP_NODELAY=1, a quarter of the
files each), and so does `storescp` (which neither fsyncs nor records anything). The two alternate, repeat after
repeat, so a load change on the machine hits both; each repeat starts a fresh node and the median of the repeats
is compared. The one setting changed from the defaults is `dicom.inactivity_timeout_s`, so that the study does not
complete and start a job while the next repeat is sent. The last line is `ratio 0.NN` (ours / storescp).

Other setups: `--target receive` (`fedlesion receive`, the SCP alone), `--receiver-processes N`
(`dicom.receiver_processes`), `--associations`, `--repeats`, `--small N` (N clones of pydicom's 9.8 kB
MR_small.dcm with seeded unique UIDs instead of XA30: per-instance overhead dominates, the hard case for a Python
SCP).

    .venv/bin/python benchmarks/ingest.py [--target node|receive] [--receiver-processes N] [--associations 4]
        [--repeats 3] [--small N]
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_gateway.spool import SPOOL_DIRNAME

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
READY_LINE = {"node": "fedlesion node:", "receive": "fedlesion receive:"}
START_TIMEOUT_S = 300


def make_instances(folder: Path, count: int, seed: int = 4) -> list[Path]:
    """`count` clones of MR_small.dcm in 4 studies of one series each, with seeded unique UIDs."""
    rng = random.Random(seed)
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    studies = [(f"2.25.{rng.getrandbits(96)}", f"2.25.{rng.getrandbits(96)}") for _ in range(4)]
    paths = []
    for index in range(count):
        study_uid, series_uid = studies[index % len(studies)]
        source.StudyInstanceUID = study_uid
        source.SeriesInstanceUID = series_uid
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = f"2.25.{rng.getrandbits(96)}"
        source.InstanceNumber = index + 1
        path = folder / f"{index:05d}.dcm"
        source.save_as(path)
        paths.append(path)
    return paths


def unpack_xa30(folder: Path) -> list[Path]:
    """The shared XA30 study, gunzipped, every series."""
    source = REPO.parent / "shared" / "data" / "dicom" / "dcm_qa_xa30i" / "dicom"
    if not source.is_dir():
        sys.exit(f"the XA30 study is needed at {source} (or pass --small N)")
    paths = []
    for compressed in sorted(source.rglob("*.dcm.gz")):
        path = folder / compressed.parent.name / compressed.name.removesuffix(".gz")
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(compressed, "rb") as packed, path.open("wb") as plain:
            shutil.copyfileobj(packed, plain)
        paths.append(path)
    return paths


def send(port: int, files: list[Path], associations: int) -> float:
    """Seconds for `associations` storescu processes to send `files` (split in equal parts) to port."""
    parts = [files[index::associations] for index in range(associations)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", "FEDLESION", "127.0.0.1", str(port), *map(str, part)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-400:]}")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ours(files: list[Path], associations: int, work: Path, target: str, processes: int | None) -> float:
    """Instances/s into a fresh `fedlesion node` or `fedlesion receive` (defaults but the inactivity timeout, and
    `dicom.receiver_processes` where given); every instance must be in its spool afterwards."""
    data_dir = Path(tempfile.mkdtemp(dir=work))
    port, web_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLESION_")}
    env.update(
        PYTHONPATH=str(REPO),
        FEDLESION_STORAGE__DATA_DIR=str(data_dir),
        FEDLESION_DICOM__INACTIVITY_TIMEOUT_S="3600",  # no study completes (and starts a job) during the run
    )
    if processes is not None:
        env["FEDLESION_DICOM__RECEIVER_PROCESSES"] = str(processes)
    command = ["node", "--dicom-port", str(port), "--web-port", str(web_port)] if target == "node" else [
        "receive", "--port", str(port)]
    log = work / f"{target}.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedlesion", *command], env=env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE[target] not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fedlesion {target} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        seconds = send(port, files, associations)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    stored = sum(1 for _ in (data_dir / SPOOL_DIRNAME).rglob("*.dcm"))
    if stored != len(files):
        raise RuntimeError(f"fedlesion {target} stored {stored} of {len(files)}")
    shutil.rmtree(data_dir)
    return len(files) / seconds


def storescp(files: list[Path], associations: int, work: Path) -> float:
    output = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    server = subprocess.Popen(
        ["storescp", "-od", str(output), str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_listening(port)
        seconds = send(port, files, associations)
    finally:
        server.terminate()
        server.wait()
    stored = sum(1 for _ in output.iterdir())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    shutil.rmtree(output)
    return len(files) / seconds


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("storescp did not start listening")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("node", "receive"), default="node", help="what `fedlesion` runs")
    parser.add_argument("--receiver-processes", type=int, help="dicom.receiver_processes (default: the setting's)")
    parser.add_argument("--associations", type=int, default=4, help="parallel storescu processes")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; medians are compared")
    parser.add_argument("--small", type=int, metavar="N", help="N clones of MR_small.dcm instead of the XA30 study")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        sys.exit("dcmtk's storescu and storescp are needed (Debian package dcmtk)")
    processes = "default" if args.receiver_processes is None else str(args.receiver_processes)
    ours_name = f"fedlesion {args.target} (receiver_processes {processes})"
    with tempfile.TemporaryDirectory(prefix="fedlesion-ingest-") as temp:
        work = Path(temp)
        (work / "instances").mkdir()
        files = make_instances(work / "instances", args.small) if args.small else unpack_xa30(work / "instances")
        size = statistics.median(path.stat().st_size for path in files)
        print(f"{os.cpu_count()} CPUs; {len(files)} instances, median {size / 1000:.1f} kB, {args.associations} "
              f"association(s), {args.repeats} interleaved repeats; {ours_name} fsyncs (group commit) and records "
              f"each instance in SQLite, storescp does neither", flush=True)
        rates: dict[str, list[float]] = {"storescp": [], ours_name: []}
        for _ in range(args.repeats):
            rates["storescp"].append(storescp(files, args.associations, work))
            rates[ours_name].append(ours(files, args.associations, work, args.target, args.receiver_processes))
            print(f"  storescp {rates['storescp'][-1]:.0f}/s, ours {rates[ours_name][-1]:.0f}/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name}: median {medians[name]:.0f}/s (runs {', '.join(f'{value:.0f}' for value in values)})")
    print(f"ratio {medians[ours_name] / medians['storescp']:.2f}")


if __name__ == "__main__":
    main()
