"""Screening a round's updates against each other (training/federation/screening.py): each attack of the hostile-site
issue is refused with its reason, honest updates pass, normalization statistics are screened apart from the learned
parameters, and the plan carries the limits."""

from __future__ import annotations

import re
from collections.abc import Callable

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


def _hostile(update: SiteUpdate, factor: float, *, base: dict[str, np.ndarray] = BASE,
             only: Callable[[str], bool] = lambda name: True, **changes) -> SiteUpdate:
    """`update` with its change from the global weights multiplied by `factor` (in the tensors `only` names)."""
    weights = {name: (base[name] + factor * (value - base[name])).astype(value.dtype)
               if value.dtype == np.float32 and only(name) else value for name, value in update.weights.items()}
    return SiteUpdate("hostile", weights, changes.get("num_cases", update.num_cases), changes.get("metrics", {}))


# A batch-normalized layer: its running statistics change far more than the learned parameters, and the way each
# site's images make them (here: site 3's the opposite of the others').
BN_BASE = {**{name: value for name, value in BASE.items() if name != "norm.num_batches_tracked"},
           "norm.weight": np.ones(8, dtype=np.float32), "norm.running_mean": np.zeros(8, dtype=np.float32),
           "norm.running_var": np.full(8, 5.0, dtype=np.float32), "norm.num_batches_tracked": np.array(100)}


def _bn_sites(count: int) -> list[SiteUpdate]:
    """Honest updates of `BN_BASE`: the learned parameters as `_sites`, statistics changes 50× their norm."""
    direction = np.random.default_rng(3).normal(0, 1.0, 8)
    updates = []
    for update, sign in zip(_sites(count), [1, 1, 1, -1]):
        statistics = {name: (BN_BASE[name] + sign * direction).astype(np.float32)
                      for name in ("norm.running_mean", "norm.running_var")}
        weights = {**update.weights, "norm.weight": BN_BASE["norm.weight"] + 0.01 * sign, **statistics}
        updates.append(SiteUpdate(update.site, weights, update.num_cases))
    return updates


def _is_statistic(name: str) -> bool:
    return name.startswith("norm.running")


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


def test_honest_updates_that_all_point_apart_are_not_refused_for_their_direction() -> None:
    """Non-IID sites late in a run: no shared direction, each change away from the others' (here at 120°)."""
    rng = np.random.default_rng(5)
    first, second = rng.normal(0, 0.01, (2, 8, 50))
    updates = []
    for k, angle in enumerate(np.radians([0.0, 120.0, 240.0])):
        weights = dict(BASE, **{"conv.weight": (BASE["conv.weight"] + np.cos(angle) * first
                                                 + np.sin(angle) * second).astype(np.float32)})
        updates.append(SiteUpdate(f"site-{k}", weights, 20))
    assert screen(BASE, updates, LIMITS, {}, FEDAVG) == {}
    # a fourth, flipped, is still the odd one out among honest updates that agree
    honest = _sites(3)
    refused = screen(BASE, [*honest, _hostile(honest[0], -1.0)], LIMITS, {}, FEDAVG)
    assert list(refused) == ["hostile"] and re.search(r"theirs 0\.\d\d with each other", refused["hostile"])


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
    assert refused["hostile"].startswith("softmax by validation loss needs the update's val_dice in [0, 1]")


def test_running_statistics_are_screened_apart_from_the_learned_parameters() -> None:
    honest = _bn_sites(4)
    # site 3's statistics moved against the others' (its scanner, not its loss): not a reason to refuse it
    assert screen(BN_BASE, honest, LIMITS, {}, FEDAVG) == {}
    # the parameters ×100 with honest statistics: refused, although the statistics' change outweighs theirs
    weights_only = _hostile(honest[0], 100.0, base=BN_BASE, only=lambda name: not _is_statistic(name))
    refused = screen(BN_BASE, [*honest[1:], weights_only], LIMITS, {}, FEDAVG)
    assert list(refused) == ["hostile"]
    assert re.match(r"the change of its learned parameters from the global weights has norm [\d.]+, \d\d+(\.\d)?× ",
                    refused["hostile"]), refused
    # the running means ×100: refused for the statistics' own norm
    statistics_only = _hostile(honest[0], 100.0, base=BN_BASE, only=lambda name: name == "norm.running_mean")
    refused = screen(BN_BASE, [*honest[1:], statistics_only], LIMITS, {}, FEDAVG)
    assert list(refused) == ["hostile"] and refused["hostile"].startswith("the change of its normalization statistics")
    # the parameters flipped with honest statistics: refused for their direction
    flipped = _hostile(honest[0], -1.0, base=BN_BASE, only=lambda name: not _is_statistic(name))
    refused = screen(BN_BASE, [*honest[1:], flipped], LIMITS, {}, FEDAVG)
    assert list(refused) == ["hostile"] and "learned parameters from the global weights points away" in refused[
        "hostile"]


def test_a_negative_running_variance_is_refused() -> None:
    honest = _bn_sites(3)
    weights = dict(honest[0].weights)
    weights["norm.running_var"] = weights["norm.running_var"] - 20.0
    refused = screen(BN_BASE, [*honest[1:], SiteUpdate("hostile", weights, 20)], LIMITS, {}, FEDAVG)
    assert refused == {"hostile": "its normalization statistic norm.running_var has negative variances"}


def test_the_gram_matrix_of_changes_is_accurate_across_blocks() -> None:
    """float32 blocks summed in float64: within 1e-5 of the float64 product, the blocks' seams included."""
    size = 5 * SUM_BLOCK // 2
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=size).astype(np.float32), "n": np.array(3)}
    updates = [SiteUpdate(str(k), {"w": rng.normal(size=size).astype(np.float32), "n": np.array(k)}, 1)
               for k in range(3)]
    changes = np.stack([u.weights["w"].astype(np.float64) - base["w"] for u in updates])
    np.testing.assert_allclose(change_gram(base, updates), changes @ changes.T, rtol=1e-5)
    np.testing.assert_allclose(change_gram(base, updates, ["w", "n"]), changes @ changes.T, rtol=1e-5)
    assert not change_gram(base, updates, ["n"]).any()  # integer counters are never compared


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
