"""The one preprocessing (design.md §3), shared by training and inference so both see identical inputs.

Channels go onto the first channel's grid, then onto that grid reoriented to RAS (axes permuted and flipped, the
scan's own tilt kept) at the manifest's spacing, covering the whole source field of view; a head mask from the first channel drives per-channel clipping and z-scoring;
inference pads (never crops) to the network's constraints. `to_source` maps probabilities back onto the source grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from models.manifest import Normalization, NormalizationMethod, Preprocessing
from models.resampling import ras_grid, resample

__all__ = ["Channel", "PreprocessedCase", "head_mask", "preprocess", "to_source"]

@dataclass
class Channel:
    """One input volume with its own geometry; `affine` maps voxel centres to RAS+ mm (NIfTI convention)."""

    data: np.ndarray
    affine: np.ndarray
    name: str
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 3 or min(self.data.shape) < 1:
            raise ValueError(f"channel {self.name!r}: data must be a non-empty 3-D array, got shape {self.data.shape}")
        if not np.issubdtype(self.data.dtype, np.number) and self.data.dtype != bool:
            raise ValueError(f"channel {self.name!r}: data must be numeric, got {self.data.dtype}")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ValueError(f"channel {self.name!r}: affine must be a finite 4x4 matrix")

    @classmethod
    def from_nifti(cls, path_or_img: str | PathLike[str] | nib.spatialimages.SpatialImage, name: str) -> Channel:
        """Load a 3-D NIfTI (a trailing singleton 4th axis is dropped) with its scaling applied, as float32."""
        img = path_or_img if isinstance(path_or_img, nib.spatialimages.SpatialImage) else nib.load(path_or_img)
        img = nib.funcs.squeeze_image(img)
        if img.ndim != 3:
            raise ValueError(f"channel {name!r}: expected a 3-D image, got shape {img.shape}")
        return cls(data=img.get_fdata(dtype=np.float32), affine=img.affine, name=name)


@dataclass(frozen=True)
class PreprocessedCase:
    """The network input plus what `to_source` needs to map results back.

    `affine` is that of the (padded) target grid; `pad_before`/`pad_after` record the voxels added on each axis,
    `head_mask` lives on the same grid as `image`.
    """

    image: np.ndarray  # (C, X, Y, Z) float32
    affine: np.ndarray
    head_mask: np.ndarray  # (X, Y, Z) bool
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]
    channel_names: tuple[str, ...]


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold over a histogram (range capped at the 99.9th percentile so a few hot voxels don't squash it)."""
    low = float(values.min())
    high = float(np.percentile(values[::2, ::2, ::2], 99.9))
    if not high > low:
        high = float(values.max())
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts, dtype=np.float64)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[np.argmax(between) + 1])


def _fill_holes(mask: np.ndarray, structure: np.ndarray, border_axes: Sequence[int]) -> np.ndarray:
    """Fill background components that touch no border face along `border_axes`.

    For all axes this equals `ndimage.binary_fill_holes`, in half its time (one labelling pass instead of an
    iterated dilation: 0.25 s vs 0.5 s on a 1 mm head); for the per-slice fill it lets only in-plane faces count
    as outside, where binary_fill_holes would leave holes in the first and last slices.
    """
    labels, count = ndimage.label(~mask, structure=structure)
    open_to_border = np.zeros(count + 1, dtype=bool)
    for axis in border_axes:
        for index in (0, -1):
            open_to_border[np.take(labels, index, axis=axis)] = True
    open_to_border[0] = False  # label 0 is the mask itself
    return ~open_to_border[labels]


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Head (or brain) mask of an RAS volume, made the same way for skull-stripped and whole-head inputs.

    Otsu on the Gaussian-smoothed volume separates zero background or noisy air from tissue; the largest
    component drops specks of noise; holes are filled in 3-D and then per axial slice, because a whole head is
    open at the neck and its skull and sinuses are dark.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    smoothed = ndimage.gaussian_filter(volume.astype(np.float32, copy=False), sigma=1.0)
    if not np.all(np.isfinite(smoothed)):
        raise ValueError("volume contains NaN or infinite values")
    if smoothed.max() <= smoothed.min():
        raise ValueError("volume is constant: no head to find")
    labels, count = ndimage.label(smoothed > _otsu_threshold(smoothed))
    if count == 0:
        raise ValueError("no voxel above the head threshold")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == np.argmax(sizes)
    mask = _fill_holes(mask, ndimage.generate_binary_structure(3, 1), border_axes=(0, 1, 2))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return _fill_holes(mask, in_plane, border_axes=(0, 1))


