"""The node's engine path against what a user would run instead: PyTorch eager with MONAI's sliding_window_inference.

Two networks, each the same on both sides (weights, input, preprocessing, mapping back to the source grid):
- `seeded`: the issue's reference, the 5.7 M-parameter DynUNet of the default NetworkPlan (batch normalization,
  DWI+ADC in), seeded weights with BN running statistics from train-mode passes over seeded synthetic stroke
  patches, exported by training/export.py and signed into a temporary package. Untrained, most of its output sits
  near 0.5 (see `near_threshold`), so its Dice between masks measures rounding more than agreement;
- `shipped`: the embedded default stroke model (models/defaults), the one the node serves; PyTorch gets the same
  weights from its training checkpoint (`--checkpoint`, default build/default-models/stroke-dwi-adc/best.pt as
  `make default-models` leaves it; the exporter folds batch norm into the convolutions, so the ONNX file alone
  cannot give them back). The checkpoint must carry the manifest's plan hash and pass export's parity check against
  the package's graph; without a checkpoint this network is skipped.
Input: ISLES'22 case 0001 (2×112×112×73 at 2 mm, from ../shared; a synthetic stroke case cropped to that size when
absent). The node side is `inference.engine.Engine.predict` in a subprocess that never imports torch, so its peak
RSS is the node's own; it runs as the node runs it (a batch-normalized network may run any window: the 112×112×80
grid fits the whole-volume budget, one pass) and with the manifest's patch as windows (`whole_volume_voxels=0`, Gaussian
blend: for `seeded` MONAI's own 8 windows of 96×96×64, which isolates ONNX Runtime from the window layout; for
`shipped` the 64³ patch it was trained on). MONAI: 96×96×64 windows, 50 %
overlap, Gaussian, sw_batch_size 1, torch.inference_mode.

Prints, per network and side, the median wall and CPU seconds of `--repeats` timed runs after one warm-up (CPU
seconds are the fairer figure on a shared machine), the ratios against MONAI in the same run, the Dice between the
masks (threshold: the manifest's) and the node's peak RSS.
Run: `.venv/bin/python benchmarks/engine.py [--repeats 3] [--network seeded|shipped] [--checkpoint best.pt] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.manifest import Preprocessing, Task, default_manifest
from models.package import TrustPolicy, build_package, load_package
from models.preprocessing import Channel, preprocess, to_source

ISLES_CASE = REPO.parent / "shared" / "data" / "nifti" / "isles22" / "case0001_dwi_adc_plus_gt"
ISLES_SHAPE = (112, 112, 73)
MONAI_WINDOW = (96, 96, 64)
SEED = 0


def load_input() -> tuple[list[Channel], str]:
    """ISLES'22 case 0001 (DWI b1000, ADC), or a synthetic stroke case of the same size when ../shared is absent."""
    if ISLES_CASE.exists():
        from training.datasets import load_cases, open_dataset

        cases, _ = load_cases(open_dataset(ISLES_CASE, Task.STROKE_DWI_ADC))
        channels = cases[0].channels
        return channels, f"ISLES'22 case 0001, {'×'.join(map(str, (len(channels), *channels[0].data.shape)))}"
    from training.synthetic import generate_case

    case = generate_case("stroke", seed=7, size="medium", pattern="single")
    fitted = []
    for name, key in (("dwi", "dwi_b1000"), ("adc", "adc")):
        data = case.images[key][tuple(slice(0, n) for n in ISLES_SHAPE)]
        data = np.pad(data, [(0, n - m) for n, m in zip(ISLES_SHAPE, data.shape)])
        fitted.append(Channel(data.astype(np.float32), case.affine, name))
    return fitted, f"synthetic stroke case (seed 7) cropped to 2×{'×'.join(map(str, ISLES_SHAPE))}"


SHIPPED_STROKE = REPO / "models" / "defaults" / Task.STROKE_DWI_ADC.value
SHIPPED_CHECKPOINT = REPO / "build" / "default-models" / Task.STROKE_DWI_ADC.value / "best.pt"


def build_seeded_package(out: Path) -> Path:
    """The default-plan DynUNet with seeded weights, exported to ONNX and signed with the demo key; its torch
    network is built again by `torch_network` from the weights saved beside it."""
    import torch

    from models.network_plan import NetworkPlan
    from models.networks import build_network, network_info, parameter_count
    from models.signing import demo_private_key
    from training.export import export_onnx

    torch.manual_seed(SEED)
    network = build_network(2, 1, NetworkPlan())
    calibrate_batch_norm(network)
    network.eval()
    torch.save(network.state_dict(), out / "weights.pt")
    (out / "plan.json").write_text(json.dumps(asdict(NetworkPlan()), default=str))
    preprocessing = Preprocessing((2.0, 2.0, 2.0), MONAI_WINDOW, NetworkPlan().size_divisible)
    manifest = default_manifest(
        Task.STROKE_DWI_ADC, 1, plan_sha256="0" * 64, demo=True,
        description=f"engine benchmark, {parameter_count(network)} parameters, not for clinical use",
        preprocessing=preprocessing, network=network_info(network, NetworkPlan()),
    )
    return build_package(out / "package", export_onnx(network, 2), manifest, demo_private_key())


