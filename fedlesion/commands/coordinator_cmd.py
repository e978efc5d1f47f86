"""`fedlesion coordinator`: set up a consortium's coordinator, enroll and revoke sites, run the rounds, release
candidates and show where things stand (training/federation/)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.federation.roles import SiteRole
from models.manifest import Task
from training.federation.aggregation import STRATEGY_NAMES

DEFAULT_ADDRESS = "127.0.0.1:50051"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("coordinator", help="the federated training coordinator (needs the train extra)")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True, parser_class=type(parser))

    init = actions.add_parser("init", help="create the CA, the server certificate, the signing keys and the state")
    _dir(init)
    init.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                      help=f"where sites reach the coordinator (default {DEFAULT_ADDRESS})")
    init.set_defaults(func=run_init)

    enroll = actions.add_parser("enroll", help="sign a site's certificate request into its enrollment bundle")
    enroll.add_argument("site", metavar="SITE")
    _dir(enroll)
    enroll.add_argument("--role", required=True, choices=[role.value for role in SiteRole])
    source = enroll.add_mutually_exclusive_group(required=True)
    source.add_argument("--csr", type=Path, metavar="FILE", help="the request from `fedlesion site keygen`")
    source.add_argument("--generate", action="store_true",
                        help="make the site's key here and put it in the bundle (tests and small setups)")
    enroll.add_argument("--out", type=Path, required=True, metavar="SITE.bundle")
    _days(enroll)
    enroll.set_defaults(func=run_enroll)

    renew = actions.add_parser("renew", help="a new certificate for an enrolled site, as a new bundle")
    renew.add_argument("site", metavar="SITE")
    _dir(renew)
    key = renew.add_mutually_exclusive_group()
    key.add_argument("--csr", type=Path, metavar="FILE", help="a request for a new site key")
    key.add_argument("--bundle", type=Path, metavar="FILE", help="the old bundle, whose key the new one keeps")
    renew.add_argument("--out", type=Path, required=True, metavar="SITE.bundle")
    _days(renew)
    renew.set_defaults(func=run_renew)

    revoke = actions.add_parser("revoke", help="refuse a site from its next call on (no restart needed)")
    revoke.add_argument("site", metavar="SITE")
    _dir(revoke)
    revoke.add_argument("--reason", default="", metavar="TEXT")
    revoke.set_defaults(func=run_revoke)

    resume = actions.add_parser("resume", help="let a site that screening suspended (or a paused one) back in")
    resume.add_argument("site", metavar="SITE")
    _dir(resume)
    resume.set_defaults(func=run_resume)

    declare = actions.add_parser("declare", help="record a site's declared dataset size (screening's case check)")
    declare.add_argument("site", metavar="SITE")
    _dir(declare)
    declare.add_argument("--cases", type=int, required=True, metavar="N",
                         help="its local training cases: an update reporting more is refused")
    declare.set_defaults(func=run_declare)

    plan = actions.add_parser("plan", help="print a commented federated plan to edit and keep")
    plan.add_argument("--task", required=True, choices=[task.value for task in Task])
    plan.add_argument("--rounds", type=int, default=3, metavar="R")
    plan.add_argument("--local-epochs", type=int, default=1, metavar="E")
    plan.add_argument("--strategy", default="fedavg", choices=STRATEGY_NAMES)
    plan.add_argument("--mu", type=float, metavar="MU", help="FedProx's proximal weight (default 0.01)")
    plan.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                      help="a parameter of the rule (repeatable): beta=0.9 (beta), temperature=1.0 and "
                           "score=cases|val_loss (softmax), fraction=0.25 (trimmed-mean)")
    plan.add_argument("--quorum", type=int, default=1, metavar="Q", help="accepted updates a round needs")
    plan.add_argument("--deadline-s", type=float, default=3600.0, metavar="S", help="seconds a round waits")
    plan.add_argument("--network", default="default", choices=("tiny", "default", "gpu"),
                      help="tiny: small enough for tests; default: today's CPU plan; gpu: the GPU plan (sites run "
                           "with --device cuda)")
    plan.set_defaults(func=run_plan)

    serve = actions.add_parser("serve", help="run the rounds and serve sites and nodes (keeps running after them)")
    _dir(serve)
    serve.add_argument("--plan", type=Path, required=True, metavar="PLAN.toml")
    serve.add_argument("--listen", metavar="HOST:PORT", help="bind here instead of the address given at init")
    serve.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus /metrics over plain HTTP on this port (default: none)")
    serve.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                       help="the address /metrics binds to (default 127.0.0.1; 0.0.0.0 lets another host scrape)")
    serve.set_defaults(func=run_serve)

    release = actions.add_parser("release", help="sign a candidate with the release key: nodes may pull it")
    release.add_argument("task", choices=[task.value for task in Task], metavar="TASK")
    release.add_argument("version", type=int, metavar="VERSION")
    _dir(release)
    release.add_argument("--by", metavar="NAME", help="who releases it (default: the login name)")
    release.set_defaults(func=run_release)

    publish = actions.add_parser("publish", help="register a package trained elsewhere as the next candidate")
    publish.add_argument("package", type=Path, metavar="PACKAGE")
    _dir(publish)
    publish.set_defaults(func=run_publish)

    status = actions.add_parser("status", help="sites, rounds and versions")
    _dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=run_status)


def _dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, required=True, metavar="DIR", help="the coordinator directory")


def _days(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=float, default=365.0, metavar="N", help="certificate lifetime (default 365)")


def run_init(args: argparse.Namespace) -> int:
    from training.federation import admin

    layout = admin.init(args.dir, args.address)
    print(f"coordinator initialised in {layout.root} for {args.address}")
    print(f"  {layout.ca}: the CA key (enroll, renew only; keep it offline if you can)")
    print(f"  {layout.release}: the release-signing key (release only)")
    print(f"  {layout.server}: what `serve` reads")
    return 0


def run_enroll(args: argparse.Namespace) -> int:
    from training.federation import admin

    csr = None if args.generate else args.csr.read_bytes()
    bundle = admin.enroll(args.dir, args.site, args.role, args.out, csr_pem=csr, lifetime_days=args.days)
    print(f"enrolled {bundle.site} as {bundle.role.value}; bundle {args.out} (certificate {bundle.fingerprint[:16]})")
    return 0


def run_renew(args: argparse.Namespace) -> int:
    from training.federation import admin

    csr = args.csr.read_bytes() if args.csr else None
    bundle = admin.renew(args.dir, args.site, args.out, csr_pem=csr, old_bundle=args.bundle, lifetime_days=args.days)
    print(f"renewed {bundle.site}; bundle {args.out} (certificate {bundle.fingerprint[:16]})")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from training.federation import admin

    admin.revoke(args.dir, args.site, args.reason)
    print(f"revoked {args.site}: refused from its next call on")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from training.federation.plan import plan_for

    params: dict[str, float | str] = {} if args.mu is None else {"mu": args.mu}
    for item in args.param:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[name] = float(value)
        except ValueError:
            params[name] = value  # a text parameter (softmax's score): the rule checks its value
    plan = plan_for(args.task, network=args.network, rounds=args.rounds, local_epochs=args.local_epochs,
                    strategy=args.strategy, strategy_params=params, quorum=args.quorum, deadline_s=args.deadline_s)
    sys.stdout.write(plan.to_toml())
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from training.federation.admin import CoordinatorDir
    from training.federation.coordinator import serve
    from training.federation.plan import FederatedPlan

    plan = FederatedPlan.from_toml(args.plan.read_text(encoding="utf-8"))
    print(f"serving plan {plan.sha256} ({plan.rounds} rounds, {plan.strategy}) from {args.dir}; each round's "
          f"report in {CoordinatorDir(args.dir).rounds(plan.sha256)}", flush=True)
    serve(args.dir, plan, listen=args.listen, metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    return 0


def run_resume(args: argparse.Namespace) -> int:
    from training.federation import admin

    admin.resume(args.dir, args.site)
    print(f"resumed {args.site}: invited from the next round it can join")
    return 0


def run_declare(args: argparse.Namespace) -> int:
    from training.federation import admin

    admin.declare(args.dir, args.site, args.cases)
    print(f"{args.site} declares {args.cases} training cases: an update reporting more is refused")
    return 0


def run_release(args: argparse.Namespace) -> int:
    from training.federation import admin

    path = admin.release(args.dir, args.task, args.version, by=args.by)
    print(f"released {args.task} version {args.version} ({path})")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from training.federation import admin

    loaded = admin.publish(args.dir, args.package)
    print(f"{loaded.manifest.task.value} version {loaded.manifest.version} is a candidate")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from training.federation.admin import CoordinatorDir

    state = CoordinatorDir(args.dir).state()
    try:
        status = state.status()
    finally:
        state.close()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(f"plan: {status['plan_sha256'] or '-'}")
    print("sites:")
    for site in status["sites"]:
        why = f" ({site['reason']})" if site["reason"] else ""
        declared = f", declares {site['declared_cases']} cases" if site["declared_cases"] else ""
        print(f"  {site['name']:<20} {site['role']:<9} {site['state']}{why}, last seen {_when(site['last_seen'])}"
              f"{', ' + site['activity'] if site['activity'] else ''}{declared}")
    print("rounds:")
    for round_ in status["rounds"]:
        version = f", version {round_['version']}" if round_["version"] else ""
        down, up = (sum(site.get(direction, 0) for site in round_["bytes"].values()) for direction in ("down", "up"))
        print(f"  round {round_['round']} ({round_['plan_sha256'][:12]}): {round_['state']}, attempt "
              f"{round_['attempt']}, {len(round_['contributors'])} of {len(round_['invited'])} sites{version}, "
              f"models {down / 1e6:.3g} MB to sites, {up / 1e6:.3g} MB back")
        if round_["note"]:
            print(f"    retried: {round_['note']}")
        for site, metrics in round_["metrics"].items():
            print(f"    {site}: " + ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items())))
        for site, evaluation in round_["evaluations"].items():
            histograms = evaluation.pop("histograms")
            print(f"    {site} (evaluator): "
                  + ", ".join(f"{key} {value:.4g}" for key, value in sorted(evaluation.items())))
            for metric, bins in sorted(histograms.items()):
                print(f"      {metric}: " + ", ".join(f"[{low:g}, {high:g}) {count}" for low, high, count
                                                     in zip(bins["edges"], bins["edges"][1:], bins["counts"])))
        for refused in round_["rejected"]:
            print(f"    refused from {refused['site']}: {refused['reason']}")
    print("versions:")
    for version in status["versions"]:
        who = f" by {version['released_by']} {_when(version['released_at'])}" if version["released_by"] else ""
        threshold = "" if version["threshold"] is None else f", threshold {version['threshold']:g}"
        print(f"  {version['task']} {version['version']}: {version['state']}{who}{threshold}")
    return 0


def _when(stamp: Any) -> str:
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
