"""High-resolution head anatomy as tissue fractions in world (RAS+ mm) space.

The brain comes from the shared MNI152 2009a template when it is available (real folding, 1 mm, skull-stripped), else
from a procedural phantom; both get the same subarachnoid CSF, skull and scalp shells so the acquisition code never
needs to know which one it got. The head is fixed in the world with its mid-sagittal plane at x = 0.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

TISSUES = ("wm", "gm", "csf", "skull", "scalp")
TEMPLATE_SUBDIR = Path("nifti/templates/nilearn_0.14.1")
TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# The template's box (MNI mm); the procedural phantom uses the same one so territories and sinus positions agree.
BOX_ORIGIN_MM = np.array([-98.0, -134.0, -72.0])
BOX_SIZE_MM = np.array([196.0, 232.0, 188.0])
SKULL_MM = (0.0, 7.0)  # distance outside the intracranial hull
SCALP_MM = (7.0, 13.0)


@dataclass(frozen=True)
class Anatomy:
    """Tissue fractions (float32, summing to ≤ 1; the rest is air) on one isotropic grid."""

    affine: np.ndarray  # voxel → RAS+ mm
    fractions: dict[str, np.ndarray]  # keys TISSUES
    ventricles: np.ndarray  # bool, lateral ventricles (periventricular MS lesions hang off these)
    source: str  # "mni152" or "procedural"

    @property
    def resolution_mm(self) -> float:
        return float(self.affine[0, 0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.fractions["wm"].shape  # type: ignore[return-value]

    @property
    def parenchyma(self) -> np.ndarray:
        """Where lesions may grow: mostly grey or white matter."""
        return (self.fractions["wm"] + self.fractions["gm"]) >= 0.5

    def world(self, index: np.ndarray) -> np.ndarray:
        """RAS+ mm of voxel indices (…, 3)."""
        return np.asarray(index, dtype=np.float64) * self.resolution_mm + self.affine[:3, 3]


def shared_data_dir() -> Path:
    """`$FEDLESION_SHARED_DATA`, else the `shared/data` folder beside the repository (design.md §10)."""
    env = os.environ.get("FEDLESION_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def template_available() -> bool:
    folder = shared_data_dir() / TEMPLATE_SUBDIR
    return all((folder / TEMPLATE_FILE.format(name)).is_file() for name in ("t1", "gm", "wm"))


def build_anatomy(rng: np.random.Generator, resolution_mm: float, *, source: str = "auto") -> Anatomy:
    """Anatomy at `resolution_mm`; `source` is "auto" (template if present), "template" or "procedural"."""
    if not 0.5 <= resolution_mm <= 3.0:
        raise ValueError(f"anatomy resolution must be 0.5–3 mm, got {resolution_mm}")
    if source not in ("auto", "template", "procedural"):
        raise ValueError(f"anatomy source must be auto, template or procedural, got {source!r}")
    if source == "template" and not template_available():
        raise ValueError(f"MNI152 template not found under {shared_data_dir() / TEMPLATE_SUBDIR}")
    if source != "procedural" and template_available():
        return _template_anatomy(float(resolution_mm), str(shared_data_dir()))
    return _procedural_anatomy(rng, float(resolution_mm))


def box_grid(resolution_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    shape = tuple(int(n) for n in np.floor(BOX_SIZE_MM / resolution_mm).astype(int) + 1)
    affine = np.diag([resolution_mm, resolution_mm, resolution_mm, 1.0])
    affine[:3, 3] = BOX_ORIGIN_MM
    return affine, shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=2)
def _template_anatomy(resolution_mm: float, data_dir: str) -> Anatomy:
    """Loading and shelling the template takes ~1 s; cached because every case of a run reuses it (read-only)."""
    import nibabel as nib

    folder = Path(data_dir) / TEMPLATE_SUBDIR
    maps = {}
    for name in ("t1", "gm", "wm"):
        image = nib.load(folder / TEMPLATE_FILE.format(name))
        if not np.allclose(image.affine[:3, :3], np.eye(3)) or not np.allclose(image.affine[:3, 3], BOX_ORIGIN_MM):
            raise ValueError(f"unexpected template affine in {folder}")
        maps[name] = np.asarray(image.dataobj, dtype=np.float32) / 255.0
    brain = (maps["t1"] > 0).astype(np.float32)
    wm, gm = maps["wm"], maps["gm"]
    affine, shape = box_grid(resolution_mm)
    if resolution_mm != 1.0:
        wm, gm, brain = (_resample_separable(m, resolution_mm, shape) for m in (wm, gm, brain))
    csf = np.clip(brain - wm - gm, 0.0, 1.0)
    fractions, hull_depth = _add_head(wm, gm, csf, resolution_mm)
    ventricles = (fractions["csf"] > 0.5) & (hull_depth > 14.0)
    ventricles &= np.abs(affine[0, 3] + np.arange(shape[0]) * resolution_mm)[:, None, None] < 30.0
    ventricles = _keep_large(ventricles, min_ml=0.5, resolution_mm=resolution_mm)
    return _frozen(Anatomy(affine, fractions, ventricles, "mni152"))


def _procedural_anatomy(rng: np.random.Generator, resolution_mm: float) -> Anatomy:
    """An ellipsoidal brain with a noise-folded cortical ribbon, sulci and two lateral ventricles."""
    affine, shape = box_grid(resolution_mm)
    axes = [affine[a, 3] + np.arange(shape[a]) * resolution_mm for a in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    semi = np.array([70.0, 88.0, 62.0]) * rng.uniform(0.95, 1.05, 3)
    radius = np.sqrt((x / semi[0]) ** 2 + ((y + 17.0) / semi[1]) ** 2 + ((z - 8.0) / semi[2]) ** 2)
    depth = ((1.0 - radius) * semi.mean()).astype(np.float32)  # ≈ mm below the brain surface
    fold = _smooth_noise(rng, shape, 4.0, resolution_mm)
    sulcus = _smooth_noise(rng, shape, 2.0, resolution_mm)
    brain = depth > 0
    gm = brain & (depth + 6.0 * fold < 8.0)
    sulci = brain & (depth < 12.0) & (sulcus > 1.0)
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        bend = 6.0 * np.cos((y + 10.0) / 30.0)
        ventricles |= ((x - side * 9.0) / 5.0) ** 2 + ((y + 10.0) / 30.0) ** 2 + ((z - 12.0 - bend) / 8.0) ** 2 < 1.0
    csf = (sulci | ventricles).astype(np.float32)
    gm_f = (gm & ~sulci & ~ventricles).astype(np.float32)
    wm_f = (brain & ~gm & ~sulci & ~ventricles).astype(np.float32)
    fractions, _ = _add_head(wm_f, gm_f, csf * brain, resolution_mm)
    return Anatomy(affine, fractions, ventricles, "procedural")


def _add_head(
    wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, resolution_mm: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fill the smoothed intracranial hull with CSF and wrap it in skull and scalp shells.

    Distances are computed on a ~3 mm grid and interpolated back (they are smooth; full-resolution EDTs cost
    seconds). Returns the fractions and the depth (mm) inside the hull, which locates deep CSF (ventricles).
    """
    factor = max(1, int(round(3.0 / resolution_mm)))
    brain = wm + gm + csf
    coarse = _block_mean(brain, factor)
    hull = ndimage.gaussian_filter(coarse, 4.0 / (resolution_mm * factor)) > 0.3
    step = resolution_mm * factor
    signed = ndimage.distance_transform_edt(~hull, sampling=step) - ndimage.distance_transform_edt(hull, sampling=step)
    signed = _upsample(signed.astype(np.float32), factor, brain.shape)
    inside = signed <= 0
    csf = np.where(inside, np.clip(1.0 - wm - gm, 0.0, 1.0), csf).astype(np.float32)
    skull = ((signed > SKULL_MM[0]) & (signed <= SKULL_MM[1])).astype(np.float32)
    scalp = ((signed > SCALP_MM[0]) & (signed <= SCALP_MM[1])).astype(np.float32)
    fractions = {"wm": wm.astype(np.float32), "gm": gm.astype(np.float32), "csf": csf, "skull": skull, "scalp": scalp}
    return fractions, -signed


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return volume
    pad = [(0, (-n) % factor) for n in volume.shape]
    padded = np.pad(volume, pad)
    s = [n // factor for n in padded.shape]
    return padded.reshape(s[0], factor, s[1], factor, s[2], factor).mean(axis=(1, 3, 5))


def _upsample(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a block-mean grid back onto the fine grid (block centres at (factor-1)/2)."""
    if factor == 1:
        return coarse
    offset = -(factor - 1) / 2.0 / factor
    return ndimage.affine_transform(
        coarse, [1.0 / factor] * 3, offset=offset, output_shape=shape, order=1, mode="nearest", output=np.float32
    )


def _resample_separable(volume: np.ndarray, step: float, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of a 1 mm grid to `step` mm, one axis at a time as a matrix product (BLAS, ~10× ndimage)."""
    out = volume
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        pos = np.arange(n_out) * step
        low = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        weight = (pos - low).astype(np.float32)
        matrix = np.zeros((n_out, n_in), dtype=np.float32)
        matrix[np.arange(n_out), low] += 1.0 - weight
        matrix[np.arange(n_out), high] += weight
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _keep_large(mask: np.ndarray, *, min_ml: float, resolution_mm: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:] * resolution_mm**3 / 1000.0
    keep = np.flatnonzero(sizes >= min_ml) + 1
    return np.isin(labels, keep)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, resolution_mm: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, drawn on a ~2 mm grid and interpolated (speed)."""
    factor = max(1, int(round(2.0 / resolution_mm)))
    coarse_shape = tuple(-(-n // factor) for n in shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), sigma_mm / (resolution_mm * factor))
    noise = _upsample(noise, factor, shape)
    return noise / max(float(noise.std()), 1e-12)


def _frozen(anatomy: Anatomy) -> Anatomy:
    """Cached anatomies are shared between cases: make accidental in-place edits fail loudly."""
    for array in (*anatomy.fractions.values(), anatomy.ventricles, anatomy.affine):
        array.flags.writeable = False
    return anatomy
