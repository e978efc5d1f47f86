"""Runs a study: for each arm, the real coordinator and one real site process per center on loopback, then the final
model of each center scored per case (scoring.py).

Each federation is deployed as a consortium deploys one (README, "Federated training"): `admin.init` makes the
coordinator's CA and keys, `admin.enroll` each center's bundle (trainers for large centers, evaluators for limited
ones), each center gets a custodian policy approving the plan by its sha256, and `fedlesion coordinator serve` and
`fedlesion site` run as processes; when the last round's candidate has been scored by every evaluator the operator's
`admin.release` releases it, and the study scores that released package as a node would (verified against the
release key). The arms:

- a rule (FedAvg, FedProx, …): every large center trains, every limited center evaluates each round's aggregate;
- `centralized`: one site holding every large center's training and validation cases; it draws as many patches per
  epoch as the large centers together, so it trains as many steps as the federation does in all;
- `local`: each large center alone (a federation of one); a limited center has no model of its own, so each of its
  cases is scored by every large center's local model (the report takes the mean per case);
- `iil` and `cyclic-iil` (Sheller et al.): the coordinator's sequential rules pass the model from large center to
  large center (name order), one center a round, over K × `rounds` rounds (K large centers), so that each center
  trains as many epochs in all as under a rule. IIL keeps the model at each center for `rounds` rounds in a row
  (rounds × local epochs) before passing it on, once around; cyclic IIL goes around `rounds` times, a round at
  each. Limited centers evaluate every round's model. (The learning-rate schedule spans all of an arm's rounds, so
  each center trains its turn at the rate a rule's sites would have in those rounds.)

Every arm uses the same partitions (centers.py), the same plan seed and the same number of rounds and local
epochs (the sequential baselines: the same epochs per center). Resuming: a federation that finished wrote
`outcome.json` and is not run again; one that was interrupted starts its processes again on the same directories
(the coordinator resumes its open round, a site its approval); an arm that finished wrote `result.json` and is
skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from models.durable import write_text_atomic
from models.federation.roles import SiteRole
from training.datasets import load_cases, read_csv_manifest
from training.federation import admin
from training.federation.monitoring import site_metrics_by_round
from training.federation.plan import FederatedPlan, plan_for
from training.federation.policy import DatasetUse, PolicyDataset, SitePolicy
from training.federation.state import SiteState
from training.study.centers import CenterData, prepare_centers
from training.study.config import SEQUENTIAL_BASELINES, Arm, StudyConfig
from training.study.scoring import CaseRow, case_rows_csv, score_package

__all__ = ["CASES_FILE", "Launcher", "Progress", "RESULT_FILE", "STUDY_FILE", "SiteRun", "arm_dir",
           "arm_federations", "run_study", "trainer_site"]

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
ARMS_DIR = "arms"
RESULT_FILE = "result.json"
CASES_FILE = "cases.csv"
OUTCOME_FILE = "outcome.json"
SPENT_FILE = "spent.json"  # wall and CPU seconds of every attempt so far
POOLED_SITE = "pooled"  # the centralized arm's one site
POLL_S = 0.5
DEADLINE_S = 3600.0  # a round waits this long for a dead site; every site answers long before
STOP_WAIT_S = 15.0



class Progress(Protocol):
    """What the study shows while it runs (the command line decides how)."""

    def note(self, text: str) -> None:
        """A line worth keeping: a center skipped, an arm finished."""

    def status(self, label: str, round_: int, rounds: int, activity: Mapping[str, str]) -> None:
        """A federation's round (the open one, or the last) and what each of its sites is doing."""


@dataclass(frozen=True)
class Launcher:
    """How the study starts `fedlesion` processes: the command (e.g. python -m fedlesion) and its environment."""

    command: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class SiteRun:
    name: str
    role: SiteRole
    policy: SitePolicy


