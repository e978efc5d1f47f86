"""benchmarks/hostile_site.py's attacks do what their names say to an honest update (the benchmark itself is run by
hand: it trains four sites for minutes)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.hostile_site import ATTACKS
from training.trainer import LocalUpdate

GLOBAL = {"conv.weight": np.full((4, 3), 0.5, dtype=np.float32), "norm.running_var": np.ones(4, dtype=np.float32),
          "norm.num_batches_tracked": np.array(10)}
HONEST = LocalUpdate({"conv.weight": GLOBAL["conv.weight"] + 0.25, "norm.running_var": GLOBAL["norm.running_var"] + 0.5,
                      "norm.num_batches_tracked": np.array(14)}, 5, {"train_loss": 1.0})


@pytest.mark.parametrize(("name", "weight_change", "variance_change", "cases"), [
    ("scaled", 25.0, 50.0, 5),
    ("flipped", -0.25, -0.5, 5),
    ("claims", 0.25, 0.5, 10**6),
    ("weights", 25.0, 0.5, 5),
])
def test_each_attack_alters_the_update_as_named(name: str, weight_change: float, variance_change: float,
                                                cases: int) -> None:
    attacked = ATTACKS[name].apply(GLOBAL, HONEST)
    np.testing.assert_allclose(attacked.weights["conv.weight"] - GLOBAL["conv.weight"], weight_change, rtol=1e-6)
    np.testing.assert_allclose(attacked.weights["norm.running_var"] - GLOBAL["norm.running_var"], variance_change,
                               rtol=1e-6)
    assert attacked.weights["conv.weight"].dtype == np.float32
    assert int(attacked.weights["norm.num_batches_tracked"]) == 14  # counters are never altered
    assert attacked.n_cases == cases and attacked.metrics == HONEST.metrics
