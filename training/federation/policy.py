"""The data custodian's policy (design.md §7): what a site may train on, which plans it runs, and its limits.

The custodian writes it (`fedlesion site policy` prints a commented one); the site reads it at start and checks every
task against it before touching data. The coordinator cannot widen it: the policy's role can only narrow the
certificate's, a plan must be approved here by its sha256 (or be the first one seen, whose hash is then pinned in the
site's state folder), and a plan that asks for more local epochs or a longer round than the caps is refused.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.durable import write_text_atomic
from models.federation.roles import SiteRole
from models.manifest import Task
from training.fingerprint import MIN_CASES_PER_BIN

if TYPE_CHECKING:
    from training.federation.plan import FederatedPlan

__all__ = [
    "DatasetUse",
    "PlanApproval",
    "PolicyDataset",
    "PolicyRole",
    "SitePolicy",
]

DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_MAX_LOCAL_EPOCHS = 20
DEFAULT_MAX_HOURS_PER_ROUND = 12.0
PINNED_PLAN_FILE = "pinned-plan.sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a TOML bare key


class PolicyRole(StrEnum):
    """What the custodian lets the site do; each maps to the certificate role it needs."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    PULL = "pull"

    @property
    def site_role(self) -> SiteRole:
        return {PolicyRole.TRAIN: SiteRole.TRAINER, PolicyRole.EVALUATE: SiteRole.EVALUATOR,
                PolicyRole.PULL: SiteRole.NODE}[self]


class DatasetUse(StrEnum):
    TRAIN = "train"
    VAL = "val"


@dataclass(frozen=True)
class PolicyDataset:
    """One dataset the site may use: `spec` is any `--data` form `fedlesion train` accepts; `task` (optional) keeps it
    to plans of that task."""

    name: str
    spec: str
    use: DatasetUse = DatasetUse.TRAIN
    task: Task | None = None

    def __post_init__(self) -> None:
        if not _DATASET_NAME.match(self.name):
            raise ValueError(f"dataset name {self.name!r}: use letters, digits, '-' and '_' only")
        if not self.spec.strip():
            raise ValueError(f"datasets.{self.name}.spec: empty")
        object.__setattr__(self, "use", _enum(DatasetUse, self.use, f"datasets.{self.name}.use"))
        if self.task is not None:
            object.__setattr__(self, "task", _enum(Task, self.task, f"datasets.{self.name}.task"))


