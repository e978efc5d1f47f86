"""Ground-truth lesions drawn on the high-resolution anatomy as an int16 label map.

Stroke: irregular blobs (top-N voxels of an ellipsoid score perturbed by smooth noise, so the volume is exact at
high resolution) in a vascular territory, single or embolic clusters. MS: periventricular ovoids elongated along the
ventricle-wall normal (Dawson's fingers) and small juxtacortical ovoids. Every lesion stays in parenchyma and in one
hemisphere (2 mm off the midline) so its side is unambiguous on every acquisition grid.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

from training.synthetic.anatomy import Anatomy

SizeClass = Literal["small", "medium", "large"]
Pattern = Literal["single", "embolic"]
# Target total volumes (ml) drawn inside each class with margins, so acquisition never moves a case across the
# class boundaries (small < 5, medium 5–70, large > 70; design.md §9). Large is capped to fit a hemisphere.
SIZE_RANGES_ML: dict[str, tuple[float, float]] = {"small": (0.4, 3.5), "medium": (9.0, 50.0), "large": (90.0, 150.0)}
# Right-hemisphere boxes (MNI mm, x ≥ 0; mirrored for the left): (x, y, z) ranges.
TERRITORIES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "MCA": ((28.0, 55.0), (-55.0, 20.0), (-5.0, 45.0)),
    "ACA": ((5.0, 18.0), (-30.0, 45.0), (25.0, 60.0)),
    "PCA": ((8.0, 32.0), (-95.0, -65.0), (-10.0, 18.0)),
    "deep": ((14.0, 28.0), (-22.0, 15.0), (-2.0, 16.0)),
}
MIDLINE_MARGIN_MM = 2.0


def draw_stroke_lesions(
    anatomy: Anatomy, rng: np.random.Generator, *, size: SizeClass, pattern: Pattern
) -> tuple[np.ndarray, dict[int, str]]:
    """Label map and each label's location ("<territory> territory")."""
    if size not in SIZE_RANGES_ML:
        raise ValueError(f"stroke size must be one of {sorted(SIZE_RANGES_ML)}, got {size!r}")
    if pattern not in ("single", "embolic"):
        raise ValueError(f"stroke pattern must be single or embolic, got {pattern!r}")
    low, high = SIZE_RANGES_ML[size]
    total_ml = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    side = 1.0 if rng.random() < 0.5 else -1.0
    if size == "large":
        territory = "MCA"
    else:
        choices = ["MCA", "ACA", "PCA"] + (["deep"] if size == "small" and pattern == "single" else [])
        territory = str(rng.choice(choices))
    parts = [total_ml] if pattern == "single" else list(total_ml * rng.dirichlet(np.full(int(rng.integers(2, 7)), 2.0)))
    labels = np.zeros(anatomy.shape, dtype=np.int16)
    allowed = anatomy.parenchyma & ~anatomy.ventricles & _hemisphere(anatomy, side)
    locations: dict[int, str] = {}
    for volume_ml in parts:
        center = _random_voxel(anatomy, allowed & ~(labels > 0), TERRITORIES[territory], side, rng)
        free = allowed & ~ndimage.binary_dilation(labels > 0, iterations=2)
        label = len(locations) + 1
        _paint_blob(labels, free, center, volume_ml, anatomy.resolution_mm, label, rng)
        locations[label] = f"{territory} territory"
    return labels, locations


def draw_ms_lesions(anatomy: Anatomy, rng: np.random.Generator, *, count: int) -> tuple[np.ndarray, dict[int, str]]:
    """`count` ovoids, about 60 % periventricular and the rest juxtacortical."""
    if not 1 <= count <= 60:
        raise ValueError(f"MS lesion count must be 1–60, got {count}")
    res = anatomy.resolution_mm
    labels = np.zeros(anatomy.shape, dtype=np.int16)
    parenchyma = anatomy.parenchyma & ~anatomy.ventricles
    wall = anatomy.ventricles & ~ndimage.binary_erosion(anatomy.ventricles)
    wall_idx = np.argwhere(wall)
    near_gm = ndimage.maximum_filter(anatomy.fractions["gm"], size=3) > 0.5
    juxta_idx = np.argwhere((anatomy.fractions["wm"] > 0.5) & near_gm)
    if len(wall_idx) == 0 or len(juxta_idx) == 0:
        raise ValueError("anatomy has no ventricles or no grey/white boundary to place MS lesions on")
    hemispheres = {side: _hemisphere(anatomy, side) for side in (-1.0, 1.0)}
    taken = np.zeros(anatomy.shape, dtype=bool)  # lesions plus a 2-voxel halo, so ovoids stay separate
    locations: dict[int, str] = {}
    for _ in range(count * 20):  # rejection sampling; overlapping or clipped-away ovoids are redrawn
        if len(locations) == count:
            break
        periventricular = rng.random() < 0.6
        if periventricular:
            anchor = wall_idx[rng.integers(len(wall_idx))]
            normal = _outward_normal(anatomy.ventricles, anchor)
            center = anchor + normal * rng.uniform(2.0, 4.5) / res
            long_axis, short = rng.uniform(3.0, 6.5), rng.uniform(1.8, 2.8)
            semi, direction = np.array([long_axis, short, short]), normal
        else:
            center = juxta_idx[rng.integers(len(juxta_idx))].astype(float)
            short = rng.uniform(1.8, 3.0)
            semi, direction = np.array([short * rng.uniform(1.0, 1.6), short, short]), _unit(rng.standard_normal(3))
        side = 1.0 if anatomy.world(center)[0] >= 0 else -1.0
        box, inside = _ovoid(center, semi / res, direction, anatomy.shape)
        inside &= parenchyma[box] & hemispheres[side][box] & ~taken[box]
        if inside.sum() * res**3 < 8.0:  # < 8 mm³ would vanish on a 3 mm slice
            continue
        label = len(locations) + 1
        labels[box][inside] = label
        halo_box, halo = _ovoid(center, semi / res + 2.0, direction, anatomy.shape)
        taken[halo_box] |= halo
        locations[label] = "periventricular" if periventricular else "juxtacortical"
    return labels, locations


