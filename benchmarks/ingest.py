"""Ingest speed: dcmtk `storescu` (TCP_NODELAY=1) sends the same instances to `fedlesion receive` (fsync on, group
commit, the real studies table; with 1 and with `--processes` SCP processes) and to dcmtk's `storescp` (which does
not fsync), over 1 and over 4 parallel associations (4 storescu processes, a quarter of the files each). Prints
instances/s of each and the ratio ours/storescp.

Two sets of instances:
- `small` (default): pydicom's MR_small.dcm (64×64, 16-bit, explicit VR little endian, 9.8 kB) cloned with new,
  seeded Study/Series/SOP Instance UIDs, so per-instance overhead dominates: the hard case for a Python SCP.
- `xa30` (`--xa30`, needs ../shared): the whole shared Siemens XA30 study as a PACS would push it (1,110 instances
  of about 170 kB, gunzipped into a temp dir): the set the issue's baseline (storescp 725/s, a naive per-instance
  fsync handler 217/s = 0.30×) was measured on.

Run: `.venv/bin/python benchmarks/ingest.py [--instances 1200] [--repeats 3] [--xa30] [--processes 2]`.
"""

from __future__ import annotations

import argparse
import gzip
import logging
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
        sys.exit(f"--xa30 needs the shared data at {source}")
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


def ours(files: list[Path], associations: int, work: Path, processes: int) -> float:
    """`fedlesion receive` as deployed (real studies table, fsync on) with `processes` SCP processes."""
    data_dir = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLESION_")}
    env.update(
        PYTHONPATH=str(REPO),
        FEDLESION_STORAGE__DATA_DIR=str(data_dir),
        FEDLESION_DICOM__RECEIVER_PROCESSES=str(processes),
        FEDLESION_DICOM__MIN_FREE_DISK_BYTES="0",
        FEDLESION_DICOM__INACTIVITY_TIMEOUT_S="3600",  # no study completes (and classifies) during the run
        FEDLESION_LOGGING__LEVEL="WARNING",
    )
    receiver = subprocess.Popen(
        [sys.executable, "-m", "fedlesion", "receive", "--port", str(port)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert receiver.stdout is not None
        if not receiver.stdout.readline().startswith("fedlesion receive:"):
            raise RuntimeError("fedlesion receive did not start")
        seconds = send(port, files, associations)
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(60)
    stored = sum(1 for _ in (data_dir / SPOOL_DIRNAME).rglob("*.dcm"))
    if stored != len(files):
        raise RuntimeError(f"our SCP stored {stored} of {len(files)}")
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


def measure(files: list[Path], repeats: int, work: Path, processes: int) -> None:
    size = statistics.median(path.stat().st_size for path in files)
    print(f"{len(files)} instances, median {size / 1000:.1f} kB; median of {repeats} runs", flush=True)
    for associations in (1, 4):
        rates: dict[str, list[float]] = {"storescp": [], "ours, 1 process": []}
        if processes > 1:
            rates[f"ours, {processes} processes"] = []
        for _ in range(repeats):
            rates["storescp"].append(storescp(files, associations, work))
            rates["ours, 1 process"].append(ours(files, associations, work, 1))
            if processes > 1:
                rates[f"ours, {processes} processes"].append(ours(files, associations, work, processes))
        reference = statistics.median(rates["storescp"])
        for name, values in rates.items():
            median = statistics.median(values)
            print(
                f"  {associations} association(s), {name}: {median:.0f}/s "
                f"(runs {', '.join(f'{value:.0f}' for value in values)}), ratio {median / reference:.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1200, help="how many small instances")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is printed")
    parser.add_argument("--xa30", action="store_true", help="also send the shared XA30 study")
    parser.add_argument("--processes", type=int, default=2, help="dicom.receiver_processes for the second setup")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not shutil.which("storescu") or not shutil.which("storescp"):
        sys.exit("dcmtk's storescu and storescp are needed (Debian package dcmtk)")
    print(f"{os.cpu_count()} CPUs; `fedlesion receive` fsyncs (group commit) and records in SQLite, storescp does neither")
    with tempfile.TemporaryDirectory(prefix="fedlesion-ingest-") as temp:
        work = Path(temp)
        (work / "small").mkdir()
        print("small:", end=" ")
        measure(make_instances(work / "small", args.instances), args.repeats, work, args.processes)
        if args.xa30:
            print("xa30:", end=" ")
            measure(unpack_xa30(work / "xa30"), args.repeats, work, args.processes)


if __name__ == "__main__":
    main()
