"""`fedlesion train`: train one site's model (single-site loop; the federated layer reuses its local step)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from models.manifest import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a segmentation model on one site's data")
    parser.add_argument("--task", required=True, choices=[task.value for task in Task])
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="dataset folder or CSV manifest; synthetic:N[:seed=S][:site=K] for N seeded synthetic "
                             "cases (seed: their own seed; site: all acquired with scanner profile K); or "
                             "synthetic-stream:P[:seed=S][:workers=W] for P fresh domain-randomised volumes every "
                             "epoch, drawn by W processes")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: last.pt, best.pt, metrics.csv, curves.png, plan.json")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs (default: the plan's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    parser.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                        help="fraction of cases held out for validation (default 0.2)")
    parser.add_argument("--val-cases", type=int, default=6, metavar="N",
                        help="with synthetic-stream: fixed seeded validation volumes (default 6)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="plan seed and case split seed (default 0)")
    # For tests and experiments: a JSON object (or a file holding one) merged into the default plan.
    parser.add_argument("--plan", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def _plan_overrides(text: str | None) -> dict:
    if not text:
        return {}
    source = text
    if text.lstrip()[:1] not in ("{", "["):
        source = Path(text).read_text(encoding="utf-8")
    try:
        value = json.loads(source)
    except json.JSONDecodeError as error:
        raise ValueError(f"--plan: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError("--plan: must be a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    overrides = _plan_overrides(args.plan)

    from training.checkpoint import checkpoint_threshold, load_checkpoint
    from training.datasets import load_training_cases, split_cases
    from training.plan import default_plan
    from training.stream import CaseStream, SyntheticStreamSpec, validation_cases
    from training.trainer import resolve_device, train_model

    resolve_device(args.device)  # fail before loading any data
    overrides.setdefault("seed", args.seed)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    plan = default_plan(args.task, args.device).with_overrides(overrides)

    stream_spec = SyntheticStreamSpec.parse(args.data)
    if stream_spec is not None:
        if args.val_cases < 1:
            raise ValueError(f"--val-cases must be at least 1, got {args.val_cases}")
        stream = CaseStream(args.task, stream_spec, args.seed, plan.preprocessing)
        train, context = stream, stream  # the stream's worker processes end with the training
        val = validation_cases(args.task, args.val_cases, stream.seed, plan.preprocessing)
        print(f"training on {stream_spec.pool} fresh volume(s) per epoch, validating on {len(val)}; plan sha256 "
              f"{plan.sha256()}", file=sys.stderr)
    else:
        cases, skipped = load_training_cases(args.data, args.task, args.seed)
        for item in skipped:
            print(f"skipped {item.case_id}: {item.reason}", file=sys.stderr)
        if not cases:
            raise ValueError(f"--data {args.data}: no usable cases")
        train, val = split_cases(cases, args.val_fraction, args.seed)
        context = contextlib.nullcontext()
        print(f"training on {len(train)} case(s), validating on {len(val)}; plan sha256 {plan.sha256()}",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    started = time.perf_counter()
    with context:
        checkpoint = train_model(plan, train, val, out, resume=args.resume, device=args.device,
                                 progress=not args.no_progress)
    if stream_spec is not None:
        print(stream.report(time.perf_counter() - started), file=sys.stderr)
    if (out / "threshold.csv").exists() and checkpoint.name == "best.pt":
        print(f"threshold {checkpoint_threshold(load_checkpoint(checkpoint)):g}, calibrated on the validation cases "
              f"(validation Dice per candidate: {out / 'threshold.csv'})", file=sys.stderr)
    print(checkpoint)
    return 0