def torch_network(package_dir: Path, weights: Path, seeded: bool):
    """The package's network in PyTorch, in eval mode: the seeded one from the weights saved beside it, the shipped
    one from its training checkpoint, refused unless it is the package's own (plan hash and export parity)."""
    import torch

    from models.network_plan import NetworkPlan
    from models.networks import build_network

    if seeded:
        network = build_network(2, 1, NetworkPlan(**json.loads((weights.parent / "plan.json").read_text())))
        network.load_state_dict(torch.load(weights, weights_only=True))
        return network.eval()
    from training.checkpoint import checkpoint_plan, load_checkpoint, model_from_checkpoint
    from training.export import check_parity, parity_inputs

    state = load_checkpoint(weights)
    plan, package = checkpoint_plan(state), load_package(package_dir, TrustPolicy.demo())
    if plan.sha256() != package.manifest.training.plan_sha256:
        raise SystemExit(f"{weights}: its plan is not the one {package_dir} was trained with")
    network = model_from_checkpoint(state)
    divisible = max(plan.preprocessing.size_divisible, plan.network.size_divisible)
    for image in parity_inputs(Task.STROKE_DWI_ADC, plan.preprocessing, plan.in_channels, divisible):
        report = check_parity(network, package.onnx_bytes, image, package.manifest.output.threshold)
        if not report.passed:
            raise SystemExit(f"{weights}: not the weights of {package_dir} ({report.describe()})")
    return network


def calibrate_batch_norm(network, cases: int = 2, patches_per_case: int = 4) -> None:
    """Running statistics as training leaves them (freshly built, BN is the identity): cumulative averages of
    train-mode passes over seeded 96×96×64 patches of preprocessed synthetic stroke cases; weights untouched."""
    import torch

    from training.synthetic import generate_case

    rng = np.random.default_rng(SEED)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all passes
    network.train()
    with torch.no_grad():
        for seed in range(cases):
            case = generate_case("stroke", seed=100 + seed)
            channels = [Channel(case.images[key], case.affine, name) for key, name in (("dwi_b1000", "dwi"), ("adc", "adc"))]
            image = preprocess(channels, Preprocessing((2.0, 2.0, 2.0), MONAI_WINDOW, 16)).image
            image = np.pad(image, [(0, 0)] + [(0, max(0, w - n)) for w, n in zip(MONAI_WINDOW, image.shape[1:])])
            for _ in range(patches_per_case):
                start = [int(rng.integers(0, n - w + 1)) for n, w in zip(image.shape[1:], MONAI_WINDOW)]
                patch = image[(slice(None), *(slice(a, a + w) for a, w in zip(start, MONAI_WINDOW)))]
                network(torch.from_numpy(np.ascontiguousarray(patch[None])))


NETWORKS = {
    "seeded": "seeded: the default NetworkPlan's 5.7 M-parameter DynUNet, untrained",
    "shipped": "shipped: the embedded default stroke model (trained on synthetic data)",
}
NODE_MODES = {"node": {}, "node, patch windows": {"whole_volume_voxels": 0}}