@dataclass(frozen=True)
class SitePolicy:
    role: PolicyRole
    datasets: tuple[PolicyDataset, ...] = ()
    approved_plans: tuple[str, ...] = ()
    approve_first_sight: bool = False
    max_local_epochs: int = DEFAULT_MAX_LOCAL_EPOCHS
    max_hours_per_round: float = DEFAULT_MAX_HOURS_PER_ROUND
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    seed: int = 0
    min_cases_per_mean: int = MIN_CASES_PER_BIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", _enum(PolicyRole, self.role, "role"))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "approved_plans", tuple(str(h).lower() for h in self.approved_plans))
        names = [dataset.name for dataset in self.datasets]
        if len(set(names)) < len(names):
            raise ValueError("datasets: a name appears twice")
        bad = [h for h in self.approved_plans if not _SHA256.match(h)]
        if bad:
            raise ValueError(f"plans.approved: {bad[0]!r} is not a sha256 (64 hex digits)")
        if not isinstance(self.approve_first_sight, bool):
            raise ValueError(f"plans.approve_first_sight: must be true or false, got {self.approve_first_sight!r}")
        if not (_whole(self.max_local_epochs) and self.max_local_epochs >= 1):
            raise ValueError(f"caps.max_local_epochs: must be a whole number ≥ 1, got {self.max_local_epochs!r}")
        if not _positive(self.max_hours_per_round):
            raise ValueError(f"caps.max_hours_per_round: must be a number > 0, got {self.max_hours_per_round!r}")
        if not (_number(self.holdout_fraction) and 0 < self.holdout_fraction < 1):
            raise ValueError(f"holdout_fraction: must be in (0, 1), got {self.holdout_fraction!r}")
        if not (_whole(self.seed) and self.seed >= 0):
            raise ValueError(f"seed: must be a whole number ≥ 0, got {self.seed!r}")
        if not (_whole(self.min_cases_per_mean) and self.min_cases_per_mean >= 1):
            raise ValueError(f"min_cases_per_mean: must be a whole number ≥ 1, got {self.min_cases_per_mean!r}")
        if self.role is PolicyRole.PULL:
            if self.datasets:
                raise ValueError("role pull: a pull-only site uses no datasets")
            return
        if self.approve_first_sight == bool(self.approved_plans):
            raise ValueError("plans: approve plans either by sha256 (approved = [...]) or on first sight "
                             "(approve_first_sight = true), exactly one of the two")
        if self.role is PolicyRole.TRAIN and not any(d.use is DatasetUse.TRAIN for d in self.datasets):
            raise ValueError("role train: the policy names no dataset with use = \"train\"")
        if not self.datasets:
            raise ValueError(f"role {self.role}: the policy names no dataset")

    # -- reading and writing ---------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> SitePolicy:
        path = Path(path)
        try:
            return cls.from_toml(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"policy {path}: {error}") from None

    @classmethod
    def from_toml(cls, text: str) -> SitePolicy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"not TOML: {error}") from None
        top = _table(data, "", {"role", "seed", "holdout_fraction", "min_cases_per_mean", "plans", "caps",
                                   "datasets"})
        plans = _table(top.get("plans", {}), "plans", {"approved", "approve_first_sight"})
        caps = _table(top.get("caps", {}), "caps", {"max_local_epochs", "max_hours_per_round"})
        datasets = []
        for name, entry in _table(top.get("datasets", {}), "datasets", None).items():
            entry = _table(entry, f"datasets.{name}", {"spec", "use", "task"})
            if not isinstance(entry.get("spec"), str):
                raise ValueError(f"datasets.{name}.spec: missing or not a string")
            datasets.append(PolicyDataset(name, entry["spec"], entry.get("use", "train"), entry.get("task")))
        if "role" not in top:
            raise ValueError("role: missing (train, evaluate or pull)")
        approved = plans.get("approved", [])
        if not isinstance(approved, list):
            raise ValueError("plans.approved: must be a list of sha256 strings")
        return cls(
            role=top["role"], datasets=tuple(datasets), approved_plans=tuple(approved),
            approve_first_sight=plans.get("approve_first_sight", False),
            max_local_epochs=caps.get("max_local_epochs", DEFAULT_MAX_LOCAL_EPOCHS),
            max_hours_per_round=caps.get("max_hours_per_round", DEFAULT_MAX_HOURS_PER_ROUND),
            holdout_fraction=top.get("holdout_fraction", DEFAULT_HOLDOUT_FRACTION), seed=top.get("seed", 0),
            min_cases_per_mean=top.get("min_cases_per_mean", MIN_CASES_PER_BIN),
        )

    def to_toml(self) -> str:
        """A commented policy that `from_toml` reads back to an equal one (the custodian edits this file)."""
        lines = [
            "# fedlesion site policy: what this site's data custodian allows (`fedlesion site --policy FILE`).",
            "# Nothing leaves the site but weights, case counts, loss and aggregate validation metrics.",
            "",
            "# train | evaluate | pull: narrows the role in the site's certificate, never widens it",
            f"role = {_quoted(self.role)}",
            "# the seed of the held-out validation split (and of synthetic datasets that name none)",
            f"seed = {self.seed}",
            "# share of the train datasets' cases held out for validation when no dataset has use = \"val\"",
            f"holdout_fraction = {self.holdout_fraction!r}",
            "# the fewest cases a validation mean that leaves the site may summarize (a mean over fewer is close to one",
            "# case's own value, and then only the case count leaves); 1 only for synthetic or public cases",
            f"min_cases_per_mean = {self.min_cases_per_mean}",
            "",
            "[plans]",
            "# the plans this site runs, by the sha256 `fedlesion coordinator plan` prints",
            f"approved = [{', '.join(_quoted(h) for h in self.approved_plans)}]",
            "# true: run the first plan the coordinator sends, pin its sha256 in the state folder, refuse any other",
            f"approve_first_sight = {'true' if self.approve_first_sight else 'false'}",
            "",
            "[caps]",
            "# a plan asking for more local epochs per round is refused",
            f"max_local_epochs = {self.max_local_epochs}",
            "# a plan whose round deadline is longer is refused; local training never runs longer than this",
            f"max_hours_per_round = {float(self.max_hours_per_round)!r}",
        ]
        if self.datasets:
            lines += ["", "# One table per dataset: spec is any --data form `fedlesion train` accepts (a folder, a CSV",
                      "# manifest, synthetic:N[:seed=S][:site=K]); use is train or val; task (optional) keeps it to "
                      "plans of that task."]
        for dataset in self.datasets:
            lines += ["", f"[datasets.{dataset.name}]", f"spec = {_quoted(dataset.spec)}",
                      f"use = {_quoted(dataset.use)}"]
            if dataset.task is not None:
                lines.append(f"task = {_quoted(dataset.task)}")
        return "\n".join(lines) + "\n"

    # -- decisions -------------------------------------------------------------------------------------------
    def hello_role(self, certificate_role: SiteRole | str) -> SiteRole:
        """The role the site asks for: the policy's, when the certificate allows it (a policy only narrows)."""
        wanted = self.role.site_role
        if not SiteRole(certificate_role).permits(wanted):
            raise ValueError(f"the policy's role {self.role} needs a {wanted} certificate; this site's certificate "
                             f"has role {SiteRole(certificate_role)} (a policy can only narrow it)")
        return wanted

    def datasets_for(self, task: Task | str, use: DatasetUse | None = None) -> list[PolicyDataset]:
        task = Task(task)
        return [d for d in self.datasets if d.task in (None, task) and (use is None or d.use is use)]

    def plan_refusal(self, plan: FederatedPlan, *, training: bool) -> str | None:
        """Why this policy refuses `plan` apart from its approval (role, data, caps), or None."""
        if training and self.role is not PolicyRole.TRAIN:
            return f"the site's policy role is {self.role}: it does not train"
        if self.role is PolicyRole.PULL:
            return "the site's policy role is pull: it neither trains nor evaluates"
        wanted = DatasetUse.TRAIN if training else None
        if not self.datasets_for(plan.task, wanted):
            return f"the site's policy names no dataset for task {plan.task}"
        if plan.local_epochs > self.max_local_epochs:
            return (f"the plan asks for {plan.local_epochs} local epochs per round, the site's policy allows at most "
                    f"{self.max_local_epochs}")
        if plan.deadline_s > self.max_hours_per_round * 3600:
            return (f"the plan's round deadline of {plan.deadline_s / 3600:g} h exceeds the site's policy cap of "
                    f"{self.max_hours_per_round:g} h per round")
        return None


