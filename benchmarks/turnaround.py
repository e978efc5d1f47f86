"""Turnaround of clinical-size stroke and MS studies through a running `fedlesion node`, and the node's memory.

A synthetic stroke study is fitted to a clinical DWI geometry (b0 + b1000 and ADC, 256 × 256 × 30 at
0.9 × 0.9 × 5 mm; training.synthetic has no matrix option, so the seeded case is generated at that spacing and
centre-padded or cropped to the matrix here) and written as DICOM. For each run a copy under a new Study Instance
UID is sent with `storescu` (TCP_NODELAY=1) to a node started here (its own data directory, a `storescp`
destination); at the last acknowledgement (storescu's exit) the explicit completion trigger runs and the clock
starts; it stops when the SEG, the SR and every SC image are stored by `storescp`. Median of 5 (after one warm-up
study, not counted), with each stage: completion, pick-up by a worker, load, preprocess, inference, postprocess, results,
DICOM outputs (report.json timings and the job row) and the send to the destination. Goal on the 2-core CPU: < 15 s.

Then `--ms-runs` MS studies (FLAIR only, the synthetic MS default of 1 × 1 × 3 mm; about 3 min each on 2 cores: the
MS model runs its trained patch in many windows) go the same way, so the memory peak covers both models at work.
`node peak RSS` is the largest summed PSS of the node's whole process tree (receiver processes included), sampled
every 0.2 s from the node's start to the last output (benchmarks/proctree.py).

    .venv/bin/python benchmarks/turnaround.py [--runs 5] [--ms-runs 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.proctree import PeakSampler
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import CompletionTrigger, StudyIndex
from models.geometry import voxel_volume_ml
from training.synthetic import SiteProfile, generate_case
from training.synthetic.dicom_writer import write_dicom_study

MATRIX = (256, 256, 30)
SITE = SiteProfile(name="clinical-dwi", in_plane_mm=0.9, slice_thickness_mm=5.0, slice_spacing_mm=5.0)
KEYS = ("dwi_b0", "dwi_b1000", "adc")  # the series written: DWI (b0 + b1000) and ADC, nothing else
MS_KEYS = ("flair",)  # the MS study: FLAIR only
STAGES = ("load", "preprocess", "inference", "postprocess")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fit(array: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop or zero-pad to `shape`; returns the array and the voxel offset of the new origin in the old grid."""
    out = np.zeros(shape, array.dtype)
    src, dst, offset = [], [], []
    for have, want in zip(array.shape, shape):
        start = (have - want) // 2  # > 0: crop, < 0: pad
        offset.append(start)
        src.append(slice(max(start, 0), max(start, 0) + min(have, want)))
        dst.append(slice(max(-start, 0), max(-start, 0) + min(have, want)))
    out[tuple(dst)] = array[tuple(src)]
    return out, np.array(offset, float)


def ms_case(seed: int):
    """A synthetic MS case at the generator's MS default geometry, FLAIR only."""
    case = generate_case("ms", seed)
    truth_ml = float((case.lesion_labels > 0).sum() * voxel_volume_ml(case.affine))
    return replace(case, images={key: case.images[key] for key in MS_KEYS}), truth_ml


def clinical_case(seed: int):
    case = generate_case("stroke", seed, site=SITE, size="medium", pattern="single")
    images, offset = {}, None
    for key in KEYS:
        images[key], offset = fit(case.images[key], MATRIX)
    labels, _ = fit(case.lesion_labels, MATRIX)
    affine = case.affine.copy()
    affine[:3, 3] = case.affine[:3, :3] @ offset + case.affine[:3, 3]
    truth_ml = float((labels > 0).sum() * voxel_volume_ml(affine))
    fitted = replace(case, images=images, lesion_labels=labels, affine=affine,
                     brain_mask=fit(case.brain_mask, MATRIX)[0])
    return fitted, truth_ml


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited {process.returncode}:\n{content[-3000:]}")
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {text!r} in {log}")


