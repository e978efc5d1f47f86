"""Domain-randomised training volumes in the manner of SynthSeg and SynthStroke: fresh anatomy, contrast and
acquisition on every draw, real lesion shapes pasted into the MNI152 template's tissue label map.

One draw (`draw_training_case(kind, seed, spacing_mm)`):
1. **Labels.** The template's tissue classes at 1 mm (`template_labels`: white matter, cortical and deep grey matter,
   ventricles, other CSF, skull, scalp) and lesions on the same grid: real shapes from the shape libraries
   (`shapes.py`), mirrored to either side at random, eroded or dilated, cut to parenchyma; stroke adds embolic showers
   of small blobs (ISLES'22 has many lesions under 0.2 ml); MS adds procedural periventricular, juxtacortical and
   infratentorial ovoids. Some draws have no lesion at all.
   The template is an average of many brains, so its cortex is a smooth band; `_fold_cortex` cuts gyri and sulci
   into it on each draw, and the cerebellum's finer folia.
2. **Space.** A random affine (rotation, scaling, shear, shift) plus a smooth elastic field maps an RAS grid at
   `spacing_mm` into the template; labels are read nearest-neighbour, the soft-edged lesion map linearly.
3. **Contrast.** Every tissue gets a random intensity in a physiological range, with inner texture. Stroke keeps the
   diffusion physics coupled: an ADC per tissue (CSF ≈ 3000, parenchyma ≈ 600–950 µm²/s), a lesion ADC of
   0.4–0.75 × the tissue's, a random T2 (S0) contrast, and DWI = S0·exp(−b·ADC) at a random b; the ADC map is
   recomputed from the noisy b0 and DWI as a scanner does, so "bright on DWI because the ADC is low" is what
   separates a lesion from DWI-bright healthy tissue (T2 shine-through, coil proximity, susceptibility pile-up,
   drawn as hard negatives, with real infarct shapes shining through). Healthy tissue with a moderately low ADC on
   both sides (corticospinal tracts, cerebellum) is drawn as anatomy. MS draws a FLAIR: dark CSF, bright lesions at
   a random contrast, and white matter that is bright in healthy heads too (tracts, ventricle lining and horn caps).
4. **Acquisition.** A multiplicative bias field, slice thickness (anisotropic blur along a random axis), Rician
   noise, a gamma on the weighted image, a random scanner scale, a cut slab now and then with a gain per slice
   (brighter edge slices), and skull stripping on a fraction of the draws so one model serves research (stripped) and clinical (whole-head) data.

Everything draws from `np.random.default_rng(seed)`'s children, so a seed gives the same arrays on any machine. The
result is a `SyntheticCase` (the phantom generator's type), so writers and metrics take it as they take a phantom.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.geometry import voxel_volume_ml
from training.synthetic.anatomy import (
    BOX_ORIGIN_MM,
    BOX_SIZE_MM,
    box_grid,
    build_anatomy,
    shared_data_dir,
    template_available,
)
from training.synthetic.case import CaseKind, GroundTruthLesion, SiteProfile, SyntheticCase
from training.synthetic.lesions import _ovoid, _unit
from training.synthetic.shapes import LesionShape, ShapeLibrary, load_shape, shape_paths

# Tissue classes of the label map (index = label value).
TISSUE_LABELS = ("air", "wm", "gm", "deep_gm", "ventricle", "csf", "skull", "scalp")
AIR, WM, GM, DEEP_GM, VENTRICLE, CSF, SKULL, SCALP = range(len(TISSUE_LABELS))
PARENCHYMA = (WM, GM, DEEP_GM)
INTRACRANIAL = (WM, GM, DEEP_GM, VENTRICLE, CSF)
DEEP_GM_DEPTH_MM = 18.0  # grey matter this far inside the brain is basal ganglia and thalamus, not cortex

# Physiological ranges the contrast draws come from. S0 and FLAIR are relative to white matter.
ADC_RANGE_UM2_S = {
    WM: (600.0, 850.0), GM: (750.0, 950.0), DEEP_GM: (680.0, 900.0), VENTRICLE: (2600.0, 3300.0),
    CSF: (2300.0, 3300.0), SKULL: (300.0, 1200.0), SCALP: (300.0, 1600.0),
}
# Grey matter up to 1.8 × white matter on b0 (T2 and proton density at DWI's long echo times): real b1000 cortex
# is a ribbon clearly brighter than white matter.
S0_RANGE = {
    WM: (1.0, 1.0), GM: (1.1, 1.8), DEEP_GM: (0.95, 1.35), VENTRICLE: (1.6, 3.5), CSF: (1.4, 3.2),
    SKULL: (0.0, 0.12), SCALP: (0.1, 0.9),
}
# FLAIR's grey/white contrast depends on the sequence (2D or 3D, inversion and echo times): from clearly brighter
# cortex to almost none on 3D FLAIR, where only lesions stand out from both.
FLAIR_RANGE = {
    WM: (1.0, 1.0), GM: (0.95, 1.45), DEEP_GM: (0.9, 1.35), VENTRICLE: (0.02, 0.35), CSF: (0.05, 0.5),
    SKULL: (0.0, 0.15), SCALP: (0.4, 1.6),
}
# Real tissue is not uniform on FLAIR at the scale of small lesions (myelination, perivascular spaces, vessels):
# a peak gain of up to this much in a field of ~5 mm blobs, so that a faint spot is a lesion by its shape and
# contrast, not because everything else is flat.
FLAIR_TEXTURE_GAIN = (0.0, 0.3)
FLAIR_TEXTURE_CELLS = 40  # across the box's longest side: blobs of ≈ 5 mm
# Of the tissue's own ADC: acute infarcts lose 25–60 % (rADC ≈ 0.4–0.75); values nearer normal come only from the
# soft lesion edge's partial volume, so bright tissue at 0.8–1.0 of normal ADC is never an infarct core here.
LESION_ADC_FRACTION = (0.4, 0.75)
LESION_S0_GAIN = (1.0, 1.6)  # acute infarcts gain T2 signal over hours
MS_LESION_GAIN = (1.15, 2.5)  # FLAIR, relative to the tissue they sit in; small real lesions are often faint
B_VALUE_RANGE = (700.0, 1500.0)  # s/mm², the stroke manifest's accepted range
# Tissue is not mono-exponential (diffusional kurtosis): the ADC a scanner reports in parenchyma and infarcts falls
# by this fraction per 1000 s/mm² of b (≈ 7 % lower at b 1500 than at 1000); free water (CSF) does not.
KURTOSIS_SLOPE_PER_1000 = (0.08, 0.2)
# Cortex bright toward one end of the brain with a normal or slightly low ADC (a hard negative; _bright_cortex_band).
CORTEX_BAND_PROBABILITY = 0.5
CORTEX_BAND_S0_GAIN = (1.15, 1.8)  # at that end of the brain, falling off away from it over CORTEX_BAND_REACH_MM
CORTEX_BAND_ADC_FRACTION = (0.88, 1.05)  # of the cortex's own ADC; an infarct's is at most LESION_ADC_FRACTION[1]
CORTEX_BAND_REACH_MM = (15.0, 45.0)
# Gyri and sulci cut into the template's smooth cortex (_fold_cortex).
FOLD_PROBABILITY = 0.85
SULCUS_SPACING_MM = (9.0, 16.0)  # between neighbouring sulci across a gyrus
SULCUS_DEPTH_MM = (6.0, 20.0)  # below the brain's surface
SULCUS_HALF_WIDTH_MM = (0.5, 1.5)  # of the CSF in a sulcus; never under half a voxel, so it shows on the grid
CORTEX_THICKNESS_MM = (2.0, 3.5)
# The cerebellum's cortex folds into folia far finer than the cerebrum's gyri: on a 2 mm DWI a striped, bright,
# symmetric texture (the healthy Canon brain's largest false positives, both hemispheres, rADC 0.83–0.87).
FOLIA_SPACING_MM = (4.0, 7.0)
CEREBELLUM_MNI_MM = (-20.0, -38.0)  # below this z and behind this y (template mm): the posterior fossa's hemispheres
# Subacute or chronic infarcts and other T2-bright lesions in real infarct shapes: bright on DWI with a normal or
# raised ADC (T2 shine-through). Only the ADC tells them from an acute infarct; they are not in the ground truth.
SHINE_THROUGH_PROBABILITY = 0.35
SHINE_THROUGH_ADC_FRACTION = (0.95, 1.6)
SHINE_THROUGH_DWI_GAIN = (1.2, 3.0)  # on DWI at the draw's b; the T2 (S0) gain that gives it is computed per voxel
# Healthy tissue with a lower ADC than the rest of the parenchyma, on both sides alike (each in NORMAL_VARIANT_
# PROBABILITY of the stroke draws): the corticospinal tracts (the healthy Philips brain's posterior limbs of the
# internal capsule: ADC 540–570 against 750 µm²/s in the parenchyma, bright on b1000) and the cerebellum. Most real
# heads show both, and models trained with them in half the draws still marked them (stroke v12–v16).
NORMAL_VARIANT_PROBABILITY = 0.8
CORTICOSPINAL_MNI_MM = ((24.0, -22.0, 50.0), (22.0, -16.0, 25.0), (19.0, -12.0, 8.0), (12.0, -20.0, -12.0),
                        (7.0, -26.0, -32.0))  # the right tract from the centrum semiovale to the pons; mirrored left
CORTICOSPINAL_RADIUS_MM = (2.5, 8.0)  # the posterior limb and the corona radiata are broader than the tract
CORTICOSPINAL_ADC_FRACTION = (0.65, 0.95)
CORTICOSPINAL_S0_GAIN = (0.95, 1.3)
CEREBELLUM_ADC_FRACTION = (0.8, 1.05)
CEREBELLUM_S0_GAIN = (0.95, 1.5)
# Healthy white matter bright on FLAIR on both sides (each in FLAIR_VARIANT_PROBABILITY of the MS draws): the
# corticospinal tracts, a thin lining of the ventricles, and caps at the frontal and occipital horns (ependymitis
# granularis), which radiologists read as normal and the MS model v3 took for lesions.
FLAIR_VARIANT_PROBABILITY = 0.5
CORTICOSPINAL_FLAIR_GAIN = (1.0, 1.2)
# The limbic cortex (hippocampus and amygdala, insula) has a longer T2 than the neocortex and is bright on FLAIR on
# both sides in healthy heads; the MS models v4 and v5 marked both mesial temporal lobes and insulae of patient 07.
# Ellipsoids in template mm, (centre, semi-axes) of the right side, the gain fading to none at their surface; the
# left is the mirror image.
LIMBIC_MNI_MM = (((26.0, -20.0, -14.0), (10.0, 24.0, 12.0)), ((38.0, 0.0, 4.0), (8.0, 24.0, 18.0)))
LIMBIC_FLAIR_GAIN = (1.05, 1.35)
VENTRICLE_LINING_MM = (1.0, 2.5)
VENTRICLE_LINING_GAIN = (1.0, 1.3)
HORN_CAP_MM = (3.0, 7.0)
HORN_CAP_GAIN = (1.1, 1.6)
HORN_END_MM = 12.0  # caps sit within this distance (front to back) of the ventricles' ends
NO_LESION_PROBABILITY = 0.1
SKULL_STRIP_PROBABILITY = 0.4
SLAB_PROBABILITY = 0.3
# Gain per slice of a multi-slice acquisition on the weighted images (_slice_gain).
SLICE_GAIN_JITTER = (0.0, 0.06)  # standard deviation of the slice-to-slice gain
EDGE_SLICE_PROBABILITY = 0.5
EDGE_SLICE_GAIN = (1.1, 1.7)  # the first or last slices of a slab
EDGE_SLICES = (1, 3)
SLAB_MM = (70.0, 140.0)
SHOWER_PROBABILITY = 0.35
SECOND_SHAPE_PROBABILITY = 0.25
ROTATION_DEG = 12.0
SCALE_RANGE = (0.88, 1.12)
SHIFT_MM = 8.0
ELASTIC_MM = 3.0  # peak standard deviation of the smooth displacement
ELASTIC_SPACING_MM = 24.0  # control-point spacing of the elastic field
THICKNESS_MM = (1.0, 6.0)  # simulated slice thickness; never finer than the output spacing
NOISE_RANGE = (0.01, 0.06)  # Rician sigma relative to white matter's b0 / FLAIR
BIAS_RANGE = (0.0, 0.35)
GAMMA_RANGE = (0.8, 1.25)
SCALE_LOG_RANGE = (np.log(50.0), np.log(3000.0))  # scanner units of the weighted images


@dataclass(frozen=True)
class TemplateLabels:
    labels: np.ndarray  # int8 (197, 233, 189) tissue classes on the template's 1 mm grid
    depth_mm: np.ndarray  # float32, distance inside the intracranial hull (≥ 0), for deep placements

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.labels.shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def template_labels() -> TemplateLabels:
    """The template's tissue classes (≈ 3 s once per process, then shared read-only)."""
    if not template_available():
        raise ValueError(f"the MNI152 template is needed for randomised training data; not found under "
                         f"{shared_data_dir()}")
    anatomy = build_anatomy(np.random.default_rng(0), 1.0, source="template")
    f = anatomy.fractions
    air = np.clip(1.0 - (f["wm"] + f["gm"] + f["csf"] + f["skull"] + f["scalp"]), 0.0, 1.0)
    order = np.stack([air, f["wm"], f["gm"], f["csf"], f["skull"], f["scalp"]])
    to_label = np.array([AIR, WM, GM, CSF, SKULL, SCALP], dtype=np.int8)
    labels = to_label[np.argmax(order, axis=0)]
    labels[(labels == CSF) & anatomy.ventricles] = VENTRICLE
    intracranial = np.isin(labels, INTRACRANIAL)
    depth = ndimage.distance_transform_edt(intracranial).astype(np.float32)
    labels[(labels == GM) & (depth > DEEP_GM_DEPTH_MM)] = DEEP_GM
    labels.flags.writeable = False
    depth.flags.writeable = False
    return TemplateLabels(labels, depth)