class PlanApproval:
    """Decides whether a plan is approved: by the policy's hashes, or the pin of approve-on-first-sight, which the
    first plan seen writes into `state_dir` (so a restart, or a coordinator that later swaps the plan, is held to it)."""

    def __init__(self, policy: SitePolicy, state_dir: str | Path):
        self.policy = policy
        self.pin_path = Path(state_dir) / PINNED_PLAN_FILE

    def pinned(self) -> str | None:
        try:
            text = self.pin_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        if not _SHA256.match(text):
            raise ValueError(f"{self.pin_path}: not a sha256; remove it to pin the next plan again")
        return text

    def approved_sha256(self) -> str | None:
        """The plan the site would run now (for GetTask's informative field)."""
        if self.policy.approve_first_sight:
            return self.pinned()
        return self.policy.approved_plans[0] if len(self.policy.approved_plans) == 1 else None

    def refusal(self, plan: FederatedPlan, *, training: bool) -> str | None:
        """None when the site may run `plan`, else why not. A plan passing every other check is pinned on first
        sight."""
        reason = self.policy.plan_refusal(plan, training=training)
        if reason:
            return reason
        sha = plan.sha256
        if not self.policy.approve_first_sight:
            if sha in self.policy.approved_plans:
                return None
            return f"plan {sha} is not approved by the site's policy"
        pinned = self.pinned()
        if pinned is None:
            self.pin_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.pin_path, sha + "\n")
            return None
        if pinned != sha:
            return (f"plan {sha} differs from plan {pinned}, which the site approved on first sight; the custodian "
                    f"must approve a new plan by its sha256")
        return None


def _enum(kind: type[StrEnum], value: Any, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{where}: must be one of {', '.join(kind)}, got {value!r}") from None


def _table(value: Any, where: str, known: set[str] | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be a table")
    unknown = sorted(set(value) - known) if known is not None else []
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}" + (f" in [{where}]" if where else ""))
    return value


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def _quoted(text: str) -> str:
    """A TOML basic string (JSON's string escapes are a subset of TOML's)."""
    return json.dumps(str(text), ensure_ascii=False)