def stored_outputs(directory: Path, slices: int) -> bool:
    """SEG, SR and one SC per slice stored by storescp (files named by modality prefix: SG, SR…, SC)."""
    names = [p.name for p in directory.iterdir() if not p.name.endswith(".tmp")] if directory.exists() else []
    return (
        any(n.startswith(("SG", "SEG")) for n in names)
        and any(n.startswith("SR") for n in names)
        and sum(n.startswith("SC") for n in names) >= slices
    )


def job_row(data_dir: Path, study_uid: str, task: str) -> sqlite3.Row:
    with sqlite3.connect(f"file:{data_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=5) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM jobs WHERE study_uid = ? AND task = ?", (study_uid, task)).fetchone()


def send_and_wait(
    uid: str, task: str, slices: int, *, work: Path, node: subprocess.Popen[bytes], node_port: int, node_log: Path,
    index: StudyIndex, env: dict[str, str],
) -> tuple[dict[str, float], int]:
    """Send one study, trigger completion at the last acknowledgement, wait for its SEG/SR/SC at the destination;
    returns the stage timings and the completion's revision."""
    received = work / "received"
    for path in received.iterdir():
        path.unlink()
    send_start = time.perf_counter()
    subprocess.run(["storescu", "-aec", "FEDLESION", "-aet", "BENCH", "+sd", "+r", "-nh", "127.0.0.1",
                    str(node_port), str(work / "studies" / uid)], check=True, env=env, capture_output=True)
    t0 = time.perf_counter()  # the last acknowledgement
    completion = index.complete(uid, CompletionTrigger.EXPLICIT)
    t_completed, completed_wall = time.perf_counter(), time.time()
    while not stored_outputs(received, slices):
        if node.poll() is not None:
            raise SystemExit(f"node exited:\n{node_log.read_text()[-3000:]}")
        if time.perf_counter() - t0 > 900:
            raise SystemExit(f"no outputs after 900 s:\n{node_log.read_text()[-3000:]}")
        time.sleep(0.02)
    t_done = time.perf_counter()
    job = job_row(work / "node-data", uid, task)
    result = json.loads(job["result_json"]) if job["result_json"] else {}
    report = json.loads((Path(job["result_dir"]) / "report.json").read_text())
    timings = {**report.get("timings", {}), **result.get("timings", {})}  # the job row has every stage
    wall_now, perf_now = time.time(), time.perf_counter()
    stored_wall = wall_now - (perf_now - t_done)
    row = {
        "send_s": t0 - send_start,
        "total_s": t_done - t0,
        "completion_s": t_completed - t0,
        "pickup_s": job["started_at"] - completed_wall,  # intake of the ready row and the claim
        **{f"{stage}_s": float(timings.get(stage, float("nan"))) for stage in STAGES},
        "results_s": float(timings.get("results", float("nan"))),
        "dicom_outputs_s": float(timings.get("dicom_outputs", float("nan"))),
        "job_s": job["finished_at"] - job["started_at"],
        "to_destination_s": stored_wall - job["finished_at"],
        "volume_ml": report.get("total_volume_ml"),
    }
    return row, completion.revision