@dataclass(frozen=True)
class FederationRun:
    """One coordinator with its sites: a rule's or a baseline's federation (the local baseline has one per center)."""

    label: str  # shown in the progress line
    model: str  # the name the model's per-case rows carry
    directory: Path
    plan: FederatedPlan
    sites: tuple[SiteRun, ...]
    device: str  # its sites' --device

    @property
    def coordinator(self) -> Path:
        return self.directory / "coordinator"

    def site_dir(self, name: str) -> Path:
        return self.directory / "sites" / name


@dataclass(frozen=True)
class Outcome:
    """What a finished federation left: its released package, time, bytes and each round's reported metrics."""

    package: str
    release_public_keys: list[str]
    seconds: float  # wall time, from the processes' start to the last evaluation
    cpu_seconds: float  # the federation's processes together (comparable when federations run side by side)
    # {"round": n, "sites": {site: {"role": …, metric: value, …}}, "bytes": {site: {"down": n, "up": n}}}
    rounds: list[dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> Outcome:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def run_study(config: StudyConfig, out: Path, launcher: Launcher, progress: Progress, *, workers: int = 1,
              parallel: int = 1) -> None:
    """Every arm of `config` into `out`, resuming what an earlier run left there: `workers` processes make the
    synthetic centers, `parallel` federations run at a time (each arm is scored once all of its have finished)."""
    out.mkdir(parents=True, exist_ok=True)
    study_path = out / STUDY_FILE
    if study_path.is_file():
        recorded = json.loads(study_path.read_text(encoding="utf-8"))
        if recorded["sha256"] != config.sha256():
            raise ValueError(f"{out} holds the results of another study (its {STUDY_FILE} records study "
                             f"{recorded['sha256'][:12]}, {config.path.name} is {config.sha256()[:12]}): choose "
                             f"another --out")
        progress.note(f"resuming the study in {out}")
    centers = prepare_centers(config, out / "data", workers)
    for center in centers:
        if center.skipped:
            progress.note(f"center {center.name} skipped: {center.skipped}")
    active = [center for center in centers if not center.skipped]
    if not any(center.large for center in active):
        raise ValueError("no large center has data: nothing would train")
    arms = config.arms()
    write_text_atomic(study_path, json.dumps({
        "sha256": config.sha256(), "config": str(config.path), "task": config.task.value, "seed": config.seed,
        "rounds": config.rounds, "local_epochs": config.local_epochs, "network": config.network,
        "device": config.device, "arms": [arm.name for arm in arms], "centers": [asdict(center) for center in centers],
    }, indent=2) + "\n")
    pending = []
    for arm in arms:
        if (arm_dir(out, arm.name) / RESULT_FILE).is_file():
            progress.note(f"{arm.name}: finished in an earlier run, kept")
        else:
            pending.append((arm, arm_federations(config, arm, active, arm_dir(out, arm.name))))
    abort = threading.Event()  # set when one federation fails or the study is interrupted: the others stop too
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        running = [[pool.submit(run_federation, federation, launcher, progress, abort) for federation in federations]
                   for _, federations in pending]
        try:
            for (arm, federations), futures in zip(pending, running):
                outcomes = [future.result() for future in futures]
                _finish_arm(config, arm, federations, outcomes, active, arm_dir(out, arm.name))
                progress.note(f"{arm.name}: finished ({sum(o.seconds for o in outcomes):.0f} s, "
                              f"{sum(o.cpu_seconds for o in outcomes):.0f} CPU-s)")
        except BaseException:
            abort.set()
            raise


def _finish_arm(config: StudyConfig, arm: Arm, federations: Sequence[FederationRun], outcomes: Sequence[Outcome],
                centers: Sequence[CenterData], folder: Path) -> None:
    """Score the arm's final models per case, then write result.json: the arm is done."""
    rows = _score_arm(config, arm, federations, outcomes, centers)
    write_text_atomic(folder / CASES_FILE, case_rows_csv(rows))
    write_text_atomic(folder / RESULT_FILE, json.dumps({
        "arm": arm.name, "kind": arm.kind, "strategy": arm.strategy, "strategy_params": arm.strategy_params,
        "seconds": sum(outcome.seconds for outcome in outcomes),
        "cpu_seconds": sum(outcome.cpu_seconds for outcome in outcomes),
        "federations": {f.label: asdict(o) for f, o in zip(federations, outcomes)},
    }, indent=2) + "\n")


def arm_dir(out: Path, arm: str) -> Path:
    """An arm's folder in the study folder."""
    return out / ARMS_DIR / arm.lower().replace(" ", "-")


# -- the arms' federations -----------------------------------------------------------------------------------------
def _plan(config: StudyConfig, strategy: str, params: Mapping[str, float | str], quorum: int,
          iterations_scale: int = 1, rounds: int | None = None) -> FederatedPlan:
    plan = plan_for(config.task, network=config.network, rounds=rounds or config.rounds,
                    local_epochs=config.local_epochs, strategy=strategy, strategy_params=params, quorum=quorum,
                    deadline_s=DEADLINE_S)
    training = replace(plan.training, **config.training, seed=config.seed)
    return replace(plan, training=replace(training, iterations_per_epoch=training.iterations_per_epoch
                                          * iterations_scale))


def arm_federations(config: StudyConfig, arm: Arm, centers: Sequence[CenterData], folder: Path
                    ) -> list[FederationRun]:
    """The federations `arm` deploys over `centers` (one, but one per large center under `local`), in `folder`."""
    large = [center for center in centers if center.large]
    limited = [center for center in centers if not center.large]
    evaluators = tuple(_evaluator(center, config.seed) for center in limited)
    if arm.kind in ("federated", *SEQUENTIAL_BASELINES):
        if arm.kind == "federated":
            plan = _plan(config, arm.strategy, arm.strategy_params, quorum=len(large))
        else:  # one center a round: K × rounds rounds train each center rounds × local epochs, as a rule does
            plan = _plan(config, arm.strategy, {}, quorum=1, rounds=config.rounds * len(large))
        trainers = tuple(trainer_site(center.name, [center], plan, config.seed) for center in large)
        return [FederationRun(arm.name, arm.name, folder, plan, trainers + evaluators, config.device)]
    if arm.kind == "centralized":
        plan = _plan(config, "fedavg", {}, quorum=1, iterations_scale=len(large))
        pooled = trainer_site(POOLED_SITE, large, plan, config.seed)
        return [FederationRun(arm.name, arm.name, folder, plan, (pooled, *evaluators), config.device)]
    plan = _plan(config, "fedavg", {}, quorum=1)
    return [FederationRun(f"{arm.name} {center.name}", center.name, folder / center.name, plan,
                          (trainer_site(center.name, [center], plan, config.seed),), config.device)
            for center in large]


def trainer_site(name: str, centers: Sequence[CenterData], plan: FederatedPlan, seed: int) -> SiteRun:
    """A training site over `centers`' train and val manifests (the val ones are what it reports each round).

    A study's sites share means over any number of cases (`min_cases_per_mean = 1`, as do its evaluators): its
    centers hold synthetic or public cases, and its report draws each center's validation curve from what the
    coordinator received."""
    datasets = []
    for center in centers:
        for split, use in (("train", DatasetUse.TRAIN), ("val", DatasetUse.VAL)):
            manifest = center.manifest(split)
            if manifest is not None:
                datasets.append(PolicyDataset(f"{center.name}-{split}", str(manifest), use))
    policy = SitePolicy(role="train", datasets=tuple(datasets), approved_plans=(plan.sha256,), seed=seed,
                        min_cases_per_mean=1)
    return SiteRun(name, SiteRole.TRAINER, policy)


def _evaluator(center: CenterData, seed: int) -> SiteRun:
    manifest = center.manifest("test")
    assert manifest is not None, "a limited center's cases are all test cases"
    policy = SitePolicy(role="evaluate", datasets=(PolicyDataset(f"{center.name}-test", str(manifest),
                                                                 DatasetUse.VAL),),
                        approve_first_sight=True, seed=seed, min_cases_per_mean=1)
    return SiteRun(center.name, SiteRole.EVALUATOR, policy)


# -- one federation ------------------------------------------------------------------------------------------------
def run_federation(run: FederationRun, launcher: Launcher, progress: Progress,
                   abort: threading.Event | None = None) -> Outcome:
    """The federation's rounds to the end, its last candidate released; resumed where an earlier run left it."""
    outcome_path = run.directory / OUTCOME_FILE
    if outcome_path.is_file():
        return Outcome.read(outcome_path)
    if not run.coordinator.is_dir():
        _deploy(run)
    spent_path = run.directory / SPENT_FILE
    spent = json.loads(spent_path.read_text()) if spent_path.is_file() else {"seconds": 0.0, "cpu_seconds": 0.0}
    processes = _Processes(run.directory / "logs", launcher)
    started = time.monotonic()
    try:
        processes.start("coordinator", "coordinator", "serve", "--dir", str(run.coordinator),
                        "--plan", str(run.directory / "plan.toml"))
        for site in run.sites:
            folder = run.site_dir(site.name)
            processes.start(site.name, "site", "--bundle", str(folder / "site.bundle"),
                            "--policy", str(folder / "policy.toml"), "--state-dir", str(folder / "state"),
                            "--device", run.device)
        status = _wait(run, processes, progress, abort or threading.Event())
    finally:
        spent = {"seconds": spent["seconds"] + time.monotonic() - started,
                 "cpu_seconds": spent["cpu_seconds"] + processes.stop()}
        write_text_atomic(spent_path, json.dumps(spent))
    final = status["rounds"][-1]
    layout = admin.CoordinatorDir(run.coordinator)
    if not any(v["version"] == final["version"] and v["state"] == "released" for v in status["versions"]):
        admin.release(run.coordinator, run.plan.task, final["version"], by="fedlesion simulate")
    state = layout.state()
    try:
        package = state.version(run.plan.task, final["version"])
    finally:
        state.close()
    assert package is not None
    outcome = Outcome(
        package=str(package.path),
        release_public_keys=[pem.decode() for pem in layout.release_public_keys()],
        rounds=site_metrics_by_round(status["rounds"]),  # what a deployment's coordinator sees: nothing per case
        **spent,
    )
    write_text_atomic(outcome_path, json.dumps(asdict(outcome), indent=2) + "\n")
    progress.note(f"{run.label}: {run.plan.rounds} rounds in {outcome.seconds:.0f} s ({outcome.cpu_seconds:.0f} CPU-s)")
    return outcome


def _deploy(run: FederationRun) -> None:
    """The coordinator, its sites' bundles and policies and the plan, made in a scratch folder and renamed into
    place whole, so an interrupted set-up is made again rather than half used."""
    scratch = run.directory.with_name(run.directory.name + ".setup")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    coordinator = scratch / "coordinator"
    admin.init(coordinator, f"127.0.0.1:{_free_port()}")
    (scratch / "plan.toml").write_text(run.plan.to_toml(), encoding="utf-8")
    for site in run.sites:
        folder = scratch / "sites" / site.name
        folder.mkdir(parents=True)
        admin.enroll(coordinator, site.name, site.role, folder / "site.bundle")
        (folder / "policy.toml").write_text(site.policy.to_toml(), encoding="utf-8")
    shutil.rmtree(run.directory, ignore_errors=True)
    run.directory.parent.mkdir(parents=True, exist_ok=True)
    os.rename(scratch, run.directory)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(run: FederationRun, processes: _Processes, progress: Progress, abort: threading.Event) -> dict[str, Any]:
    """Poll the coordinator's state until the last round is closed and every evaluator has scored it; a process
    that exits, or a training site the coordinator stops inviting, ends the study with the reason."""
    trainers = {site.name for site in run.sites if site.role is SiteRole.TRAINER}
    evaluators = {site.name for site in run.sites if site.role is SiteRole.EVALUATOR}
    shown: tuple[Any, ...] = ()
    changed = time.monotonic()
    while not abort.is_set():
        processes.check()
        status = _status(run.coordinator)
        sites = {site["name"]: site for site in status["sites"]}
        for name in trainers:
            if name in sites and sites[name]["state"] != SiteState.ACTIVE.value:
                raise RuntimeError(f"{run.label}: site {name} is {sites[name]['state']} ({sites[name]['reason']}); "
                                   f"its log: {processes.log(name)}")
        rounds = status["rounds"]
        final = rounds[-1] if rounds and rounds[-1]["round"] == run.plan.rounds and rounds[-1]["version"] else None
        if final is not None and all(name in final["evaluations"] or sites[name]["state"] != SiteState.ACTIVE.value
                                     for name in evaluators):
            return status
        number = min(sum(1 for r in rounds if r["version"]) + 1, run.plan.rounds)
        activity = {site.name: sites[site.name]["activity"] or "starting" if site.name in sites else "starting"
                    for site in run.sites}
        if (number, activity) != shown:
            progress.status(run.label, number, run.plan.rounds, activity)
            shown, changed = (number, activity), time.monotonic()
        elif time.monotonic() - changed > run.plan.deadline_s:
            raise RuntimeError(f"{run.label}: nothing moved for {run.plan.deadline_s:.0f} s; logs in "
                               f"{processes.folder}")
        abort.wait(POLL_S)
    raise RuntimeError(f"{run.label}: stopped (another federation of the study failed, or it was interrupted)")


def _status(coordinator: Path) -> dict[str, Any]:
    state = admin.CoordinatorDir(coordinator).state()
    try:
        return state.status()
    finally:
        state.close()


class _Processes:
    """The federation's `fedlesion` processes, each logging to its own file (appended to across resumptions)."""

    def __init__(self, folder: Path, launcher: Launcher) -> None:
        self.folder = folder
        self.launcher = launcher
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, name: str, *args: str) -> None:
        with self.log(name).open("ab") as log_file:
            self.running[name] = subprocess.Popen([*self.launcher.command, *args], env=dict(self.launcher.env),
                                                  stdout=log_file, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL)

    def check(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                tail = self.log(name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with status {process.returncode}; the end of its log "
                                   f"({self.log(name)}):\n{tail}")

    def stop(self) -> float:
        """SIGTERM to each (the coordinator stops serving cleanly), SIGKILL to any still running after a while;
        returns the CPU seconds they used (each process's own rusage, read as it is reaped)."""
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        cpu_seconds = 0.0
        for process in self.running.values():
            cpu_seconds += _reap(process, deadline)
        self.running.clear()
        return cpu_seconds


def _reap(process: subprocess.Popen[bytes], deadline: float) -> float:
    """Wait for `process` (SIGKILL after `deadline`) with wait4, whose rusage says the CPU time it used; 0 when
    it was reaped already (a process that exited by itself, found by `check`)."""
    killed = False
    while True:
        try:
            pid, status, usage = os.wait4(process.pid, 0 if killed else os.WNOHANG)
        except ChildProcessError:
            return 0.0
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            process.kill()
            killed = True
        else:
            time.sleep(0.05)


# -- scoring -------------------------------------------------------------------------------------------------------
def _score_arm(config: StudyConfig, arm: Arm, federations: Sequence[FederationRun], outcomes: Sequence[Outcome],
               centers: Sequence[CenterData]) -> list[CaseRow]:
    """Each federation's final model on the test cases of the centers it serves: every center for a rule and for
    centralized; for local, a large center's own and every limited center's."""
    test_cases = {}
    for center in centers:
        manifest = center.manifest("test")
        if manifest is not None:
            test_cases[center.name], _ = load_cases(read_csv_manifest(manifest, config.task))
    rows = []
    for federation, outcome in zip(federations, outcomes):
        served = [(c, case) for c in centers if c.name in test_cases
                  and (arm.kind != "local" or not c.large or c.name == federation.model)
                  for case in test_cases[c.name]]
        keys = [pem.encode() for pem in outcome.release_public_keys]
        metrics = score_package(Path(outcome.package), keys, config.task, [case for _, case in served])
        rows += [CaseRow(arm.name, federation.model, center.name, center.large, case.case_id, values)
                 for (center, case), values in zip(served, metrics)]
    return rows
