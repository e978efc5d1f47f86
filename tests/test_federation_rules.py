"""Every aggregation rule of design.md §7 on hand-computed numbers (training/federation/aggregation.py), and their
parameters validated up front, in the plan as on the command line."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from fedlesion.cli import main
from training.federation.aggregation import SUM_BLOCK, STRATEGY_NAMES, SiteUpdate, strategy_by_name
from training.federation.plan import FederatedPlan, plan_for

COUNTER = "norm.num_batches_tracked"
BASE = {"w": np.zeros(2, dtype=np.float32), COUNTER: np.array(0)}


def _update(site: str, cases: int, w: list[float], counter: int, **metrics: float) -> SiteUpdate:
    return SiteUpdate(site, {"w": np.array(w, dtype=np.float32), COUNTER: np.array(counter)}, cases, metrics)


# n_k = 1, 2, 3; each rule's α_k or order statistics are worked out by hand in its test.
THREE = [_update("a", 1, [1.0, 10.0], 10, val_dice=0.8),
         _update("b", 2, [4.0, -2.0], 20, val_dice=0.7),
         _update("c", 3, [10.0, 4.0], 30, val_dice=0.6)]


def _aggregate(name: str, updates: list[SiteUpdate], **params: float | str) -> tuple[np.ndarray, int]:
    out = strategy_by_name(name, params).aggregate(BASE, updates)
    assert out["w"].dtype == np.float32 and out[COUNTER].dtype == BASE[COUNTER].dtype
    return out["w"], int(out[COUNTER])


def test_every_rule_has_its_command_line_name() -> None:
    assert set(STRATEGY_NAMES) == {"fedavg", "fedprox", "fedbn", "vanillaavg", "beta", "softmax", "median",
                                   "trimmed-mean", "iil", "cyclic-iil"}


def test_vanillaavg_counts_every_site_the_same() -> None:
    w, counter = _aggregate("vanillaavg", THREE)
    # (1 + 4 + 10)/3 = 5, (10 − 2 + 4)/3 = 4; counters 60/3 = 20
    np.testing.assert_allclose(w, [5.0, 4.0], rtol=1e-6)
    assert counter == 20


def test_beta_weights_by_the_inverse_effective_number_of_cases() -> None:
    # β = 0.5: (1−β)/(1−β^n) = 1, 2/3, 4/7 for n = 1, 2, 3 → α = (21, 14, 12)/47
    w, counter = _aggregate("beta", THREE, beta=0.5)
    np.testing.assert_allclose(w, [(21 + 14 * 4 + 12 * 10) / 47, (21 * 10 - 14 * 2 + 12 * 4) / 47], rtol=1e-6)
    assert counter == round((21 * 10 + 14 * 20 + 12 * 30) / 47)  # 850/47 = 18.09
    # the default β = 0.9: a one-case site weighs (1 − 0.9^10)/0.1 = 6.513 times a ten-case site
    alphas = strategy_by_name("beta").coefficients([_update("a", 1, [0, 0], 0), _update("b", 10, [0, 0], 0)])
    assert alphas[0] / alphas[1] == pytest.approx(6.5132155, rel=1e-7) and sum(alphas) == pytest.approx(1.0)
    # β = 0 is VanillaAvg
    np.testing.assert_allclose(_aggregate("beta", THREE, beta=0.0)[0], [5.0, 4.0], rtol=1e-6)


def test_softmax_scores_case_counts_or_the_validation_loss_at_its_temperature() -> None:
    # T = 1/ln 2 turns e^{n/T} into 2^n: α ∝ 2, 4, 8 → (1, 2, 4)/7
    w, counter = _aggregate("softmax", THREE, temperature=1 / math.log(2))
    np.testing.assert_allclose(w, [(1 + 2 * 4 + 4 * 10) / 7, (10 - 2 * 2 + 4 * 4) / 7], rtol=1e-6)
    assert counter == round((10 + 2 * 20 + 4 * 30) / 7)  # 170/7 = 24.3
    # s_k = −(1 − val_dice), T = 0.1/ln 2: α ∝ 2^{10·val_dice} ∝ (4, 2, 1)/7, the best validation first
    w, _ = _aggregate("softmax", THREE, temperature=0.1 / math.log(2), score="val_loss")
    np.testing.assert_allclose(w, [(4 + 2 * 4 + 10) / 7, (4 * 10 - 2 * 2 + 4) / 7], rtol=1e-6)
    # scores far apart neither overflow nor divide by zero: the largest takes it all
    huge = strategy_by_name("softmax").coefficients([_update("a", 1, [0, 0], 0), _update("b", 5000, [0, 0], 0)])
    assert huge == [0.0, 1.0]
    rule = strategy_by_name("softmax", {"score": "val_loss"})
    assert "val_dice" in rule.refusal(_update("d", 1, [0, 0], 0))
    assert rule.refusal(_update("d", 1, [0, 0], 0, val_dice=1.5)) and rule.refusal(THREE[0]) is None
    with pytest.raises(ValueError, match="update from d: softmax by validation loss needs"):
        rule.coefficients([*THREE, _update("d", 1, [0, 0], 0)])


def test_fedbn_aggregates_as_fedavg_and_keeps_normalization_at_the_sites() -> None:
    w, counter = _aggregate("fedbn", THREE)
    # α = n/6: (1 + 8 + 30)/6 = 6.5, (10 − 4 + 12)/6 = 3; counters (10 + 40 + 90)/6 = 23.3
    np.testing.assert_allclose(w, [6.5, 3.0], rtol=1e-6)
    assert counter == 23
    assert strategy_by_name("fedbn").local_normalization and not strategy_by_name("fedavg").local_normalization
    assert plan_for("stroke-dwi-adc", network="tiny", strategy="fedbn").local_normalization


FIVE = [*THREE, _update("d", 1, [100.0, 0.0], 40), _update("e", 1, [-50.0, 3.0], 50)]


def test_coordinate_median_takes_the_middle_value_of_each_element() -> None:
    assert _aggregate("median", THREE) == (pytest.approx([4.0, 4.0]), 20)  # (1, 4, 10), (−2, 4, 10)
    # an even count: the mean of the middle two, (4 + 10)/2 = 7, (0 + 4)/2 = 2; counters (20 + 30)/2 = 25
    assert _aggregate("median", FIVE[:4]) == (pytest.approx([7.0, 2.0]), 25)
    # five sites, the ×100 outliers (100 and −50) never reach the result
    assert _aggregate("median", FIVE) == (pytest.approx([4.0, 3.0]), 30)


def test_trimmed_mean_drops_the_extremes_of_each_element() -> None:
    # K = 5, fraction 0.25: ⌊1.25⌋ = 1 from each end. (−50, 1, 4, 10, 100) → 5; (−2, 0, 3, 4, 10) → 7/3
    w, counter = _aggregate("trimmed-mean", FIVE)
    np.testing.assert_allclose(w, [5.0, 7 / 3], rtol=1e-6)
    assert counter == 30
    assert _aggregate("trimmed-mean", FIVE, fraction=0.4)[0] == pytest.approx([4.0, 3.0])  # two each end: median
    assert _aggregate("trimmed-mean", FIVE, fraction=0.0)[0] == pytest.approx([13.0, 3.0])  # the plain mean
    assert _aggregate("trimmed-mean", THREE)[0] == pytest.approx([5.0, 4.0])  # ⌊0.75⌋ = 0: nothing trimmed


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_rules_work_across_block_edges(name: str) -> None:
    size = 5 * SUM_BLOCK // 2
    ramp = np.arange(size, dtype=np.float32).reshape(size // 2, 2)
    base = {"w": np.zeros_like(ramp), COUNTER: np.array(0)}
    updates = [SiteUpdate(site, {"w": factor * ramp, COUNTER: np.array(factor)}, 1)
               for site, factor in (("a", 1), ("b", 3), ("c", 2))]
    out = strategy_by_name(name, {"fraction": 1 / 3} if name == "trimmed-mean" else {}).aggregate(base, updates)
    np.testing.assert_array_equal(out["w"], 2 * ramp)
    assert int(out[COUNTER]) == 2


def test_a_sequential_rule_lets_one_site_train_a_round_and_passes_its_model_on_unchanged() -> None:
    sites = ["a", "b", "c"]
    assert [strategy_by_name("iil").participants(r, 3, sites) for r in (1, 2, 3)] == [["a"], ["b"], ["c"]]  # once
    assert [strategy_by_name("iil").participants(r, 6, sites) for r in range(1, 7)] == [
        ["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]  # ⌊(r−1)·3/6⌋: two rounds in a row each
    assert [strategy_by_name("iil").participants(r, 4, sites) for r in range(1, 5)] == [
        ["a"], ["a"], ["b"], ["c"]]  # ⌊0, 0.75, 1.5, 2.25⌋
    assert [strategy_by_name("iil").participants(r, 2, sites) for r in (1, 2)] == [["a"], ["b"]]  # ⌊0, 1.5⌋
    assert [strategy_by_name("cyclic-iil").participants(r, 7, sites) for r in range(1, 8)] == [
        ["a"], ["b"], ["c"], ["a"], ["b"], ["c"], ["a"]]  # (r−1) mod 3
    assert strategy_by_name("iil").participants(1, 3, []) == []
    assert strategy_by_name("fedavg").participants(2, 3, sites) == sites  # every other rule invites them all
    with pytest.raises(ValueError, match="round 4 is not one of 1..3"):
        strategy_by_name("cyclic-iil").participants(4, 3, sites)

    for name in ("iil", "cyclic-iil"):
        w, counter = _aggregate(name, THREE[1:2])
        assert w.tolist() == [4.0, -2.0] and counter == 20  # b's model, bit for bit
        with pytest.raises(ValueError, match=f"strategy {name}: one site trains each round, got updates from a, b"):
            _aggregate(name, THREE[:2])
    assert plan_for("stroke-dwi-adc", network="tiny", strategy="iil").quorum == 1
    with pytest.raises(ValueError, match="cyclic-iil trains one site per round, so its quorum is 1, got 2"):
        plan_for("stroke-dwi-adc", network="tiny", strategy="cyclic-iil", quorum=2)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("beta", {"beta": 1.0}, "beta must be in [0, 1)"),
        ("beta", {"beta": -0.1}, "beta must be in [0, 1)"),
        ("softmax", {"temperature": 0.0}, "temperature must be > 0"),
        ("softmax", {"score": "dice"}, "score must be one of cases, val_loss"),
        ("softmax", {"temperature": "hot"}, "temperature must be a finite number"),
        ("trimmed-mean", {"fraction": 0.5}, "fraction must be in [0, 0.5)"),
        ("fedprox", {"mu": math.inf}, "mu must be a finite number"),
        ("median", {"fraction": 0.1}, "strategy median: unknown parameter(s) fraction"),
    ],
)
def test_rule_parameters_are_checked_when_the_rule_is_made(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        strategy_by_name(name, params)


def test_the_plan_carries_every_rule_parameter_and_refuses_a_bad_one() -> None:
    plan = plan_for("stroke-dwi-adc", network="tiny", strategy="softmax", strategy_params={"score": "val_loss"})
    assert plan.strategy_params == {"temperature": 1.0, "score": "val_loss"}  # the defaults written out too
    text = plan.to_toml()
    assert 'score = "val_loss"' in text and "temperature = 1.0" in text and "#   beta: beta = 0.9" in text
    assert FederatedPlan.from_toml(text) == plan
    with pytest.raises(ValueError, match=re.escape("federation.strategy: strategy softmax: temperature must be > 0")):
        FederatedPlan.from_toml(text.replace("temperature = 1.0", "temperature = -2.0"))
    trimmed = plan_for("ms-flair", network="tiny", strategy="trimmed-mean").to_toml()
    with pytest.raises(ValueError, match=re.escape("fraction must be in [0, 0.5)")):
        FederatedPlan.from_toml(trimmed.replace("fraction = 0.25", "fraction = 0.5"))


def test_the_plan_command_writes_any_rule_with_its_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coordinator", "plan", "--task", "stroke-dwi-adc", "--network", "tiny", "--strategy", "beta",
                 "--param", "beta=0.99"]) == 0
    printed = FederatedPlan.from_toml(capsys.readouterr().out)
    assert (printed.strategy, printed.strategy_params) == ("beta", {"beta": 0.99})
    assert main(["coordinator", "plan", "--task", "stroke-dwi-adc", "--network", "tiny", "--strategy", "softmax",
                 "--param", "score=val_loss", "--param", "temperature=0.5"]) == 0
    assert FederatedPlan.from_toml(capsys.readouterr().out).strategy_params == {"temperature": 0.5,
                                                                                "score": "val_loss"}
