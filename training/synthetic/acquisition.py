"""Scanning the anatomy: acquisition grids, slice profiles, the signal model, artefacts and per-site domain shift.

Tissue fractions (not images) are sampled onto the grid: signal is linear in them, so partial volume comes out right
and every contrast and the brain mask cost one sampling pass each. A slab of `slice_thickness_mm` is averaged at each
slice position (positions `slice_spacing_mm` apart, so thickness < spacing leaves a gap). Lesion labels use an area
rule (fraction ≥ 0.5, label from the nearest high-resolution voxel) so voxel-counted volumes stay honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.geometry import affine_spacing
from training.synthetic.anatomy import TISSUES, Anatomy
from training.synthetic.case import Geometry, SiteProfile

WM_LEVEL = 400.0  # white-matter magnitude on b0/FLAIR before the site's intensity scale (scanner-like numbers)
B_VALUE = 1000.0
# Magnitude relative to white matter (b0 is the T2-weighted b = 0 image; b1000 follows from it and the ADC).
SIGNAL = {
    "dwi_b0": {"wm": 1.0, "gm": 1.25, "csf": 2.6, "skull": 0.05, "scalp": 0.3, "infarct": 1.5, "ms": 1.5},
    "flair": {"wm": 1.0, "gm": 1.2, "csf": 0.12, "skull": 0.05, "scalp": 1.1, "infarct": 1.45, "ms": 2.0},
    "t1_flair": {"wm": 1.0, "gm": 0.7, "csf": 0.15, "skull": 0.05, "scalp": 1.3, "infarct": 0.6, "ms": 0.65},
}
ADC_UM2_S = {"wm": 700.0, "gm": 820.0, "csf": 3000.0, "skull": 500.0, "scalp": 900.0, "ms": 1150.0}
INFARCT_ADC_RANGE = (320.0, 620.0)  # hyperacute to late acute; partial volume raises it further
# Susceptibility pile-up sites on EPI (MNI mm): frontal sinus, skull base under both temporal lobes.
SUSCEPTIBILITY_MM = np.array([[0.0, 62.0, -12.0], [-38.0, -22.0, -38.0], [38.0, -22.0, -38.0]])
GEOMETRIES = ("axial", "flipped", "oblique", "sagittal")


@dataclass(frozen=True)
class Grid:
    affine: np.ndarray  # voxel → RAS+ mm
    shape: tuple[int, int, int]
    phase_axis: int  # in-plane axis closest to anterior–posterior: EPI distortion and N/2 ghosts run along it


def validate_site(site: SiteProfile) -> None:
    """Reject profiles no scanner would produce (and that would make the sampler misbehave)."""
    checks = {
        "intensity_scale": (site.intensity_scale, 0.01, 100.0),
        "bias_strength": (site.bias_strength, 0.0, 0.9),
        "noise_sigma": (site.noise_sigma, 0.0, 0.5),
        "in_plane_mm": (site.in_plane_mm, 0.5, 5.0),
        "slice_thickness_mm": (site.slice_thickness_mm, 0.5, 10.0),
        "slice_spacing_mm": (site.slice_spacing_mm, 0.5, 12.0),
        "contrast_gamma": (site.contrast_gamma, 0.3, 3.0),
    }
    for name, (value, low, high) in checks.items():
        if not low <= value <= high:
            raise ValueError(f"site {site.name!r}: {name} must be in [{low}, {high}], got {value}")
    if site.slice_spacing_mm < site.slice_thickness_mm:
        raise ValueError(f"site {site.name!r}: slice spacing {site.slice_spacing_mm} < thickness {site.slice_thickness_mm}")


def random_site(rng: np.random.Generator, name: str) -> SiteProfile:
    """A plausible scanner/protocol: 2D clinical slabs (some with gaps) to near-isotropic research protocols."""
    thickness, spacing = [(2.0, 2.0), (3.0, 3.0), (4.0, 4.0), (4.0, 5.0), (5.0, 5.0), (5.0, 6.0)][rng.integers(6)]
    return SiteProfile(
        name=name,
        intensity_scale=float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))),
        bias_strength=float(rng.uniform(0.0, 0.3)),
        noise_sigma=float(rng.uniform(0.01, 0.05)),
        in_plane_mm=float(rng.choice([1.0, 1.2, 1.5, 1.8, 2.0])),
        slice_thickness_mm=thickness,
        slice_spacing_mm=spacing,
        contrast_gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
    )


def make_grid(geometry: Geometry, site: SiteProfile, anatomy: Anatomy, rng: np.random.Generator) -> Grid:
    """A grid covering the head; the head stays put, only the slice orientation and voxel order change."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    eye = np.eye(3)
    if geometry == "axial":
        directions = eye
    elif geometry == "flipped":
        directions = eye * np.array([1.0, -1.0, 1.0])
    elif geometry == "sagittal":
        directions = eye[:, [1, 2, 0]]  # columns along A, rows along S, slices along R
    else:
        a, b = np.deg2rad(rng.uniform(15.0, 20.0, 2) * rng.choice([-1.0, 1.0], 2))
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        directions = rx @ ry
    head = anatomy.world(np.argwhere(anatomy.fractions["scalp"] > 0)[::20])
    projected = head @ directions
    extent = projected.max(0) - projected.min(0)
    spacing = np.array([site.in_plane_mm, site.in_plane_mm, site.slice_spacing_mm])
    in_plane = 2 * int(np.ceil((max(extent[0], extent[1]) + 10.0) / site.in_plane_mm / 2))
    shape = (in_plane, in_plane, int(np.ceil(extent[2] / site.slice_spacing_mm)) + 1)
    center = (projected.max(0) + projected.min(0)) / 2.0 @ directions.T + rng.uniform(-3.0, 3.0, 3)
    linear = directions * spacing
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = center - linear @ ((np.array(shape) - 1) / 2.0)
    phase_axis = int(np.argmax(np.abs(directions[1, :2])))
    return Grid(affine, shape, phase_axis)  # type: ignore[arg-type]