def _hemisphere(anatomy: Anatomy, side: float) -> np.ndarray:
    x = anatomy.affine[0, 3] + np.arange(anatomy.shape[0]) * anatomy.resolution_mm
    return np.broadcast_to((side * x >= MIDLINE_MARGIN_MM)[:, None, None], anatomy.shape)


def _random_voxel(anatomy: Anatomy, allowed: np.ndarray, box_mm, side: float, rng: np.random.Generator) -> np.ndarray:
    """A random allowed voxel inside the territory box on `side` (the whole allowed region if the box is empty)."""
    (x0, x1), (y0, y1), (z0, z1) = box_mm
    lo = np.array([min(side * x0, side * x1), y0, z0])
    hi = np.array([max(side * x0, side * x1), y1, z1])
    i0 = np.clip(np.floor((lo - anatomy.affine[:3, 3]) / anatomy.resolution_mm).astype(int), 0, None)
    i1 = np.ceil((hi - anatomy.affine[:3, 3]) / anatomy.resolution_mm).astype(int) + 1
    candidates = np.argwhere(allowed[i0[0] : i1[0], i0[1] : i1[1], i0[2] : i1[2]]) + i0
    if len(candidates) == 0:
        candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        raise ValueError("no room left in the brain for another lesion")
    return candidates[rng.integers(len(candidates))]


def _paint_blob(
    labels: np.ndarray,
    allowed: np.ndarray,
    center: np.ndarray,
    volume_ml: float,
    resolution_mm: float,
    label: int,
    rng: np.random.Generator,
) -> None:
    """Paint the `volume_ml` best-scoring allowed voxels around `center`, keeping the largest connected part."""
    radius_mm = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    stretch = rng.uniform(0.75, 1.35, 3)
    semi = radius_mm * stretch / np.cbrt(stretch.prod()) / resolution_mm
    box, _ = _ovoid(center, 2.2 * semi + 4.0, np.array([0.0, 0.0, 1.0]), labels.shape)
    shape = tuple(s.stop - s.start for s in box)
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), -1) - center
    local = grid @ rotation
    distance = np.sqrt(((local / semi) ** 2).sum(-1))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0 / resolution_mm)
    score = -distance + 0.5 * noise / max(float(noise.std()), 1e-12)
    score[~allowed[box]] = -np.inf
    n_voxels = int(min(round(volume_ml * 1000.0 / resolution_mm**3), np.isfinite(score).sum()))
    if n_voxels < 1:
        return
    threshold = np.partition(score.ravel(), -n_voxels)[-n_voxels]
    chosen, count = ndimage.label(score >= threshold)
    if count > 1:
        chosen = chosen == (np.argmax(np.bincount(chosen.ravel())[1:]) + 1)
    labels[box][chosen > 0] = label


def _ovoid(
    center: np.ndarray,
    semi_vox: np.ndarray,
    direction: np.ndarray,
    shape: tuple[int, ...],
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box and inside-mask of an ellipsoid whose first semi-axis lies along `direction`."""
    reach = int(np.ceil(np.max(semi_vox))) + 1
    box = tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, n)) for c, n in zip(center, shape))
    helper = np.eye(3)[int(np.argmin(np.abs(direction)))]  # never parallel to `direction`
    second = _unit(np.cross(direction, helper))
    basis = np.stack([direction, second, np.cross(direction, second)], axis=1)
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), -1) - center
    local = grid @ basis
    return box, ((local / semi_vox) ** 2).sum(-1) <= 1.0


def _outward_normal(ventricles: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Unit normal of the ventricle wall at `index`, pointing into the white matter."""
    reach = 4
    box = tuple(slice(max(int(i) - reach, 0), min(int(i) + reach + 1, n)) for i, n in zip(index, ventricles.shape))
    local = ndimage.gaussian_filter(ventricles[box].astype(np.float32), 1.5)
    at = tuple(int(i) - s.start for i, s in zip(index, box))
    gradient = np.array([np.gradient(local, axis=a)[at] for a in range(3)])
    return _unit(-gradient)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-9 else np.array([0.0, 0.0, 1.0])
