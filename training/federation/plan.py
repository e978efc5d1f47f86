"""The federated plan: the whole `TrainingPlan` plus the federated part, as a commented TOML file.

The custodian approves a plan by its identity, the embedded `TrainingPlan.sha256()` (the hash the manifest records),
so `FederatedPlan.sha256` is exactly that. `to_toml()` writes every value (nothing left to a default that could
change between fedlesion versions) and `from_toml(plan.to_toml()) == plan`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from models.manifest import Task
from models.network_plan import Architecture, NetworkPlan
from training.federation.aggregation import (
    STRATEGIES,
    STRATEGY_NAMES,
    Sequential,
    Strategy,
    StrategyParams,
    strategy_by_name,
)
from training.federation.screening import SCREENING_COMMENTS, ScreeningLimits
from training.plan import TrainingPlan, default_plan

NETWORK_SIZES = ("tiny", "default", "gpu")

_FEDERATION_COMMENTS = {
    "task": "the task every round trains (models.manifest.Task value)",
    "rounds": "federated rounds; each round's aggregate becomes a candidate version",
    "strategy": "aggregation rule: " + ", ".join(STRATEGY_NAMES),
    "quorum": "a round closes at its deadline only with at least this many accepted updates (else it is retried)",
    "deadline_s": "seconds a round waits for the invited sites",
}
_TRAINING_COMMENTS = {
    "epochs": "local epochs per round at each site",
    "iterations_per_epoch": "patches drawn per local epoch",
    "threshold": "probability threshold written into each candidate's manifest",
    "seed": "the seed every site derives its sampling and augmentation from",
}


@dataclass(frozen=True)
class FederatedPlan:
    """What the coordinator runs and each site's custodian approves."""

    training: TrainingPlan
    rounds: int
    strategy: str = "fedavg"
    strategy_params: StrategyParams = field(default_factory=dict)
    quorum: int = 1
    deadline_s: float = 600.0
    screening: ScreeningLimits = ScreeningLimits()

    def __post_init__(self) -> None:
        if not isinstance(self.training, TrainingPlan):
            raise ValueError("training: must be a TrainingPlan")
        for name in ("rounds", "quorum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"federation.{name}: must be an integer ≥ 1, got {value!r}")
        deadline = self.deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < math.inf:
            raise ValueError(f"federation.deadline_s: must be a number > 0, got {deadline!r}")
        object.__setattr__(self, "deadline_s", float(deadline))
        if not isinstance(self.strategy_params, Mapping):
            raise ValueError(f"federation.strategy_params: must be a table, got {self.strategy_params!r}")
        try:  # the strategy validates its own name and parameters (e.g. FedProx's mu ≥ 0)
            rule = strategy_by_name(self.strategy, self.strategy_params)
        except ValueError as error:
            raise ValueError(f"federation.strategy: {error}") from None
        object.__setattr__(self, "strategy_params", dict(rule.params))  # defaults included: the TOML says them all
        if isinstance(rule, Sequential) and self.quorum != 1:
            raise ValueError(f"federation.quorum: {self.strategy} trains one site per round, so its quorum is 1, "
                             f"got {self.quorum}")
        if not isinstance(self.screening, ScreeningLimits):
            raise ValueError("federation.screening: must be ScreeningLimits")

    @property
    def task(self) -> Task:
        return self.training.task

    @property
    def local_epochs(self) -> int:
        return self.training.epochs

    @property
    def prox_mu(self) -> float:
        """The proximal weight a site passes to `LocalTrainer.train(prox_mu=…)` (0 unless FedProx)."""
        return self.rule().prox_mu

    @property
    def local_normalization(self) -> bool:
        """Whether each site keeps its own normalization layers (FedBN)."""
        return self.rule().local_normalization

    def rule(self) -> Strategy:
        """The aggregation rule the plan names, with its parameters."""
        return strategy_by_name(self.strategy, self.strategy_params)

    @property
    def sha256(self) -> str:
        """The plan's identity: the embedded training plan's canonical hash (what sites approve, manifests record)."""
        return self.training.sha256()

    def to_toml(self) -> str:
        """The plan as a commented TOML document that `from_toml` reads back to an equal plan."""
        lines = [
            "# fedlesion federated plan. Sites approve it by the sha256 of [training] (printed by",
            "# `fedlesion coordinator status`): change any [training] value and every custodian must approve again.",
            "",
            "[federation]",
        ]
        federation = {
            "task": str(self.task),
            "rounds": self.rounds,
            "strategy": self.strategy,
            "quorum": self.quorum,
            "deadline_s": self.deadline_s,
        }
        lines += _toml_table(federation, _FEDERATION_COMMENTS)
        lines += ["", "[federation.strategy_params]", *_strategy_params_comments()]
        lines += _toml_table(dict(self.strategy_params), {})
        lines += ["", "[federation.screening]", "# every update is checked against the others of its round first"]
        lines += _toml_table(asdict(self.screening), SCREENING_COMMENTS)
        lines += ["", "# The training plan every site runs (training/plan.py), local epochs included."]
        lines += _toml_tables("training", self.training.to_dict(), _TRAINING_COMMENTS)
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> FederatedPlan:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"plan: not TOML: {error}") from None
        unknown = sorted(set(data) - {"federation", "training"})
        if unknown:
            raise ValueError(f"plan: unknown section(s) {', '.join(unknown)}")
        for section in ("federation", "training"):
            if not isinstance(data.get(section), dict):
                raise ValueError(f"plan: missing [{section}] table")
        federation = dict(data["federation"])
        known = {"task", "rounds", "strategy", "strategy_params", "quorum", "deadline_s", "screening"}
        unknown = sorted(set(federation) - known)
        if unknown:
            raise ValueError(f"plan: unknown key(s) in [federation]: {', '.join(unknown)}")
        training = TrainingPlan.from_dict(data["training"])
        task = federation.pop("task", str(training.task))
        if task != str(training.task):
            raise ValueError(f"federation.task: {task!r} differs from training.task {str(training.task)!r}")
        if "rounds" not in federation:
            raise ValueError("federation.rounds: missing")
        federation["screening"] = ScreeningLimits.from_table(federation.get("screening", {}))
        try:
            return cls(training=training, **federation)
        except TypeError as error:
            raise ValueError(f"plan: {error}") from None


