"""The checkpoint contract (training/checkpoint.py) that export and the federated layer read."""

from __future__ import annotations

import pytest
import torch

from models.network_plan import NetworkPlan
from models.networks import build_network
from training.checkpoint import (
    FORMAT,
    KEYS,
    checkpoint_threshold,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from training.plan import TrainingPlan, default_plan


def _plan() -> TrainingPlan:
    return default_plan("ms-flair").with_overrides(
        {"network": {"depth": 3, "base_filters": 4, "max_filters": 16, "norm": "batch"},
         "preprocessing": {"patch_size": [32, 32, 32]}}
    )


def test_round_trip_with_weights_only(tmp_path):
    plan = _plan()
    torch.manual_seed(0)
    model = build_network(plan.in_channels, 1, plan.network)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    history = [{"epoch": 1, "train_loss": 0.7, "val_dice": float("nan")}]
    path = save_checkpoint(
        tmp_path / "sub" / "last.pt", plan=plan, epoch=1, model=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), history=history, best_val_dice=None, federated_round=3, strategy="fedavg",
    )
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {*KEYS, "threshold"} and raw["format"] == FORMAT == "fedlesion-checkpoint-1"
    assert raw["threshold"] is None and checkpoint_threshold(raw) == plan.threshold  # not calibrated: the plan's
    del raw["threshold"]  # written before calibration existed: still read, at the plan's threshold
    assert checkpoint_threshold(raw) == plan.threshold
    assert raw["task"] == "ms-flair" and raw["epoch"] == 1 and raw["federated_round"] == 3
    assert raw["strategy"] == "fedavg" and raw["best_val_dice"] is None
    assert raw["history"] == [{"epoch": 1, "train_loss": 0.7, "val_dice": None}]  # NaN stored as None
    assert raw["plan"]["network"] == {"architecture": "dynunet", "base_filters": 4, "depth": 3, "max_filters": 16,
                                      "norm": "batch"}
    assert raw["plan"]["preprocessing"] == {
        "target_spacing_mm": [1.5, 1.5, 1.5], "patch_size": [32, 32, 32], "size_divisible": 16,
        "normalization": {"method": "zscore-head-mask", "clip_percentiles": [0.5, 99.5]},
    }
    assert raw["plan"]["in_channels"] == 1 and raw["plan"]["threshold"] == 0.5
    rebuilt = build_network(raw["plan"]["in_channels"], 1, NetworkPlan(**raw["plan"]["network"]))
    rebuilt.load_state_dict(raw["model"])
    for name, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value)
    fresh = torch.optim.AdamW(rebuilt.parameters(), lr=1e-3)
    fresh.load_state_dict(raw["optimizer"])
    assert TrainingPlan.from_dict(raw["plan"]).sha256() == plan.sha256()

    state = load_checkpoint(path)
    assert model_from_checkpoint(state).training is False
    assert not list(tmp_path.glob("sub/.*tmp*"))


def test_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": FORMAT, "task": "ms-flair"}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="lacks"):
        load_checkpoint(tmp_path / "short.pt")
    with pytest.raises(ValueError, match="epoch"):
        save_checkpoint(tmp_path / "x.pt", plan=_plan(), epoch=-1, model={})


def test_checkpoint_is_fsynced_before_and_after_its_rename(tmp_path, fsynced):
    """The file's data reach the disk before the rename, and the rename itself (the directory) after it."""
    path = save_checkpoint(tmp_path / "sub" / "last.pt", plan=_plan(), epoch=0, model={"w": torch.ones(2)})
    assert len(fsynced) == 2, fsynced
    temp, directory = fsynced
    assert temp.parent == path.parent and temp.name.startswith(".last.pt.tmp-") and not temp.exists()
    assert directory == path.parent
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
