"""The probability threshold a model is read at, calibrated on held-out cases (torch-free).

Lesion-centred patches make a network see far more lesion than a whole head holds, so its probabilities run high on
whole volumes; reading them at the threshold that scores best on held-out cases corrects that without touching the
weights. One rule for a single run (`LocalTrainer.calibrate_threshold`) and for a federation, whose trainer sites
each report their mean validation Dice at every candidate (`DiceByThreshold`, one aggregate per threshold) and whose
coordinator pools them, weighted by each site's validation cases, into the threshold its candidate's manifest gets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from models.federation import federation_pb2 as pb2

__all__ = ["THRESHOLD_CANDIDATES", "DiceByThreshold", "best_threshold", "pooled_dice"]

THRESHOLD_CANDIDATES = tuple(round(0.3 + 0.05 * step, 2) for step in range(14))  # 0.30 … 0.95


@dataclass(frozen=True)
class DiceByThreshold:
    """A site's mean Dice over its `num_cases` validation cases at each threshold: never a per-case value."""

    thresholds: tuple[float, ...]
    mean_dice: tuple[float, ...]
    num_cases: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "mean_dice", tuple(float(d) for d in self.mean_dice))
        if not self.thresholds or len(self.thresholds) != len(self.mean_dice):
            raise ValueError(f"{len(self.thresholds)} thresholds and {len(self.mean_dice)} Dice values: one Dice per "
                             "threshold, at least one")
        if not all(0.0 < t < 1.0 for t in self.thresholds) or list(self.thresholds) != sorted(set(self.thresholds)):
            raise ValueError(f"thresholds must increase strictly inside (0, 1), got {list(self.thresholds)}")
        if not all(math.isfinite(d) and 0.0 <= d <= 1.0 for d in self.mean_dice):
            raise ValueError(f"Dice values must lie in [0, 1], got {list(self.mean_dice)}")
        if isinstance(self.num_cases, bool) or not isinstance(self.num_cases, int) or self.num_cases < 1:
            raise ValueError(f"num_cases must be an integer ≥ 1, got {self.num_cases!r}")

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.thresholds, self.mean_dice))

    def to_message(self) -> pb2.ThresholdDice:
        return pb2.ThresholdDice(thresholds=self.thresholds, mean_dice=self.mean_dice, num_cases=self.num_cases)

    @classmethod
    def from_message(cls, message: pb2.ThresholdDice) -> DiceByThreshold:
        return cls(tuple(message.thresholds), tuple(message.mean_dice), int(message.num_cases))


def pooled_dice(reports: Sequence[DiceByThreshold]) -> dict[float, float]:
    """Σ n_k·d_k(t) / Σ n_k per threshold t that every report has: the mean Dice over all their validation cases, as
    if one site held them (a site with more cases counts more)."""
    if not reports:
        raise ValueError("no Dice reports to pool")
    common = set(reports[0].thresholds).intersection(*(report.thresholds for report in reports[1:]))
    cases = sum(report.num_cases for report in reports)
    return {
        threshold: sum(report.num_cases * report.as_dict()[threshold] for report in reports) / cases
        for threshold in sorted(common)
    }


def best_threshold(dice_by_threshold: Mapping[float, float], preferred: float) -> float:
    """The threshold with the highest Dice; ties go to the one nearest `preferred` (the plan's threshold)."""
    if not dice_by_threshold:
        raise ValueError("no threshold to choose from")
    return max(dice_by_threshold, key=lambda t: (dice_by_threshold[t], -abs(t - preferred)))
