"""`fedlesion export`: checkpoint → parity-checked ONNX → signed package → registry (design.md §2, §8).

The signing key decides trust: the shipped demo key always yields a demo package ("not for clinical use"),
published under the demo trust policy; any other key publishes under a policy that trusts exactly that key.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a training checkpoint to a signed ONNX model package and publish it"
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    parser.add_argument("--registry", type=Path, required=True, metavar="DIR", help="registry to publish to")
    parser.add_argument("--key", type=Path, required=True, metavar="KEY.pem", help="Ed25519 publishing key (PEM)")
    parser.add_argument("--version", type=int, default=None, metavar="N", help="default: the latest version + 1")
    parser.add_argument("--demo", action="store_true", help="mark the package demo (forced with the demo key)")
    parser.add_argument("--description", default="", metavar="TEXT")
    parser.add_argument("--trained-on", metavar="TEXT", help="what the model was trained on (into the manifest)")
    parser.add_argument("--hardware", metavar="TEXT", help="the hardware it was trained on, e.g. \"2 CPU cores\" (into the manifest)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="also keep the package here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.package import TrustPolicy
    from models.registry import Registry
    from models.signing import load_private_key
    from training.export import export_package, is_demo_key

    if not args.checkpoint.is_file():
        raise ValueError(f"{args.checkpoint}: no such checkpoint file")
    key = load_private_key(args.key)
    trust = TrustPolicy.demo() if is_demo_key(key) else TrustPolicy.enrolled([key.public_key()])
    registry = Registry(args.registry, trust)
    options = {
        "private_key": key,
        "version": args.version,
        "demo": args.demo,
        "description": args.description,
        "registry": registry,
        "trained_on": args.trained_on,
        "hardware": args.hardware,
    }
    if args.out is not None:
        result = export_package(args.checkpoint, args.out, **options)
    else:
        with tempfile.TemporaryDirectory(prefix="fedlesion-export-") as tmp:
            result = export_package(args.checkpoint, Path(tmp) / "package", **options)
    manifest = result.manifest
    for note in result.warnings:
        print(f"note: {note}")
    print(f"published {manifest.task.value} version {manifest.version} to {result.path}")
    print(f"task: {manifest.task.value}")
    print(f"version: {manifest.version}")
    print(f"demo: {'yes' if manifest.demo else 'no'}")
    print(f"plan sha256: {manifest.training.plan_sha256}")
    print(f"{manifest.onnx.file} sha256: {result.onnx_sha256}")
    print(f"{manifest.onnx.file} size: {result.onnx_bytes} bytes")
    for report in result.parity:
        print(f"parity {report.describe()}")
    print(f"export {result.export_seconds:.1f} s, parity {result.parity_seconds:.1f} s")
    return 0
