"""Aggregation rules behind one interface (design.md §7): w' = Σ α_k w_k with Σ α_k = 1.

One small class per rule, Flower-like: `aggregate(global_weights, updates)` returns the new global weights. This
issue has FedAvg (α_k = n_k / n, n_k the site's local training cases) and FedProx (the same aggregation; its μ
reaches each site's `LocalTrainer` through the plan as `prox_mu`). The next federated issue adds the others under
the same interface. Sums run in float64 and are cast back to each tensor's dtype; the integer counters of
normalization layers (num_batches_tracked) are averaged the same way and rounded. The float64 sums run a block of
elements at a time in two small buffers, so a large model costs no float64 copy of each update (fresh memory is the
dearest part of a close).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

Weights = dict[str, np.ndarray]
SUM_BLOCK = 1 << 16  # elements summed at a time: two float64 buffers of 512 KiB


@dataclass(frozen=True)
class SiteUpdate:
    """One accepted update: the site's weights after local training, its case count and aggregate metrics."""

    site: str
    weights: Mapping[str, np.ndarray]
    num_cases: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """An aggregation rule with its validated parameters."""

    name: ClassVar[str]
    parameters: ClassVar[Mapping[str, float]] = {}  # accepted parameter names and their defaults

    def __init__(self, params: Mapping[str, float] | None = None) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ValueError(f"strategy {self.name}: unknown parameter(s) {', '.join(unknown)}")
        self.params = {**self.parameters, **{key: float(value) for key, value in params.items()}}

    @property
    def prox_mu(self) -> float:
        """The proximal weight each site's local loss adds (0: none)."""
        return 0.0

    @abstractmethod
    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        """α_k for each update, summing to 1."""

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Weights:
        """The new global weights; every update must carry exactly the global tensors' names, shapes and dtypes."""
        if not updates:
            raise ValueError("no updates to aggregate")
        for update in updates:
            _check_like(global_weights, update)
        alphas = self.coefficients(updates)
        total, term = np.empty(SUM_BLOCK, np.float64), np.empty(SUM_BLOCK, np.float64)
        out: Weights = {}
        for name, reference in global_weights.items():
            result = np.empty(reference.shape, reference.dtype)
            flat_result = result.reshape(-1)
            sources = [np.asarray(update.weights[name]).reshape(-1) for update in updates]
            for start in range(0, flat_result.size, SUM_BLOCK):
                stop = min(start + SUM_BLOCK, flat_result.size)
                block_total, block_term = total[: stop - start], term[: stop - start]
                block_total.fill(0.0)
                for alpha, source in zip(alphas, sources):
                    np.multiply(source[start:stop], alpha, out=block_term, dtype=np.float64)
                    block_total += block_term
                if np.issubdtype(reference.dtype, np.integer):
                    np.rint(block_total, out=block_total)
                flat_result[start:stop] = block_total
            out[name] = result
        return out


class FedAvg(Strategy):
    """McMahan et al.: α_k = n_k / Σ n."""

    name = "fedavg"

    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        counts = [int(update.num_cases) for update in updates]
        if any(count < 0 for count in counts) or sum(counts) == 0:
            raise ValueError(f"case counts must be ≥ 0 and not all 0, got {counts}")
        total = sum(counts)
        return [count / total for count in counts]


class FedProx(FedAvg):
    """Li et al.: FedAvg's aggregation; each site's loss adds (μ/2)‖w − w_global‖²."""

    name = "fedprox"
    parameters = {"mu": 0.01}

    def __init__(self, params: Mapping[str, float] | None = None) -> None:
        super().__init__(params)
        mu = self.params["mu"]
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"strategy fedprox: mu must be a finite number ≥ 0, got {mu!r}")

    @property
    def prox_mu(self) -> float:
        return self.params["mu"]


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx)}
STRATEGY_NAMES = tuple(STRATEGIES)


def strategy_by_name(name: str, params: Mapping[str, float] | None = None) -> Strategy:
    """The strategy the plan names (the command line's spelling), its parameters validated."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: one of {', '.join(STRATEGY_NAMES)}") from None
    return cls(params)


def _check_like(global_weights: Mapping[str, np.ndarray], update: SiteUpdate) -> None:
    names, expected = set(update.weights), set(global_weights)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ValueError(f"update from {update.site}: tensors differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, reference in global_weights.items():
        value = update.weights[name]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise ValueError(
                f"update from {update.site}: {name} is {value.dtype}{list(value.shape)}, "
                f"the model's {reference.dtype}{list(reference.shape)}"
            )


__all__ = ["FedAvg", "FedProx", "STRATEGIES", "STRATEGY_NAMES", "SiteUpdate", "Strategy", "strategy_by_name"]
