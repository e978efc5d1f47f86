"""Training datasets: the real ISLES'22 and MS cases, flat and CSV layouts, broken cases skipped, synthetic cases."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    ISLES_ADC,
    ISLES_CASE,
    ISLES_DWI,
    ISLES_MASK,
    MS_CASE,
    MS_FLAIR,
    MS_MASK,
    require,
)

from models.geometry import affine_spacing
from models.manifest import Task
from training.datasets import (
    CaseError,
    CaseFiles,
    SyntheticSpec,
    find_ms,
    load_case,
    load_cases,
    load_training_cases,
    open_dataset,
    read_csv_manifest,
    synthetic_cases,
)

STROKE, MS = Task.STROKE_DWI_ADC, Task.MS_FLAIR


@pytest.fixture(autouse=True)
def _shared_data() -> None:
    require(ISLES_DWI, ISLES_ADC, ISLES_MASK, MS_FLAIR, MS_MASK)


def _flat_isles(folder: Path, case: str = "sub-strokecase0001_ses-0001") -> Path:
    """The three real ISLES files linked into one folder under another case name."""
    folder.mkdir(parents=True, exist_ok=True)
    for source, kind in ((ISLES_DWI, "dwi"), (ISLES_ADC, "adc"), (ISLES_MASK, "msk")):
        (folder / f"{case}_{kind}.nii.gz").symlink_to(source)
    return folder


def test_real_isles_case_loads_with_adc_in_micrometre2_per_s() -> None:
    index = open_dataset(str(ISLES_CASE), "stroke-dwi-adc")
    assert index.task is STROKE and index.skipped == []
    (files,) = index.cases
    assert files.case_id == "sub-strokecase0001_ses-0001"
    assert list(files.channels) == ["dwi", "adc"] and files.mask == ISLES_MASK
    cases, skipped = load_cases(index)
    (case,) = cases
    assert skipped == [] and case.adc_unit_detected == "1e-3 mm2/s"
    assert [channel.name for channel in case.channels] == ["dwi", "adc"]
    raw_adc = nib.load(ISLES_ADC).get_fdata()
    np.testing.assert_allclose(case.channels[1].data, raw_adc * 1000, rtol=1e-6)
    assert case.channels[1].data.dtype == np.float32
    assert case.mask.dtype == np.uint8 and case.mask.shape == case.channels[0].data.shape
    assert int(case.mask.sum()) == int(np.count_nonzero(nib.load(ISLES_MASK).dataobj))


def test_real_ms_case_loads_and_coregistered_files_are_not_taken_for_flair() -> None:
    index = open_dataset(MS_CASE.parent, MS)
    (files,) = index.cases
    assert files.case_id == "patient07" and files.channels == {"flair": MS_FLAIR} and files.mask == MS_MASK
    (case,), skipped = load_cases(index)
    assert skipped == [] and case.adc_unit_detected is None
    assert case.mask.shape == (182, 218, 182) and case.mask.sum() > 0
    with_t1 = find_ms(MS_CASE.parent, t1="t1_*.nii*").cases[0]
    assert list(with_t1.channels) == ["flair", "t1"] and with_t1.channels["t1"].name.startswith("T1_")


def test_flat_isles_folder_loads(tmp_path: Path) -> None:
    index = open_dataset(_flat_isles(tmp_path / "flat"), STROKE)
    assert [files.case_id for files in index.cases] == ["sub-strokecase0001_ses-0001"]
    (case,), skipped = load_cases(index)
    assert skipped == [] and case.adc_unit_detected == "1e-3 mm2/s"


def test_csv_manifest_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    _flat_isles(tmp_path / "data")
    prefix = "data/sub-strokecase0001_ses-0001"
    (tmp_path / "cases.csv").write_text(
        "case_id,dwi,adc,mask\n"
        f"relative,{prefix}_dwi.nii.gz,{prefix}_adc.nii.gz,{prefix}_msk.nii.gz\n"
        f"absolute,{ISLES_DWI},{ISLES_ADC},{ISLES_MASK}\n"
        f"no-adc,{ISLES_DWI},,{ISLES_MASK}\n"
    )
    index = open_dataset(str(tmp_path / "cases.csv"), STROKE)
    assert index.cases[0].channels["dwi"] == tmp_path / f"{prefix}_dwi.nii.gz"
    assert [(s.case_id, s.reason) for s in index.skipped] == [("no-adc", "no adc path in the CSV")]
    cases, skipped = load_cases(index)
    assert [case.case_id for case in cases] == ["relative", "absolute"] and len(skipped) == 1
    np.testing.assert_array_equal(cases[0].channels[1].data, cases[1].channels[1].data)


def test_csv_manifest_needs_every_channel_column(tmp_path: Path) -> None:
    (tmp_path / "cases.csv").write_text("case_id,dwi,mask\n")
    with pytest.raises(ValueError, match="missing column.*adc"):
        read_csv_manifest(tmp_path / "cases.csv", STROKE)


def test_broken_cases_are_skipped_with_a_reason_and_the_rest_load(tmp_path: Path, caplog) -> None:
    root = _flat_isles(tmp_path / "isles", "sub-good_ses-1")
    for kind in ("dwi", "adc", "msk"):
        target = root / f"sub-corrupt_ses-1_{kind}.nii.gz"
        if kind == "dwi":
            target.write_bytes(np.random.default_rng(0).bytes(4096))
        else:
            target.symlink_to(ISLES_ADC if kind == "adc" else ISLES_MASK)
    (root / "sub-badmask_ses-1_dwi.nii.gz").symlink_to(ISLES_DWI)
    (root / "sub-badmask_ses-1_adc.nii.gz").symlink_to(ISLES_ADC)
    nib.save(nib.Nifti1Image(np.zeros((112, 112, 72), np.uint8), np.eye(4)), root / "sub-badmask_ses-1_msk.nii.gz")
    (root / "sub-noadc_ses-1_dwi.nii.gz").symlink_to(ISLES_DWI)
    (root / "sub-noadc_ses-1_msk.nii.gz").symlink_to(ISLES_MASK)
    (root / "sub-badunit_ses-1_dwi.nii.gz").symlink_to(ISLES_DWI)
    (root / "sub-badunit_ses-1_msk.nii.gz").symlink_to(ISLES_MASK)
    adc = nib.load(ISLES_ADC)
    nib.save(nib.Nifti1Image(adc.get_fdata() * 1e5, adc.affine), root / "sub-badunit_ses-1_adc.nii.gz")

    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        cases, skipped = load_cases(open_dataset(root, STROKE))
    assert [case.case_id for case in cases] == ["sub-good_ses-1"]
    reasons = {item.case_id: item.reason for item in skipped}
    assert set(reasons) == {"sub-corrupt_ses-1", "sub-badmask_ses-1", "sub-noadc_ses-1", "sub-badunit_ses-1"}
    assert "not a gzip file" in reasons["sub-corrupt_ses-1"]
    assert "mask shape (112, 112, 72) differs from dwi's (112, 112, 73)" in reasons["sub-badmask_ses-1"]
    assert reasons["sub-noadc_ses-1"] == "no adc file"
    assert "ADC unit not recognised" in reasons["sub-badunit_ses-1"]
    for case_id, reason in reasons.items():
        assert any(case_id in message and reason in message for message in caplog.messages)


def test_missing_file_named_in_a_csv_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "cases.csv").write_text(
        f"case_id,dwi,adc,mask\ngone,{ISLES_DWI},missing_adc.nii.gz,{ISLES_MASK}\nok,{ISLES_DWI},{ISLES_ADC},{ISLES_MASK}\n"
    )
    cases, skipped = load_cases(read_csv_manifest(tmp_path / "cases.csv", STROKE))
    assert [case.case_id for case in cases] == ["ok"]
    (gone,) = skipped
    assert gone.case_id == "gone" and "missing_adc.nii.gz" in gone.reason


def test_mask_on_another_grid_and_missing_mask_raise_case_error(tmp_path: Path) -> None:
    shifted = nib.load(ISLES_MASK)
    affine = shifted.affine.copy()
    affine[0, 3] += 0.01
    nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), affine), tmp_path / "mask.nii.gz")
    channels = {"dwi": ISLES_DWI, "adc": ISLES_ADC}
    with pytest.raises(CaseError, match="mask affine differs"):
        load_case(CaseFiles("shifted", channels, tmp_path / "mask.nii.gz"), STROKE)
    with pytest.raises(CaseError, match="no lesion mask"):
        load_case(CaseFiles("unlabelled", channels, None), STROKE)
    with pytest.raises(CaseError, match="first channel must be dwi"):
        load_case(CaseFiles("order", {"adc": ISLES_ADC, "dwi": ISLES_DWI}, ISLES_MASK), STROKE)


def test_layout_that_does_not_fit_the_task_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit task ms-flair"):
        open_dataset(ISLES_CASE, MS)
    with pytest.raises(ValueError, match="does not fit task stroke-dwi-adc"):
        open_dataset(MS_CASE.parent, STROKE)
    with pytest.raises(ValueError, match="not found"):
        open_dataset(tmp_path / "nowhere", STROKE)


def test_synthetic_cases_are_seeded() -> None:
    first, second = (list(synthetic_cases(STROKE, 1, seed=7)) for _ in range(2))  # seed 7: a quick 2 mm site
    (a,), (b,) = first, second
    assert a.case_id == b.case_id and [c.name for c in a.channels] == ["dwi", "adc"]
    for x, y in zip(a.channels, b.channels):
        np.testing.assert_array_equal(x.data, y.data)
        np.testing.assert_array_equal(x.affine, y.affine)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.mask.dtype == np.uint8 and a.mask.shape == a.channels[0].data.shape and a.mask.any()
    brain = a.channels[1].data[a.channels[1].data > 100]
    assert 500 < np.median(brain) < 1500  # ADC already in 10⁻⁶ mm²/s


def test_synthetic_spec_options() -> None:
    assert SyntheticSpec.parse("synthetic:3") == SyntheticSpec(3, seed=None, site=None)
    assert SyntheticSpec.parse("synthetic:3:site=2:seed=5") == SyntheticSpec(3, seed=5, site=2)
    assert SyntheticSpec.parse("/data/isles") is None
    for bad in ("synthetic:0", "synthetic:x", "synthetic:2:seed=-1", "synthetic:2:colour=1", "synthetic:2:site=1:site=2",
                "synthetic:2:seed"):
        with pytest.raises(ValueError, match="synthetic:N"):
            SyntheticSpec.parse(bad)


def test_synthetic_site_profile_and_own_seed() -> None:
    """Two simulated sites: the same patients (the spec's seed wins over the run's), each site's own scanner."""
    site_a, skipped = load_training_cases("synthetic:2:seed=7:site=4", STROKE, seed=0)  # 4 and 9: quick 2 mm sites
    site_b, _ = load_training_cases("synthetic:2:seed=7:site=9", STROKE, seed=1)
    assert skipped == [] and len(site_a) == len(site_b) == 2
    assert [case.case_id for case in site_a] == [case.case_id for case in site_b]
    for cases, slice_mm in ((site_a, 5.0), (site_b, 4.0)):
        for case in cases:
            spacing = sorted(affine_spacing(case.channels[0].affine))
            np.testing.assert_allclose(spacing, [2.0, 2.0, slice_mm], atol=1e-6)
    assert site_a[0].channels[0].data.shape != site_b[0].channels[0].data.shape