def _padding(shape: tuple[int, int, int], spec: Preprocessing) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Voxels to add before/after each axis: at least the patch size, a multiple of size_divisible, centred."""
    div = spec.size_divisible
    padded = [-(-max(n, p) // div) * div for n, p in zip(shape, spec.patch_size)]
    before = tuple((m - n) // 2 for m, n in zip(padded, shape))
    after = tuple(m - n - b for m, n, b in zip(padded, shape, before))
    return before, after


def _normalise(values: np.ndarray, mask: np.ndarray, spec: Normalization, name: str) -> np.ndarray:
    """Normalise one channel in place (z-score in the mask, the fixed scale of a quantitative map, or its ratio to
    its own median in the mask); 0 outside the mask."""
    if spec.method is NormalizationMethod.MEDIAN_RATIO:
        assert spec.clip_values is not None and spec.scale is not None
        inside = values[mask]
        reference = inside[(inside > spec.clip_values[0]) & (inside < spec.clip_values[1])]
        if reference.size == 0:
            raise ValueError(f"channel {name!r} has no value within {spec.clip_values} inside the head mask")
        values *= np.float32(spec.scale / float(np.median(reference)))
        np.clip(values, 0.0, 4.0, out=values)
        values[~mask] = 0.0
        return values
    if spec.method is NormalizationMethod.FIXED_SCALE:
        assert spec.clip_values is not None and spec.scale is not None
        np.clip(values, *spec.clip_values, out=values)
        values *= np.float32(spec.scale)
        values[~mask] = 0.0
        return values
    clip = spec.clip_percentiles
    inside = values[mask]
    low, high = np.percentile(inside, clip)
    np.clip(inside, low, high, out=inside)
    mean, std = inside.mean(dtype=np.float64), inside.std(dtype=np.float64)
    if not std > 1e-6 * max(abs(mean), 1.0):
        raise ValueError(f"channel {name!r} is constant inside the head mask")
    np.clip(values, low, high, out=values)
    values -= np.float32(mean)
    values /= np.float32(std)
    values[~mask] = 0.0
    return values


def preprocess(
    channels: Sequence[Channel], spec: Preprocessing, *, pad_for_inference: bool = True
) -> PreprocessedCase:
    """Resample, mask, normalise and (for inference) pad `channels`; the first channel defines the geometry."""
    if not channels:
        raise ValueError("at least one channel is required")
    if not isinstance(spec, Preprocessing):
        raise ValueError(f"spec must be a manifest Preprocessing, got {type(spec).__name__}")
    first = channels[0]
    for channel in channels[1:]:
        uids = (first.frame_of_reference_uid, channel.frame_of_reference_uid)
        if None not in uids and uids[0] != uids[1]:
            raise ValueError(
                f"channel {channel.name!r} has FrameOfReferenceUID {uids[1]}, "
                f"channel {first.name!r} has {uids[0]}: they cannot be combined"
            )
    for channel in channels:
        if not np.all(np.isfinite(channel.data)):
            raise ValueError(f"channel {channel.name!r} contains NaN or infinite values")

    grid_affine, grid_shape = ras_grid(first.affine, first.data.shape, spec.target_spacing_mm)
    resampled = []
    for channel in channels:
        data = channel.data
        if channel is not first and (
            channel.data.shape != first.data.shape or not np.allclose(channel.affine, first.affine, atol=1e-4)
        ):
            data = resample(data, channel.affine, first.affine, first.data.shape)
        resampled.append(resample(data, first.affine, grid_affine, grid_shape))

    mask = head_mask(resampled[0])
    before, after = _padding(grid_shape, spec) if pad_for_inference else ((0, 0, 0), (0, 0, 0))
    padded_shape = tuple(n + b + a for n, b, a in zip(grid_shape, before, after))
    inner = tuple(slice(b, b + n) for b, n in zip(before, grid_shape))
    image = np.zeros((len(channels), *padded_shape), dtype=np.float32)
    for c, (channel, values) in enumerate(zip(channels, resampled)):
        image[(c, *inner)] = _normalise(values, mask, spec.normalization_of(channel.name), channel.name)
    padded_mask = np.zeros(padded_shape, dtype=bool)
    padded_mask[inner] = mask
    affine = grid_affine.copy()
    affine[:3, 3] -= grid_affine[:3, :3] @ np.asarray(before, dtype=np.float64)
    return PreprocessedCase(
        image=image,
        affine=affine,
        head_mask=padded_mask,
        source_shape=tuple(int(n) for n in first.data.shape),
        source_affine=first.affine.copy(),
        pad_before=before,
        pad_after=after,
        channel_names=tuple(channel.name for channel in channels),
    )


def to_source(probabilities: np.ndarray, case: PreprocessedCase) -> np.ndarray:
    """Map a probability map on the case's grid back (linear) onto the source grid, its own voxel order and affine.

    Thresholding is the caller's, after this, so lesion volumes are measured on the source grid (design.md §3).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.shape != case.image.shape[1:]:
        raise ValueError(f"probabilities have shape {probabilities.shape}, the case grid is {case.image.shape[1:]}")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("probabilities contain NaN or infinite values")
    out = resample(probabilities, case.affine, case.source_affine, case.source_shape)
    return np.clip(out, 0.0, 1.0, out=out)