def plan_for(
    task: Task | str,
    *,
    network: str = "tiny",
    rounds: int = 3,
    local_epochs: int = 1,
    strategy: str = "fedavg",
    strategy_params: StrategyParams | None = None,
    quorum: int = 1,
    deadline_s: float = 600.0,
    screening: ScreeningLimits = ScreeningLimits(),
) -> FederatedPlan:
    """A federated plan around today's CPU plan (`default`), the GPU plan (`gpu`: training.plan.default_plan's
    "cuda" one, for sites run with `--device cuda`) or a network small enough for tests (`tiny`).

    `tiny`: a depth-3 DynUNet (MONAI's least) with 4, 8, 8 filters on 32³ patches, 4 patches per epoch: a local
    epoch takes well under a second on two cores and its export's parity check a few seconds; a site validates it
    with non-overlapping windows (overlap 0.5 made each round's validation of one 2 mm case about ten times slower).
    """
    if network not in NETWORK_SIZES:
        raise ValueError(f"network: must be one of {', '.join(NETWORK_SIZES)}, got {network!r}")
    training = default_plan(task, "cuda" if network == "gpu" else "cpu")
    if network == "tiny":
        training = replace(
            training,
            network=NetworkPlan(Architecture.DYNUNET, base_filters=4, depth=3, max_filters=8,
                                norm=training.network.norm),
            preprocessing=replace(training.preprocessing, patch_size=(32, 32, 32)),
            batch_size=2,
            iterations_per_epoch=4,
            warmup_epochs=0,
            val_overlap=0.0,
        )
    training = replace(training, epochs=local_epochs)
    return FederatedPlan(training, rounds, strategy, dict(strategy_params or {}), quorum, deadline_s, screening)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a plan value must be finite, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ValueError(f"a plan value of type {type(value).__name__} has no TOML form")


def _strategy_params_comments() -> list[str]:
    """Each rule's parameters and their defaults, as comment lines for the plan's reader."""
    return ["# the rule's parameters; their defaults:"] + [
        f"#   {name}: " + ", ".join(f"{key} = {_toml_value(value)}" for key, value in cls.parameters.items())
        for name, cls in STRATEGIES.items() if cls.parameters
    ]


def _toml_table(values: Mapping[str, Any], comments: Mapping[str, str]) -> list[str]:
    """The scalar and list keys of one table, each preceded by its comment when it has one."""
    lines: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            continue
        if key in comments:
            lines.append(f"# {comments[key]}")
        lines.append(f"{key} = {_toml_value(value)}")
    return lines


def _toml_tables(name: str, values: Mapping[str, Any], comments: Mapping[str, str]) -> list[str]:
    """`[name]` with its plain keys, then each nested object as its own `[name.key]` table."""
    lines = ["", f"[{name}]", *_toml_table(values, comments)]
    for key, value in values.items():
        if isinstance(value, Mapping):
            lines += _toml_tables(f"{name}.{key}", value, {})
    return lines


__all__ = ["FederatedPlan", "NETWORK_SIZES", "plan_for"]
