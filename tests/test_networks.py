"""Network factory: shapes, parameter counts, plan validation (needs the `train` extra)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models.network_plan import Architecture, NetworkPlan  # noqa: E402
from models.networks import (  # noqa: E402
    build_network,
    load_network_weights,
    network_weights,
    parameter_count,
)


@pytest.mark.parametrize("architecture", list(Architecture))
def test_forward_shape_and_parameter_count(architecture: Architecture, capsys: pytest.CaptureFixture[str]) -> None:
    plan = NetworkPlan(architecture=architecture, base_filters=4, depth=3, max_filters=16)
    network = build_network(2, 1, plan).eval()
    side = plan.size_divisible * 4
    with torch.no_grad():
        out = network(torch.randn(1, 2, side, side, side // 2))
    assert tuple(out.shape) == (1, 1, side, side, side // 2)
    count = parameter_count(network)
    with capsys.disabled():
        print(f"\n{architecture.value}: {count} parameters, filters {plan.filters}")
    assert 1_000 < count < 1_000_000


@pytest.mark.parametrize("architecture", list(Architecture))
def test_network_weights_hold_each_tensor_once_and_load_back_whole(architecture: Architecture) -> None:
    """DynUNet names its encoder blocks twice in its state dict: what a federation ships holds each tensor once, and
    loading it into a fresh network restores every name, the second ones included."""
    plan = NetworkPlan(architecture=architecture, base_filters=4, depth=3, max_filters=16, norm="batch")
    torch.manual_seed(1)
    trained = build_network(2, 1, plan)
    weights = {name: tensor.numpy().copy() for name, tensor in network_weights(trained).items()}
    unique_elements = sum(tensor.numel() for tensor in [*trained.parameters(), *trained.buffers()])
    assert sum(array.size for array in weights.values()) == unique_elements
    if architecture is Architecture.DYNUNET:
        assert len(weights) < len(trained.state_dict())
    torch.manual_seed(2)
    fresh = build_network(2, 1, plan)
    load_network_weights(fresh, weights)
    expected = trained.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(ValueError, match="unknown"):
        load_network_weights(fresh, {"no.such.tensor": np.zeros(1, np.float32)})


def test_plan_filters_double_and_cap() -> None:
    plan = NetworkPlan(base_filters=32, depth=6, max_filters=320)
    assert plan.filters == (32, 64, 128, 256, 320, 320)
    assert plan.size_divisible == 32
    assert NetworkPlan(architecture="unet", norm="batch").architecture is Architecture.UNET


@pytest.mark.parametrize(
    "kwargs, field",
    [({"depth": 1}, "depth"), ({"base_filters": 0}, "base_filters"), ({"max_filters": 8}, "max_filters")],
)
def test_plan_rejects_bad_values(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        NetworkPlan(**kwargs)


def test_build_rejects_bad_channels() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_network(0)
