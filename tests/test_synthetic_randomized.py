"""The domain-randomised training generator: shapes from the libraries, each transform's range, DWI/ADC physics,
laterality in the ground truth, determinism; and the stream and patch sampler that feed it to training."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import require
from training.synthetic import randomized as rz
from training.synthetic.anatomy import BOX_ORIGIN_MM, box_grid, shared_data_dir
from training.synthetic.shapes import ShapeLibrary, load_shape, shape_paths

SHARED = shared_data_dir()


@pytest.fixture(scope="module", autouse=True)
def _shared_data() -> None:
    require(SHARED / "nifti" / "templates", SHARED / "nifti" / "soop_lesions", SHARED / "nifti" / "ms_lesion_shapes")


def _plain(shape: tuple[int, ...]) -> tuple:
    """No shine-through and no normal variants: the renderer's physics alone."""
    return rz._ShineThrough.none(shape), rz._NormalVariants.none(shape)


@pytest.fixture(scope="module")
def strokes() -> list:
    return [rz.draw_training_case("stroke", seed, 2.0) for seed in range(4)]


@pytest.mark.parametrize("library, count", [(ShapeLibrary.STROKE, 1448), (ShapeLibrary.MS, 27)])
def test_library_masks_land_on_the_template_at_their_own_world_coordinates(library, count) -> None:
    paths = shape_paths(library)
    assert len(paths) == count
    shape = load_shape(library, 3)
    image = nib.load(paths[3])
    voxels = np.argwhere(np.asarray(image.dataobj) > 0)
    assert shape.mask.sum() == len(voxels)  # nothing lost or duplicated by the move
    world = nib.affines.apply_affine(image.affine, voxels)
    on_template = np.argwhere(shape.mask) + shape.origin
    template_world = on_template + rz.BOX_ORIGIN_MM  # the template grid is 1 mm, axes along RAS
    assert np.array_equal(np.sort(world.round().astype(int), axis=0), np.sort(template_world.astype(int), axis=0))
    labels = rz.template_labels().labels[tuple(on_template.T)]
    assert np.isin(labels, rz.INTRACRANIAL).mean() > 0.8  # real lesions sit in the template's brain


def test_mirroring_moves_a_shape_to_the_other_hemisphere() -> None:
    shape = load_shape(ShapeLibrary.STROKE, 10)
    mask, origin = rz._mirror(shape, rz.template_labels().shape)
    x = (np.argwhere(shape.mask)[:, 0] + shape.origin[0]).mean() + rz.BOX_ORIGIN_MM[0]
    mirrored = (np.argwhere(mask)[:, 0] + origin[0]).mean() + rz.BOX_ORIGIN_MM[0]
    assert mirrored == pytest.approx(-x)


def test_same_seed_same_volume_other_seed_differs(strokes) -> None:
    again = rz.draw_training_case("stroke", 1, 2.0)
    for key, image in strokes[1].images.items():
        assert np.array_equal(image, again.images[key])
    assert np.array_equal(strokes[1].lesion_labels, again.lesion_labels)
    assert not np.array_equal(strokes[0].images["adc"].shape, strokes[1].images["adc"].shape) or \
        not np.array_equal(strokes[0].images["adc"], strokes[1].images["adc"])


def test_grid_units_and_ranges(strokes) -> None:
    for case in strokes:
        assert np.allclose(np.diag(case.affine)[:3], 2.0) and np.allclose(case.affine[:3, :3], np.diag([2.0] * 3))
        adc = case.images["adc"]
        assert adc.min() >= 0 and adc.max() <= 5000
        brain = case.brain_mask.astype(bool) & (adc > 0)
        assert 550 < np.median(adc[brain]) < 1300  # µm²/s: parenchyma dominates, CSF raises the median a little
        assert rz.THICKNESS_MM[0] <= case.slice_thickness_mm <= rz.THICKNESS_MM[1]
        if case.skull_stripped:
            outside = case.images["dwi_b1000"][case.brain_mask == 0]
            assert (outside > 0).mean() < 0.05  # at most the one-voxel dilation of a loose stripping mask
    decisions = [np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3]).random() for seed in range(200)]
    assert 0.3 < np.mean(np.array(decisions) < rz.SKULL_STRIP_PROBABILITY) < 0.5  # the stripping draw's own stream