def sample(
    volumes: list[np.ndarray], source_affine: np.ndarray, grid: Grid, thickness_mm: float, support: np.ndarray
) -> list[np.ndarray]:
    """Average each volume over every voxel's slab: linear samples at sub-slice offsets along the slice normal.

    Only voxels near `support` (a high-resolution mask, e.g. the head) are sampled; the rest stay 0 (about half
    the grid is air, and interpolation is the cost that matters).
    """
    resolution = float(np.linalg.norm(source_affine[:3, 0]))
    n_sub = max(1, int(np.ceil(thickness_mm / (1.5 * resolution))))  # linear taps are 2 voxels wide
    to_source = np.linalg.inv(source_affine) @ grid.affine
    centres = _source_coords(to_source, grid)
    inside = ndimage.map_coordinates(support.view(np.uint8), centres, order=0, prefilter=False).reshape(grid.shape)
    inside = ndimage.binary_dilation(inside > 0, iterations=1).ravel()
    base = centres[:, inside]
    normal = to_source[:3, 2] / np.linalg.norm(grid.affine[:3, 2])  # source voxels per mm along the slice normal
    sums = [np.zeros(base.shape[1], dtype=np.float32) for _ in volumes]
    for offset in ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thickness_mm:
        coords = base + (normal * offset).astype(np.float32)[:, None]
        for total, volume in zip(sums, volumes):
            total += ndimage.map_coordinates(volume, coords, order=1, prefilter=False, output=np.float32)
    out = []
    for total in sums:
        full = np.zeros(inside.size, dtype=np.float32)
        full[inside] = total / n_sub
        out.append(full.reshape(grid.shape))
    return out


def _source_coords(to_source: np.ndarray, grid: Grid) -> np.ndarray:
    index = np.indices(grid.shape, dtype=np.float32).reshape(3, -1)
    return to_source[:3, :3].astype(np.float32) @ index + to_source[:3, 3:4].astype(np.float32)


