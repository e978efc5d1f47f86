"""Training throughput and memory of the default plan, and the time of one local epoch on 20 synthetic cases.

    .venv/bin/python benchmarks/train_step.py [--task stroke-dwi-adc] [--device cpu|cuda] [--cases 20] [--steps 5]

Prints: steady-state training throughput (patches/s, over `--steps` optimizer steps after one warm-up step, batches
drawn and augmented as in training), peak RSS (`resource.getrusage`, the process's high-water mark) and on CUDA
`torch.cuda.max_memory_allocated`; then the wall time of one local epoch (`LocalTrainer.train(None, 1)`) on
`--cases` synthetic cases, with case generation and preprocessing timed separately and NOT included in the epoch
time (they happen once per site, not once per epoch or round).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import torch

from models.manifest import Task


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=Task.STROKE_DWI_ADC.value, choices=[task.value for task in Task])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from models.networks import parameter_count
    from training.datasets import synthetic_cases
    from training.plan import default_plan
    from training.trainer import LocalTrainer

    plan = default_plan(args.task, args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"plan {plan.sha256()[:12]}: {plan.network.architecture} depth {plan.network.depth}, "
          f"{plan.network.base_filters} base filters, patch {plan.patch_size} at {plan.preprocessing.target_spacing_mm} mm, "
          f"batch {plan.batch_size}, {plan.iterations_per_epoch} patches ({plan.steps_per_epoch} steps) per epoch")

    started = time.perf_counter()
    cases = list(synthetic_cases(args.task, args.cases, args.seed))
    generated = time.perf_counter() - started
    started = time.perf_counter()
    trainer = LocalTrainer(plan, cases, device=args.device, progress=False)
    prepared = time.perf_counter() - started
    print(f"{args.cases} synthetic cases: generated in {generated:.1f} s, preprocessed in {prepared:.1f} s "
          f"({parameter_count(trainer.model):,} parameters)")

    # Throughput: one warm-up step, then `steps` timed steps (sampling + augmentation + forward/backward/update).
    batches = iter(trainer.batches(10_000))
    trainer.train_step(*next(batches))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    patches = 0
    data_time = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        data_time += time.perf_counter() - t0
        trainer.train_step(images, labels)
        patches += images.shape[0]
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    print(f"throughput: {patches / elapsed:.2f} patches/s ({elapsed / args.steps:.2f} s per step of {plan.batch_size}, "
          f"of which sampling+augmentation {data_time / args.steps:.2f} s)")

    # One local epoch, as the federated layer runs it (preprocessing excluded: done once above).
    trainer.epoch = 0
    started = time.perf_counter()
    update = trainer.train(None, 1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    epoch_time = time.perf_counter() - started
    print(f"one local epoch on {update.n_cases} cases ({plan.iterations_per_epoch} patches, {plan.steps_per_epoch} "
          f"steps): {epoch_time:.1f} s, preprocessing excluded; with preprocessing {epoch_time + prepared:.1f} s; "
          f"loss {update.metrics['train_loss']:.4f}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    if args.device == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
