"""Metrics against the ISLES'22 oracle (design.md §9) and hand-computed edge cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ISLES_DWI, ISLES_MASK, require

from models.metrics import (
    CaseMetrics,
    compute_metrics,
    evaluate_dataset,
    evaluate_files,
    size_category,
    summarize,
)
from models.geometry import voxel_volume_ml
from models.postprocessing import label_components

NAN = math.nan


def mask(*voxels: tuple[int, int, int], shape: tuple[int, int, int] = (8, 8, 8), dtype: type = np.uint8) -> np.ndarray:
    array = np.zeros(shape, dtype=dtype)
    for voxel in voxels:
        array[voxel] = 1
    return array


def assert_metrics(actual: CaseMetrics, **expected: object) -> None:
    for name, value in expected.items():
        got = getattr(actual, name)
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got), f"{name}: expected NaN, got {got}"
        else:
            assert got == pytest.approx(value, abs=1e-12), f"{name}: expected {value}, got {got}"


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


# --- oracle -------------------------------------------------------------------------------------------------------


def test_oracle_isles_case_0001() -> None:
    require(ISLES_DWI, ISLES_MASK)
    dwi = nib.load(ISLES_DWI).get_fdata()
    gt_image = nib.load(ISLES_MASK)
    threshold = np.percentile(dwi[dwi > 0], 99)
    pred = dwi > threshold
    assert int(pred.sum()) == 1461

    voxel_ml = voxel_volume_ml(gt_image.affine)
    assert voxel_ml == pytest.approx(0.008, abs=1e-9)
    result = compute_metrics(pred, np.asanyarray(gt_image.dataobj), voxel_ml)

    assert round(result.gt_volume_ml / voxel_ml) == 835
    assert result.dice == pytest.approx(0.166376, abs=1e-6)
    assert result.avd_ml == pytest.approx(5.008, abs=1e-6)
    assert result.ald == 57
    assert result.lf1 == pytest.approx(0.368421, abs=1e-6)
    assert (result.gt_lesions, result.pred_lesions) == (31, 88)
    assert result.tp_lesions + result.fn_lesions == 31


# --- hand-built cases ---------------------------------------------------------------------------------------------


def test_both_empty_is_a_perfect_score_with_undefined_ratios() -> None:
    result = compute_metrics(mask(), mask(), 0.008)
    assert_metrics(
        result, dice=1.0, avd_ml=0.0, ald=0, lf1=1.0, gt_lesions=0, pred_lesions=0, tp_lesions=0, fp_lesions=0,
        fn_lesions=0, voxel_sensitivity=NAN, voxel_precision=NAN, lesion_sensitivity=NAN, lesion_precision=NAN,
    )
    assert result.size_category == "small"
    assert result.as_dict()["voxel_sensitivity"] is None
    json.dumps(result.as_dict(), allow_nan=False)


def test_empty_ground_truth_with_a_prediction() -> None:
    result = compute_metrics(mask((1, 1, 1), (5, 5, 5)), mask(), 0.5)
    assert_metrics(
        result, dice=0.0, avd_ml=1.0, ald=2, lf1=0.0, pred_lesions=2, tp_lesions=0, fp_lesions=2, fn_lesions=0,
        voxel_sensitivity=NAN, voxel_precision=0.0, lesion_sensitivity=NAN, lesion_precision=0.0,
    )


def test_empty_prediction_with_a_ground_truth() -> None:
    result = compute_metrics(mask(), mask((1, 1, 1), (1, 1, 2)), 0.5)
    assert_metrics(
        result, dice=0.0, avd_ml=1.0, ald=1, lf1=0.0, gt_lesions=1, tp_lesions=0, fp_lesions=0, fn_lesions=1,
        voxel_sensitivity=0.0, voxel_precision=NAN, lesion_sensitivity=0.0, lesion_precision=NAN,
    )


def test_corner_neighbours_are_one_lesion_and_one_shared_voxel_is_a_hit() -> None:
    # (1,1,1) and (2,2,2) share only a corner: one lesion under 26-connectivity (three under 6-connectivity).
    gt = mask((1, 1, 1), (2, 2, 2), (3, 3, 3))
    result = compute_metrics(mask((3, 3, 3)), gt, 1.0)
    assert_metrics(
        result, dice=2 * 1 / (1 + 3), avd_ml=2.0, ald=0, lf1=1.0, gt_lesions=1, pred_lesions=1, tp_lesions=1,
        fp_lesions=0, fn_lesions=0, voxel_sensitivity=1 / 3, voxel_precision=1.0,
        lesion_sensitivity=1.0, lesion_precision=1.0,
    )


def test_adjacent_without_overlap_is_not_a_hit() -> None:
    result = compute_metrics(mask((1, 1, 2)), mask((1, 1, 1)), 1.0)
    assert_metrics(result, dice=0.0, ald=0, tp_lesions=0, fp_lesions=1, fn_lesions=1, lf1=0.0)


def test_one_prediction_touching_two_ground_truth_lesions() -> None:
    gt = mask((1, 1, 1), (1, 1, 5), (6, 6, 6))  # three lesions; the last one is missed
    pred = mask(*[(1, 1, z) for z in range(1, 6)])  # one lesion of 5 voxels bridging the first two
    result = compute_metrics(pred, gt, 0.5)
    assert_metrics(
        result, dice=2 * 2 / (5 + 3), avd_ml=1.0, ald=2, gt_lesions=3, pred_lesions=1, tp_lesions=2, fp_lesions=0,
        fn_lesions=1, lf1=2 / (2 + (0 + 1) / 2), voxel_sensitivity=2 / 3, voxel_precision=2 / 5,
        lesion_sensitivity=2 / 3, lesion_precision=1.0,
    )


def test_two_predictions_touching_one_ground_truth_lesion_plus_a_false_positive() -> None:
    gt = mask(*[(1, 1, z) for z in range(1, 6)])
    pred = mask((1, 1, 1), (1, 1, 5), (6, 6, 6))
    result = compute_metrics(pred, gt, 1.0)
    assert_metrics(
        result, dice=2 * 2 / (3 + 5), avd_ml=2.0, ald=2, gt_lesions=1, pred_lesions=3, tp_lesions=1, fp_lesions=1,
        fn_lesions=0, lf1=1 / (1 + (1 + 0) / 2), lesion_sensitivity=1.0, lesion_precision=2 / 3,
    )


def test_binarization_is_greater_than_zero_for_any_dtype() -> None:
    gt = np.zeros((4, 4, 4), dtype=np.float32)
    gt[0, 0, 0], gt[3, 3, 3], gt[2, 0, 0] = 0.5, 1.0, -1.0  # the negative value is background
    pred = np.zeros((4, 4, 4), dtype=np.uint16)
    pred[0, 0, 0] = 7
    result = compute_metrics(pred, gt, 1.0)
    assert_metrics(result, dice=2 / 3, gt_lesions=2, pred_lesions=1, tp_lesions=1, fn_lesions=1)
    assert compute_metrics(pred.astype(bool), gt, 1.0) == result


@pytest.mark.parametrize(
    ("volume", "expected"),
    [(0.0, "small"), (4.999, "small"), (5.0, "medium"), (70.0, "medium"), (70.001, "large")],
)
def test_size_categories_by_ground_truth_volume(volume: float, expected: str) -> None:
    assert size_category(volume) == expected


def test_size_thresholds_are_configurable() -> None:
    assert size_category(3.0, small_below_ml=2.0, large_above_ml=10.0) == "medium"
    result = compute_metrics(mask(), mask((0, 0, 0)), 20.0, small_below_ml=2.0, large_above_ml=10.0)
    assert result.size_category == "large"
    with pytest.raises(ValueError, match="size thresholds"):
        size_category(1.0, small_below_ml=80.0, large_above_ml=70.0)


@pytest.mark.parametrize(
    ("pred", "gt", "voxel_ml", "message"),
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 1.0, "shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), 1.0, "3-D"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 0.0, "voxel volume"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), math.nan, "voxel volume"),
        (np.full((4, 4, 4), "a"), np.zeros((4, 4, 4)), 1.0, "numeric"),
    ],
)
def test_bad_inputs_are_refused(pred: np.ndarray, gt: np.ndarray, voxel_ml: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(pred, gt, voxel_ml)


# --- shared post-processing pieces --------------------------------------------------------------------------------


def test_label_components_uses_26_connectivity() -> None:
    labels, count = label_components(mask((0, 0, 0), (1, 1, 1), (5, 5, 5)))
    assert count == 2
    assert labels[0, 0, 0] == labels[1, 1, 1] != labels[5, 5, 5]
    with pytest.raises(ValueError, match="3-D"):
        label_components(np.zeros((3, 3)))


# --- summary, files, datasets -------------------------------------------------------------------------------------


def test_summary_is_mean_and_sample_sd_without_nan() -> None:
    rows = [
        compute_metrics(mask((0, 0, 0)), mask((0, 0, 0)), 1.0),  # dice 1, voxel_precision 1
        compute_metrics(mask(), mask((0, 0, 0), (0, 0, 1)), 1.0),  # dice 0, voxel_precision NaN
        compute_metrics(mask((0, 0, 0)), mask((0, 0, 0), (0, 0, 1)), 1.0),  # dice 2/3, voxel_precision 1
    ]
    summary = summarize(rows)
    dice = [1.0, 0.0, 2 / 3]
    assert summary["dice"].n == 3
    assert summary["dice"].mean == pytest.approx(np.mean(dice))
    assert summary["dice"].sd == pytest.approx(np.std(dice, ddof=1))
    assert (summary["voxel_precision"].n, summary["voxel_precision"].mean, summary["voxel_precision"].sd) == (2, 1, 0)
    assert "size_category" not in summary
    single = summarize(rows[:1])["dice"]
    assert single.n == 1 and math.isnan(single.sd) and single.as_dict()["sd"] is None


def test_evaluate_files_checks_the_grids(tmp_path: Path) -> None:
    gt = save(tmp_path / "gt.nii.gz", mask((1, 1, 1), (1, 1, 2)))
    same = save(tmp_path / "same.nii", mask((1, 1, 1)).astype(np.float32))
    assert_metrics(evaluate_files(same, gt), dice=2 / 3, avd_ml=0.008, gt_volume_ml=0.016)

    nearly = np.diag([2.0, 2.0, 2.0, 1.0])
    nearly[0, 3] = 5e-4
    assert evaluate_files(save(tmp_path / "nearly.nii.gz", mask((1, 1, 1)), nearly), gt).dice == pytest.approx(2 / 3)

    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 0.01
    with pytest.raises(ValueError, match=r"^grids differ: affines"):
        evaluate_files(save(tmp_path / "shifted.nii.gz", mask((1, 1, 1)), shifted), gt)
    with pytest.raises(ValueError, match=r"^grids differ: prediction shape"):
        evaluate_files(save(tmp_path / "small.nii.gz", mask(shape=(4, 4, 4))), gt)
    with pytest.raises(FileNotFoundError, match="prediction file not found"):
        evaluate_files(tmp_path / "missing.nii.gz", gt)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="cannot read prediction .* as NIfTI"):
        evaluate_files(tmp_path / "junk.nii.gz", gt)


def test_evaluate_dataset_pairs_by_case_id(tmp_path: Path) -> None:
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for case, pred in [("0001", mask((1, 1, 1))), ("0002", mask((1, 1, 1), (1, 1, 2)))]:
        save(pred_dir / f"case{case}_pred.nii.gz", pred)
        save(gt_dir / f"sub-strokecase{case}_msk.nii.gz", mask((1, 1, 1), (1, 1, 2)))
    result = evaluate_dataset(pred_dir, gt_dir)
    assert [case.case_id for case in result.cases] == ["0001", "0002"]
    assert result.summary["dice"].mean == pytest.approx((2 / 3 + 1) / 2)
    assert result.summary["dice"].sd == pytest.approx(np.std([2 / 3, 1.0], ddof=1))
    assert result.unpaired == []

    save(gt_dir / "sub-strokecase0003_msk.nii.gz", mask())
    with pytest.raises(ValueError, match="1 unpaired file.*case0003.*ground truth without prediction"):
        evaluate_dataset(pred_dir, gt_dir)
    skipped = evaluate_dataset(pred_dir, gt_dir, allow_unpaired=True)
    assert len(skipped.cases) == 2 and "sub-strokecase0003" in skipped.unpaired[0]
    assert skipped.as_dict()["unpaired_skipped"] == skipped.unpaired

    with pytest.raises(ValueError, match="invalid case regex"):
        evaluate_dataset(pred_dir, gt_dir, case_regex="(")
    with pytest.raises(ValueError, match="found twice"):
        evaluate_dataset(pred_dir, gt_dir, case_regex=r"case(\d)")
    with pytest.raises(NotADirectoryError, match="prediction folder not found"):
        evaluate_dataset(tmp_path / "nowhere", gt_dir)