def print_medians(task: str, rows: list[dict[str, float]]) -> float:
    """The per-stage medians of one task's counted runs; returns the median turnaround."""
    print(f"\n{task}: median of {len(rows)} (2-core CPU, onnxruntime CPU):")
    for key in rows[0]:
        if key == "volume_ml":
            continue
        values = [r[key] for r in rows]
        print(f"  {key:<18} {statistics.median(values):7.3f} s   (min {min(values):.3f}, max {max(values):.3f})")
    return statistics.median(r["total_s"] for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="stroke studies counted (after one warm-up)")
    parser.add_argument("--ms-runs", type=int, default=1, help="MS (FLAIR) studies, about 3 min each on 2 cores")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the node's data directory and logs here")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} (dcmtk) is required")
    work = Path(tempfile.mkdtemp(prefix="fedlesion-turnaround-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TCP_NODELAY": "1"}

    started = time.perf_counter()
    case, truth_ml = clinical_case(args.seed)
    flair, ms_truth_ml = ms_case(args.seed)
    print(f"synthetic stroke study: {MATRIX[0]}x{MATRIX[1]}x{MATRIX[2]} at {SITE.in_plane_mm} x {SITE.in_plane_mm} x "
          f"{SITE.slice_spacing_mm} mm, lesion {truth_ml:.1f} ml; MS study: FLAIR "
          f"{'x'.join(map(str, flair.images['flair'].shape))} at {flair.site.in_plane_mm} x {flair.site.in_plane_mm} "
          f"x {flair.site.slice_spacing_mm} mm, lesions {ms_truth_ml:.1f} ml "
          f"(generated in {time.perf_counter() - started:.0f} s)")
    prefix = f"1.2.826.0.1.3680043.10.1371.9.{os.getpid()}"
    studies = [(f"{prefix}.{n}", "stroke", case, truth_ml) for n in range(args.runs + 1)]
    studies += [(f"{prefix}.{args.runs + 1 + n}", "ms", flair, ms_truth_ml) for n in range(args.ms_runs)]
    for uid, _, study_case, _ in studies:
        write_dicom_study(study_case, work / "studies" / uid, study_uid=uid, patient_name="Turnaround^Bench")

    scp_port, node_port, web_port = free_port(), free_port(), free_port()
    (work / "received").mkdir(exist_ok=True)
    data_dir = work / "node-data"
    node_env = {
        **env,
        "PYTHONPATH": str(REPO_ROOT),
        "FEDLESION_STORAGE__DATA_DIR": str(data_dir),
        "FEDLESION_DICOM__DESTINATIONS": f"STORESCP@127.0.0.1:{scp_port}",
        "FEDLESION_DICOM__INACTIVITY_TIMEOUT_S": "600",
    }
    processes: list[subprocess.Popen[bytes]] = []
    rows: dict[str, list[dict[str, float]]] = {"stroke": [], "ms": []}
    try:
        with (work / "storescp.log").open("wb") as log:
            processes.append(subprocess.Popen(
                ["storescp", "-aet", "STORESCP", "-od", str(work / "received"), "+xa", str(scp_port)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))
        node_log = work / "node.log"
        with node_log.open("wb") as log:
            node = subprocess.Popen(
                [sys.executable, "-m", "fedlesion", "node", "--dicom-port", str(node_port), "--web-port",
                 str(web_port)], stdout=log, stderr=subprocess.STDOUT, env=node_env, cwd=REPO_ROOT,
            )
        processes.append(node)
        with PeakSampler(node.pid) as memory:
            t_start = time.perf_counter()
            wait_for_line(node_log, "fedlesion node: AE", node, 300)
            print(f"node started in {time.perf_counter() - t_start:.1f} s (models verified and warmed up), "
                  f"process tree PSS {memory.peak_kib / 1024:.0f} MiB so far")
            index = StudyIndex(data_dir / "dicom.sqlite3", data_dir / "spool", DicomSettings())
            counted = 0
            for uid, task, study_case, truth in studies:
                row, revision = send_and_wait(
                    uid, task, study_case.images[next(iter(study_case.images))].shape[2], work=work, node=node,
                    node_port=node_port, node_log=node_log, index=index, env=env,
                )
                warm_up = task == "stroke" and not counted
                counted += task == "stroke"
                label = "warm-up" if warm_up else f"{task} run {len(rows[task]) + 1}"
                print(f"{label}: {row['total_s']:.2f} s from last ack to SEG/SC/SR stored (revision {revision}, job "
                      f"{row['job_s']:.2f} s, inference {row['inference_s']:.2f} s, {row['volume_ml']} ml vs truth "
                      f"{truth:.1f} ml; tree PSS peak so far {memory.peak_kib / 1024:.0f} MiB)", flush=True)
                if not warm_up:
                    rows[task].append(row)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()

    medians = {task: print_medians(task, task_rows) for task, task_rows in rows.items() if task_rows}
    print(f"\nnode peak RSS {memory.peak_kib / 1024:.0f} MiB (summed PSS of the node's process tree, both models "
          f"loaded; goal < 1 GB {'met' if memory.peak_kib * 1024 < 1e9 else 'NOT met'})")
    for task, median in medians.items():
        goal = f": goal < 15 s {'met' if median < 15 else 'NOT met'}" if task == "stroke" else ""
        runs = len(rows[task])
        print(f"turnaround median {median:.2f} s ({task}, {runs} run{'s' if runs != 1 else ''}){goal}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
