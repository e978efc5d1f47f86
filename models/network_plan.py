"""The network part of a training plan (architecture, depth, filters, normalization), torch-free.

A plan is read and hashed where no network is built: a coordinator's plan file, and a limited center's evaluator
site, which installs without torch (design.md §1). `models.networks` builds the network a plan describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Architecture", "NetworkPlan", "Norm"]


class Architecture(StrEnum):
    DYNUNET = "dynunet"
    UNET = "unet"


class Norm(StrEnum):
    INSTANCE = "instance"
    BATCH = "batch"  # FedBN keeps these layers local (design.md §7)


@dataclass(frozen=True)
class NetworkPlan:
    """The network part of a training plan: small, typed, hashable into the plan's sha256."""

    architecture: Architecture = Architecture.DYNUNET
    base_filters: int = 16
    depth: int = 5
    max_filters: int = 320
    norm: Norm = Norm.BATCH  # a fixed map at inference, so the node may run any window (design.md §5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", Architecture(self.architecture))
        object.__setattr__(self, "norm", Norm(self.norm))
        for name in ("base_filters", "max_filters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer ≥ 1, got {value!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 2 <= self.depth <= 7:
            raise ValueError(f"depth: must be an integer from 2 to 7, got {self.depth!r}")
        if self.max_filters < self.base_filters:
            raise ValueError(f"max_filters: {self.max_filters} is below base_filters {self.base_filters}")

    @property
    def filters(self) -> tuple[int, ...]:
        """Channels per level, doubling from `base_filters` and capped at `max_filters`."""
        return tuple(min(self.base_filters * 2**level, self.max_filters) for level in range(self.depth))

    @property
    def size_divisible(self) -> int:
        """Each level below the first halves the grid: inputs must be multiples of this (the manifest says so)."""
        return 2 ** (self.depth - 1)
