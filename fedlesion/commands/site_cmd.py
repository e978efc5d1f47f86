"""`fedlesion site`: a federated site (keygen, the custodian's policy, and the site loop itself)."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.manifest import Task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site", help="a federated training site: its custodian's policy",
    )
    parser.set_defaults(func=run, site_parser=parser)
    actions = parser.add_subparsers(title="site commands", metavar="ACTION", parser_class=type(parser))

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
    policy.set_defaults(func=run_policy)


def run(args: argparse.Namespace) -> int:
    args.site_parser.error("choose an action: policy")


def run_policy(args: argparse.Namespace) -> int:
    from training.federation.policy import DatasetUse, PolicyDataset, SitePolicy

    datasets = [PolicyDataset(*_name_spec(item, "--data"), DatasetUse.TRAIN, args.task) for item in args.data]
    datasets += [PolicyDataset(*_name_spec(item, "--val"), DatasetUse.VAL, args.task) for item in args.val]
    caps = {key: value for key, value in (("max_local_epochs", args.max_local_epochs),
                                          ("max_hours_per_round", args.max_hours_per_round)) if value is not None}
    policy = SitePolicy(
        role=args.role, datasets=tuple(datasets), approved_plans=tuple(_plan_sha256(item) for item in args.approve),
        approve_first_sight=args.approve_first_sight, seed=args.seed, **caps,
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
