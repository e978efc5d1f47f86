"""`fedlesion site`: a federated site (keygen, the custodian's policy, and the site loop itself)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.manifest import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site", help="run a federated training site under its custodian's policy (or: site keygen, site policy)",
        description="Runs the site: trains the coordinator's rounds on the policy's datasets (never exits when the "
                    "coordinator is away; it retries). `site keygen` and `site policy` prepare its files.",
    )
    parser.add_argument("--bundle", metavar="FILE", help="the enrollment bundle from `fedlesion coordinator enroll`")
    parser.add_argument("--key", metavar="FILE", help="the site key when the bundle has none (default: site.key "
                                                       "beside the bundle)")
    parser.add_argument("--policy", metavar="TOML", help="the custodian's policy (`fedlesion site policy`)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the site keeps its state, e.g. the plan pinned on first sight "
                             "(default: site-state/ beside the policy)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.set_defaults(func=run, site_parser=parser)
    actions = parser.add_subparsers(title="site commands", metavar="ACTION", parser_class=type(parser))

    keygen = actions.add_parser("keygen", help="make the site's key and certificate request")
    keygen.add_argument("--out", required=True, metavar="DIR", help="writes DIR/site.key (0600) and DIR/site.csr")
    keygen.add_argument("--name", metavar="SITE", help="the name the request carries (the coordinator's "
                                                        "`enroll SITE` decides the certificate's; default: hostname)")
    keygen.set_defaults(func=run_keygen)

    policy = actions.add_parser("policy", help="print a commented custodian policy to edit and keep")
    policy.add_argument("--role", required=True, choices=("train", "evaluate", "pull"),
                        help="what the site may do; narrows the certificate's role, never widens it")
    policy.add_argument("--data", action="append", default=[], metavar="NAME=SPEC",
                        help="a dataset to train on (any --data form `fedlesion train` accepts); repeatable")
    policy.add_argument("--val", action="append", default=[], metavar="NAME=SPEC",
                        help="a validation dataset (without one, a seeded share of the train datasets is held out)")
    policy.add_argument("--task", choices=[task.value for task in Task],
                        help="keep the datasets to plans of this task (default: any task)")
    approval = policy.add_mutually_exclusive_group()
    approval.add_argument("--approve", action="append", default=[], metavar="PLAN",
                          help="a plan the site runs: its TOML file or its sha256; repeatable")
    approval.add_argument("--approve-first-sight", action="store_true",
                          help="run the first plan the coordinator sends and refuse any other")
    policy.add_argument("--max-local-epochs", type=int, metavar="N", help="cap on a plan's local epochs per round")
    policy.add_argument("--max-hours-per-round", type=float, metavar="H", help="cap on a plan's round deadline")
    policy.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the held-out split (default 0)")
    policy.add_argument("--min-cases-per-mean", type=int, metavar="N",
                        help="the fewest validation cases a shared mean may summarize (default: as many as a shared "
                             "histogram's bin holds; 1 only for synthetic or public cases)")
    policy.set_defaults(func=run_policy)


def run(args: argparse.Namespace) -> int:
    if not args.bundle or not args.policy:
        args.site_parser.error("the site needs --bundle and --policy (or an action: keygen, policy)")
    from models.federation.enrollment import EnrollmentBundle
    from training.federation.policy import SitePolicy
    from training.federation.site import Site

    bundle = EnrollmentBundle.read(args.bundle, key_path=args.key)
    policy = SitePolicy.read(args.policy)
    state_dir = Path(args.state_dir) if args.state_dir else Path(args.policy).resolve().parent / "site-state"
    site = Site(bundle, policy, state_dir, device=args.device)
    print(f"site {bundle.site} ({site.role}) → {bundle.coordinator_address}; state in {state_dir}", file=sys.stderr)
    site.run()
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    import socket

    from training.federation.site import write_site_key

    key_path, csr_path = write_site_key(Path(args.out), args.name or socket.gethostname())
    print(f"wrote {key_path} (keep it on this machine) and {csr_path} (send it to the coordinator's operator)")
    return 0


def run_policy(args: argparse.Namespace) -> int:
    from training.federation.policy import DatasetUse, PolicyDataset, SitePolicy

    datasets = [PolicyDataset(*_name_spec(item, "--data"), DatasetUse.TRAIN, args.task) for item in args.data]
    datasets += [PolicyDataset(*_name_spec(item, "--val"), DatasetUse.VAL, args.task) for item in args.val]
    limits = {key: value for key, value in (("max_local_epochs", args.max_local_epochs),
                                            ("max_hours_per_round", args.max_hours_per_round),
                                            ("min_cases_per_mean", args.min_cases_per_mean)) if value is not None}
    policy = SitePolicy(
        role=args.role, datasets=tuple(datasets), approved_plans=tuple(_plan_sha256(item) for item in args.approve),
        approve_first_sight=args.approve_first_sight, seed=args.seed, **limits,
    )
    print(policy.to_toml(), end="")
    return 0


def _name_spec(item: str, option: str) -> tuple[str, str]:
    name, sep, spec = item.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"{option} {item}: expected NAME=SPEC")
    return name, spec


def _plan_sha256(item: str) -> str:
    """A plan file's identity, or the sha256 itself."""
    path = Path(item)
    if not path.is_file():
        if len(item) != 64 or not all(c in "0123456789abcdef" for c in item.lower()):
            raise ValueError(f"--approve {item}: neither a plan file nor a sha256")
        return item.lower()
    from training.federation.plan import FederatedPlan

    try:
        return FederatedPlan.from_toml(path.read_text(encoding="utf-8")).sha256
    except ValueError as error:
        raise ValueError(f"--approve {item}: {error}") from None
