"""The study file (`fedlesion simulate --config study.toml`): the centers, the rules to compare and the baselines.

One `[study]` table (task, seed, network, rounds, rules, baselines, split fractions, `[study.training]` values of
the training plan) and one `[centers.NAME]` table
per center. A large center (`role = "train"`) trains; a limited one (`role = "evaluate"`) only scores the published
models. A center's cases are seeded synthetic ones (`synthetic = N`, with a scanner profile and a lesion-size mix)
or real datasets (`data`, any `--data` form `fedlesion train` accepts, one or a list). Relative paths resolve
against the study file's folder, so a study file and its data can move together.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from models.manifest import Task
from training.datasets import SyntheticSpec
from training.federation.aggregation import STRATEGIES, STRATEGY_NAMES, Sequential, strategy_by_name
from training.federation.plan import NETWORK_SIZES, plan_for
from training.plan import TrainingPlan
from training.synthetic.lesions import SIZE_RANGES_ML

__all__ = ["BASELINES", "DEVICES", "RULES", "SEQUENTIAL_BASELINES", "Arm", "CenterConfig", "CenterRole", "StudyConfig",
           "SyntheticSource"]

# Each baseline's name in the report. IIL and cyclic IIL (Sheller et al.) are the coordinator's sequential rules.
BASELINES = {"centralized": "centralized", "local": "local", "iil": "IIL", "cyclic-iil": "cyclic IIL"}
DEVICES = ("cpu", "cuda")
SEQUENTIAL_BASELINES = tuple(name for name, cls in STRATEGIES.items() if issubclass(cls, Sequential))
RULES = tuple(name for name in STRATEGY_NAMES if name not in SEQUENTIAL_BASELINES)  # what study.rules compares
# The training plan's scalar settings a study may change; the network, preprocessing and augmentation come with
# `network`, local epochs and the seed with the study's own keys.
TRAINING_KEYS = tuple(f.name for f in fields(TrainingPlan)
                      if f.name not in ("task", "in_channels", "network", "preprocessing", "augmentation", "epochs",
                                        "seed"))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # a certificate's common name and a folder name


class CenterRole(StrEnum):
    """Large centers train (and report validation metrics); limited centers only evaluate the published models."""

    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class SyntheticSource:
    """`cases` seeded synthetic cases acquired with one scanner profile (`scanner`, a `generate_site` seed; None:
    each case draws its own) and, for stroke, lesion sizes drawn from `lesion_sizes` (ISLES'22 size classes)."""

    cases: int
    seed: int
    scanner: int | None = None
    lesion_sizes: dict[str, float] | None = None


@dataclass(frozen=True)
class CenterConfig:
    name: str
    role: CenterRole
    data: tuple[str, ...] = ()  # dataset specs, paths already resolved
    synthetic: SyntheticSource | None = None
    optional: bool = False  # skipped with a message when a data path is absent (e.g. ../shared/data)


@dataclass(frozen=True)
class Arm:
    """One column of the comparison: an aggregation rule over every center, or a baseline."""

    name: str  # what the report prints: the rule's class name (FedAvg, FedProx, …) or the baseline's (IIL, …)
    kind: str  # "federated" or a baseline (a key of BASELINES)
    strategy: str = "fedavg"
    strategy_params: dict[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyConfig:
    path: Path
    task: Task
    seed: int
    network: str
    device: str  # where every site trains and evaluates (`fedlesion site --device`)
    rounds: int
    local_epochs: int
    training: dict[str, Any]  # TrainingPlan values that replace the network size's own (TRAINING_KEYS)
    rules: tuple[str, ...]
    rule_params: dict[str, dict[str, float | str]]
    baselines: tuple[str, ...]
    val_fraction: float
    test_fraction: float
    centers: tuple[CenterConfig, ...]

    @classmethod
    def read(cls, path: str | Path) -> StudyConfig:
        path = Path(path).resolve()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"study {path}: not TOML: {error}") from None
        try:
            return cls.from_dict(data, path)
        except ValueError as error:
            raise ValueError(f"study {path}: {error}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> StudyConfig:
        _known(data, "", {"study", "rules", "centers"})
        study = _table(data.get("study"), "study")
        _known(study, "study", {"task", "seed", "network", "device", "rounds", "local_epochs", "training", "rules",
                                "baselines", "val_fraction", "test_fraction"})
        rules = tuple(_strings(study.get("rules", ["fedavg"]), "study.rules"))
        baselines = tuple(_strings(study.get("baselines", list(BASELINES)), "study.baselines"))
        for rule in rules:
            if rule in SEQUENTIAL_BASELINES:
                raise ValueError(f"study.rules: {rule} passes the model from site to site: name it in study.baselines")
            if rule not in RULES:
                raise ValueError(f"study.rules: {rule!r} is not a rule; one of {', '.join(RULES)}")
        for baseline in baselines:
            if baseline not in BASELINES:
                raise ValueError(f"study.baselines: {baseline!r} is not a baseline; one of {', '.join(BASELINES)}")
        for what, names in (("rules", rules), ("baselines", baselines)):
            if len(set(names)) < len(names):
                raise ValueError(f"study.{what}: a name appears twice")
        if not rules and not baselines:
            raise ValueError("study: name at least one rule or baseline")
        rule_params = {name: dict(_table(value, f"rules.{name}")) for name, value in
                       _table(data.get("rules", {}), "rules").items()}
        for name, params in rule_params.items():
            if name not in rules:
                raise ValueError(f"[rules.{name}]: the rule is not in study.rules")
            strategy_by_name(name, params)  # the rule validates its parameters
        if "task" not in study:
            raise ValueError("study.task: missing (stroke-dwi-adc or ms-flair)")
        try:
            task = Task(study["task"])
        except ValueError:
            raise ValueError(f"study.task: one of {', '.join(t.value for t in Task)}, got {study['task']!r}") from None
        network = study.get("network", "tiny")
        if network not in NETWORK_SIZES:
            raise ValueError(f"study.network: one of {', '.join(NETWORK_SIZES)}, got {network!r}")
        seed = _whole(study.get("seed", 0), "study.seed", 0)
        device = study.get("device", "cpu")
        if device not in DEVICES:
            raise ValueError(f"study.device: one of {', '.join(DEVICES)}, got {device!r}")
        training = dict(_table(study.get("training", {}), "study.training"))
        unknown = sorted(set(training) - set(TRAINING_KEYS))
        if unknown:
            raise ValueError(f"study.training: {', '.join(unknown)} cannot be set here; the keys are "
                             f"{', '.join(TRAINING_KEYS)}")
        try:  # the training plan validates the values
            replace(plan_for(task, network=network).training, **training)
        except (TypeError, ValueError) as error:
            raise ValueError(f"study.training: {error}") from None
        config = cls(
            path=path, task=task, seed=seed, network=network, device=device,
            rounds=_whole(study.get("rounds", 3), "study.rounds", 1),
            local_epochs=_whole(study.get("local_epochs", 1), "study.local_epochs", 1),
            training=training,
            rules=rules, rule_params=rule_params, baselines=baselines,
            val_fraction=_fraction(study.get("val_fraction", 0.2), "study.val_fraction"),
            test_fraction=_fraction(study.get("test_fraction", 0.3), "study.test_fraction"),
            centers=tuple(_center(name, entry, path.parent, task, seed)
                          for name, entry in _table(data.get("centers"), "centers").items()),
        )
        if not any(center.role is CenterRole.TRAIN for center in config.centers):
            raise ValueError("centers: no center has role = \"train\": nothing would train")
        return config

    def arms(self) -> list[Arm]:
        """The rules in the file's order, then the baselines."""
        rules = [Arm(type(strategy_by_name(rule)).__name__, "federated", rule, self.rule_params.get(rule, {}))
                 for rule in self.rules]
        return rules + [Arm(BASELINES[baseline], baseline, baseline if baseline in SEQUENTIAL_BASELINES else "fedavg")
                        for baseline in self.baselines]

    def sha256(self) -> str:
        """The study's identity: a folder holds the results of one study, so a changed file cannot resume into it."""
        data = asdict(self)
        data["path"] = None
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _center(name: str, entry: Any, base: Path, task: Task, study_seed: int) -> CenterConfig:
    where = f"centers.{name}"
    if not _NAME.match(name):
        raise ValueError(f"[{where}]: a center's name is letters, digits, '-' and '_' (at most 63)")
    entry = _table(entry, where)
    _known(entry, where, {"role", "data", "synthetic", "seed", "scanner", "lesion_sizes", "optional"})
    try:
        role = CenterRole(entry.get("role"))
    except ValueError:
        raise ValueError(f"{where}.role: train or evaluate, got {entry.get('role')!r}") from None
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        raise ValueError(f"{where}.optional: true or false")
    if ("data" in entry) == ("synthetic" in entry):
        raise ValueError(f"[{where}]: give either data (dataset specs) or synthetic (a number of cases)")
    if "data" in entry:
        extra = sorted({"seed", "scanner", "lesion_sizes"} & set(entry))
        if extra:
            raise ValueError(f"{where}: {', '.join(extra)} apply to synthetic centers only")
        specs = entry["data"] if isinstance(entry["data"], list) else [entry["data"]]
        return CenterConfig(name, role, tuple(_resolve(spec, base, f"{where}.data") for spec in specs),
                            optional=optional)
    sizes = entry.get("lesion_sizes")
    if sizes is not None:
        if task is not Task.STROKE_DWI_ADC:
            raise ValueError(f"{where}.lesion_sizes: stroke centers only (MS lesion loads are the generator's)")
        sizes = dict(_table(sizes, f"{where}.lesion_sizes"))
        unknown = sorted(set(sizes) - set(SIZE_RANGES_ML))
        if unknown or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)
                              for v in sizes.values()) or not sum(sizes.values()) > 0:
            raise ValueError(f"{where}.lesion_sizes: shares ≥ 0 (not all 0) of {', '.join(SIZE_RANGES_ML)}")
    scanner = entry.get("scanner")
    synthetic = SyntheticSource(
        cases=_whole(entry["synthetic"], f"{where}.synthetic", 1),
        seed=_whole(entry.get("seed", _center_seed(study_seed, name)), f"{where}.seed", 0),
        scanner=None if scanner is None else _whole(scanner, f"{where}.scanner", 0),
        lesion_sizes=sizes,
    )
    return CenterConfig(name, role, synthetic=synthetic, optional=optional)


def _center_seed(study_seed: int, name: str) -> int:
    """A center's default case seed: from the study's seed and its name, so adding a center changes no other's."""
    from training.synthetic import derived_seed

    return derived_seed(study_seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big"))


def _resolve(spec: Any, base: Path, where: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: a dataset spec (a folder, a CSV manifest or synthetic:N…), got {spec!r}")
    if SyntheticSpec.parse(spec) is not None:
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"[{where}]: missing or not a table")
    return value


def _known(table: dict[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}" + (f" in [{where}]" if where else ""))


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: a list of names")
    return value


def _whole(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: a whole number ≥ {minimum}, got {value!r}")
    return value


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{where}: a number in [0, 1), got {value!r}")
    return float(value)
