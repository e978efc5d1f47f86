"""Aggregation rules behind one interface (design.md §7), one small class per rule as Flower's strategies are.

`aggregate(global_weights, updates)` returns the new global weights. The weighted rules compute w' = Σ α_k w_k with
Σ α_k = 1 (n_k: the site's local training cases): FedAvg (n_k / n), VanillaAvg (1/K), Beta ((1−β)/(1−β^{n_k}),
normalised), Softmax (softmax(s_k/T)), FedProx (FedAvg's α; its μ reaches each site's `LocalTrainer` through the
plan as `prox_mu`) and FedBN (FedAvg's α; each site keeps its own normalization layers, `local_normalization`). The
robust rules, coordinate-wise median and trimmed mean, ignore n_k: one site's claim cannot move them. The
sequential rules (Sheller et al.'s institutional incremental learning, IIL and cyclic IIL) average nothing: each
round one site trains, chosen by `participants`, and its model is the round's.

Every rule works a block of elements at a time, in float64, and casts back to each tensor's dtype; the integer
counters of normalization layers (num_batches_tracked) are combined the same way and rounded. Blocks keep a large
model from costing a float64 copy of each update (fresh memory is the dearest part of a close).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

Weights = dict[str, np.ndarray]
StrategyParams = Mapping[str, float | str]
# Combines one block of every update's elements (the same positions in each) into `out` (float64, block-sized).
BlockRule = Callable[[Sequence[np.ndarray], np.ndarray], None]
SUM_BLOCK = 1 << 16  # elements combined at a time: float64 buffers of 512 KiB


@dataclass(frozen=True)
class SiteUpdate:
    """One accepted update: the site's weights after local training, its case count and aggregate metrics."""

    site: str
    weights: Mapping[str, np.ndarray]
    num_cases: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """An aggregation rule with its validated parameters (numbers, or one of `choices` where the default is text)."""

    name: ClassVar[str]
    parameters: ClassVar[StrategyParams] = {}  # accepted parameter names and their defaults
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}  # the allowed values of each text parameter
    local_normalization: ClassVar[bool] = False  # sites keep their own normalization layers (FedBN)

    def __init__(self, params: StrategyParams | None = None) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ValueError(f"strategy {self.name}: unknown parameter(s) {', '.join(unknown)}")
        resolved: dict[str, float | str] = dict(self.parameters)
        for key, value in params.items():
            if key in self.choices:
                if value not in self.choices[key]:
                    raise ValueError(f"strategy {self.name}: {key} must be one of {', '.join(self.choices[key])}, "
                                     f"got {value!r}")
                resolved[key] = value
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"strategy {self.name}: {key} must be a finite number, got {value!r}")
            else:
                resolved[key] = float(value)
        self.params = resolved

    def number(self, key: str) -> float:
        value = self.params[key]
        assert isinstance(value, float), key
        return value

    @property
    def prox_mu(self) -> float:
        """The proximal weight each site's local loss adds (0: none)."""
        return 0.0

    def refusal(self, update: SiteUpdate) -> str | None:
        """Why this rule cannot use `update` (e.g. a metric it scores is missing), checked before aggregating."""
        return None

    def participants(self, round_number: int, rounds: int, trainers: Sequence[str]) -> list[str]:
        """The trainers round `round_number` of `rounds` invites, out of every enrolled trainer (name order): all of
        them, but for a rule that passes the model from site to site."""
        return list(trainers)

    @abstractmethod
    def block_rule(self, updates: Sequence[SiteUpdate]) -> BlockRule:
        """How this round's updates combine, one block of elements at a time."""

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Weights:
        """The new global weights; every update must carry exactly the global tensors' names, shapes and dtypes."""
        if not updates:
            raise ValueError("no updates to aggregate")
        for update in updates:
            _check_like(global_weights, update)
        combine = self.block_rule(updates)
        combined = np.empty(SUM_BLOCK, np.float64)
        out: Weights = {}
        for name, reference in global_weights.items():
            result = np.empty(reference.shape, reference.dtype)
            flat_result = result.reshape(-1)
            sources = [np.asarray(update.weights[name]).reshape(-1) for update in updates]
            for start in range(0, flat_result.size, SUM_BLOCK):
                stop = min(start + SUM_BLOCK, flat_result.size)
                block = combined[: stop - start]
                combine([source[start:stop] for source in sources], block)
                if np.issubdtype(reference.dtype, np.integer):
                    np.rint(block, out=block)
                flat_result[start:stop] = block
            out[name] = result
        return out


