"""Training patches, torch-free: a case preprocessed once for training, and the patch sampler that draws from it.

Torch-free so the synthetic-stream workers (`training.stream`) prepare cases in processes that never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from scipy import ndimage

from models.geometry import voxel_volume_ml
from models.manifest import Preprocessing
from models.preprocessing import Channel, PreprocessedCase, preprocess
from models.resampling import resample


class CaseLike(Protocol):
    """What the trainer needs of a case: `training.datasets.TrainingCase` has it."""

    case_id: str
    channels: list[Channel]
    mask: np.ndarray  # on the first channel's grid


@dataclass(frozen=True)
class PreparedCase:
    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32, preprocessed, not padded
    label: np.ndarray  # (X, Y, Z) uint8 on the same grid
    lesions: tuple[np.ndarray, ...]  # per connected lesion, the (N, 3) int32 indices of its voxels
    preprocessed: PreprocessedCase
    source_mask: np.ndarray  # ground truth on the source grid, for validation
    voxel_ml: float  # of the source grid


def prepare_case(case: CaseLike, preprocessing: Preprocessing) -> PreparedCase:
    """Preprocess once and put the mask on the preprocessed grid (linear, then ≥ 0.5)."""
    channels = list(case.channels)
    mask = np.asarray(case.mask)
    if mask.shape != channels[0].data.shape:
        raise ValueError(f"case {case.case_id}: mask shape {mask.shape} is not the first channel's "
                         f"{channels[0].data.shape}")
    pre = preprocess(channels, preprocessing, pad_for_inference=False)
    grid = pre.image.shape[1:]
    label = resample((mask > 0).astype(np.float32), channels[0].affine, pre.affine, grid, order=1) >= 0.5
    components, count = ndimage.label(label, structure=np.ones((3, 3, 3), dtype=bool))
    voxels = np.argwhere(components).astype(np.int32)
    order = np.argsort(components[tuple(voxels.T)], kind="stable")
    sizes = np.bincount(components[tuple(voxels.T)], minlength=count + 1)[1:]
    return PreparedCase(
        case_id=str(case.case_id),
        image=pre.image,
        label=label.astype(np.uint8),
        lesions=tuple(np.split(voxels[order], np.cumsum(sizes)[:-1])) if count else (),
        preprocessed=pre,
        source_mask=(mask > 0).astype(np.uint8),
        voxel_ml=voxel_volume_ml(channels[0].affine),
    )


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[..., start:start+size] over the last three axes, zero-padded where the window leaves the array."""
    spatial = array.shape[-3:]
    out = np.zeros((*array.shape[:-3], *size), dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, spatial):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchSampler:
    """Draws (image, label) patches: `foreground_fraction` centred on a voxel of a lesion, the rest anywhere.

    The lesion is drawn first, uniformly among the case's lesions, then a voxel in it: drawing voxels alone would
    centre nearly every patch on the one large infarct and rarely on the small embolic lesions around it.
    """

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int], foreground_fraction: float):
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        self.patch = tuple(int(v) for v in patch_size)
        self.foreground_fraction = foreground_fraction

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        case = self.cases[int(rng.integers(len(self.cases)))]
        shape = case.label.shape
        if case.lesions and rng.random() < self.foreground_fraction:
            lesion = case.lesions[int(rng.integers(len(case.lesions)))]
            centre = lesion[int(rng.integers(len(lesion)))]
        else:
            centre = np.array([int(rng.integers(n)) for n in shape])
        start = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
        return crop(case.image, start, self.patch), crop(case.label[None], start, self.patch)


__all__ = ["CaseLike", "PatchSampler", "PreparedCase", "crop", "prepare_case"]
