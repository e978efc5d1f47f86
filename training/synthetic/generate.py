"""Seeded synthetic studies: anatomy → lesions → acquisition grid → images, all from one seed.

Each stage draws from its own child of `SeedSequence(seed)`, so the same seed gives byte-identical arrays and a change
in one stage does not reshuffle the others.
"""

from __future__ import annotations

import numpy as np

from models.geometry import voxel_volume_ml
from training.synthetic import acquisition
from training.synthetic.anatomy import build_anatomy
from training.synthetic.case import CaseKind, Geometry, GroundTruthLesion, SiteProfile, SyntheticCase
from training.synthetic.lesions import Pattern, SizeClass, draw_ms_lesions, draw_stroke_lesions

# Defaults per kind: stroke DWI at 2 mm isotropic (the stroke model's target), MS FLAIR at 1 × 1 × 3 mm.
DEFAULT_SITES: dict[str, SiteProfile] = {
    "stroke": SiteProfile(name="default-stroke"),
    "ms": SiteProfile(name="default-ms", in_plane_mm=1.0, slice_thickness_mm=3.0, slice_spacing_mm=3.0),
}


def derived_seed(*keys: int) -> int:
    """A seed drawn from several (run seed, case index, epoch, ...): neighbouring run seeds share no cases."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def generate_site(seed: int) -> SiteProfile:
    """A random plausible scanner/protocol profile, named after its seed."""
    _check_seed(seed)
    return acquisition.random_site(np.random.default_rng(seed), f"site-{seed}")


def generate_case(
    kind: CaseKind,
    seed: int,
    *,
    site: SiteProfile | None = None,
    geometry: Geometry = "axial",
    skull_stripped: bool = False,
    case_id: str | None = None,
    size: SizeClass | None = None,
    pattern: Pattern | None = None,
    anatomy: str = "auto",
    dwi_mimics: bool = False,
    coverage_mm: float | None = None,
) -> SyntheticCase:
    """One case. `size`/`pattern` (stroke only) default to a seeded draw; `anatomy` is auto, template or procedural.

    `dwi_mimics` adds healthy DWI-bright tissue with a normal ADC (coil proximity, T2 shine-through); `coverage_mm`
    keeps a slab of that many mm along the slice axis at a seeded position, as a clinical DWI slab may cut the brain.
    Both draw from their own seed streams, so a case without them is unchanged.
    """
    if kind not in DEFAULT_SITES:
        raise ValueError(f"kind must be stroke or ms, got {kind!r}")
    _check_seed(seed)
    if kind == "ms" and (size is not None or pattern is not None):
        raise ValueError("size and pattern apply to stroke cases only")
    site = site if site is not None else DEFAULT_SITES[kind]
    acquisition.validate_site(site)
    if coverage_mm is not None and not 20.0 <= coverage_mm <= 400.0:
        raise ValueError(f"coverage_mm must be in [20, 400], got {coverage_mm!r}")
    anatomy_rng, lesion_rng, grid_rng, render_rng, mimic_rng, coverage_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(6)
    )
    resolution = 1.0 if min(site.in_plane_mm, site.slice_thickness_mm) < 1.5 else 1.5
    head = build_anatomy(anatomy_rng, resolution, source=anatomy)
    if kind == "stroke":
        size = size if size is not None else ("small", "medium", "large")[int(lesion_rng.choice(3, p=[0.5, 0.35, 0.15]))]
        pattern = pattern if pattern is not None else ("single" if lesion_rng.random() < 0.7 else "embolic")
        labels_hr, locations = draw_stroke_lesions(head, lesion_rng, size=size, pattern=pattern)
    else:
        labels_hr, locations = draw_ms_lesions(head, lesion_rng, count=int(lesion_rng.integers(3, 31)))
    grid = acquisition.make_grid(geometry, site, head, grid_rng)
    lesion_hr = (labels_hr > 0).astype(np.float32)
    tissues = [head.fractions[t] for t in acquisition.TISSUES]
    sampled = acquisition.sample(
        [*tissues, lesion_hr], head.affine, grid, site.slice_thickness_mm, support=np.add.reduce(tissues) > 0
    )
    fractions = dict(zip(acquisition.TISSUES, sampled[:-1]))
    lesion = sampled[-1]
    labels = acquisition.acquire_labels(labels_hr, lesion, head.affine, grid)
    images = acquisition.render(
        fractions, lesion, "infarct" if kind == "stroke" else "ms", grid, site, render_rng,
        mimic_rng if dwi_mimics else None,
    )
    brain = ((fractions["wm"] + fractions["gm"] + fractions["csf"] + lesion) >= 0.5).astype(np.uint8)
    affine = grid.affine
    if coverage_mm is not None:
        slab = _slab(brain, coverage_mm / site.slice_spacing_mm, coverage_rng)
        images = {key: image[:, :, slab] for key, image in images.items()}
        labels, brain = labels[:, :, slab], brain[:, :, slab]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, slab.start]) + affine[:3, 3]
    if skull_stripped:
        images = {key: (image * brain).astype(np.float32) for key, image in images.items()}
    labels, lesions = _final_lesions(labels, affine, locations, "infarct" if kind == "stroke" else "ms")
    return SyntheticCase(
        case_id=case_id if case_id is not None else f"{kind}-{seed}",
        kind=kind,
        seed=seed,
        geometry=geometry,
        affine=affine,
        images=images,
        lesion_labels=labels,
        lesions=lesions,
        site=site,
        skull_stripped=skull_stripped,
        slice_thickness_mm=site.slice_thickness_mm,
        brain_mask=brain,
        anatomy_source=head.source,
    )


def _slab(brain: np.ndarray, slices: float, rng: np.random.Generator) -> slice:
    """`slices` consecutive slices at a random position over the brain's extent (all of them when it is shorter)."""
    count = max(1, int(round(slices)))
    occupied = np.flatnonzero(brain.any(axis=(0, 1)))
    if len(occupied) == 0 or count >= brain.shape[2]:
        return slice(0, brain.shape[2])
    low = max(0, int(occupied[0]) - count // 2)
    high = min(brain.shape[2] - count, int(occupied[-1]) - count // 2)
    start = int(rng.integers(low, max(low, high) + 1))
    return slice(start, start + count)


def _final_lesions(
    labels: np.ndarray, affine: np.ndarray, locations: dict[int, str], kind: str
) -> tuple[np.ndarray, list[GroundTruthLesion]]:
    """Renumber the lesions that survived acquisition 1…n and measure them on the acquired grid."""
    voxel_ml = voxel_volume_ml(affine)
    present = [int(v) for v in np.unique(labels) if v > 0]
    out = np.zeros_like(labels)
    lesions = []
    for new, old in enumerate(present, start=1):
        voxels = np.argwhere(labels == old)
        out[labels == old] = new
        centroid = affine[:3, :3] @ voxels.mean(0) + affine[:3, 3]
        lesions.append(
            GroundTruthLesion(
                label=new,
                kind=kind,  # type: ignore[arg-type]
                side="left" if centroid[0] < 0 else "right",
                centroid_ras_mm=tuple(round(float(c), 3) for c in centroid),  # type: ignore[arg-type]
                volume_ml=round(len(voxels) * voxel_ml, 6),
                location=locations.get(old, ""),
            )
        )
    return out, lesions


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
