"""Synthetic studies: determinism, lesion side/size/contrast, geometry, site shift, NIfTI output."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from training.synthetic import SiteProfile, generate_case, generate_site, write_nifti_case
from training.synthetic.anatomy import build_anatomy

GEOMETRIES = ("axial", "flipped", "oblique", "sagittal")


def voxel_x(case) -> np.ndarray:
    """RAS x (mm) of every voxel."""
    index = np.indices(case.lesion_labels.shape).reshape(3, -1)
    return (case.affine[0, :3] @ index + case.affine[0, 3]).reshape(case.lesion_labels.shape)


@pytest.fixture(scope="module")
def stroke_cases() -> dict[str, object]:
    """The same medium stroke seen through every geometry (the head does not move)."""
    return {g: generate_case("stroke", 11, geometry=g, size="medium", pattern="single") for g in GEOMETRIES}


@pytest.fixture(scope="module")
def ms_case():
    return generate_case("ms", 5)


def test_same_seed_identical_different_seed_differs() -> None:
    a = generate_case("stroke", 7, size="small")
    b = generate_case("stroke", 7, size="small")
    c = generate_case("stroke", 8, size="small")
    assert a.images.keys() == b.images.keys()
    for key in a.images:
        assert a.images[key].tobytes() == b.images[key].tobytes(), key
    assert a.lesion_labels.tobytes() == b.lesion_labels.tobytes()
    assert a.lesions == b.lesions
    assert a.images["dwi_b1000"].tobytes() != c.images["dwi_b1000"].tobytes()
    assert generate_site(3) == generate_site(3) != generate_site(4)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_lesion_on_recorded_side(stroke_cases, geometry: str) -> None:
    case = stroke_cases[geometry]
    x = voxel_x(case)
    assert case.lesions
    for lesion in case.lesions:
        assert (lesion.centroid_ras_mm[0] < 0) == (lesion.side == "left")
        voxels_x = x[case.lesion_labels == lesion.label]
        assert np.all(np.sign(voxels_x) == (-1 if lesion.side == "left" else 1)), "lesion crosses the midline"
    sides = {l.side for c in stroke_cases.values() for l in c.lesions}
    assert len(sides) == 1, "the head moved between geometries"


def test_geometries_change_only_the_grid(stroke_cases) -> None:
    axial, flipped = stroke_cases["axial"], stroke_cases["flipped"]
    assert axial.affine[1, 1] > 0 > flipped.affine[1, 1]
    sagittal = stroke_cases["sagittal"].affine[:3, :3]
    assert abs(sagittal[0, 2]) == pytest.approx(2.0) and sagittal[0, 0] == 0  # slices along x
    tilt = np.degrees(np.arccos(abs(stroke_cases["oblique"].affine[2, 2]) / 2.0))
    assert 15.0 < tilt < 30.0
    volumes = [sum(l.volume_ml for l in c.lesions) for c in stroke_cases.values()]
    assert max(volumes) / min(volumes) < 1.15, volumes


@pytest.mark.parametrize("size", ["small", "large"])
def test_volume_in_size_class(stroke_cases, size: str) -> None:
    bounds = {"small": (0.0, 5.0), "medium": (5.0, 70.0), "large": (70.0, 1e9)}
    cases = [generate_case("stroke", 21, size=size, pattern="embolic" if size == "small" else "single")]
    if size == "small":
        cases.append(stroke_cases["axial"])  # medium, from the fixture
        bounds_for = [bounds["small"], bounds["medium"]]
    else:
        bounds_for = [bounds["large"]]
    for case, (low, high) in zip(cases, bounds_for):
        total = sum(l.volume_ml for l in case.lesions)
        voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000
        assert total == pytest.approx(case.mask.sum() * voxel_ml, rel=1e-4)
        assert low < total < high, (case.case_id, total)
    if size == "small":
        assert len(cases[0].lesions) >= 2  # embolic: a cluster
        assert len({l.location for l in cases[0].lesions}) == 1  # in one territory


def test_stroke_contrast_dwi_bright_adc_low(stroke_cases) -> None:
    case = stroke_cases["axial"]
    lesion = case.mask > 0
    brain = (case.brain_mask > 0) & ~lesion
    side = -1 if case.lesions[0].side == "left" else 1
    contralateral = brain & (np.sign(voxel_x(case)) == -side)
    dwi, adc = case.images["dwi_b1000"], case.images["adc"]
    assert dwi[lesion].mean() > 1.3 * dwi[contralateral].mean()
    assert 600 < np.median(adc[brain]) < 1000
    assert adc[lesion].mean() < 0.75 * np.median(adc[brain])
    assert case.images["flair"][lesion].mean() > 1.1 * np.median(case.images["flair"][brain])


def test_whole_head_has_skull_and_scalp_skull_stripped_has_zero_background(stroke_cases) -> None:
    head = stroke_cases["axial"]
    outside = head.brain_mask == 0
    flair = head.images["flair"]
    bright_outside = (flair[outside] > 0.5 * np.median(flair[head.brain_mask > 0])).sum()
    voxel_ml = abs(np.linalg.det(head.affine[:3, :3])) / 1000
    assert bright_outside * voxel_ml > 100, "no scalp signal outside the brain"
    stripped = generate_case("stroke", 11, size="medium", pattern="single", skull_stripped=True)
    for key, image in stripped.images.items():
        assert np.all(image[stripped.brain_mask == 0] == 0), key
        assert np.all(image[stripped.brain_mask > 0] == head.images[key][stripped.brain_mask > 0]), key


def test_slice_gap_site() -> None:
    site = SiteProfile(name="gap", in_plane_mm=2.0, slice_thickness_mm=5.0, slice_spacing_mm=6.0, bias_strength=0.2)
    case = generate_case("stroke", 4, site=site, size="medium")
    assert case.spacing_mm == pytest.approx((2.0, 2.0, 6.0))
    assert case.slice_thickness_mm == 5.0 and case.site == site
    assert 20 <= case.lesion_labels.shape[2] <= 40
    total = sum(l.volume_ml for l in case.lesions)
    assert 5 < total < 70


def test_site_profiles_shift_intensity() -> None:
    site = generate_site(9)
    assert 0.5 <= site.in_plane_mm <= 2.0 and site.slice_spacing_mm >= site.slice_thickness_mm
    scaled = SiteProfile(name="bright", intensity_scale=2.0)
    a = generate_case("stroke", 2, size="small")
    b = generate_case("stroke", 2, size="small", site=scaled)
    brain = a.brain_mask > 0
    ratio = np.median(b.images["flair"][brain]) / np.median(a.images["flair"][brain])
    assert ratio == pytest.approx(2.0, rel=0.05)
    assert np.array_equal(a.images["adc"], b.images["adc"])  # ADC is quantitative: no site scale


def test_ms_lesions_bright_on_flair_and_periventricular_near_ventricles(ms_case) -> None:
    case = ms_case
    assert case.spacing_mm == pytest.approx((1.0, 1.0, 3.0))
    assert 3 <= len(case.lesions) <= 30
    lesion = case.mask > 0
    brain = (case.brain_mask > 0) & ~lesion
    flair = case.images["flair"]
    assert flair[lesion].mean() > 1.3 * np.median(flair[brain])
    anatomy = build_anatomy(np.random.default_rng(0), 1.0, source="auto")
    assert anatomy.source == case.anatomy_source
    distance = ndimage.distance_transform_edt(~anatomy.ventricles, sampling=anatomy.resolution_mm)
    locations = {l.location for l in case.lesions}
    assert locations <= {"periventricular", "juxtacortical"} and "periventricular" in locations
    for lesion in case.lesions:
        index = np.round((np.array(lesion.centroid_ras_mm) - anatomy.affine[:3, 3]) / anatomy.resolution_mm)
        d = distance[tuple(index.astype(int))]
        if lesion.location == "periventricular":
            assert d < 9.0, (lesion, d)


def test_procedural_anatomy_works_without_template() -> None:
    case = generate_case("stroke", 3, size="medium", anatomy="procedural")
    assert case.anatomy_source == "procedural"
    brain = (case.brain_mask > 0) & (case.mask == 0)
    assert 600 < np.median(case.images["adc"][brain]) < 1000
    assert case.lesions and all((l.centroid_ras_mm[0] < 0) == (l.side == "left") for l in case.lesions)


def test_nifti_written_with_case_affine(tmp_path, stroke_cases) -> None:
    case = stroke_cases["oblique"]
    paths = write_nifti_case(case, tmp_path / "case")
    assert {"dwi", "dwi_b0", "adc", "flair", "mask", "lesions"} <= paths.keys()
    for stem in ("dwi", "adc", "mask"):
        image = nib.load(paths[stem])
        assert np.allclose(image.affine, case.affine, atol=1e-4)
        assert np.allclose(image.header.get_qform(), case.affine, atol=1e-4)
    assert np.array_equal(np.asarray(nib.load(paths["adc"]).dataobj), case.images["adc"])
    assert np.array_equal(np.asarray(nib.load(paths["dwi"]).dataobj), case.images["dwi_b1000"])
    assert np.array_equal(np.asarray(nib.load(paths["mask"]).dataobj), case.mask)
    meta = json.loads(paths["lesions"].read_text())
    assert meta["seed"] == 11 and meta["geometry"] == "oblique" and meta["adc_unit"] == "1e-6 mm2/s"
    assert [l["side"] for l in meta["lesions"]] == [l.side for l in case.lesions]
    assert meta["site"]["slice_spacing_mm"] == case.site.slice_spacing_mm


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "tumour", "seed": 1}, "kind"),
        ({"kind": "stroke", "seed": -1}, "seed"),
        ({"kind": "stroke", "seed": 1, "geometry": "coronal"}, "geometry"),
        ({"kind": "stroke", "seed": 1, "size": "huge"}, "size"),
        ({"kind": "ms", "seed": 1, "size": "small"}, "stroke cases only"),
        ({"kind": "stroke", "seed": 1, "site": SiteProfile(slice_thickness_mm=5, slice_spacing_mm=4)}, "spacing"),
        ({"kind": "stroke", "seed": 1, "site": SiteProfile(noise_sigma=-1)}, "noise_sigma"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_case(**kwargs)


def test_synthetic_package_is_torch_free() -> None:
    code = "import sys, training.synthetic; bad = {'torch', 'monai'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_susceptibility_spots_are_bright_on_dwi_but_not_low_on_adc(stroke_cases) -> None:
    """A real scan's skull-base pile-up mimics an infarct on DWI only; ADC must stay normal there or a model
    trained on these phantoms learns to call artefacts strokes."""
    from training.synthetic.acquisition import SUSCEPTIBILITY_MM

    case = stroke_cases["axial"]
    index = np.indices(case.mask.shape).reshape(3, -1)
    world = (case.affine[:3, :3] @ index + case.affine[:3, 3:4]).T.reshape(*case.mask.shape, 3)
    brain = (case.brain_mask > 0) & (case.mask == 0) & (case.images["adc"] < 2000)  # parenchyma, no CSF
    near = np.zeros(case.mask.shape, bool)
    for point in SUSCEPTIBILITY_MM:
        near |= np.linalg.norm(world - point, axis=-1) < 8.0
    spots, rest = brain & near, brain & ~near
    assert spots.sum() > 20
    dwi, adc = case.images["dwi_b1000"], case.images["adc"]
    assert np.median(dwi[spots]) > 1.3 * np.median(dwi[rest])
    assert np.median(adc[spots]) > np.median(adc[rest])  # measured 1.19× (0.93× when b1000 alone piled up)


def test_dwi_mimics_brighten_dwi_without_lowering_adc_and_leave_the_rest_of_the_case_alone() -> None:
    """Hard negatives for the stroke model: healthy tissue that is bright on DWI (coil proximity, T2 shine-through)
    keeps a normal ADC; they draw from their own seed stream, so the lesions stay where they were."""
    plain = generate_case("stroke", 11, size="medium", pattern="single")
    mimics = generate_case("stroke", 11, size="medium", pattern="single", dwi_mimics=True)
    assert mimics.lesion_labels.tobytes() == plain.lesion_labels.tobytes() and mimics.lesions == plain.lesions
    again = generate_case("stroke", 11, size="medium", pattern="single", dwi_mimics=True)
    assert again.images["dwi_b1000"].tobytes() == mimics.images["dwi_b1000"].tobytes()
    tissue = (plain.brain_mask > 0) & (plain.mask == 0) & (plain.images["adc"] < 2000)
    brighter = tissue & (mimics.images["dwi_b1000"] > 1.3 * plain.images["dwi_b1000"])
    assert brighter.sum() > 200  # measured: thousands of voxels
    # ADC there is that of normal tissue (or raised), never the infarct's (< 620 µm²/s in the phantom).
    assert np.median(mimics.images["adc"][brighter]) >= 0.95 * np.median(plain.images["adc"][brighter])
    assert np.median(mimics.images["adc"][brighter]) > 650
    lesion = plain.mask > 0
    assert np.median(mimics.images["adc"][lesion]) < 650


def test_partial_coverage_keeps_a_slab_and_measures_lesions_on_it() -> None:
    whole = generate_case("stroke", 11, size="large", pattern="single")
    slab = generate_case("stroke", 11, size="large", pattern="single", coverage_mm=60.0)
    assert slab.images["dwi_b1000"].shape[:2] == whole.images["dwi_b1000"].shape[:2]
    assert slab.images["dwi_b1000"].shape[2] == 30  # 60 mm of 2 mm slices
    # The slab is a contiguous run of the full grid's slices, with its origin moved along the slice normal.
    start = int(round(np.linalg.solve(whole.affine[:3, :3], slab.affine[:3, 3] - whole.affine[:3, 3])[2]))
    assert np.array_equal(slab.images["dwi_b1000"], whole.images["dwi_b1000"][:, :, start : start + 30])
    assert np.array_equal(slab.mask, whole.mask[:, :, start : start + 30])
    voxel_ml = abs(np.linalg.det(slab.affine[:3, :3])) / 1000
    assert sum(lesion.volume_ml for lesion in slab.lesions) == pytest.approx((slab.mask > 0).sum() * voxel_ml)
    with pytest.raises(ValueError, match="coverage_mm"):
        generate_case("stroke", 11, coverage_mm=5.0)
