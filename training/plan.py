"""The training plan: everything that decides how weights are trained, typed, JSON-safe and hashable.

A site's data custodian approves plans by their `sha256()` (design.md §7), and the manifest records the hash of the
plan that produced a model, so `to_dict()` is canonical: plain strings, numbers and lists only, and
`from_dict(plan.to_dict()) == plan`.

`default_plan(task, device)` gives two sizes. The CPU plan is small enough that one local epoch on 20 synthetic
stroke cases takes well under two minutes on two cores (see `benchmarks/train_step.py`), so federated tests and
demos stay fast; the GPU plan is an nnU-Net-like size.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from models.manifest import (
    Normalization,
    NormalizationMethod,
    Preprocessing,
    Task,
    _Obj,
    _preprocessing,
    default_inputs,
    preprocessing_dict,
)
from models.network_plan import Architecture, NetworkPlan, Norm

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly")
LOSSES = ("dice_ce",)


@dataclass(frozen=True)
class AugmentationPlan:
    """Strengths of the seeded MONAI dict transforms applied to each training patch (0 or a 0 prob disables one)."""

    flip_prob: float = 0.5  # per axis; image and label flip together, so left-right flips are fine
    affine_prob: float = 0.2
    rotate_deg: float = 15.0
    scale: float = 0.1  # ± fraction
    intensity_prob: float = 0.3
    intensity_scale: float = 0.1  # ± fraction
    intensity_shift: float = 0.1  # ± in z-score units
    gamma_prob: float = 0.2
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.15
    noise_std: float = 0.1
    bias_field_prob: float = 0.1
    bias_field_coeff: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma_range", tuple(float(v) for v in self.gamma_range))
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"augmentation.{f.name}: must be a finite number ≥ 0, got {value!r}")
            if f.name.endswith("_prob") and value > 1:
                raise ValueError(f"augmentation.{f.name}: a probability must be ≤ 1, got {value!r}")
            if not isinstance(value, tuple):
                object.__setattr__(self, f.name, float(value))  # 15 and 15.0 hash the same
        low, high = self.gamma_range
        if len(self.gamma_range) != 2 or not 0 < low <= high:
            raise ValueError(f"augmentation.gamma_range: need 0 < low ≤ high, got {list(self.gamma_range)}")


@dataclass(frozen=True)
class TrainingPlan:
    task: Task
    in_channels: int
    network: NetworkPlan
    preprocessing: Preprocessing  # its patch_size is the training (and sliding-window) patch
    batch_size: int = 2
    epochs: int = 10
    iterations_per_epoch: int = 40  # patches drawn per epoch; optimizer steps = ceil(this / batch_size)
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = 0.99  # SGD only (nesterov)
    schedule: str = "cosine"
    warmup_epochs: int = 1
    min_lr_ratio: float = 0.01  # the schedule never goes below lr × this (federated runs may outlast `epochs`)
    foreground_fraction: float = 1.0 / 3.0
    augmentation: AugmentationPlan = field(default_factory=AugmentationPlan)
    loss: str = "dice_ce"  # MONAI DiceCELoss(sigmoid=True)
    threshold: float = 0.5
    amp: bool = False  # mixed precision; only ever used on CUDA
    val_overlap: float = 0.5  # sliding-window validation, Gaussian weighting
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))
        if not isinstance(self.network, NetworkPlan):
            raise ValueError("network: must be a NetworkPlan")
        if not isinstance(self.preprocessing, Preprocessing):
            raise ValueError("preprocessing: must be a manifest Preprocessing")
        if not isinstance(self.augmentation, AugmentationPlan):
            raise ValueError("augmentation: must be an AugmentationPlan")
        for name, minimum in (("in_channels", 1), ("batch_size", 1), ("epochs", 1), ("iterations_per_epoch", 1),
                              ("warmup_epochs", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: must be an integer ≥ {minimum}, got {value!r}")
        expected = len(default_inputs(self.task))
        if self.in_channels != expected:
            raise ValueError(f"in_channels: task {self.task} has {expected} input channel(s), got {self.in_channels}")
        for name, low, high in (("lr", 0.0, 10.0), ("weight_decay", 0.0, 1.0), ("momentum", 0.0, 1.0),
                                ("min_lr_ratio", 0.0, 1.0), ("foreground_fraction", 0.0, 1.0),
                                ("threshold", 0.0, 1.0), ("val_overlap", 0.0, 0.95)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name}: must be a number in [{low}, {high}], got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold: must be in (0, 1), got {self.threshold}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.amp, bool):
            raise ValueError(f"amp: must be true or false, got {self.amp!r}")
        divisible = self.network.size_divisible
        if any(size % divisible for size in self.preprocessing.patch_size):
            raise ValueError(
                f"preprocessing.patch_size: {list(self.preprocessing.patch_size)} must be multiples of "
                f"{divisible} (a depth-{self.network.depth} network halves the grid {self.network.depth - 1} times)"
            )
        if self.preprocessing.size_divisible % divisible:
            raise ValueError(
                f"preprocessing.size_divisible: {self.preprocessing.size_divisible} must be a multiple of the "
                f"network's {divisible}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.iterations_per_epoch // self.batch_size)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.preprocessing.patch_size)

    def to_dict(self) -> dict[str, Any]:
        pre = self.preprocessing
        aug = asdict(self.augmentation)
        aug["gamma_range"] = list(self.augmentation.gamma_range)
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("task", "network", "preprocessing", "augmentation")
        }
        out.update(
            task=str(self.task),
            network={
                "architecture": str(self.network.architecture),
                "base_filters": self.network.base_filters,
                "depth": self.network.depth,
                "max_filters": self.network.max_filters,
                "norm": str(self.network.norm),
            },
            # The same keys as the manifest's "preprocessing" object.
            preprocessing=preprocessing_dict(pre),
            augmentation=aug,
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        if not isinstance(data, Mapping):
            raise ValueError(f"a training plan must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan: unknown key(s) {', '.join(unknown)}")
        for key in ("task", "in_channels", "network", "preprocessing"):
            if key not in data:
                raise ValueError(f"plan: missing key {key!r}")
        network = _known_fields(data["network"], NetworkPlan, "plan.network")
        try:
            data["network"] = NetworkPlan(**network)
        except (TypeError, ValueError) as error:
            raise ValueError(f"plan.network: {error}") from None
        # The manifest's own parser validates the preprocessing object (same keys, same rules).
        data["preprocessing"] = _preprocessing(_Obj(data["preprocessing"], "plan.preprocessing"))
        if "augmentation" in data:
            aug = _known_fields(data["augmentation"], AugmentationPlan, "plan.augmentation")
            if "gamma_range" in aug:
                aug["gamma_range"] = tuple(aug["gamma_range"])
            data["augmentation"] = AugmentationPlan(**aug)
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"plan: {error}") from None

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what `sha256` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainingPlan:
        """A plan with `overrides` merged into `to_dict()` (nested objects merged key by key), validated again."""
        return TrainingPlan.from_dict(_merge(self.to_dict(), overrides))


def _known_fields(value: Any, dataclass_type: type, path: str) -> dict[str, Any]:
    """A nested plan object as a dict, refused when it is not an object or has keys `dataclass_type` lacks."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: must be an object")
    unknown = set(value) - {f.name for f in fields(dataclass_type)}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    return dict(value)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def default_plan(task: Task | str, device: str = "cpu") -> TrainingPlan:
    """The default plan for `task` on `device` ("cpu" or "cuda").

    CPU: DynUNet depth 4, 8 base filters (0.35 M parameters), batch 2, 40 patches (20 steps) per epoch; stroke
    64×64×48 at 2 mm, MS 64³ at 1.5 mm (a whole head at 1 mm took 25–40 s per pass on two cores; at 1.5 mm a third of
    that, and lesions of 3 mm still span two voxels). Sized for two CPU cores: the shipped default models train with it on fresh
    randomised volumes (`synthetic-stream`), where the number of steps matters more than the width, and federated
    tests and demos stay fast. GPU: depth 5, 32 base filters, batch 2 (MS) or 4 (stroke), 250 steps per epoch,
    stroke 96×96×64 at 2 mm, MS 128³ at 1 mm, mixed precision.

    Both tasks use batch normalization: at inference it is a fixed map, so the node runs a whole volume in one pass
    and gets the model's own output (design.md §5), where instance normalization forced the MS model into patch
    windows (~120 s per study on the CPU).
    """
    task = Task(task)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    stroke = task is Task.STROKE_DWI_ADC
    spacing = (2.0, 2.0, 2.0) if stroke else (1.5, 1.5, 1.5) if device == "cpu" else (1.0, 1.0, 1.0)
    in_channels = len(default_inputs(task))
    # The ADC reads relative to the head's own (its median between 100 and 1500 µm²/s, so not CSF nor background): a
    # fixed µm²/s scale (v4-v7) put the line between infarct and normal tissue at clinical scanners' normal grey-matter
    # ADC (benchmarks/specificity.py --adc-scale), and a z-score over the head mask shifts with skull, field of view
    # and CSF.
    channels = (("adc", Normalization(NormalizationMethod.MEDIAN_RATIO, clip_values=(100.0, 1500.0), scale=1.0)),) \
        if stroke else ()
    norm = Norm.BATCH
    if device == "cpu":
        network = NetworkPlan(Architecture.DYNUNET, base_filters=8, depth=4, max_filters=128, norm=norm)
        patch = (64, 64, 48) if stroke else (64, 64, 64)
        return TrainingPlan(
            task=task, in_channels=in_channels, network=network,
            preprocessing=Preprocessing(spacing, patch, 16, Normalization(), channels),
            batch_size=2, epochs=20, iterations_per_epoch=40, optimizer="adamw", lr=1e-3, weight_decay=1e-5,
            schedule="cosine", warmup_epochs=1, amp=False,
        )
    network = NetworkPlan(Architecture.DYNUNET, base_filters=32, depth=5, max_filters=320, norm=norm)
    patch = (96, 96, 64) if stroke else (128, 128, 128)
    batch = 4 if stroke else 2
    return TrainingPlan(
        task=task, in_channels=in_channels, network=network,
        preprocessing=Preprocessing(spacing, patch, 16, Normalization(), channels),
        batch_size=batch, epochs=200, iterations_per_epoch=250 * batch, optimizer="sgd", lr=1e-2,
        weight_decay=3e-5, momentum=0.99, schedule="poly", warmup_epochs=2, amp=True,
    )


__all__ = ["AugmentationPlan", "TrainingPlan", "default_plan"]
