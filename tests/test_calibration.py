"""Threshold calibration (training/calibration.py): one site's Dice per threshold, a federation's pooled choice."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import compute_metrics, dice_at_thresholds
from training.calibration import THRESHOLD_CANDIDATES, DiceByThreshold, best_threshold, pooled_dice


def test_pooled_dice_weights_each_site_by_its_validation_cases() -> None:
    # 0.3: (5·0.2 + 15·0.6) / 20 = 0.5, 0.5: (5·0.6 + 15·0.4) / 20 = 0.45, 0.7: (5·0.1 + 15·0.3) / 20 = 0.25.
    # The sites' plain mean would say 0.4 | 0.5 | 0.2 and choose 0.5: the larger site's cases outweigh.
    small = DiceByThreshold((0.3, 0.5, 0.7), (0.2, 0.6, 0.1), 5)
    large = DiceByThreshold((0.3, 0.5, 0.7), (0.6, 0.4, 0.3), 15)
    pooled = pooled_dice([small, large])
    assert pooled == pytest.approx({0.3: 0.5, 0.5: 0.45, 0.7: 0.25})
    assert best_threshold(pooled, preferred=0.5) == 0.3


def test_only_thresholds_every_site_reported_are_pooled() -> None:
    older = DiceByThreshold((0.4, 0.5), (0.9, 0.1), 10)  # e.g. a site on another release with other candidates
    newer = DiceByThreshold((0.3, 0.5), (0.8, 0.3), 30)
    assert pooled_dice([older, newer]) == pytest.approx({0.5: (10 * 0.1 + 30 * 0.3) / 40})
    assert pooled_dice([DiceByThreshold((0.4,), (0.9,), 10), DiceByThreshold((0.6,), (0.3,), 30)]) == {}
    with pytest.raises(ValueError, match="no Dice reports"):
        pooled_dice([])


def test_a_tie_goes_to_the_threshold_nearest_the_plans() -> None:
    assert best_threshold({0.3: 0.5, 0.45: 0.5, 0.7: 0.5}, preferred=0.5) == 0.45
    assert best_threshold({0.3: 0.5, 0.45: 0.5, 0.7: 0.6}, preferred=0.5) == 0.7
    with pytest.raises(ValueError, match="no threshold"):
        best_threshold({}, preferred=0.5)


@pytest.mark.parametrize("thresholds, dice, cases, message", [
    ((0.3, 0.5), (0.5,), 5, "one Dice per threshold"),
    ((), (), 5, "one Dice per threshold"),
    ((0.5, 0.3), (0.5, 0.5), 5, "increase strictly"),
    ((0.0, 0.5), (0.5, 0.5), 5, "inside (0, 1)"),
    ((0.3, 0.5), (0.5, float("nan")), 5, "must lie in [0, 1]"),
    ((0.3, 0.5), (0.5, 0.5), 0, "num_cases must be an integer ≥ 1"),
])
def test_a_malformed_report_is_refused(thresholds, dice, cases, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        DiceByThreshold(thresholds, dice, cases)


def test_a_report_round_trips_its_wire_message() -> None:
    report = DiceByThreshold(THRESHOLD_CANDIDATES, tuple(np.linspace(0.1, 0.8, len(THRESHOLD_CANDIDATES))), 12)
    assert DiceByThreshold.from_message(report.to_message()) == report


def test_dice_at_thresholds_is_compute_metrics_dice_at_each_threshold() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.random((12, 10, 8)).astype(np.float32)
    truth = probabilities + rng.normal(0, 0.3, probabilities.shape) > 0.7
    thresholds = (0.3, 0.5, 0.9, 0.999)
    expected = [compute_metrics(probabilities >= t, truth, 1.0).dice for t in thresholds]
    assert dice_at_thresholds(probabilities, truth, thresholds) == pytest.approx(expected)
    assert dice_at_thresholds(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), (0.5,)) == [1.0]  # both empty
    with pytest.raises(ValueError, match="shape"):
        dice_at_thresholds(probabilities, truth[:-1], thresholds)