def timed(function, repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU (all threads) seconds of `repeats` calls after one warm-up, and the last result."""
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, result


def node_side(package_dir: Path, probabilities_out: Path, mode: str, repeats: int, threads: int) -> dict:
    """The node's path, torch-free: load the package, predict (warm-up + repeats), save the last probabilities."""
    from inference.engine import Engine

    channels, _ = load_input()
    started = time.perf_counter()
    engine = Engine(load_package(package_dir, TrustPolicy.demo()), threads=threads, **NODE_MODES[mode])
    load_seconds = time.perf_counter() - started
    walls, cpus, prediction = timed(lambda: engine.predict(channels), repeats)
    np.save(probabilities_out, prediction.probabilities)
    return {
        "seconds": walls,
        "cpu_seconds": cpus,
        "load_seconds": load_seconds,
        "windows": prediction.windows,
        "grid": list(prediction.case.image.shape),
        "providers": engine.providers,
        "threads": engine.session_options.intra_op_num_threads,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_imported": "torch" in sys.modules,
    }


def monai_side(package_dir: Path, weights: Path, seeded: bool, repeats: int, threads: int) -> dict:
    """What a user would run: the same preprocessing, PyTorch eager, MONAI's sliding_window_inference, Gaussian."""
    import torch
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(threads)
    network = torch_network(package_dir, weights, seeded)
    spec = load_package(package_dir, TrustPolicy.demo()).manifest.preprocessing
    channels, _ = load_input()

    def predict() -> np.ndarray:
        case = preprocess(channels, spec)
        with torch.inference_mode():
            logits = sliding_window_inference(
                torch.from_numpy(case.image[None]), MONAI_WINDOW, 1, network, overlap=0.5, mode="gaussian"
            )
            probabilities = torch.sigmoid(logits)[0, 0].numpy()
        return to_source(probabilities, case)

    walls, cpus, probabilities = timed(predict, repeats)
    return {"seconds": walls, "cpu_seconds": cpus, "probabilities": probabilities}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def run_network(name: str, tmp_path: Path, checkpoint: Path, repeats: int, threads: int) -> dict:
    """Both node modes (subprocesses) and MONAI for one network; rows with ratios against MONAI."""
    seeded = name == "seeded"
    package_dir = build_seeded_package(tmp_path) if seeded else SHIPPED_STROKE
    weights = tmp_path / "weights.pt" if seeded else checkpoint
    threshold = load_package(package_dir, TrustPolicy.demo()).manifest.output.threshold
    sides: dict[str, dict] = {}
    for index, mode in enumerate(NODE_MODES):
        npy = tmp_path / f"{name}-node{index}.npy"
        completed = subprocess.run(
            [sys.executable, __file__, "--node-side", str(package_dir), str(npy), mode,
             "--repeats", str(repeats), "--threads", str(threads)],
            capture_output=True, text=True, check=True,
        )
        sides[mode] = {**json.loads(completed.stdout.strip().splitlines()[-1]), "probabilities": np.load(npy)}
    sides["MONAI"] = monai_side(package_dir, weights, seeded, repeats, threads)
    monai_probabilities = sides["MONAI"]["probabilities"]
    monai_mask = monai_probabilities >= threshold
    rows = {}
    for side_name, side in sides.items():
        mask = side.pop("probabilities") >= threshold
        rows[side_name] = {
            **side,
            "median_s": statistics.median(side["seconds"]),
            "median_cpu_s": statistics.median(side["cpu_seconds"]),
            "mask_voxels": int(mask.sum()),
            "dice_vs_monai": dice(mask, monai_mask),
        }
    for row in rows.values():
        row["speedup"] = rows["MONAI"]["median_s"] / row["median_s"]
        row["cpu_speedup"] = rows["MONAI"]["median_cpu_s"] / row["median_cpu_s"]
    near = float((np.abs(monai_probabilities - threshold) < 0.05).mean())
    return {"threshold": threshold, "near_threshold": near, "sides": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime and torch threads; 0: physical cores")
    parser.add_argument("--network", choices=NETWORKS, action="append", help="default: both")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT,
                        help="the shipped stroke model's training checkpoint (default: %(default)s)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--node-side", nargs=3, metavar=("PACKAGE", "OUT_NPY", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node_side:
        package, out, mode = args.node_side
        print(json.dumps(node_side(Path(package), Path(out), mode, args.repeats, args.threads)))
        return

    from inference.engine import physical_cores

    threads = args.threads or physical_cores()
    _, source = load_input()
    names = args.network or [name for name in NETWORKS if name != "shipped" or args.checkpoint.exists()]
    if "shipped" in names and not args.checkpoint.exists():
        raise SystemExit(f"--checkpoint {args.checkpoint}: not found (make default-models writes it)")
    with tempfile.TemporaryDirectory(prefix="fedlesion-engine-bench-") as tmp:
        networks = {name: run_network(name, Path(tmp), args.checkpoint, args.repeats, threads) for name in names}
    if args.json:
        print(json.dumps({"input": source, "threads": threads, "repeats": args.repeats, "networks": networks}, indent=2))
        return
    print(f"input: {source}; {threads} threads; median of {args.repeats} after one warm-up")
    for name, result in networks.items():
        print(f"\n{NETWORKS[name]}; threshold {result['threshold']:g}, "
              f"{100 * result['near_threshold']:.1f} % of MONAI's probabilities within 0.05 of it")
        print(f"{'side':24} {'wall s':>7} {'CPU s':>7} {'speedup':>8} {'CPU sp.':>8} {'Dice':>7} {'mask vox':>9} "
              f"{'windows':>7} {'peak RSS':>9}")
        for side_name, row in result["sides"].items():
            rss = f"{row['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in row else "-"
            print(f"{side_name:24} {row['median_s']:7.2f} {row['median_cpu_s']:7.2f} {row['speedup']:7.2f}× "
                  f"{row['cpu_speedup']:7.2f}× {row['dice_vs_monai']:7.4f} {row['mask_voxels']:9d} "
                  f"{row.get('windows', 8):>7} {rss:>9}")


if __name__ == "__main__":
    main()