def test_deformation_stays_within_its_ranges() -> None:
    affine, shape = box_grid(2.0)
    for seed in range(3):
        coords = rz._template_coordinates(np.random.default_rng(seed), affine, shape)
        centre_index = np.ravel_multi_index(tuple(n // 2 for n in shape), shape)
        centre_mm = coords[:, centre_index] + rz.BOX_ORIGIN_MM
        expected = affine[:3, :3] @ np.array([n // 2 for n in shape]) + affine[:3, 3]
        # the grid centre moves by at most the shift, the elastic field (3 σ) and the rotation of ~1 mm offset
        assert np.all(np.abs(centre_mm - expected) < rz.SHIFT_MM + 3 * rz.ELASTIC_MM + 3.0)
        step = coords.reshape(3, *shape)[:, 1:, :, :] - coords.reshape(3, *shape)[:, :-1, :, :]
        length = np.linalg.norm(step, axis=0).mean() / 2.0  # template mm per output mm along x
        assert 1 / rz.SCALE_RANGE[1] - 0.05 < length < 1 / rz.SCALE_RANGE[0] + 0.05


def test_dwi_is_bright_where_the_adc_is_low_and_only_there() -> None:
    """All white matter; the left half is infarct. The lesion's ADC is the drawn fraction of the tissue's, and its
    DWI is brighter by what S0 gain and exp(−b·ΔADC) predict."""
    labels = np.full((32, 32, 16), rz.WM, dtype=np.int8)
    lesion = np.zeros(labels.shape, dtype=np.float32)
    lesion[:16] = 1.0
    for seed in range(5):
        images, _ = rz._render_stroke(np.random.default_rng(seed), labels, lesion, 2.0, *_plain(labels.shape))
        adc, dwi = images["adc"], images["dwi_b1000"]
        inner = (slice(4, 12), slice(4, 28), slice(4, 12)), (slice(20, 28), slice(4, 28), slice(4, 12))
        lesion_adc, healthy_adc = np.median(adc[inner[0]]), np.median(adc[inner[1]])
        assert 500 < healthy_adc < 950
        assert 0.3 < lesion_adc / healthy_adc < 0.95
        assert np.median(dwi[inner[0]]) > 1.1 * np.median(dwi[inner[1]])


def test_parenchymal_adc_falls_with_b_as_kurtosis_makes_it(monkeypatch) -> None:
    """The same draw at b 1500 and b 1000: white matter's measured ADC is 90–96 % as high (a b-1500 scanner's
    normal tissue looks darker on ADC, as the Canon brain of the shared data does)."""
    labels = np.full((32, 32, 16), rz.WM, dtype=np.int8)
    lesion = np.zeros(labels.shape, dtype=np.float32)
    medians = {}
    for b_value in (1000.0, 1500.0):
        monkeypatch.setattr(rz, "B_VALUE_RANGE", (b_value, b_value))
        images, _ = rz._render_stroke(np.random.default_rng(3), labels, lesion, 2.0, *_plain(labels.shape))
        medians[b_value] = np.median(images["adc"][4:28, 4:28, 4:12])
    assert 0.88 < medians[1500.0] / medians[1000.0] < 0.97


def test_coil_gain_brightens_the_periphery_and_never_darkens() -> None:
    """An array coil's periphery is brighter than the head's centre on average, and no gain is below 1."""
    from scipy import ndimage

    labels = np.zeros((60, 60, 50), dtype=np.int8)
    grid = np.indices(labels.shape)
    labels[((grid - np.array([30, 30, 25])[:, None, None, None]) ** 2).sum(0) < 24**2] = rz.WM
    inside_mm = ndimage.distance_transform_edt(labels != rz.AIR, sampling=2.0)
    ratios = []
    for seed in range(8):
        gain = rz._coil_and_pileup(np.random.default_rng(seed), labels, 2.0)
        assert gain.min() >= 1.0
        ratios.append(gain[(inside_mm > 0) & (inside_mm < 8)].mean() / gain[inside_mm > 30].mean())
    assert np.mean(ratios) > 1.15


def test_t2_bright_mimics_keep_a_normal_adc() -> None:
    labels = np.full((40, 40, 20), rz.WM, dtype=np.int8)
    s0 = np.ones(labels.shape, dtype=np.float32)
    adc = np.full(labels.shape, 700.0, dtype=np.float32)
    for seed in range(20):
        rz._diffusion_mimics(np.random.default_rng(seed), labels, np.zeros(labels.shape, np.float32), s0, adc, 2.0)
    assert s0.max() > 1.3  # some tissue became T2-bright …
    assert adc.min() >= 700.0  # … and none of it got a low ADC


def test_bright_cortex_band_is_bilateral_toward_one_end_with_a_near_normal_adc() -> None:
    """The hard negative: only parenchyma changes (the cortex and a random share of the tissue beneath), brighter at
    one end of the brain (the vertex or the skull base) than at the other, on both sides alike, and its ADC stays
    within CORTEX_BAND_ADC_FRACTION of normal (an infarct's is lower)."""
    labels = np.full((40, 40, 40), rz.AIR, dtype=np.int8)
    labels[4:36, 4:36, 4:36] = rz.GM
    labels[10:30, 10:30, 10:30] = rz.WM
    lesion = np.zeros(labels.shape, dtype=np.float32)
    ends = set()
    for seed in range(16):
        s0 = np.ones(labels.shape, dtype=np.float32)
        adc = np.full(labels.shape, 800.0, dtype=np.float32)
        rz._bright_cortex_band(np.random.default_rng(seed), labels, lesion, s0, adc, 2.0)
        assert np.all(s0[labels == rz.AIR] == 1.0) and np.all(adc[labels == rz.AIR] == 800.0)
        if s0.max() == 1.0:
            continue
        top, bottom = s0[4:36, 4:36, 32:36].mean(), s0[4:36, 4:36, 4:8].mean()
        assert abs(top - bottom) > 0.05
        ends.add("vertex" if top > bottom else "base")
        left, right = s0[4:20].mean(), s0[20:36].mean()
        assert abs(left - right) < 0.1 * (s0.max() - 1.0) + 0.02
        fraction = adc[labels != rz.AIR] / 800.0
        assert fraction.min() >= 1.0 - (1.0 - rz.CORTEX_BAND_ADC_FRACTION[0]) * 1.25 - 1e-4
        assert fraction.max() <= 1.0 + (rz.CORTEX_BAND_ADC_FRACTION[1] - 1.0) * 1.25 + 1e-4
    assert ends == {"vertex", "base"}


def test_folded_cortex_has_sulci_from_the_surface_lined_by_grey_matter() -> None:
    """Sulci (CSF) cut into the parenchyma only within their depth range and open onto the outer CSF; grey matter
    lines them; deep grey matter and lesions keep their labels; some draws stay smooth (FOLD_PROBABILITY)."""
    from scipy import ndimage

    shape = (64, 64, 64)
    radius = np.sqrt(((np.indices(shape) - 31.5) ** 2).sum(0))
    labels = np.full(shape, rz.AIR, dtype=np.int8)
    labels[radius < 31] = rz.CSF
    labels[radius < 29] = rz.GM
    labels[radius < 22] = rz.WM  # a thick band, as averaging made the template's
    labels[radius < 6] = rz.DEEP_GM
    lesion = np.zeros(shape, dtype=np.float32)
    lesion[40:48, 28:36, 28:36] = 1.0  # 8-24 mm inside: in the shell
    depth_mm = (29.0 - radius) * 2.0  # below the parenchyma's surface, 2 mm voxels
    folds = 0
    for seed in range(8):
        folded = rz._fold_cortex(np.random.default_rng(seed), labels, lesion, 2.0, np.zeros(shape, dtype=bool))
        assert np.array_equal(folded[labels == rz.DEEP_GM], labels[labels == rz.DEEP_GM])
        assert np.array_equal(folded[lesion > 0], labels[lesion > 0])
        assert np.array_equal(folded[~np.isin(labels, rz.PARENCHYMA)], labels[~np.isin(labels, rz.PARENCHYMA)])
        sulci = (folded == rz.CSF) & (labels != rz.CSF)
        if not sulci.any():
            assert np.array_equal(folded, labels)
            continue
        folds += 1
        assert depth_mm[sulci].max() < rz.SULCUS_DEPTH_MM[1] * 1.4 + 2.0
        opening, _ = ndimage.label((folded == rz.CSF) | (folded == rz.AIR), structure=np.ones((3, 3, 3)))
        assert np.mean(opening[sulci] == opening[0, 0, 0]) > 0.9  # reach the outside, not cysts
        # the voxels next to a sulcus: within the thinnest ribbon (CORTEX_THICKNESS_MM[0], one 2 mm voxel)
        lined = ndimage.binary_dilation(sulci) & ~sulci & np.isin(labels, (rz.WM, rz.GM))
        assert np.mean(folded[lined] == rz.GM) > 0.6
        assert ((folded == rz.WM) & (labels == rz.GM)).sum() > 0.05 * (labels == rz.GM).sum()  # gyral white cores
    assert 4 <= folds < 8


def _template_points(x_mm: np.ndarray, y_mm: np.ndarray, z_mm: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(3, N) template voxel coordinates of a grid given in template mm, and the grid's shape."""
    grid = np.stack(np.meshgrid(x_mm, y_mm, z_mm, indexing="ij")).astype(np.float32)
    return (grid.reshape(3, -1) - BOX_ORIGIN_MM[:, None].astype(np.float32)), grid.shape[1:]


def test_cerebellum_is_read_from_template_positions() -> None:
    """The posterior fossa behind the brainstem is cerebellum; the temporal lobes beside it and the cerebrum above it
    are not."""
    points, shape = _template_points(np.array([20.0, -20.0]), np.array([-60.0, -10.0]), np.array([-35.0, 10.0]))
    inside = rz._in_cerebellum(points, shape)  # type: ignore[arg-type]
    assert inside[:, 0, 0].all()  # both sides, behind and below
    assert not inside[:, 1, :].any()  # temporal lobes: low but in front
    assert not inside[:, :, 1].any()  # occipital lobes: behind but high


def test_cerebellum_folds_finer_than_the_cerebrum() -> None:
    """On the same smooth shell, the half marked cerebellum gets sulci (folia) closer together: its shell lies nearer
    to a sulcus in every folded draw (on a 2 mm grid, folia 4–7 mm apart sit near the grid's limit)."""
    from scipy import ndimage

    shape = (64, 64, 64)
    radius = np.sqrt(((np.indices(shape) - 31.5) ** 2).sum(0))
    labels = np.full(shape, rz.AIR, dtype=np.int8)
    labels[radius < 31] = rz.CSF
    labels[radius < 29] = rz.GM
    labels[radius < 22] = rz.WM
    cerebellum = np.zeros(shape, dtype=bool)
    cerebellum[:, :, :32] = True
    shell = (radius < 29) & (radius > 24)
    ratios = []
    for seed in range(8):
        folded = rz._fold_cortex(np.random.default_rng(seed), labels, np.zeros(shape, np.float32), 2.0, cerebellum)
        sulci = (folded == rz.CSF) & (labels != rz.CSF)
        if not sulci.any():
            continue
        to_sulcus = ndimage.distance_transform_edt(~sulci, sampling=2.0)
        gyri, folia = (to_sulcus[shell & ~sulci & part].mean() for part in (~cerebellum, cerebellum))
        assert folia < gyri
        ratios.append(gyri / folia)
    assert len(ratios) >= 4
    assert np.median(ratios) > 1.1


def test_shine_through_is_bright_on_dwi_with_a_normal_or_raised_adc() -> None:
    """Where shine-through sits, DWI is brighter by about the drawn gain while the ADC is normal or raised (never
    an infarct's); the shapes come from the stroke library, never overlap the acute lesions, and most draws have
    none."""
    labels = np.full((32, 32, 16), rz.WM, dtype=np.int8)
    shine_map = np.zeros(labels.shape, dtype=np.float32)
    shine_map[:16] = 1.0
    inner = (slice(4, 12), slice(4, 28), slice(4, 12)), (slice(20, 28), slice(4, 28), slice(4, 12))
    for seed, (gain, fraction) in enumerate([(1.2, 0.95), (2.0, 1.3), (3.0, 1.6)]):
        shine = rz._ShineThrough(shine_map, gain, fraction)
        images, _ = rz._render_stroke(np.random.default_rng(seed), labels, np.zeros_like(shine_map), 2.0, shine,
                                      rz._NormalVariants.none(labels.shape))
        adc, dwi = images["adc"], images["dwi_b1000"]
        adc_ratio = np.median(adc[inner[0]]) / np.median(adc[inner[1]])
        assert 0.88 < adc_ratio < 1.8 and abs(adc_ratio - fraction) < 0.15 * fraction
        assert np.median(dwi[inner[0]]) > 1.1 * np.median(dwi[inner[1]])

    template = rz.template_labels()
    _, box_shape = box_grid(2.0)
    index = np.indices(box_shape, dtype=np.float32).reshape(3, -1) * 2.0  # template voxels of the 2 mm box grid
    lesion = np.zeros(box_shape, dtype=np.float32)
    lesion[:, :, 20:40] = 1.0
    drawn = [rz._shine_through(np.random.default_rng(seed), template, index, box_shape, lesion) for seed in range(12)]
    present = [shine for shine in drawn if shine.soft.any()]
    assert 1 <= len(present) <= 8
    for shine in present:
        assert not shine.soft[:, :, 20:40].any()
        assert rz.SHINE_THROUGH_DWI_GAIN[0] <= shine.dwi_gain <= rz.SHINE_THROUGH_DWI_GAIN[1]
        assert rz.SHINE_THROUGH_ADC_FRACTION[0] <= shine.adc_fraction <= rz.SHINE_THROUGH_ADC_FRACTION[1]
        assert np.isin(template.labels[tuple(index[:, shine.soft.reshape(-1) > 0.5].astype(int))],
                       rz.PARENCHYMA).mean() > 0.9


def test_normal_variants_are_left_right_symmetric_anatomy_within_their_ranges() -> None:
    """The corticospinal tracts and the cerebellum: darker on ADC (never below the ranges' floors), mirror-symmetric
    left to right, along the tract's path and nowhere far from both."""
    axes = (np.arange(-60.0, 60.1, 2.0), np.arange(-90.0, 40.1, 2.0), np.arange(-50.0, 60.1, 2.0))
    points, shape = _template_points(*axes)
    labels = np.full(shape, rz.WM, dtype=np.int8)
    cerebellum = rz._in_cerebellum(points, shape)  # type: ignore[arg-type]
    floor = rz.CORTICOSPINAL_ADC_FRACTION[0] * rz.CEREBELLUM_ADC_FRACTION[0]

    def nearest(position_mm: tuple[float, ...]) -> tuple[int, ...]:
        return tuple(int(np.argmin(np.abs(axis - value))) for axis, value in zip(axes, position_mm))

    tract, far = nearest(rz.CORTICOSPINAL_MNI_MM[2]), nearest((58.0, 38.0, 58.0))
    kinds = set()
    for seed in range(10):
        variants = rz._normal_variants(np.random.default_rng(seed), points, labels, cerebellum)
        adc, s0 = variants.adc_fraction, variants.s0_gain
        assert np.allclose(adc, adc[::-1], atol=1e-4) and np.allclose(s0, s0[::-1], atol=1e-4)
        assert adc.min() >= floor - 1e-4 and adc.max() <= rz.CEREBELLUM_ADC_FRACTION[1] + 1e-4
        assert s0.min() >= 0.95 * 0.95 - 1e-4 and s0.max() <= 1.3 * 1.5 + 1e-4
        assert adc[far] == 1.0 and s0[far] == 1.0
        if adc[tract] < 0.99:
            kinds.add("tract")
        if np.median(adc[cerebellum]) < 0.99:
            kinds.add("cerebellum")
    assert kinds == {"tract", "cerebellum"}


def test_flair_variants_brighten_tracts_limbic_cortex_and_ventricle_caps_on_both_sides() -> None:
    """On the template's own labels: the FLAIR multiplier is 1 outside white matter, deep grey matter and the limbic
    cortex, never darkens, stays within the product of its ranges, is alike on both sides, and brightens the horn
    caps and the mesial temporal lobes in some draws."""
    from scipy import ndimage

    x = np.arange(-70.0, 70.1, 2.0)
    points, shape = _template_points(x, np.arange(-110.0, 70.1, 2.0), np.arange(-40.0, 70.1, 2.0))
    labels = ndimage.map_coordinates(rz.template_labels().labels, points, order=0).reshape(shape)
    white = np.isin(labels, (rz.WM, rz.DEEP_GM))
    cortex = labels == rz.GM
    limbic = rz._limbic_weight(points, shape) > 0.0
    tract = rz._corticospinal_weight(points, shape, rz.CORTICOSPINAL_RADIUS_MM[1]) > 0.01
    ventricle = labels == rz.VENTRICLE
    near_ventricle = ndimage.binary_dilation(ventricle, iterations=2) & white
    hippocampus = tuple(int(np.argmin(np.abs(axis - value))) for axis, value in zip(
        (x, np.arange(-110.0, 70.1, 2.0), np.arange(-40.0, 70.1, 2.0)), rz.LIMBIC_MNI_MM[0][0]))
    ceiling = (rz.CORTICOSPINAL_FLAIR_GAIN[1] * rz.LIMBIC_FLAIR_GAIN[1] * rz.VENTRICLE_LINING_GAIN[1]
               * rz.HORN_CAP_GAIN[1])
    brightened, temporal = 0, 0
    for seed in range(12):
        gain = rz._flair_variants(np.random.default_rng(seed), points, labels, 2.0)
        assert np.all(gain[~(white | (cortex & limbic))] == 1.0)
        assert gain.min() >= 1.0 - 1e-6 and gain.max() <= ceiling + 1e-4
        left, right = gain[: len(x) // 2] - 1.0, gain[len(x) // 2 + 1:] - 1.0
        assert abs(left.sum() - right.sum()) <= 0.15 * max(left.sum(), right.sum()) + 1e-3
        if gain[near_ventricle & ~limbic & ~tract].max() > 1.05:
            brightened += 1
        mirrored = (len(x) - 1 - hippocampus[0], *hippocampus[1:])
        assert gain[hippocampus] == pytest.approx(gain[mirrored], abs=1e-4)
        if gain[hippocampus] > 1.0:
            temporal += 1
    # each variant is drawn in about half the draws: lining or caps in about 3 of 4, the limbic cortex in 1 of 2
    assert 4 <= brightened <= 11 and 2 <= temporal <= 10


def test_slice_gain_brightens_edge_slices_of_the_weighted_images_alike_and_leaves_the_adc() -> None:
    """One gain per axial slice, the same on b0 and DWI (so the scanner's ADC holds), never on the ADC; the first or
    last slices of a slab are brighter in about EDGE_SLICE_PROBABILITY of the draws."""
    edges = 0
    for seed in range(20):
        images = {key: np.full((6, 6, 30), 100.0, dtype=np.float32) for key in ("dwi_b0", "dwi_b1000", "adc")}
        rz._slice_gain(np.random.default_rng(seed), images, ["dwi_b0", "dwi_b1000"])
        assert np.all(images["adc"] == 100.0)
        assert np.allclose(images["dwi_b0"], images["dwi_b1000"])
        gain = images["dwi_b0"][0, 0] / 100.0
        assert np.allclose(images["dwi_b0"], gain[None, None, :] * 100.0)  # constant within each slice
        middle = np.median(gain[5:25])
        assert np.all(np.abs(gain[5:25] - 1.0) < 0.4)
        if max(gain[0], gain[-1]) > middle * rz.EDGE_SLICE_GAIN[0] * 0.95:
            edges += 1
    assert 4 <= edges <= 16


def test_laterality_of_every_lesion_follows_the_template_side(strokes) -> None:
    """Each ground-truth lesion's side is where it lies in the symmetric template; on the output grid (rotated ≤ 12°,
    shifted ≤ 8 mm) a lesion well off the midline lies on that side of the head's centre."""
    checked = 0
    for case in [*strokes, *(rz.draw_training_case("stroke", seed, 2.0) for seed in (11, 12))]:
        brain = np.argwhere(case.brain_mask > 0)
        mid_x = (case.affine[:3, :3] @ brain.mean(0) + case.affine[:3, 3])[0]
        for lesion in case.lesions:
            offset = lesion.centroid_ras_mm[0] - mid_x
            if abs(offset) > 25.0:
                assert (offset < 0) == (lesion.side == "left"), lesion
                checked += 1
    assert checked >= 3


def test_ms_draws_flair_with_bright_lesions() -> None:
    case = rz.draw_training_case("ms", 3, 1.5)
    assert set(case.images) == {"flair"} and case.mask.any()
    flair = case.images["flair"]
    brain = (case.brain_mask > 0) & (case.mask == 0)
    assert np.median(flair[case.mask > 0]) > np.median(flair[brain])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        rz.draw_training_case("tumour", 1, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        rz.draw_training_case("stroke", -1, 2.0)
    with pytest.raises(ValueError, match="spacing"):
        rz.draw_training_case("stroke", 1, 0.2)
    with pytest.raises(ValueError, match="outside"):
        load_shape(ShapeLibrary.MS, 27)