# -- lesions on the template grid -----------------------------------------------------------------------------


@dataclass
class _LesionCanvas:
    """Lesion labels (int16, 1…n, in painting order) on the template grid."""

    labels: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> _LesionCanvas:
        return cls(np.zeros(shape, dtype=np.int16))

    def add(self, mask: np.ndarray, origin: np.ndarray) -> None:
        """Paint `mask` (template box at `origin`) with the next label where nothing is painted yet."""
        low = np.maximum(origin, 0)
        high = np.minimum(np.asarray(origin) + mask.shape, self.labels.shape)
        if np.any(high <= low):
            return
        local = mask[tuple(slice(int(lo - o), int(hi - o)) for lo, hi, o in zip(low, high, origin))]
        region = self.labels[tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))]
        region[local & (region == 0)] = int(self.labels.max()) + 1


def _mirror(shape: LesionShape, template_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The shape mirrored across the template's mid-sagittal plane (x = 0 at index 98): the other hemisphere."""
    mask = shape.mask[::-1]
    origin = np.array(shape.origin)
    origin[0] = template_shape[0] - 1 - (origin[0] + shape.mask.shape[0] - 1)
    return mask, origin


def _library_lesion(
    library: ShapeLibrary, rng: np.random.Generator, template: TemplateLabels
) -> tuple[np.ndarray, np.ndarray]:
    """A random library mask, mirrored half the time, eroded or dilated a little, cut to parenchyma."""
    shape = load_shape(library, int(rng.integers(len(shape_paths(library)))))
    mask, origin = (shape.mask, np.array(shape.origin)) if rng.random() < 0.5 else _mirror(shape, template.shape)
    change = int(rng.choice([-1, 0, 0, 1]))
    if change < 0 and mask.sum() > 200:
        mask = ndimage.binary_erosion(mask)
    elif change > 0:
        mask = np.pad(mask, 1)
        origin = origin - 1
        mask = ndimage.binary_dilation(mask)
    if library is ShapeLibrary.MS and rng.random() < 0.7:  # a random subset of the patient's lesions
        parts, count = ndimage.label(mask)
        keep = np.flatnonzero(rng.random(count) < rng.uniform(0.3, 1.0)) + 1
        mask = np.isin(parts, keep)
    return _in_parenchyma(mask, origin, template), origin


def _in_parenchyma(mask: np.ndarray, origin: np.ndarray, template: TemplateLabels) -> np.ndarray:
    low = np.clip(origin, 0, None)
    high = np.minimum(origin + mask.shape, template.shape)
    inside = np.zeros_like(mask)
    local = tuple(slice(int(lo - o), int(hi - o)) for lo, hi, o in zip(low, high, origin))
    box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
    inside[local] = np.isin(template.labels[box], PARENCHYMA)
    return mask & inside


def _blobs(
    rng: np.random.Generator,
    template: TemplateLabels,
    count: int,
    centre: np.ndarray,
    spread_mm: float,
    radius_mm: tuple[float, float],
    allowed: tuple[int, ...],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` small irregular ovoids within `spread_mm` of `centre` (template index), each in `allowed` tissue."""
    candidates = np.argwhere(np.isin(template.labels[_around(centre, spread_mm, template.shape)], allowed))
    if len(candidates) == 0:
        return []
    offset = np.array([s.start for s in _around(centre, spread_mm, template.shape)])
    out = []
    for index in candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]:
        semi = rng.uniform(*radius_mm) * rng.uniform(0.7, 1.3, 3)
        box, inside = _ovoid(index + offset, semi, _unit(rng.standard_normal(3)), template.shape)
        mask = inside & np.isin(template.labels[box], allowed)
        if mask.any():
            out.append((mask, np.array([s.start for s in box])))
    return out


def _around(centre: np.ndarray, reach_mm: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    reach = int(np.ceil(reach_mm))
    return tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, n)) for c, n in zip(centre, shape))


def _stroke_lesions(rng: np.random.Generator, template: TemplateLabels) -> _LesionCanvas:
    canvas = _LesionCanvas.empty(template.shape)
    if rng.random() < NO_LESION_PROBABILITY:
        return canvas
    shower = rng.random() < SHOWER_PROBABILITY
    if not shower or rng.random() < 0.6:
        for _ in range(2 if rng.random() < SECOND_SHAPE_PROBABILITY else 1):
            canvas.add(*_library_lesion(ShapeLibrary.STROKE, rng, template))
    if shower:  # embolic: many small lesions in one vascular region
        painted = np.argwhere(canvas.labels > 0)
        if len(painted) and rng.random() < 0.7:
            centre = painted[rng.integers(len(painted))]
        else:
            brain = np.argwhere(np.isin(template.labels[::4, ::4, ::4], PARENCHYMA)) * 4
            centre = brain[rng.integers(len(brain))]
        for mask, origin in _blobs(rng, template, int(rng.integers(3, 26)), centre, rng.uniform(15.0, 45.0),
                                   (1.0, 3.5), PARENCHYMA):
            canvas.add(mask, origin)
    return canvas


def _ms_lesions(rng: np.random.Generator, template: TemplateLabels) -> _LesionCanvas:
    canvas = _LesionCanvas.empty(template.shape)
    if rng.random() < NO_LESION_PROBABILITY / 2:
        return canvas
    if rng.random() < 0.7:
        canvas.add(*_library_lesion(ShapeLibrary.MS, rng, template))
    ventricle_wall = np.argwhere(ndimage.binary_dilation(template.labels[::2, ::2, ::2] == VENTRICLE)
                                 & (template.labels[::2, ::2, ::2] == WM)) * 2
    juxtacortical = np.argwhere((template.labels[::2, ::2, ::2] == WM) & (template.depth_mm[::2, ::2, ::2] < 12.0)) * 2
    z_index = np.arange(template.shape[2]) + BOX_ORIGIN_MM[2]
    infratentorial = np.argwhere((template.labels[::2, ::2, ::2] == WM)
                                 & (z_index[::2] < -25.0)[None, None, :]) * 2
    for anchors, count, radius in ((ventricle_wall, rng.integers(0, 10), (1.5, 4.5)),
                                   (juxtacortical, rng.integers(0, 6), (1.0, 3.0)),
                                   (infratentorial, rng.integers(0, 3), (1.0, 3.0))):
        for _ in range(int(count)):
            if len(anchors) == 0:
                break
            centre = anchors[rng.integers(len(anchors))]
            for mask, origin in _blobs(rng, template, 1, centre, 3.0, radius, (WM, DEEP_GM)):
                canvas.add(mask, origin)
    return canvas


# -- space ----------------------------------------------------------------------------------------------------


def _template_coordinates(
    rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """(3, N) template voxel coordinates of every output voxel under a random affine + elastic map."""
    angles = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        step = np.eye(3)
        step[a, a], step[a, b], step[b, a], step[b, b] = c, -s, s, c
        rotation = rotation @ step
    shear = np.eye(3) + np.triu(rng.uniform(-0.05, 0.05, (3, 3)), 1)
    linear = rotation @ shear @ np.diag(1.0 / rng.uniform(*SCALE_RANGE, 3))
    centre = BOX_ORIGIN_MM + BOX_SIZE_MM / 2.0
    shift = rng.uniform(-SHIFT_MM, SHIFT_MM, 3)
    # template mm = linear · (world − centre) + centre + shift + elastic(world); voxel = template mm − box origin
    to_template = np.eye(4)
    to_template[:3, :3] = linear @ affine[:3, :3]
    to_template[:3, 3] = linear @ (affine[:3, 3] - centre) + centre + shift - BOX_ORIGIN_MM
    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = to_template[:3, :3].astype(np.float32) @ index + to_template[:3, 3:4].astype(np.float32)
    sigma = rng.uniform(0.0, ELASTIC_MM)
    if sigma > 0.1:
        spacing = float(affine[0, 0])
        control = tuple(max(2, int(np.ceil(n * spacing / ELASTIC_SPACING_MM)) + 1) for n in shape)
        for axis in range(3):
            field = rng.standard_normal(control).astype(np.float32) * sigma
            zoom = [n / c for n, c in zip(shape, control)]
            coords[axis] += ndimage.zoom(field, zoom, order=1, grid_mode=True, mode="nearest").reshape(-1)
    return coords


def _in_cerebellum(coords: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Output voxels whose template position lies in the posterior fossa behind the brainstem: read from the template
    so the region turns with the draw's deformation."""
    y_mm = coords[1] + BOX_ORIGIN_MM[1]
    z_mm = coords[2] + BOX_ORIGIN_MM[2]
    return ((z_mm < CEREBELLUM_MNI_MM[0]) & (y_mm < CEREBELLUM_MNI_MM[1])).reshape(shape)


def _folding_field(rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: float,
                   fold_spacing_mm: tuple[float, float]) -> np.ndarray:
    """Smooth noise of unit spread whose zero surface lies a random distance in `fold_spacing_mm` from itself."""
    sigma = rng.uniform(*fold_spacing_mm) / 4.4 / spacing_mm  # zeros of Gaussian-smoothed noise lie ≈ 4.4 σ apart
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _fold_cortex(
    rng: np.random.Generator, labels: np.ndarray, lesion: np.ndarray, spacing_mm: float, cerebellum: np.ndarray
) -> np.ndarray:
    """Gyri and sulci in the cortical shell: a ribbon of grey matter on a core of white matter, lining sulci of CSF
    that run from the surface down to a random depth; in `cerebellum`, folia a third as far apart.

    Real cortex is a folded ribbon, bright on DWI and FLAIR, between dark sulci. Without folds in training, the only
    folded bright things a model sees are the real lesion shapes, so it takes real cortex for lesion (the healthy
    Canon and Philips brains, every stroke candidate up to v8). The sulci are the zero surface of a smooth random
    field read at each voxel's nearest point on the brain's surface, so they stand perpendicular to that surface as
    real sulci do. Deep grey matter and lesions keep their labels."""
    if rng.random() >= FOLD_PROBABILITY:
        return labels
    parenchyma = np.isin(labels, PARENCHYMA)
    if not parenchyma.any() or parenchyma.all():
        return labels
    depth, nearest = ndimage.distance_transform_edt(parenchyma, sampling=spacing_mm, return_indices=True)
    gyri = _folding_field(rng, labels.shape, spacing_mm, SULCUS_SPACING_MM)
    folia = _folding_field(rng, labels.shape, spacing_mm, FOLIA_SPACING_MM)
    field = np.where(cerebellum, folia, gyri)[tuple(nearest)]  # constant along each line to the surface
    slope = np.sqrt(sum(g * g for g in np.gradient(field, spacing_mm)))
    to_sulcus_mm = np.abs(field) / np.maximum(slope, 1e-6)
    reach = rng.uniform(*SULCUS_DEPTH_MM) * (1.0 + 0.4 * _smooth_noise(rng, labels.shape, 8))
    thickness = rng.uniform(*CORTEX_THICKNESS_MM)
    half_width = max(rng.uniform(*SULCUS_HALF_WIDTH_MM), 0.5 * spacing_mm)
    shell = np.isin(labels, (WM, GM)) & (depth < reach + thickness) & (lesion < 0.05)
    sulcus = shell & (to_sulcus_mm < half_width) & (depth < reach)
    ribbon = shell & ~sulcus & ((to_sulcus_mm < half_width + thickness) | (depth <= thickness))
    folded = labels.copy()
    folded[shell] = WM
    folded[ribbon] = GM
    folded[sulcus] = CSF
    return folded


# -- healthy look-alikes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShineThrough:
    """Where T2 shine-through sits on the output grid (soft, 0–1) and how it shows there."""

    soft: np.ndarray
    dwi_gain: float
    adc_fraction: float

    @classmethod
    def none(cls, shape: tuple[int, ...]) -> _ShineThrough:
        return cls(np.zeros(shape, dtype=np.float32), 1.0, 1.0)


def _shine_through(
    rng: np.random.Generator, template: TemplateLabels, coords: np.ndarray, shape: tuple[int, int, int],
    lesion: np.ndarray,
) -> _ShineThrough:
    """One or two real infarct shapes, away from the draw's acute lesions, bright on DWI with a normal or raised
    ADC: an older infarct, or a T2-bright lesion shining through. Drawn on folded cortex (v7 drew them on the smooth
    template), so a folded bright shape is a lesion only where its ADC is low."""
    if rng.random() >= SHINE_THROUGH_PROBABILITY:
        return _ShineThrough.none(shape)
    canvas = _LesionCanvas.empty(template.shape)
    for _ in range(int(rng.integers(1, 3))):
        canvas.add(*_library_lesion(ShapeLibrary.STROKE, rng, template))
    soft = _lesion_on_grid(canvas, coords, shape, float(rng.uniform(0.4, 1.0))) * (lesion < 0.05)
    return _ShineThrough(soft.astype(np.float32), float(rng.uniform(*SHINE_THROUGH_DWI_GAIN)),
                         float(rng.uniform(*SHINE_THROUGH_ADC_FRACTION)))


@dataclass(frozen=True)
class _NormalVariants:
    """Multipliers of healthy tissue's S0 and ADC on the output grid (1 where nothing varies)."""

    s0_gain: np.ndarray
    adc_fraction: np.ndarray

    @classmethod
    def none(cls, shape: tuple[int, ...]) -> _NormalVariants:
        return cls(np.ones(shape, dtype=np.float32), np.ones(shape, dtype=np.float32))


def _distance_to_segment(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of each of the (3, N) `points` to the segment from `start` to `end` (same units)."""
    step = end - start
    along = np.clip(((points - start[:, None]) * step[:, None]).sum(0) / float(step @ step), 0.0, 1.0)
    return np.linalg.norm(points - (start[:, None] + along * step[:, None]), axis=0)


def _corticospinal_weight(coords: np.ndarray, shape: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    """0–1 nearness to either corticospinal tract (Gaussian across it), from each voxel's template position; the
    left tract is the right one mirrored, so the weight is symmetric by construction."""
    points = coords + BOX_ORIGIN_MM[:, None].astype(np.float32)
    points[0] = np.abs(points[0])
    path = np.array(CORTICOSPINAL_MNI_MM, dtype=np.float32)
    distance = np.min([_distance_to_segment(points, a, b) for a, b in zip(path[:-1], path[1:])], axis=0)
    return np.exp(-0.5 * (distance / radius_mm) ** 2).reshape(shape).astype(np.float32)


def _normal_variants(
    rng: np.random.Generator, coords: np.ndarray, labels: np.ndarray, cerebellum: np.ndarray
) -> _NormalVariants:
    """Bilateral healthy tissue darker on ADC and often brighter on DWI than the rest: the corticospinal tracts and
    the cerebellum. An infarct there is one-sided and lower still; the model must learn that symmetric, moderately
    low ADC along these tracts is anatomy."""
    variants = _NormalVariants.none(labels.shape)
    if rng.random() < NORMAL_VARIANT_PROBABILITY:
        weight = _corticospinal_weight(coords, labels.shape, rng.uniform(*CORTICOSPINAL_RADIUS_MM))
        weight *= np.isin(labels, (WM, DEEP_GM))
        variants.adc_fraction[:] *= 1.0 + (rng.uniform(*CORTICOSPINAL_ADC_FRACTION) - 1.0) * weight
        variants.s0_gain[:] *= 1.0 + (rng.uniform(*CORTICOSPINAL_S0_GAIN) - 1.0) * weight
    if rng.random() < NORMAL_VARIANT_PROBABILITY:
        tissue = ndimage.gaussian_filter((cerebellum & np.isin(labels, PARENCHYMA)).astype(np.float32), 1.0)
        variants.adc_fraction[:] *= 1.0 + (rng.uniform(*CEREBELLUM_ADC_FRACTION) - 1.0) * tissue
        variants.s0_gain[:] *= 1.0 + (rng.uniform(*CEREBELLUM_S0_GAIN) - 1.0) * tissue
    return variants


# -- contrast and acquisition --------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Unit-peak smooth random field: normal noise on a coarse `cells`-wide grid, upsampled linearly."""
    coarse = tuple(max(2, cells * n // max(shape)) for n in shape)
    field = rng.standard_normal(coarse).astype(np.float32)
    up = ndimage.zoom(field, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
    return up / max(float(np.abs(up).max()), 1e-6)


def _table(rng: np.random.Generator, ranges: dict[int, tuple[float, float]]) -> np.ndarray:
    table = np.zeros(len(TISSUE_LABELS), dtype=np.float32)
    for label, (low, high) in ranges.items():
        table[label] = rng.uniform(low, high)
    return table


def _blur_thickness(rng: np.random.Generator, images: list[np.ndarray], spacing_mm: float) -> float:
    """Blur along a random slice axis (z most often) as a thick slice would; returns the thickness drawn."""
    thickness = float(rng.uniform(max(THICKNESS_MM[0], spacing_mm), THICKNESS_MM[1]))
    axis = int(rng.choice(3, p=[0.15, 0.15, 0.7]))
    sigma = [0.35 * rng.uniform(0.0, 1.0)] * 3  # in-plane point spread, voxels
    sigma[axis] = np.sqrt(max(thickness**2 - spacing_mm**2, 0.0)) / 2.355 / spacing_mm
    for image in images:
        ndimage.gaussian_filter(image, sigma, output=image, truncate=3.0)
    return thickness


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    real = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
    imaginary = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return np.sqrt(real * real + imaginary * imaginary)


def _render_stroke(
    rng: np.random.Generator, labels: np.ndarray, lesion: np.ndarray, spacing_mm: float, shine: _ShineThrough,
    variants: _NormalVariants,
) -> tuple[dict[str, np.ndarray], float]:
    """b0, DWI and a scanner-computed ADC (µm²/s) from the label map, the soft lesion map and the healthy
    look-alikes."""
    shape = labels.shape
    b_value = float(rng.uniform(*B_VALUE_RANGE))
    texture = _smooth_noise(rng, shape, int(rng.integers(8, 24)))
    s0 = _table(rng, S0_RANGE)[labels] * (1.0 + rng.uniform(0.0, 0.1) * texture) * variants.s0_gain
    adc = _table(rng, ADC_RANGE_UM2_S)[labels] * (1.0 + rng.uniform(0.0, 0.08) * _smooth_noise(rng, shape, 16))
    adc *= variants.adc_fraction
    # DWI × dwi_gain at this b: the T2 gain makes up for what the raised ADC takes away, voxel by voxel.
    t2_gain = shine.dwi_gain * np.exp(b_value * adc * 1e-6 * (shine.adc_fraction - 1.0))
    s0 *= 1.0 + shine.soft * (t2_gain - 1.0)
    adc *= 1.0 + shine.soft * (shine.adc_fraction - 1.0)
    fraction = rng.uniform(*LESION_ADC_FRACTION) + 0.08 * _smooth_noise(rng, shape, 24)
    adc *= 1.0 - lesion * (1.0 - np.clip(fraction, 0.3, 0.95))
    s0 *= 1.0 + lesion * (rng.uniform(*LESION_S0_GAIN) - 1.0)
    _diffusion_mimics(rng, labels, lesion, s0, adc, spacing_mm)
    _bright_cortex_band(rng, labels, lesion, s0, adc, spacing_mm)
    restricted = ~np.isin(labels, (VENTRICLE, CSF))
    adc[restricted] *= 1.0 - rng.uniform(*KURTOSIS_SLOPE_PER_1000) * (b_value - 1000.0) / 1000.0
    dwi = s0 * np.exp(-b_value * adc * 1e-6)
    gain = (1.0 + rng.uniform(*BIAS_RANGE) * _smooth_noise(rng, shape, 3)) * _coil_and_pileup(rng, labels, spacing_mm)
    s0 *= gain
    dwi *= gain
    thickness = _blur_thickness(rng, [s0, dwi], spacing_mm)
    sigma = rng.uniform(*NOISE_RANGE)
    s0, dwi = _rician(rng, s0, sigma), _rician(rng, dwi, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = 1e6 * np.log(s0 / np.maximum(dwi, 1e-4)) / b_value
    measured = np.clip(np.nan_to_num(measured), 0.0, 5000.0)
    measured[s0 < rng.uniform(0.08, 0.2)] = 0.0  # scanners blank the ADC where b0 is background
    scale = float(np.exp(rng.uniform(*SCALE_LOG_RANGE)))
    gamma = float(rng.uniform(*GAMMA_RANGE))
    images = {
        "dwi_b0": (s0 * scale).astype(np.float32),
        "dwi_b1000": (np.power(dwi, gamma) * scale).astype(np.float32),
        "adc": measured.astype(np.float32),
    }
    return images, thickness


def _diffusion_mimics(
    rng: np.random.Generator, labels: np.ndarray, lesion: np.ndarray, s0: np.ndarray, adc: np.ndarray,
    spacing_mm: float,
) -> None:
    """Healthy tissue bright on DWI with a normal or raised ADC (T2 shine-through, vasogenic oedema, old
    infarcts): what a radiologist tells from an acute infarct by the ADC, and so must the model."""
    tissue = np.isin(labels, PARENCHYMA) & (lesion < 0.05)
    candidates = np.argwhere(tissue[::3, ::3, ::3]) * 3
    if len(candidates) == 0:
        return
    for index in candidates[rng.choice(len(candidates), size=int(rng.integers(0, 5)))]:
        radius = rng.uniform(2.0, 10.0, 3) / spacing_mm
        box = tuple(slice(max(int(i - 3 * r), 0), min(int(i + 3 * r) + 1, n))
                    for i, r, n in zip(index, radius, labels.shape))
        grid = np.ogrid[box]
        blob = np.exp(-0.5 * sum(((g - i) / r) ** 2 for g, i, r in zip(grid, index, radius))).astype(np.float32)
        blob *= tissue[box]
        s0[box] *= 1.0 + rng.uniform(0.3, 1.2) * blob
        adc[box] *= 1.0 + rng.uniform(0.0, 0.5) * blob


def _grid_axes_mm(shape: tuple[int, ...], spacing_mm: float) -> list[np.ndarray]:
    """Each axis's voxel positions in mm, shaped to broadcast along that axis only (sums of them are volumes)."""
    return [(np.arange(n, dtype=np.float32) * spacing_mm).reshape([-1 if i == k else 1 for k in range(len(shape))])
            for i, n in enumerate(shape)]


def _bright_cortex_band(
    rng: np.random.Generator, labels: np.ndarray, lesion: np.ndarray, s0: np.ndarray, adc: np.ndarray,
    spacing_mm: float,
) -> None:
    """Cortex bright on b0 and DWI toward one end of the brain, both hemispheres alike, with a normal or slightly low
    ADC: susceptibility pile-up over the skull base (orbitofrontal cortex, temporal poles), the cortex under an array
    coil at the vertex, the edge slices of a slab. The tissue beneath the cortex shares a random part of it (the
    healthy Canon brain's whole cerebellum is bright). The healthy Canon and Philips brains of the shared data mark
    this way. An infarct is one vascular territory with an ADC well below normal; the model must learn that a
    symmetric bright band is not one."""
    if rng.random() >= CORTEX_BAND_PROBABILITY:
        return
    cortex = (labels == GM) & (lesion < 0.05)
    if not cortex.any():
        return
    # A direction in the sagittal plane (no left-right part, so the band is bilateral): up or down, tilted forwards
    # or backwards.
    direction = _unit(np.array([0.0, rng.uniform(-0.8, 0.8), rng.choice([-1.0, 1.0])]))
    height = sum(a * d for a, d in zip(_grid_axes_mm(labels.shape, spacing_mm), direction))
    end_mm = float(np.broadcast_to(height, labels.shape)[np.isin(labels, INTRACRANIAL)].max(initial=0.0))
    falloff = np.exp(-np.clip(end_mm - height, 0.0, None) / rng.uniform(*CORTEX_BAND_REACH_MM))
    beneath = np.isin(labels, (WM, DEEP_GM)) & (lesion < 0.05)
    tissue = cortex + rng.uniform(0.0, 1.0) * beneath
    weight = tissue * falloff * (1.0 + 0.25 * _smooth_noise(rng, labels.shape, 12))
    s0 *= 1.0 + (rng.uniform(*CORTEX_BAND_S0_GAIN) - 1.0) * weight
    adc *= 1.0 + (rng.uniform(*CORTEX_BAND_ADC_FRACTION) - 1.0) * weight


def _coil_and_pileup(rng: np.random.Generator, labels: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Gain on every b-value alike (so the ADC keeps its value): receive-coil proximity (one side, and the whole
    periphery of an array coil) and EPI pile-up."""
    shape = labels.shape
    axes = _grid_axes_mm(shape, spacing_mm)
    head = np.argwhere(labels[::4, ::4, ::4] != AIR) * 4 * spacing_mm
    centre = head.mean(0) if len(head) else np.array(shape) * spacing_mm / 2.0
    direction = _unit(rng.standard_normal(3) + np.array([0.0, -1.5, 0.0]))
    depth = sum((a - c) * d for a, c, d in zip(axes, centre, direction))
    surface = float(np.percentile(head @ direction - centre @ direction, 98)) if len(head) else 0.0
    gain = 1.0 + rng.uniform(0.0, 0.7) * np.exp(-np.clip(surface - depth, 0.0, None) / rng.uniform(15.0, 35.0))
    # A phased-array head coil sees the whole periphery best: the cortex under every element is bright on b0 and
    # DWI alike, while the ADC, a ratio, stays normal.
    inside_mm = ndimage.distance_transform_edt(labels != AIR, sampling=spacing_mm)
    gain = gain * (1.0 + rng.uniform(0.0, 0.8) * np.exp(-inside_mm / rng.uniform(8.0, 25.0)))
    for _ in range(int(rng.integers(0, 4))):  # susceptibility pile-up near air–bone interfaces
        spot = head[rng.integers(len(head))] if len(head) else centre
        radius = rng.uniform(6.0, 15.0)
        bump = sum((a - s) ** 2 for a, s in zip(axes, spot))
        gain = gain * (1.0 + rng.uniform(0.3, 1.5) * np.exp(-bump / (2.0 * radius**2)))
    return np.broadcast_to(gain, shape).astype(np.float32)


def _limbic_weight(coords: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """0–1 nearness to the limbic cortex of either side (`LIMBIC_MNI_MM`), from each voxel's template position."""
    points = coords + BOX_ORIGIN_MM[:, None].astype(np.float32)
    points[0] = np.abs(points[0])
    weight = np.zeros(points.shape[1], dtype=np.float32)
    for centre, semi_axes in LIMBIC_MNI_MM:
        inside = sum(((points[axis] - centre[axis]) / semi_axes[axis]) ** 2 for axis in range(3))
        weight = np.maximum(weight, np.clip(1.0 - inside, 0.0, 1.0) ** 2)
    return weight.reshape(shape)


def _flair_variants(
    rng: np.random.Generator, coords: np.ndarray, labels: np.ndarray, spacing_mm: float
) -> np.ndarray:
    """FLAIR multiplier of healthy tissue that is bright on both sides: the corticospinal tracts, the limbic cortex,
    the lining of the ventricles and caps at their frontal and occipital horns. An MS lesion is an ovoid of its own;
    these follow anatomy, symmetric and smooth."""
    gain = np.ones(labels.shape, dtype=np.float32)
    white = np.isin(labels, (WM, DEEP_GM))
    if rng.random() < FLAIR_VARIANT_PROBABILITY:
        weight = _corticospinal_weight(coords, labels.shape, rng.uniform(*CORTICOSPINAL_RADIUS_MM)) * white
        gain *= 1.0 + (rng.uniform(*CORTICOSPINAL_FLAIR_GAIN) - 1.0) * weight
    if rng.random() < FLAIR_VARIANT_PROBABILITY:
        weight = _limbic_weight(coords, labels.shape) * np.isin(labels, (GM, DEEP_GM))
        gain *= 1.0 + (rng.uniform(*LIMBIC_FLAIR_GAIN) - 1.0) * weight
    ventricle = labels == VENTRICLE
    if not ventricle.any():
        return gain
    # from the ventricle's wall, half a voxel beyond the ventricle's voxel centres
    to_wall = ndimage.distance_transform_edt(~ventricle, sampling=spacing_mm).astype(np.float32) - spacing_mm / 2.0
    if rng.random() < FLAIR_VARIANT_PROBABILITY:
        lining = np.exp(-0.5 * (to_wall / rng.uniform(*VENTRICLE_LINING_MM)) ** 2) * white
        gain *= 1.0 + (rng.uniform(*VENTRICLE_LINING_GAIN) - 1.0) * lining
    if rng.random() < FLAIR_VARIANT_PROBABILITY:
        y_mm = (coords[1] + BOX_ORIGIN_MM[1]).reshape(labels.shape)
        front, back = float(y_mm[ventricle].max()), float(y_mm[ventricle].min())
        ends = (y_mm > front - HORN_END_MM) | (y_mm < back + HORN_END_MM)
        cap = np.exp(-0.5 * (to_wall / rng.uniform(*HORN_CAP_MM)) ** 2) * (white & ends)
        cap = ndimage.gaussian_filter(cap.astype(np.float32), 1.0) * white
        gain *= 1.0 + (rng.uniform(*HORN_CAP_GAIN) - 1.0) * cap
    return gain


def _render_flair(
    rng: np.random.Generator, labels: np.ndarray, lesion: np.ndarray, spacing_mm: float, variants: np.ndarray
) -> tuple[dict[str, np.ndarray], float]:
    """FLAIR from the label map, the soft lesion map and the healthy tissue's bright variants (a multiplier)."""
    shape = labels.shape
    flair = _table(rng, FLAIR_RANGE)[labels] * (1.0 + rng.uniform(0.0, 0.1) * _smooth_noise(rng, shape, 16))
    flair *= 1.0 + rng.uniform(*FLAIR_TEXTURE_GAIN) * _smooth_noise(rng, shape, FLAIR_TEXTURE_CELLS)
    flair *= variants
    gain = rng.uniform(*MS_LESION_GAIN) * (1.0 + 0.1 * _smooth_noise(rng, shape, 24))
    flair *= 1.0 + lesion * (gain - 1.0)
    flair *= 1.0 + rng.uniform(*BIAS_RANGE) * _smooth_noise(rng, shape, 3)
    thickness = _blur_thickness(rng, [flair], spacing_mm)
    flair = _rician(rng, flair, rng.uniform(*NOISE_RANGE))
    scale = float(np.exp(rng.uniform(*SCALE_LOG_RANGE)))
    return {"flair": (np.power(flair, rng.uniform(*GAMMA_RANGE)) * scale).astype(np.float32)}, thickness


# -- one draw ---------------------------------------------------------------------------------------------------


def draw_training_case(kind: CaseKind, seed: int, spacing_mm: float) -> SyntheticCase:
    """One domain-randomised case on an RAS grid at `spacing_mm` (isotropic), from `seed` alone."""
    if kind not in ("stroke", "ms"):
        raise ValueError(f"kind must be stroke or ms, got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.8 <= spacing_mm <= 3.0:
        raise ValueError(f"spacing_mm must be in [0.8, 3], got {spacing_mm!r}")
    lesion_rng, space_rng, contrast_rng, strip_rng, fold_rng, slice_rng, shine_rng, variant_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(8)
    )
    template = template_labels()
    canvas = _stroke_lesions(lesion_rng, template) if kind == "stroke" else _ms_lesions(lesion_rng, template)
    affine, shape = box_grid(spacing_mm)  # the template's box, RAS, at the output spacing
    coords = _template_coordinates(space_rng, affine, shape)
    labels = ndimage.map_coordinates(template.labels, coords, order=0, mode="constant", cval=AIR).reshape(shape)
    soft = _lesion_on_grid(canvas, coords, shape, float(lesion_rng.uniform(0.4, 1.0)))
    cerebellum = _in_cerebellum(coords, shape)
    if kind == "stroke":
        shine = _shine_through(shine_rng, template, coords, shape, soft)
        labels = _fold_cortex(fold_rng, labels, np.maximum(soft, shine.soft), spacing_mm, cerebellum)
        variants = _normal_variants(variant_rng, coords, labels, cerebellum)
        images, thickness = _render_stroke(contrast_rng, labels, soft, spacing_mm, shine, variants)
    else:
        labels = _fold_cortex(fold_rng, labels, soft, spacing_mm, cerebellum)
        variants = _flair_variants(variant_rng, coords, labels, spacing_mm)
        images, thickness = _render_flair(contrast_rng, labels, soft, spacing_mm, variants)
    brain = np.isin(labels, INTRACRANIAL)
    skull_stripped = bool(strip_rng.random() < SKULL_STRIP_PROBABILITY)
    if skull_stripped:
        kept = _perturbed(brain, strip_rng)
        for image in images.values():
            image[~kept] = 0.0
    mask = soft >= 0.5
    if strip_rng.random() < SLAB_PROBABILITY:
        slab = _slab(brain, strip_rng.uniform(*SLAB_MM) / spacing_mm, strip_rng)
        images = {key: np.ascontiguousarray(image[:, :, slab]) for key, image in images.items()}
        mask, brain = mask[:, :, slab], brain[:, :, slab]
        coords = coords.reshape(3, *shape)[:, :, :, slab].reshape(3, -1)
        affine = affine.copy()
        affine[2, 3] += slab.start * spacing_mm
    _slice_gain(slice_rng, images, [key for key in images if key != "adc"])
    lesion_labels, lesions = _ground_truth(mask, coords, affine, "infarct" if kind == "stroke" else "ms")
    site = SiteProfile(name=f"randomized-{seed}", in_plane_mm=spacing_mm, slice_thickness_mm=round(thickness, 2),
                       slice_spacing_mm=max(round(thickness, 2), spacing_mm))
    return SyntheticCase(
        case_id=f"{kind}-randomized-{seed}", kind=kind, seed=seed, geometry="axial", affine=affine, images=images,
        lesion_labels=lesion_labels, lesions=lesions, site=site, skull_stripped=skull_stripped,
        slice_thickness_mm=round(thickness, 2), brain_mask=brain.astype(np.uint8), anatomy_source="mni152-randomized",
    )


def _lesion_on_grid(canvas: _LesionCanvas, coords: np.ndarray, shape: tuple[int, int, int], edge_mm: float) -> np.ndarray:
    """The soft lesion map (edges blurred by `edge_mm`) on the output grid; only the output voxels that land in the
    lesions' box are interpolated."""
    soft = np.zeros(int(np.prod(shape)), dtype=np.float32)
    painted = np.argwhere(canvas.labels > 0)
    if len(painted):
        low = np.maximum(painted.min(0) - 4, 0)
        high = np.minimum(painted.max(0) + 5, canvas.labels.shape)
        box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
        local_soft = ndimage.gaussian_filter((canvas.labels[box] > 0).astype(np.float32), edge_mm)
        inside = np.all((coords >= low[:, None]) & (coords <= (high - 1)[:, None]), axis=0)
        local = coords[:, inside] - low[:, None].astype(np.float32)
        soft[inside] = ndimage.map_coordinates(local_soft, local, order=1, mode="constant")
    return soft.reshape(shape)


def _slice_gain(rng: np.random.Generator, images: dict[str, np.ndarray], weighted: list[str]) -> None:
    """A gain per axial slice on the weighted images: slice-to-slice fluctuation, and brighter first or last slices
    of a slab (the healthy Philips brain's lowest slices). Every b-value alike, so the ADC the scanner computed
    stays as it was: a bright slice with a normal ADC is no infarct."""
    slices = images[weighted[0]].shape[2]
    gain = 1.0 + rng.normal(0.0, rng.uniform(*SLICE_GAIN_JITTER), slices)
    if rng.random() < EDGE_SLICE_PROBABILITY:
        count = int(rng.integers(EDGE_SLICES[0], EDGE_SLICES[1] + 1))
        ends = [slice(0, count), slice(slices - count, slices)]
        for end in ends if rng.random() < 0.3 else [ends[int(rng.integers(2))]]:
            gain[end] *= rng.uniform(*EDGE_SLICE_GAIN)
    for key in weighted:
        images[key] *= np.clip(gain, 0.5, None).astype(np.float32)[None, None, :]


def _perturbed(brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A skull-stripping mask as tools make them: the brain, a voxel tighter or looser here and there."""
    change = int(rng.integers(-1, 2))
    if change < 0:
        return ndimage.binary_erosion(brain)
    if change > 0:
        return ndimage.binary_dilation(brain)
    return brain


def _slab(brain: np.ndarray, slices: float, rng: np.random.Generator) -> slice:
    count = max(8, int(round(slices)))
    occupied = np.flatnonzero(brain.any(axis=(0, 1)))
    if len(occupied) == 0 or count >= brain.shape[2]:
        return slice(0, brain.shape[2])
    low = max(0, int(occupied[0]))
    high = max(low, min(brain.shape[2] - count, int(occupied[-1]) - count // 2))
    start = int(rng.integers(low, high + 1))
    return slice(start, start + count)


def _ground_truth(
    mask: np.ndarray, coords: np.ndarray, affine: np.ndarray, kind: str
) -> tuple[np.ndarray, list[GroundTruthLesion]]:
    """Connected lesions 1…n, each with its side read from where its voxels lie in the (symmetric) template:
    the template's x < 0 is the patient's left, whatever rotation the draw applied."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = voxel_volume_ml(affine)
    flat = labels.reshape(-1)
    template_x = coords[0] + BOX_ORIGIN_MM[0]
    lesions = []
    for label in range(1, count + 1):
        members = np.flatnonzero(flat == label)
        voxels = np.array(np.unravel_index(members, labels.shape))
        centroid = affine[:3, :3] @ voxels.mean(1) + affine[:3, 3]
        lesions.append(GroundTruthLesion(
            label=label, kind=kind,  # type: ignore[arg-type]
            side="left" if float(template_x[members].mean()) < 0 else "right",
            centroid_ras_mm=tuple(round(float(c), 3) for c in centroid),  # type: ignore[arg-type]
            volume_ml=round(len(members) * voxel_ml, 6),
        ))
    return labels.astype(np.int16), lesions


__all__ = ["TISSUE_LABELS", "TemplateLabels", "draw_training_case", "template_labels"]