class WeightedAverage(Strategy):
    """w' = Σ α_k w_k; a subclass says what α_k is."""

    @abstractmethod
    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        """α_k for each update, summing to 1."""

    def block_rule(self, updates: Sequence[SiteUpdate]) -> BlockRule:
        alphas = self.coefficients(updates)
        term = np.empty(SUM_BLOCK, np.float64)

        def weighted_sum(blocks: Sequence[np.ndarray], out: np.ndarray) -> None:
            out.fill(0.0)
            block_term = term[: out.size]
            for alpha, block in zip(alphas, blocks):
                np.multiply(block, alpha, out=block_term, dtype=np.float64)
                out += block_term

        return weighted_sum


class FedAvg(WeightedAverage):
    """McMahan et al.: α_k = n_k / Σ n."""

    name = "fedavg"

    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        counts = _case_counts(updates, minimum=0)
        if sum(counts) == 0:
            raise ValueError(f"case counts must be ≥ 0 and not all 0, got {counts}")
        total = sum(counts)
        return [count / total for count in counts]


class FedProx(FedAvg):
    """Li et al.: FedAvg's aggregation; each site's loss adds (μ/2)‖w − w_global‖²."""

    name = "fedprox"
    parameters = {"mu": 0.01}

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        if self.number("mu") < 0:
            raise ValueError(f"strategy fedprox: mu must be a finite number ≥ 0, got {self.params['mu']!r}")

    @property
    def prox_mu(self) -> float:
        return self.number("mu")


class FedBN(FedAvg):
    """Li et al. 2021: normalization layers stay local. Each site trains from the global weights with its own
    normalization layers in place of the global ones (kept across rounds and restarts: site.py); the published model
    needs one set, so the coordinator averages every tensor, normalization included, by FedAvg."""

    name = "fedbn"
    local_normalization = True


class VanillaAvg(WeightedAverage):
    """α_k = 1/K: every site counts the same, whatever its size."""

    name = "vanillaavg"

    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        return [1.0 / len(updates)] * len(updates)


class Beta(WeightedAverage):
    """α_k ∝ (1−β)/(1−β^{n_k}) (design.md §7): the inverse of Cui et al.'s "effective number" of n_k samples, so a
    site's weight falls with its size but saturates (β = 0.9: one case weighs 1, ten 0.15, any large site 0.1).
    β = 0 is VanillaAvg; β → 1 approaches 1/n_k."""

    name = "beta"
    parameters = {"beta": 0.9}

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        if not 0 <= self.number("beta") < 1:
            raise ValueError(f"strategy beta: beta must be in [0, 1), got {self.params['beta']!r}")

    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        beta = self.number("beta")
        raw = [(1 - beta) / (1 - beta**count) for count in _case_counts(updates, minimum=1)]
        return [value / sum(raw) for value in raw]


class Softmax(WeightedAverage):
    """α_k = softmax(s_k / T): s_k = n_k (`score = "cases"`, as the public code of this rule family does) or the
    negative validation loss (`score = "val_loss"`). Sites share no per-voxel validation loss, only their mean
    validation Dice, so the validation loss here is the Dice loss 1 − val_dice. With case counts as scores, T sets
    how many cases make a difference: T = 1 gives a site with ten more cases e^10 times the weight."""

    name = "softmax"
    parameters = {"temperature": 1.0, "score": "cases"}
    choices = {"score": ("cases", "val_loss")}

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        if not self.number("temperature") > 0:
            raise ValueError(f"strategy softmax: temperature must be > 0, got {self.params['temperature']!r}")

    def refusal(self, update: SiteUpdate) -> str | None:
        if self.params["score"] == "val_loss" and not 0 <= update.metrics.get("val_dice", math.nan) <= 1:
            return ("softmax by validation loss needs the update's val_dice in [0, 1] (a site shares it over at least "
                    "its policy's min_cases_per_mean validation cases)")
        return None

    def coefficients(self, updates: Sequence[SiteUpdate]) -> list[float]:
        if self.params["score"] == "cases":
            scores = [float(count) for count in _case_counts(updates, minimum=1)]
        else:
            for update in updates:
                reason = self.refusal(update)
                if reason:
                    raise ValueError(f"update from {update.site}: {reason}")
            scores = [-(1.0 - update.metrics["val_dice"]) for update in updates]
        scaled = np.asarray(scores, np.float64) / self.number("temperature")
        exponents = np.exp(scaled - scaled.max())  # shifted: the largest is e^0, nothing overflows
        return [float(value) for value in exponents / exponents.sum()]


class CoordinateMedian(Strategy):
    """Each element is the median of the sites' values (the mean of the middle two for an even K): one site, however
    far off, moves no element past the honest ones' range."""

    name = "median"

    def block_rule(self, updates: Sequence[SiteUpdate]) -> BlockRule:
        stacked = np.empty((len(updates), SUM_BLOCK), np.float64)

        def median(blocks: Sequence[np.ndarray], out: np.ndarray) -> None:
            values = _stack(blocks, stacked)
            np.median(values, axis=0, out=out)

        return median


