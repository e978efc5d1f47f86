"""Network definitions for training and export. Needs the `train` extra (torch, MONAI).

Nothing torch-free imports this module: a node runs the exported ONNX graph, never these classes. The network
returns logits; export appends the activation so the ONNX graph outputs probabilities (design.md §8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DynUNet, UNet

from models.manifest import LayerNormalization, NetworkInfo
from models.network_plan import Architecture, NetworkPlan


def build_network(in_channels: int, out_channels: int = 1, plan: NetworkPlan = NetworkPlan()) -> torch.nn.Module:
    """A 3-D segmentation network for `plan`, without deep supervision (one output, as the ONNX graph has)."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer ≥ 1, got {value!r}")
    if not isinstance(plan, NetworkPlan):
        raise ValueError(f"plan must be a NetworkPlan, not {type(plan).__name__}")
    if plan.architecture is Architecture.DYNUNET:
        strides = [(1, 1, 1)] + [(2, 2, 2)] * (plan.depth - 1)
        return DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[(3, 3, 3)] * plan.depth,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(plan.filters),
            norm_name=(plan.norm.value, {"affine": True}),
            deep_supervision=False,
            res_block=True,
        )
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=plan.filters,
        strides=(2,) * (plan.depth - 1),
        num_res_units=2,
        norm=plan.norm.value,
    )


def network_weights(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor under its first name only: what travels and is averaged in a federation.

    MONAI's DynUNet registers its encoder blocks a second time (`skip_layers`), so its state dict names half of its
    tensors twice; shipping both names doubled every transfer. `load_network_weights` fills the other names too,
    since they are the same tensors.
    """
    weights: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in network.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        weights[name] = tensor
    return weights


def load_network_weights(network: torch.nn.Module, weights: Mapping[str, Any]) -> None:
    """Copy (possibly partial, e.g. FedBN without norm layers) weights into `network`; unknown names and wrong
    shapes are a ValueError."""
    state = network.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise ValueError(f"weights name unknown parameters: {', '.join(unknown[:5])}")
    for name, value in weights.items():
        tensor = torch.as_tensor(np.asarray(value))
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(f"weights {name}: shape {tuple(tensor.shape)}, the model has {tuple(state[name].shape)}")
        with torch.no_grad():
            state[name].copy_(tensor.to(state[name].dtype))


NORMALIZATION_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def normalization_weight_names(network: torch.nn.Module) -> set[str]:
    """The names in `network_weights` that belong to normalization layers (affine parameters, running statistics,
    counters): what FedBN keeps at each site."""
    owned = {
        tensor.data_ptr()
        for module in network.modules() if isinstance(module, NORMALIZATION_LAYERS)
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False))
    }
    return {name for name, tensor in network_weights(network).items() if tensor.data_ptr() in owned}


def parameter_count(network: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in network.parameters())


def network_info(network: torch.nn.Module, plan: NetworkPlan) -> NetworkInfo:
    """What the manifest records about `network`, built from `plan`: the engine's window choice depends on it."""
    return NetworkInfo(str(plan.architecture), LayerNormalization(str(plan.norm)), parameter_count(network))
