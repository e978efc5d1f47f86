"""The federated plan file and the aggregation rules (training/federation/plan.py, aggregation.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.federation.aggregation import SUM_BLOCK, FedAvg, FedProx, SiteUpdate, strategy_by_name
from training.federation.plan import FederatedPlan, plan_for


def test_plan_toml_round_trips_and_its_identity_is_the_training_plan_hash() -> None:
    plan = plan_for("stroke-dwi-adc", network="tiny", rounds=4, local_epochs=2, strategy="fedprox",
                    strategy_params={"mu": 0.05}, quorum=2, deadline_s=30)
    text = plan.to_toml()
    assert text.startswith("#") and "# local epochs per round" in text
    again = FederatedPlan.from_toml(text)
    assert again == plan
    assert again.sha256 == plan.training.sha256() and again.local_epochs == 2 and again.prox_mu == 0.05
    default = plan_for("ms-flair", network="default")
    assert FederatedPlan.from_toml(default.to_toml()) == default
    assert default.training.network.base_filters > plan.training.network.base_filters
    changed = FederatedPlan.from_toml(text.replace("seed = 0", "seed = 1"))
    assert changed.sha256 != plan.sha256


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("rounds = 4", "rounds = 0"), "federation.rounds"),
        (('strategy = "fedprox"', 'strategy = "krum"'), "unknown strategy 'krum'"),
        (("mu = 0.05", "mu = -1.0"), "mu must be"),
        (("deadline_s = 30.0", "deadline_s = 0"), "federation.deadline_s"),
        (('task = "stroke-dwi-adc"', 'task = "ms-flair"'), "differs from training.task"),
        (("quorum = 2", "quorum = 2\nshuffle = true"), "unknown key(s) in [federation]: shuffle"),
        (("batch_size = 2", "batch_size = 0"), "batch_size"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_key(edit: tuple[str, str], message: str) -> None:
    text = plan_for("stroke-dwi-adc", rounds=4, strategy="fedprox", strategy_params={"mu": 0.05}, quorum=2,
                    deadline_s=30).to_toml()
    assert edit[0] in text
    with pytest.raises(ValueError, match=re.escape(message)):
        FederatedPlan.from_toml(text.replace(edit[0], edit[1], 1))  # the first occurrence: [federation]


def _update(site: str, cases: int, w: list[float], counter: int) -> SiteUpdate:
    return SiteUpdate(site, {"w": np.array(w, dtype=np.float32), "bn.num_batches_tracked": np.array(counter)}, cases)


def test_fedavg_weights_sites_by_their_case_counts() -> None:
    base = {"w": np.zeros(2, dtype=np.float32), "bn.num_batches_tracked": np.array(0)}
    updates = [_update("a", 1, [1.0, 10.0], 10), _update("b", 3, [5.0, 2.0], 20)]
    out = FedAvg().aggregate(base, updates)
    # (1·1 + 3·5)/4 = 4, (1·10 + 3·2)/4 = 4; counters (10 + 60)/4 = 17.5 → 18 (rounded half to even)
    np.testing.assert_array_equal(out["w"], np.array([4.0, 4.0], dtype=np.float32))
    assert out["w"].dtype == np.float32 and out["bn.num_batches_tracked"].dtype == base["bn.num_batches_tracked"].dtype
    assert int(out["bn.num_batches_tracked"]) == 18 and isinstance(out["bn.num_batches_tracked"], np.ndarray)
    # FedProx aggregates as FedAvg does; its mu goes to the sites.
    prox = strategy_by_name("fedprox", {"mu": 0.1})
    assert isinstance(prox, FedProx) and prox.prox_mu == 0.1 and FedAvg().prox_mu == 0.0
    np.testing.assert_array_equal(prox.aggregate(base, updates)["w"], out["w"])


def test_fedavg_sums_tensors_larger_than_one_block_exactly() -> None:
    # A tensor of 2.5 blocks: every element is weighted like the others, across the block edges.
    size = 5 * SUM_BLOCK // 2
    base = {"w": np.zeros((size // 2, 2), dtype=np.float32), "bn.num_batches_tracked": np.array(0)}
    ramp = np.arange(size, dtype=np.float32).reshape(size // 2, 2)
    updates = [SiteUpdate("a", {"w": ramp, "bn.num_batches_tracked": np.array(3)}, 1),
               SiteUpdate("b", {"w": 3 * ramp, "bn.num_batches_tracked": np.array(7)}, 3)]
    out = FedAvg().aggregate(base, updates)
    # (1·r + 3·3r)/4 = 2.5·r, exact in float32 for these integers; counters (3 + 21)/4 = 6
    np.testing.assert_array_equal(out["w"], 2.5 * ramp)
    assert out["w"].shape == base["w"].shape and out["w"].dtype == np.float32
    assert int(out["bn.num_batches_tracked"]) == 6


def test_aggregation_refuses_updates_unlike_the_model() -> None:
    base = {"w": np.zeros(2, dtype=np.float32), "bn.num_batches_tracked": np.array(0)}
    wrong_shape = SiteUpdate("c", {"w": np.zeros(3, dtype=np.float32), "bn.num_batches_tracked": np.array(1)}, 1)
    with pytest.raises(ValueError, match="update from c: w is float32"):
        FedAvg().aggregate(base, [_update("a", 1, [1, 1], 1), wrong_shape])
    with pytest.raises(ValueError, match="not all 0"):
        FedAvg().aggregate(base, [_update("a", 0, [1, 1], 1)])
    with pytest.raises(ValueError, match="no updates"):
        FedAvg().aggregate(base, [])
    with pytest.raises(ValueError, match="unknown parameter"):
        strategy_by_name("fedavg", {"mu": 1.0})