class TrimmedMean(Strategy):
    """Each element is the mean of the sites' values without the ⌊fraction·K⌋ smallest and largest
    (scipy.stats.trim_mean's count): the default 0.25 drops one of four sites at each end."""

    name = "trimmed-mean"
    parameters = {"fraction": 0.25}

    def __init__(self, params: StrategyParams | None = None) -> None:
        super().__init__(params)
        if not 0 <= self.number("fraction") < 0.5:
            raise ValueError(f"strategy trimmed-mean: fraction must be in [0, 0.5), got {self.params['fraction']!r}")

    def block_rule(self, updates: Sequence[SiteUpdate]) -> BlockRule:
        stacked = np.empty((len(updates), SUM_BLOCK), np.float64)
        cut = int(self.number("fraction") * len(updates))

        def trimmed_mean(blocks: Sequence[np.ndarray], out: np.ndarray) -> None:
            values = _stack(blocks, stacked)
            values.sort(axis=0)
            np.mean(values[cut: len(blocks) - cut], axis=0, out=out)

        return trimmed_mean


class Sequential(Strategy):
    """Institutional incremental learning (Sheller et al. 2018): one site trains per round, starting from the model
    the site before it sent, and the round's model is its update, unchanged. A subclass says whose turn a round is;
    a turn falls on a site whatever its state, so a site that is away holds the model until it is back (or its
    operator revokes it: the order is over the trainers enrolled then)."""

    @abstractmethod
    def turn(self, round_number: int, rounds: int, sites: int) -> int:
        """The index (0-based, in name order) of the site that trains round `round_number` (1-based) of `rounds`."""

    def participants(self, round_number: int, rounds: int, trainers: Sequence[str]) -> list[str]:
        if not 1 <= round_number <= rounds:
            raise ValueError(f"strategy {self.name}: round {round_number} is not one of 1..{rounds}")
        return [trainers[self.turn(round_number, rounds, len(trainers))]] if trainers else []

    def block_rule(self, updates: Sequence[SiteUpdate]) -> BlockRule:
        if len(updates) != 1:
            raise ValueError(f"strategy {self.name}: one site trains each round, got updates from "
                             f"{', '.join(update.site for update in updates)}")

        def passed_on(blocks: Sequence[np.ndarray], out: np.ndarray) -> None:
            out[:] = blocks[0]

        return passed_on


class IIL(Sequential):
    """IIL: the sites in turn, each once, for an equal share of the rounds in a row (⌊(r−1)·K/R⌋ of K sites over R
    rounds): with R = K each site trains one round of the plan's local epochs and passes the model on."""

    name = "iil"

    def turn(self, round_number: int, rounds: int, sites: int) -> int:
        return (round_number - 1) * sites // rounds


class CyclicIIL(Sequential):
    """Cyclic IIL: the sites in turn, one round each, then again from the first ((r−1) mod K): R = C·K rounds are
    C cycles, each visit as short as the plan's local epochs."""

    name = "cyclic-iil"

    def turn(self, round_number: int, rounds: int, sites: int) -> int:
        return (round_number - 1) % sites


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedBN, VanillaAvg, Beta, Softmax, CoordinateMedian, TrimmedMean, IIL,
                              CyclicIIL)
}
STRATEGY_NAMES = tuple(STRATEGIES)


def strategy_by_name(name: str, params: StrategyParams | None = None) -> Strategy:
    """The strategy the plan names (the command line's spelling), its parameters validated."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: one of {', '.join(STRATEGY_NAMES)}") from None
    return cls(params)


def _case_counts(updates: Sequence[SiteUpdate], minimum: int) -> list[int]:
    counts = [int(update.num_cases) for update in updates]
    if any(count < minimum for count in counts):
        raise ValueError(f"case counts must be ≥ {minimum}, got {counts}")
    return counts


def _stack(blocks: Sequence[np.ndarray], buffer: np.ndarray) -> np.ndarray:
    """The blocks as the rows of `buffer` (float64), a view of exactly their size."""
    values = buffer[:, : blocks[0].size]
    for row, block in zip(values, blocks):
        row[:] = block
    return values


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


__all__ = ["Beta", "CoordinateMedian", "CyclicIIL", "FedAvg", "FedBN", "FedProx", "IIL", "STRATEGIES", "STRATEGY_NAMES",
           "Sequential", "SiteUpdate", "Softmax", "Strategy", "StrategyParams", "TrimmedMean", "VanillaAvg",
           "WeightedAverage", "strategy_by_name"]
