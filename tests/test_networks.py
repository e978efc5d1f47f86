"""Network factory: shapes, parameter counts, plan validation (needs the `train` extra)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from models.networks import Architecture, NetworkPlan, build_network, parameter_count  # noqa: E402


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
