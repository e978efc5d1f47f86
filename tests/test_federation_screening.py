"""Screening a round's updates against each other (training/federation/screening.py): each attack of the hostile-site
issue is refused with its reason, honest updates pass, and the plan carries the limits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.federation.aggregation import SUM_BLOCK, SiteUpdate, strategy_by_name
from training.federation.plan import FederatedPlan, plan_for
from training.federation.screening import ScreeningLimits, change_gram, screen

BASE = {"conv.weight": np.full((8, 50), 0.1, dtype=np.float32), "conv.bias": np.zeros(8, dtype=np.float32),
        "norm.num_batches_tracked": np.array(100)}
FEDAVG = strategy_by_name("fedavg")
LIMITS = ScreeningLimits()


def _sites(count: int) -> list[SiteUpdate]:
    """Honest updates: one shared direction of change plus each site's own noise (pairwise cosines near 0.8)."""
    rng = np.random.default_rng(7)
    common = {name: rng.normal(0, 0.01, value.shape) for name, value in BASE.items() if value.dtype == np.float32}
    updates = []
    for k in range(count):
        weights = {name: (BASE[name] + common[name] + rng.normal(0, 0.005, BASE[name].shape)).astype(np.float32)
                   for name in common}
        weights["norm.num_batches_tracked"] = np.array(100 + 10**6 * k)  # counters are not compared
        updates.append(SiteUpdate(f"site-{k}", weights, 20 + k))
    return updates


def _hostile(update: SiteUpdate, factor: float, **changes) -> SiteUpdate:
    """`update` with its change from the global weights multiplied by `factor`."""
    weights = {name: (BASE[name] + factor * (value - BASE[name])).astype(value.dtype) if value.dtype == np.float32
               else value for name, value in update.weights.items()}
    return SiteUpdate("hostile", weights, changes.get("num_cases", update.num_cases), changes.get("metrics", {}))


def test_honest_updates_pass() -> None:
    assert screen(BASE, _sites(4), LIMITS, {}, FEDAVG) == {}


def test_a_scaled_update_is_refused_for_its_norm() -> None:
    honest = _sites(4)
    refused = screen(BASE, [*honest[:3], _hostile(honest[3], 100.0)], LIMITS, {}, FEDAVG)
    assert list(refused) == ["hostile"]
    assert re.search(r"norm [\d.]+, \d\d+(\.\d)?× the median of the others'", refused["hostile"]), refused
    # two updates: the larger one is still the odd one out
    assert list(screen(BASE, [honest[0], _hostile(honest[1], 100.0)], LIMITS, {}, FEDAVG)) == ["hostile"]
    # within the plan's ratio it passes
    assert screen(BASE, [*honest[:3], _hostile(honest[3], 3.0)], LIMITS, {}, FEDAVG) == {}


@pytest.mark.parametrize("count", [3, 4])
def test_a_sign_flipped_update_is_refused_for_its_direction(count: int) -> None:
    honest = _sites(count)
    refused = screen(BASE, [*honest[:-1], _hostile(honest[-1], -1.0)], LIMITS, {}, FEDAVG)
    assert list(refused) == ["hostile"]  # with three, the honest two stay: each agrees with the other
    assert "points away from the others'" in refused["hostile"] and f"with {count - 1} of {count - 1}" in refused[
        "hostile"]
    # between two, neither is the odd one out
    assert screen(BASE, [honest[0], _hostile(honest[1], -1.0)], LIMITS, {}, FEDAVG) == {}


def test_a_case_count_above_the_declared_size_or_the_plan_cap_is_refused() -> None:
    honest = _sites(3)
    claims = [*honest, _hostile(honest[0], 1.0, num_cases=10**6)]
    refused = screen(BASE, claims, LIMITS, {"site-1": 20}, FEDAVG)
    assert refused == {
        "site-1": "it reports 21 training cases, above its declared dataset size of 20",
        "hostile": "it reports 1000000 training cases, above the plan's cap of 100000",
    }
    assert screen(BASE, claims, ScreeningLimits(max_cases=10**6), {"site-1": 21}, FEDAVG) == {}


def test_an_update_the_rule_cannot_score_is_refused() -> None:
    honest = [SiteUpdate(u.site, u.weights, u.num_cases, {"val_dice": 0.5}) for u in _sites(3)]
    softmax = strategy_by_name("softmax", {"score": "val_loss"})
    refused = screen(BASE, [*honest, _hostile(honest[0], 1.0, metrics={"val_dice": 7.0})], LIMITS, {}, softmax)
    assert refused == {"hostile": "softmax by validation loss needs the update's val_dice in [0, 1]"}


def test_the_gram_matrix_of_changes_is_exact_across_blocks() -> None:
    size = 5 * SUM_BLOCK // 2
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=size).astype(np.float32), "n": np.array(3)}
    updates = [SiteUpdate(str(k), {"w": rng.normal(size=size).astype(np.float32), "n": np.array(k)}, 1)
               for k in range(3)]
    changes = np.stack([u.weights["w"].astype(np.float64) - base["w"] for u in updates])
    np.testing.assert_allclose(change_gram(base, updates), changes @ changes.T, rtol=1e-12)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("max_norm_ratio = 10.0", "max_norm_ratio = 1.0"), "federation.screening.max_norm_ratio: must be a number > 1"),
        (("min_cosine = 0.0", "min_cosine = 2.0"), "federation.screening.min_cosine: must be a number in [-1, 1]"),
        (("max_cases = 100000", "max_cases = 0"), "federation.screening.max_cases: must be an integer ≥ 1"),
        (("max_cases = 100000", "max_cases = 100000\nmin_sites = 3"),
         "unknown key(s) in [federation.screening]: min_sites"),
    ],
)
def test_the_plan_carries_the_screening_limits_and_refuses_bad_ones(edit: tuple[str, str], message: str) -> None:
    plan = plan_for("stroke-dwi-adc", network="tiny", screening=ScreeningLimits(3.0, -0.5, 500))
    assert FederatedPlan.from_toml(plan.to_toml()).screening == ScreeningLimits(3.0, -0.5, 500)
    text = plan_for("stroke-dwi-adc", network="tiny").to_toml()
    assert edit[0] in text
    with pytest.raises(ValueError, match=re.escape(message)):
        FederatedPlan.from_toml(text.replace(edit[0], edit[1]))
    # a plan written before screening existed reads with the defaults
    start, end = text.index("[federation.screening]"), text.index("max_cases = 100000") + len("max_cases = 100000")
    assert FederatedPlan.from_toml(text[:start] + text[end:]).screening == ScreeningLimits()