def acquire_labels(labels_hr: np.ndarray, fraction: np.ndarray, source_affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Area rule: a voxel is lesion when ≥ half of its slab is; its label is the nearest high-resolution one."""
    coords = _source_coords(np.linalg.inv(source_affine) @ grid.affine, grid)
    nearest = ndimage.map_coordinates(labels_hr, coords, order=0, prefilter=False).reshape(grid.shape)
    lesion = fraction >= 0.5
    labels = np.where(lesion, nearest, 0).astype(np.int16)
    for _ in range(3):  # lesion voxels whose centre fell just outside: borrow a neighbour's label
        missing = lesion & (labels == 0)
        if not missing.any():
            break
        labels[missing] = ndimage.maximum_filter(labels, size=3)[missing]
    return labels


def render(
    fractions: dict[str, np.ndarray],
    lesion: np.ndarray,
    lesion_kind: str,
    grid: Grid,
    site: SiteProfile,
    rng: np.random.Generator,
    mimic_rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Images (IMAGE_KEYS) from sampled fractions: signal model, bias, EPI artefacts, Rician noise, site shift.

    With `mimic_rng`, healthy tissue also gets what makes real DWI bright without restricted diffusion
    (`_dwi_mimics`), drawn from that generator alone so the rest of the case is unchanged.
    """
    healthy = 1.0 - lesion
    lesion_adc = float(rng.uniform(*INFARCT_ADC_RANGE)) if lesion_kind == "infarct" else ADC_UM2_S["ms"]
    jitter = {t: float(rng.uniform(0.95, 1.05)) for t in TISSUES}

    def mix(table: dict[str, float], weight: dict[str, float] | None = None) -> np.ndarray:
        w = weight or {}
        out = lesion * table[lesion_kind] * w.get(lesion_kind, 1.0)
        for tissue in TISSUES:
            out += fractions[tissue] * healthy * (table[tissue] * jitter[tissue] * w.get(tissue, 1.0))
        return out * WM_LEVEL

    attenuation = {t: float(np.exp(-B_VALUE * ADC_UM2_S[t] * 1e-6)) for t in TISSUES}
    attenuation[lesion_kind] = float(np.exp(-B_VALUE * lesion_adc * 1e-6))
    images = {
        "dwi_b0": mix(SIGNAL["dwi_b0"]),
        "dwi_b1000": mix(SIGNAL["dwi_b0"], attenuation),
        "flair": mix(SIGNAL["flair"]),
        "t1_flair": mix(SIGNAL["t1_flair"]),
    }
    world = _world(grid)
    bias = 1.0 + site.bias_strength * _smooth_field(world, rng)
    for key in images:
        images[key] *= bias
    if mimic_rng is not None:
        _dwi_mimics(images, fractions, lesion, world, grid, mimic_rng)
    _epi_artefacts(images, world, grid, rng)
    sigma = site.noise_sigma * WM_LEVEL
    for key in images:
        noise = rng.standard_normal((2, *grid.shape), dtype=np.float32) * sigma
        images[key] = np.sqrt((images[key] + noise[0]) ** 2 + noise[1] ** 2)
    images["adc"] = _adc(images["dwi_b0"], images["dwi_b1000"])
    for key in ("dwi_b0", "dwi_b1000", "flair", "t1_flair"):
        images[key] = (WM_LEVEL * (images[key] / WM_LEVEL) ** site.contrast_gamma * site.intensity_scale).astype(
            np.float32
        )
    return images


def _adc(b0: np.ndarray, b1000: np.ndarray) -> np.ndarray:
    """10⁶·ln(S0/Sb)/b clipped to [0, 5000], 0 where S0 is background (design.md §4)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = 1e6 * np.log(b0 / np.maximum(b1000, 1e-3)) / B_VALUE
    adc = np.clip(np.nan_to_num(adc), 0.0, 5000.0)
    return np.where(b0 > 0.15 * WM_LEVEL, adc, 0.0).astype(np.float32)


def _epi_artefacts(images: dict[str, np.ndarray], world: np.ndarray, grid: Grid, rng: np.random.Generator) -> None:
    """DWI only: susceptibility pile-up, a smooth phase-encode displacement, and an N/2 ghost."""
    bumps = np.zeros(grid.shape, dtype=np.float32)
    for point, amplitude in zip(SUSCEPTIBILITY_MM, rng.uniform(0.6, 1.5, len(SUSCEPTIBILITY_MM))):
        bumps += amplitude * np.exp(-((world - point) ** 2).sum(-1) / (2.0 * 12.0**2))
    # Pile-up concentrates signal geometrically, on every b-value alike: the DWI is bright there but the ADC is
    # not low, which is what tells a radiologist (and the model) it is not an infarct.
    images["dwi_b1000"] *= 1.0 + bumps
    images["dwi_b0"] *= 1.0 + bumps
    in_plane = float(np.linalg.norm(grid.affine[:3, grid.phase_axis]))
    displacement_mm = rng.uniform(2.0, 5.0) * bumps / max(float(bumps.max()), 1e-6)
    displacement_mm += rng.uniform(0.3, 1.0) * _smooth_field(world, rng)
    coords = np.indices(grid.shape, dtype=np.float32)
    coords[grid.phase_axis] += displacement_mm / in_plane
    ghost = float(rng.uniform(0.02, 0.06))
    for key in ("dwi_b0", "dwi_b1000"):
        warped = ndimage.map_coordinates(images[key], coords, order=1, mode="nearest", output=np.float32)
        images[key] = warped + ghost * np.roll(warped, grid.shape[grid.phase_axis] // 2, axis=grid.phase_axis)


def _dwi_mimics(
    images: dict[str, np.ndarray],
    fractions: dict[str, np.ndarray],
    lesion: np.ndarray,
    world: np.ndarray,
    grid: Grid,
    rng: np.random.Generator,
) -> None:
    """Healthy tissue that is bright on DWI while its ADC stays normal: hard negatives for the stroke model.

    Both are what the default model marked on the healthy Canon and Philips brains (benchmarks/specificity.py):
    - receive-coil proximity: the cortex nearest the coil elements (often the occiput) is brighter on every image
      alike, so the ratio, and with it the ADC, is untouched;
    - T2 shine-through: blobs with a long T2 (b0 and FLAIR raised) and a normal-to-raised ADC, as in chronic
      infarcts, gliosis or vasogenic oedema, which a radiologist tells from an acute infarct by the ADC.
    """
    head = (fractions["wm"] + fractions["gm"] + fractions["csf"] + fractions["scalp"]) > 0.5
    centre = world[head].mean(0)
    direction = rng.standard_normal(3) + np.array([0.0, -1.5, 0.0])  # posterior elements most often
    direction /= np.linalg.norm(direction)
    depth = (world - centre) @ direction.astype(np.float32)
    surface = float(np.percentile(depth[head], 98))
    coil = np.exp(-np.clip(surface - depth, 0.0, None) / rng.uniform(15.0, 35.0)).astype(np.float32)
    coil_gain = 1.0 + rng.uniform(0.2, 0.8) * coil
    for key in images:
        images[key] *= coil_gain
    tissue = (fractions["wm"] + fractions["gm"]) >= 0.5
    clear = ndimage.distance_transform_edt(lesion < 0.05, sampling=affine_spacing(grid.affine))
    candidates = np.argwhere(tissue & (clear > 15.0))
    if len(candidates) == 0:
        return
    for index in candidates[rng.choice(len(candidates), size=int(rng.integers(2, 7)))]:
        radius = rng.uniform(3.0, 10.0, 3)
        offset = world - world[tuple(index)]
        blob = np.exp(-0.5 * ((offset / radius) ** 2).sum(-1)).astype(np.float32) * tissue
        t2_gain = 1.0 + rng.uniform(0.3, 1.0) * blob
        raised_adc = rng.uniform(0.0, 400.0) * blob  # µm²/s above the tissue's own
        images["dwi_b0"] *= t2_gain
        images["flair"] *= t2_gain
        images["dwi_b1000"] *= t2_gain * np.exp(-B_VALUE * raised_adc * 1e-6)


def _world(grid: Grid) -> np.ndarray:
    index = np.indices(grid.shape, dtype=np.float32)
    return np.moveaxis(np.tensordot(grid.affine[:3, :3].astype(np.float32), index, axes=1), 0, -1) + grid.affine[:3, 3]


def _smooth_field(world: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sum of three long-wavelength plane waves, scaled to peak |1| over the grid."""
    field = np.zeros(world.shape[:3], dtype=np.float32)
    for _ in range(3):
        direction = rng.standard_normal(3)
        k = 2.0 * np.pi / rng.uniform(150.0, 400.0) * direction / np.linalg.norm(direction)
        field += np.cos(world @ k.astype(np.float32) + rng.uniform(0.0, 2.0 * np.pi)).astype(np.float32)
    return field / max(float(np.abs(field).max()), 1e-6)
