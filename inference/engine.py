"""The ONNX Runtime engine: one session per verified model package, probabilities on the source grid.

Torch-free. The package's bytes (read and hashed once by `models.package`) go straight into the session. Inputs go
through the one preprocessing (`models.preprocessing`); the network is fully convolutional and the preprocessed
grid is padded to a multiple of `size_divisible`, so a volume that fits the voxel budget runs in one pass, and a
larger one runs as overlapping windows blended with a Gaussian importance map (nnU-Net/MONAI style).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.package import LoadedPackage
from models.preprocessing import Channel, PreprocessedCase, preprocess, to_source

LOG = logging.getLogger(__name__)

# Execution providers in order of preference; the first available wins, CPU always closes the list.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
WHOLE_VOLUME_VOXELS = 160 * 160 * 128  # above this, sliding windows keep activation memory bounded


def choose_providers(available: Sequence[str]) -> list[str]:
    """The preferred providers among `available` (onnxruntime.get_available_providers()), CPU always last."""
    chosen = [name for name in PROVIDER_PREFERENCE if name in available and name != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Weights that trust a window's centre more than its edges; never zero, so every voxel gets a value."""
    axes = []
    for n in patch_size:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window origins along one axis: stride patch·(1 − overlap), the last window flush with the end."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, stride))
    return [*starts, size - patch]


@dataclass(frozen=True)
class Prediction:
    """Probabilities on the source grid (first channel's voxel order and affine) and the case they came from."""

    probabilities: np.ndarray
    case: PreprocessedCase
    windows: int


class Engine:
    """A loaded package ready to segment: `predict(channels)` → probabilities on the source grid."""

    def __init__(
        self,
        package: LoadedPackage,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        overlap: float = 0.5,
        whole_volume_voxels: int = WHOLE_VOLUME_VOXELS,
    ) -> None:
        import onnxruntime

        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.package = package
        self.manifest = package.manifest
        self.overlap = overlap
        self.whole_volume_voxels = whole_volume_voxels
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        chosen = list(providers) if providers else choose_providers(onnxruntime.get_available_providers())
        self.session = onnxruntime.InferenceSession(package.onnx_bytes, options, providers=chosen)
        self.providers = self.session.get_providers()
        LOG.info(
            "model %s v%d on %s", self.manifest.task.value, self.manifest.version, ", ".join(self.providers)
        )

    def predict(self, channels: Sequence[Channel]) -> Prediction:
        expected = [channel.name for channel in self.manifest.inputs]
        if [channel.name for channel in channels] != expected:
            raise ValueError(f"model expects channels {expected}, got {[channel.name for channel in channels]}")
        case = preprocess(channels, self.manifest.preprocessing)
        probabilities, windows = self._probabilities(case.image)
        return Prediction(to_source(probabilities, case), case, windows)

    def _run(self, image: np.ndarray) -> np.ndarray:
        spec = self.manifest.onnx
        (output,) = self.session.run([spec.output_name], {spec.input_name: image[None]})
        return output[0, 0]

    def _probabilities(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        spatial = image.shape[1:]
        if int(np.prod(spatial)) <= self.whole_volume_voxels:
            return self._run(image), 1
        patch = self.manifest.preprocessing.patch_size
        importance = gaussian_importance(patch)
        total = np.zeros(spatial, np.float32)
        weight = np.zeros(spatial, np.float32)
        starts = [window_starts(n, p, self.overlap) for n, p in zip(spatial, patch)]
        windows = 0
        for x in starts[0]:
            for y in starts[1]:
                for z in starts[2]:
                    region = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                    total[region] += self._run(image[(slice(None), *region)]) * importance
                    weight[region] += importance
                    windows += 1
        return total / weight, windows
