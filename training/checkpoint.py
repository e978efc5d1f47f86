"""Training checkpoints: one `torch.save` dict that `torch.load(path, weights_only=True)` reads (torch 2.11 and 2.13).

The contract (ONNX export and the federated layer read it; change it only with a new "format"):

```
{
  "format": "fedlesion-checkpoint-1",
  "task": "stroke-dwi-adc" | "ms-flair",
  "plan": TrainingPlan.to_dict(),        # plain JSON types; see training/plan.py
      # plan["network"]       = {"architecture": str, "base_filters": int, "depth": int, "max_filters": int,
      #                          "norm": str}  -> models.networks.NetworkPlan(**plan["network"])
      # plan["preprocessing"] = the manifest's preprocessing object (models.manifest.preprocessing_dict)
      # plan["in_channels"]: int, plan["threshold"]: float (on sigmoid(logits))
  "epoch": int,                          # epochs completed (the next epoch to run has this index)
  "model": state_dict of build_network(plan["in_channels"], 1, NetworkPlan(**plan["network"])) -> logits
  "optimizer": optimizer state_dict | None,
  "scheduler": LR scheduler state_dict | None,
  "history": [{"epoch": int, "train_loss": float, "val_dice": float | None, ...more per-epoch numbers}, ...],
  "best_val_dice": float | None,
  "federated_round": int | None,
  "strategy": str | None,
}
```
Only tensors, numbers, strings, None, lists and dicts (and the tuples inside torch's own optimizer state) are
stored, so `weights_only=True` loads it. Random state needs no entry: the trainer derives every epoch's sampling and
augmentation seeds from (plan seed, epoch), so resuming at `epoch` replays exactly what a straight run would do.
Files are written through `models.durable.write_atomic` (temporary name, fsync, rename, directory fsync), so neither
a crash nor a power cut leaves half a checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from models.durable import write_atomic
from training.plan import TrainingPlan

FORMAT = "fedlesion-checkpoint-1"
KEYS = ("format", "task", "plan", "epoch", "model", "optimizer", "scheduler", "history", "best_val_dice",
        "federated_round", "strategy")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    plan: TrainingPlan,
    epoch: int,
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    best_val_dice: float | None = None,
    federated_round: int | None = None,
    strategy: str | None = None,
    threshold: float | None = None,
) -> Path:
    """Write the checkpoint dict atomically (tmp file + rename); tensors are saved on the CPU.

    `threshold` is the one calibrated on the validation cases for these weights (None: the plan's); checkpoints
    written before it existed lack the key and read as None.
    """
    if not isinstance(plan, TrainingPlan):
        raise ValueError("plan must be a TrainingPlan")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an integer ≥ 0, got {epoch!r}")
    path = Path(path)
    state = {
        "format": FORMAT,
        "task": str(plan.task),
        "plan": plan.to_dict(),
        "epoch": int(epoch),
        "model": {name: tensor.detach().cpu().clone() for name, tensor in model.items()},
        "optimizer": _to_cpu(optimizer) if optimizer is not None else None,
        "scheduler": dict(scheduler) if scheduler is not None else None,
        "history": [_plain(row) for row in (history or [])],
        "best_val_dice": None if best_val_dice is None else float(best_val_dice),
        "federated_round": None if federated_round is None else int(federated_round),
        "strategy": None if strategy is None else str(strategy),
        "threshold": None if threshold is None else float(threshold),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda temp: torch.save(state, temp))


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint with `weights_only=True`; raises ValueError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"{path}: not a readable fedlesion checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: checkpoint format {found!r} is not {FORMAT!r}")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    plan = checkpoint_plan(state)
    if state["task"] != str(plan.task):
        raise ValueError(f"{path}: checkpoint task {state['task']!r} differs from its plan's {str(plan.task)!r}")
    return state


def checkpoint_plan(state: Mapping[str, Any]) -> TrainingPlan:
    return TrainingPlan.from_dict(state["plan"])


def checkpoint_threshold(state: Mapping[str, Any]) -> float:
    """The probability threshold these weights are meant to be read at: calibrated when the checkpoint says so."""
    calibrated = state.get("threshold")
    return checkpoint_plan(state).threshold if calibrated is None else float(calibrated)


def model_from_checkpoint(state: Mapping[str, Any]) -> torch.nn.Module:
    """The network (logits out, eval mode) with the checkpoint's weights."""
    from models.networks import build_network

    plan = checkpoint_plan(state)
    model = build_network(plan.in_channels, 1, plan.network)
    model.load_state_dict(state["model"])
    return model.eval()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(item) for item in value)
    return value


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif hasattr(value, "item"):
            value = value.item()
        out[str(key)] = value
    return out
