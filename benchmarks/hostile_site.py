"""One hostile site among four (issue 13, item 2): does screening keep the published model what it is without it?

A simulated federation: four synthetic sites, each with its own scanner profile (`training.synthetic.generate_site`)
and seeded cases made once as `fedlesion simulate` makes a center's (training.study.centers: train, val and test
splits as NIfTI files), FedAvg on the tests' tiny network. Each run deploys the federation afresh *in this process*:
`coordinator init`, one enrolled bundle and custodian policy per site, the real coordinator (`Coordinator.start`:
the gRPC servicer over mTLS on loopback and the round loop, whose close screens, aggregates, exports to ONNX and
signs) and four real site loops (`training.federation.site.Site`, what `fedlesion site` runs: GetTask, GetWeights,
the real `LocalTrainer`, PutUpdate) in threads instead of processes. In every run but the clean one, site 4 is
hostile: its trainer's update is altered after honest local training, a hook of this benchmark only:

- `scaled`: its change from the global weights ×100;
- `flipped`: its change ×−1 (the sign flipped);
- `claims`: its update untouched, 10⁶ training cases reported (FedAvg would give it 10⁶/(10⁶+15) of the weight);
- `weights`: the change of its learned parameters ×100, its normalization layers' running statistics honest (their
  change outweighs the parameters' on a batch-normalized network: screened together, this one passed).

Each run's last candidate is released and scored as a node runs it (`training.study.scoring.score_package`: the ONNX
engine and the pipeline) on a fixed validation set, the four sites' held-out test cases. Every run uses the same
cases, splits, plan and seeds, so only the attack differs. Two honest references: `clean` (four honest sites) and
`without site-4` (the other three alone: what screening that refuses every hostile update from round 1 gives, since
the honest sites' training is deterministic). A run with screening off (limits that refuse nothing; the check of
negative running variances stays, so `scaled` and `flipped` are refused by it even then) shows what screening
prevents. Each row also says which updates screening refused, in which rounds (a site refused twice in a row is
suspended), and how many updates each round's model was built from; below the table, how near the honest runs'
updates came to screening's limits, and the first refusal of each run with its reason.

Goal (the issue): with screening on, the Dice of each attack's run within 0.02 of the run without the hostile site
(the clean run's difference is shown too). Progress goes to stderr; run it niced, under the shared CPU lock:

    flock /tmp/cpu.lock nice -n 10 .venv/bin/python benchmarks/hostile_site.py [--rounds 3] [--local-epochs 5]
        [--attacks scaled flipped claims weights] [--unscreened weights claims] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.federation.wire import decode_weights  # noqa: E402
from models.manifest import Task  # noqa: E402
from training.datasets import TrainingCase, load_cases, read_csv_manifest  # noqa: E402
from training.federation import admin  # noqa: E402
from training.federation.aggregation import SiteUpdate  # noqa: E402
from training.federation.coordinator import Coordinator  # noqa: E402
from training.federation.plan import FederatedPlan, plan_for  # noqa: E402
from training.federation.policy import SitePolicy  # noqa: E402
from training.federation.screening import (  # noqa: E402
    PARAMETERS,
    STATISTICS,
    ScreeningLimits,
    change_gram,
    change_grams,
    cosines,
    is_running_statistic,
    norm_ratios,
)
from training.federation.site import Site  # noqa: E402
from training.plan import AugmentationPlan  # noqa: E402
from training.study.centers import CenterData, prepare_centers  # noqa: E402
from training.study.config import StudyConfig  # noqa: E402
from training.study.runner import trainer_site  # noqa: E402
from training.study.scoring import score_package  # noqa: E402
from training.trainer import LocalUpdate  # noqa: E402

TASK = Task.STROKE_DWI_ADC
SEED = 14
SCANNERS = {"site-1": 5, "site-2": 9, "site-3": 14, "site-4": 21}  # generate_site profiles, as in study-small.toml
HOSTILE = "site-4"
CASES_PER_SITE = 8  # 2 test (the validation set), 1 val (what the site reports each round), 5 train
GOAL_DICE = 0.02
# Limits that refuse nothing: the norm check needs a finite ratio, no cosine is below −1, no claim above 10⁹ (a
# negative running variance is refused whatever the limits).
UNSCREENED = ScreeningLimits(max_norm_ratio=1e300, min_cosine=-1.0, max_cases=10**9)
HEARTBEAT_S = 2.0  # the coordinator's heartbeat interval: sites poll at least every second
STALL_S = 300.0  # a run whose rounds stop closing for this long ends early
FAILED_CLOSES = 3  # a run ends early when this many errors (e.g. a close whose export fails) follow its last close
DEADLINE_S = 900.0  # the plan's round deadline: never reached (a round closes once all four answered)
POLL_S = 0.25


@dataclass(frozen=True)
class Attack:
    """What the hostile site does to its honest update: its change from the global weights times `factor` (in the
    normalization layers' running statistics too unless `statistics` is False), and the number of training cases it
    reports (its own when None). Integer tensors (normalization counters) stay."""

    name: str
    description: str
    factor: float = 1.0
    statistics: bool = True
    claimed_cases: int | None = None

    def alters(self, name: str, value: np.ndarray) -> bool:
        return np.issubdtype(value.dtype, np.floating) and (self.statistics or not is_running_statistic(name))

    def apply(self, global_weights: Mapping[str, np.ndarray], update: LocalUpdate) -> LocalUpdate:
        weights = {name: (global_weights[name] + self.factor * (value - global_weights[name])).astype(value.dtype)
                   if self.alters(name, value) else value for name, value in update.weights.items()}
        cases = update.n_cases if self.claimed_cases is None else self.claimed_cases
        return LocalUpdate(weights, cases, update.metrics)


ATTACKS = {attack.name: attack for attack in (
    Attack("scaled", "change ×100", factor=100.0),
    Attack("flipped", "change ×−1", factor=-1.0),
    Attack("claims", "claims 10⁶ cases", claimed_cases=10**6),
    Attack("weights", "learned parameters' change ×100", factor=100.0, statistics=False),
)}


@dataclass(frozen=True)
class Run:
    attack: Attack | None  # None: every site honest
    screened: bool = True
    without_hostile: bool = False  # the three other sites alone

    @property
    def label(self) -> str:
        if self.without_hostile:
            return f"without {HOSTILE}"
        return "clean" if self.attack is None else f"{HOSTILE} {self.attack.description}"


@dataclass
class Result:
    run: Run
    dice: float | None  # the last candidate's mean Dice on the validation set; None: no round closed
    rounds: list[dict[str, Any]]  # `coordinator status`'s closed rounds
    suspended: str  # why the hostile site was suspended, or ""
    seconds: float
    cpu_seconds: float
    margins: dict[str, float]  # honest runs: how near screening's limits their updates came (`honest_margins`)
    error: str = ""  # why the last rounds did not close


class HostileTrainer:
    """A site's real `LocalTrainer` whose every update leaves altered by `attack` (`Site._train` passes the round's
    global weights as `global_weights`)."""

    def __init__(self, trainer: Any, attack: Attack) -> None:
        self._trainer = trainer
        self._attack = attack

    def train(self, weights: Mapping[str, np.ndarray] | None = None, epochs: int = 1, *,
              global_weights: Mapping[str, np.ndarray] | None = None, prox_mu: float = 0.0) -> LocalUpdate:
        assert global_weights is not None, "the site passes the round's global weights"
        update = self._trainer.train(weights, epochs, global_weights=global_weights, prox_mu=prox_mu)
        return self._attack.apply(global_weights, update)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


class HostileSite(Site):
    """`fedlesion site`'s loop with its trainer wrapped in a `HostileTrainer`."""

    def __init__(self, *args: Any, attack: Attack, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack

    def _prepare(self, plan: FederatedPlan) -> Any:
        prepared = super()._prepare(plan)
        if not isinstance(prepared.trainer, HostileTrainer):
            prepared = dataclasses.replace(prepared, trainer=HostileTrainer(prepared.trainer, self.attack))
            self._prepared = prepared
        return prepared


class Errors(logging.Handler):
    """The federation's errors (e.g. a close that failed and is retried), shown when a run ends early."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + (f": {record.exc_info[1]}" if record.exc_info else ""))


def make_plan(rounds: int, local_epochs: int) -> FederatedPlan:
    """The tiny network's federated plan, tuned to learn within a few rounds: lr 0.01 held constant, 16 patches per
    local epoch, half of them on lesions, no augmentation. Quorum 3: a round still closes when one update is
    refused."""
    plan = plan_for(TASK, network="tiny", rounds=rounds, local_epochs=local_epochs, strategy="fedavg", quorum=3,
                    deadline_s=DEADLINE_S)
    no_augmentation = AugmentationPlan(flip_prob=0, affine_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0,
                                       bias_field_prob=0)
    training = replace(plan.training, lr=0.01, min_lr_ratio=1.0, iterations_per_epoch=16, foreground_fraction=0.5,
                       augmentation=no_augmentation, seed=SEED)
    return replace(plan, training=training)


def make_centers(folder: Path) -> list[CenterData]:
    """The four sites' partitions (seeded NIfTI cases and CSV manifests), made once for every run."""
    study = {
        "study": {"task": TASK.value, "seed": SEED, "network": "tiny", "val_fraction": 0.2, "test_fraction": 0.25},
        "centers": {name: {"role": "train", "synthetic": CASES_PER_SITE, "scanner": scanner}
                    for name, scanner in SCANNERS.items()},
    }
    return prepare_centers(StudyConfig.from_dict(study, folder / "study.toml"), folder / "data", workers=2)


def run_federation(run: Run, plan: FederatedPlan, centers: Sequence[CenterData], validation: Sequence[TrainingCase],
                   folder: Path, progress: tqdm) -> Result:
    """Deploy, run every round, release the last candidate and score it."""
    if not run.screened:
        plan = replace(plan, screening=UNSCREENED)
    coordinator_dir = folder / "coordinator"
    admin.init(coordinator_dir, f"127.0.0.1:{_free_port()}")
    stop = threading.Event()
    sites = []
    for center in centers:
        if run.without_hostile and center.name == HOSTILE:
            continue
        site_dir = folder / "sites" / center.name
        site_dir.mkdir(parents=True)
        bundle = admin.enroll(coordinator_dir, center.name, "trainer", site_dir / "site.bundle")
        policy: SitePolicy = trainer_site(center.name, [center], plan, SEED).policy
        if run.attack is not None and center.name == HOSTILE:
            sites.append(HostileSite(bundle, policy, site_dir / "state", stop=stop, attack=run.attack))
        else:
            sites.append(Site(bundle, policy, site_dir / "state", stop=stop))
    errors = Errors()
    logging.getLogger("training.federation").addHandler(errors)
    started, cpu_started = time.monotonic(), time.process_time()
    coordinator = Coordinator(coordinator_dir, plan, heartbeat_interval_s=HEARTBEAT_S, tick_s=0.05)
    coordinator.start()
    threads = [threading.Thread(target=site.run, name=f"site {site.bundle.site}", daemon=True) for site in sites]
    for thread in threads:
        thread.start()
    try:
        status, error = _wait(coordinator_dir, plan, run, progress, errors)
    finally:
        stop.set()
        coordinator.stop()
        for thread in threads:
            thread.join(timeout=30)
        logging.getLogger("training.federation").removeHandler(errors)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    hostile = next((site for site in status["sites"] if site["name"] == HOSTILE), {})
    suspended = (hostile.get("reason") or "") if hostile.get("state") == "suspended" else ""
    rounds = [r for r in status["rounds"] if r["version"]]
    margins = honest_margins(coordinator.rounds_dir, len(rounds)) if run.attack is None else {}
    if not rounds:
        return Result(run, None, rounds, suspended, seconds, cpu_seconds, margins, error)
    package = admin.release(coordinator_dir, TASK, rounds[-1]["version"], by="benchmarks/hostile_site.py")
    keys = admin.CoordinatorDir(coordinator_dir).release_public_keys()
    metrics = score_package(package, keys, TASK, validation)
    dice = float(np.mean([case.dice for case in metrics]))
    return Result(run, dice, rounds, suspended, seconds, cpu_seconds, margins, error)


def honest_margins(rounds_dir: Path, rounds: int) -> dict[str, float]:
    """Over every round of an honest run, the screening figures nearest its limits: the largest norm ratio of each
    group of tensors and the smallest cosine of the learned parameters' change with the others' mean, with the
    smallest cosine of all floating tensors together (how screening compared changes before it split them)."""
    margins = {f"{PARAMETERS} norm ratio": 0.0, f"{STATISTICS} norm ratio": 0.0, f"{PARAMETERS} cosine": 1.0,
               "all tensors cosine": 1.0}
    base_path = rounds_dir / "initial.weights"
    for number in range(1, rounds + 1):
        base = decode_weights(base_path.read_bytes())
        updates = [SiteUpdate(path.name, decode_weights(path.read_bytes()), 1)
                   for path in sorted((rounds_dir / str(number) / "updates").glob("*.weights"))]
        grams = change_grams(base, updates)
        for what, gram in grams.items():
            margins[f"{what} norm ratio"] = max(margins[f"{what} norm ratio"], float(np.nanmax(norm_ratios(gram))))
        for what, gram in ((PARAMETERS, grams[PARAMETERS]), ("all tensors", change_gram(base, updates))):
            margins[f"{what} cosine"] = min(margins[f"{what} cosine"], float(np.nanmin(cosines(gram)[0])))
        base_path = rounds_dir / str(number) / "aggregate.weights"
    return margins


def _wait(coordinator_dir: Path, plan: FederatedPlan, run: Run, progress: tqdm, errors: Errors
          ) -> tuple[dict[str, Any], str]:
    """Poll the coordinator's state until its last round has a version; (status, "") or (status, why not)."""
    layout = admin.CoordinatorDir(coordinator_dir)
    closed, changed, errors_before = 0, time.monotonic(), 0
    while True:
        state = layout.state()
        try:
            status = state.status()
        finally:
            state.close()
        done = sum(1 for r in status["rounds"] if r["version"])
        if done > closed:
            progress.update(done - closed)
            closed, changed, errors_before = done, time.monotonic(), len(errors.messages)
        activity = " ".join(f"{s['name'][-1]}:{s['activity'] if s['state'] == 'active' else s['state']}"
                            for s in status["sites"])
        progress.set_postfix_str(f"{run.label}, screening {'on' if run.screened else 'off'}: {activity}",
                                 refresh=False)
        if done == plan.rounds:
            return status, ""
        failed = len(errors.messages) - errors_before
        if failed >= FAILED_CLOSES or time.monotonic() - changed > STALL_S:
            why = errors.messages[-1] if errors.messages else "no error logged"
            return status, (f"round {closed + 1} did not close ({failed} errors in {time.monotonic() - changed:.0f} "
                            f"s, the last: {why})")
        time.sleep(POLL_S)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refusals(result: Result) -> list[tuple[int, str, str]]:
    """(round, site, reason) of every update refused at screening."""
    prefix = "screening: "
    return [(r["round"], refused["site"], refused["reason"].removeprefix(prefix)) for r in result.rounds
            for refused in r["rejected"] if refused["reason"].startswith(prefix)]


def table(results: Sequence[Result]) -> list[str]:
    clean = next((r.dice for r in results if r.run.attack is None and not r.run.without_hostile), None)
    without = next((r.dice for r in results if r.run.without_hostile), None)
    lines = [f"| run | screening | Dice | Δ vs clean | Δ vs without {HOSTILE} | goal \\|Δ\\| ≤ 0.02 (vs without / "
             "clean) | refused at screening (round: site) | updates per round | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        refused = ", ".join(f"{number}: {site}" for number, site, _ in refusals(result)) or "none"
        if result.suspended:
            refused += f"; {HOSTILE} suspended"
        counts = " ".join(str(len(r["contributors"])) for r in result.rounds)
        attacked = result.run.attack is not None
        dice = "—" if result.dice is None else f"{result.dice:.3f}"
        delta = _difference(result.dice, clean if attacked or result.run.without_hostile else None)
        delta_without = _difference(result.dice, without if attacked else None)
        goal = "—"
        if attacked and result.run.screened:
            goal = " / ".join(_verdict(result.dice, reference) for reference in (without, clean))
        lines.append(f"| {result.run.label} | {'on' if result.run.screened else 'off'} | {dice} | {delta} | "
                     f"{delta_without} | {goal} | {refused} | {counts} | {result.seconds:.0f} | "
                     f"{result.cpu_seconds:.0f} |")
    return lines


def _verdict(dice: float | None, reference: float | None) -> str:
    return "—" if dice is None or reference is None else "met" if abs(dice - reference) <= GOAL_DICE else "NOT met"


def _difference(dice: float | None, reference: float | None) -> str:
    return "—" if dice is None or reference is None else f"{dice - reference:+.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--attacks", nargs="*", choices=list(ATTACKS), default=list(ATTACKS),
                        help="the attacks run with screening on")
    parser.add_argument("--unscreened", nargs="*", choices=list(ATTACKS), default=["weights", "claims"],
                        help="the attacks also run with screening off")
    parser.add_argument("--log", type=Path, help="the federation's log (coordinator and sites) into this file")
    parser.add_argument("--keep", type=Path, help="work here and keep the deployments (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        raise ValueError("--rounds: at least 2 (a refused site is suspended at its second refusal)")
    logging.basicConfig(level=logging.INFO if args.log else logging.CRITICAL, filename=args.log,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter's notes on torchvision, every round
    torch.set_num_threads(1)  # four trainers share the two cores: one thread each rather than eight
    work = args.keep or Path(tempfile.mkdtemp(prefix="hostile-site-"))
    runs = [Run(None), Run(None, without_hostile=True)] + [Run(ATTACKS[name]) for name in args.attacks] + [
        Run(ATTACKS[name], screened=False) for name in args.unscreened]
    plan = make_plan(args.rounds, args.local_epochs)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        print(f"making the four sites' cases ({CASES_PER_SITE} each) in {work}", file=sys.stderr)
        centers = make_centers(work)
        validation = []
        for center in centers:
            manifest = center.manifest("test")
            assert manifest is not None
            cases, _ = load_cases(read_csv_manifest(manifest, TASK))
            validation += cases
        results = []
        with tqdm(total=len(runs) * plan.rounds, unit="round", file=sys.stderr, dynamic_ncols=True) as progress:
            for number, run in enumerate(runs):
                results.append(run_federation(run, plan, centers, validation, work / "runs" / str(number), progress))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    counts = {center.name: center.counts for center in centers}
    print(f"in-process deployment (the real coordinator and four `Site` loops as threads, gRPC/mTLS on loopback); "
          f"FedAvg, tiny network, {plan.rounds} rounds × {plan.local_epochs} local epochs of "
          f"{plan.training.iterations_per_epoch} patches, lr {plan.training.lr:g}, quorum {plan.quorum}; screening "
          f"limits {dataclasses.asdict(plan.screening)}; sites (train/val/test cases): "
          + ", ".join(f"{name} scanner {SCANNERS[name]} {c['train']}/{c['val']}/{c['test']}"
                      for name, c in counts.items()))
    print(f"validation set: the sites' {len(validation)} test cases, scored through the released package as a node "
          f"runs it")
    print()
    print("\n".join(table(results)))
    print()
    for result in results:
        if result.margins:
            figures = ", ".join(f"{name} {value:.2f}" for name, value in result.margins.items())
            print(f"{result.run.label}, honest updates over all rounds: {figures} (largest ratios, smallest cosines)")
    for result in results:
        for number, site, reason in refusals(result)[:1]:
            print(f"{result.run.label}: round {number}, {site}: {reason}")
        if result.error:
            last = f"round {result.rounds[-1]['round']}'s" if result.rounds else "no"
            print(f"{result.run.label}: {result.error}; its Dice is {last} candidate's")
    print(f"total {time.monotonic() - started:.0f} s; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (1 min), {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
