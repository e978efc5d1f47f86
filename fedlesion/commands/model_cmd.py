"""`fedlesion model`: verify, publish and list signed model packages; make a publishing key pair; roll a node's
task back to the version installed before.

Without `--public-key` the demo trust policy applies (only the shipped demo key), as on a node without an
enrollment bundle; with it, the given publisher keys are trusted and demo packages are refused. `rollback` works on
the node's registry from the settings and trusts what the node trusts; the running node swaps within
`inference.registry_poll_s`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.manifest import Task
from models.package import LoadedPackage, TrustPolicy, load_package, sha256_hex
from models.registry import Registry
from models.signing import load_public_key, public_key_fingerprint, write_key_pair


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="verify, publish and list signed model packages")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)

    verify = actions.add_parser("verify", help="check a package (directory or .tar) and print what it holds")
    verify.add_argument("path", type=Path, metavar="PATH")
    _add_public_key(verify)
    verify.set_defaults(func=run, action="verify")

    publish = actions.add_parser("publish", help="verify a package and add it to a registry")
    publish.add_argument("path", type=Path, metavar="PATH")
    publish.add_argument("--registry", type=Path, required=True, metavar="DIR")
    _add_public_key(publish)
    publish.set_defaults(func=run, action="publish")

    listing = actions.add_parser("list", help="list the versions in a registry")
    listing.add_argument("--registry", type=Path, required=True, metavar="DIR")
    listing.set_defaults(func=run, action="list")

    rollback = actions.add_parser(
        "rollback", help="serve the version of TASK installed before the current one (audited)"
    )
    rollback.add_argument("task", type=_task, metavar="TASK", help="stroke-dwi-adc | ms-flair (or stroke | ms)")
    rollback.set_defaults(func=run, action="rollback")

    pull = actions.add_parser(
        "pull", help="pull released models once, as the node does ([models] enrollment_bundle, auto_install)"
    )
    pull.set_defaults(func=run, action="pull")

    keygen = actions.add_parser("keygen", help="write OUT_PREFIX.private.pem and OUT_PREFIX.public.pem (Ed25519)")
    keygen.add_argument("prefix", metavar="OUT_PREFIX")
    keygen.set_defaults(func=run, action="keygen")


def _add_public_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--public-key",
        type=Path,
        action="append",
        metavar="PEM",
        help="trust this publisher key (repeatable); default: the demo key only",
    )


def _task(text: str) -> Task:
    try:
        return Task(text)
    except ValueError:
        return Task.from_short_name(text)


def run(args: argparse.Namespace) -> int:
    if args.action == "keygen":
        return _keygen(args.prefix)
    if args.action == "rollback":
        return _rollback(args)
    if args.action == "pull":
        return _pull(args)
    if args.action == "list":
        return _list(Registry(args.registry, TrustPolicy.demo()))
    trust = TrustPolicy.enrolled(map(load_public_key, args.public_key)) if args.public_key else TrustPolicy.demo()
    if args.action == "publish":
        loaded = Registry(args.registry, trust).publish(args.path)
        print(f"published {loaded.manifest.task.value} version {loaded.manifest.version} to {args.registry}")
    else:
        loaded = load_package(args.path, trust)
    _describe(loaded)
    return 0


def _describe(loaded: LoadedPackage) -> None:
    manifest = loaded.manifest
    print(f"task: {manifest.task.value}")
    print(f"version: {manifest.version}")
    print(f"demo: {'yes' if loaded.demo else 'no'}")
    print(f"signer: {loaded.signer_fingerprint}")
    print(f"manifest sha256: {loaded.manifest_sha256}")
    print(f"{manifest.onnx.file} sha256: {sha256_hex(loaded.onnx_bytes)}")


def _list(registry: Registry) -> int:
    for task in Task:
        versions = registry.versions(task)
        print(f"{task.value}: {', '.join(map(str, versions)) if versions else '-'}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    import getpass

    from fedlesion.settings import load_settings
    from inference.models import trust_from_bundle
    from inference.web.audit import AuditAction, AuditLog

    settings = load_settings(Path(args.config) if args.config else None)
    registry = Registry(settings.registry_dir, trust_from_bundle(settings.models.enrollment_bundle, [args.task]))
    pinned = registry.installed(args.task)
    current = pinned.version if pinned else max(registry.versions(args.task), default=None)
    user = f"cli:{getpass.getuser()}"
    pin = registry.rollback(args.task, user)
    AuditLog(settings.storage.data_dir).record(
        user, AuditAction.MODEL_ROLLBACK, task=args.task.value, version=f"{current} -> {pin.version}"
    )
    print(f"{args.task.value}: rolled back from version {current} to version {pin.version}; a running node "
          f"serves it within {settings.inference.registry_poll_s:g} s")
    return 0


def _pull(args: argparse.Namespace) -> int:
    """One pull pass on the node's registry; exit 1 when the coordinator could not be reached."""
    from fedlesion.settings import load_settings
    from inference.jobs import enabled_tasks
    from inference.model_pull import ModelPuller
    from inference.models import ModelService, trust_from_bundle

    settings = load_settings(Path(args.config) if args.config else None)
    tasks = enabled_tasks(settings.tasks)
    trust = trust_from_bundle(settings.models.enrollment_bundle, tasks)
    # an enrolled node refuses the embedded demo defaults anyway: what serves is what the registry holds
    models = ModelService(settings.registry_dir, trust, tasks, defaults_dir=None)
    puller = ModelPuller.from_settings(models, settings.models, settings.storage.data_dir)
    models.start(watch=False, seed=False)
    stored = puller.pull_once()
    for task in sorted(tasks):
        pending = models.pending(task)
        print(
            f"{task.value}: "
            + (f"pulled version {stored[task]}, " if task in stored else "nothing new, ")
            + f"serving {models.served_versions().get(task, 'nothing')}"
            + (f", pending {', '.join(map(str, pending))}" if pending else "")
        )
    for refusal in models.refusals():
        print(f"refused: {refusal.kind}: {refusal.reason}")
    error = puller.status()["last_error"]
    if error:
        print(f"fedlesion: pulling from {puller.coordinator} failed: {error}", file=sys.stderr)
        return 1
    return 0


def _keygen(prefix: str) -> int:
    private_path, public_path, public_pem = write_key_pair(prefix)
    print(f"wrote {private_path} (keep it secret) and {public_path}")
    print(f"fingerprint: {public_key_fingerprint(load_public_key(public_pem))}")
    return 0
