"""`fedlesion evaluate`: single pair, dataset mode, and one-line errors (design.md §9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ISLES_DWI, ISLES_MASK, require

from fedlesion.cli import main

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), path)
    return path


def line_mask(length: int) -> np.ndarray:
    array = np.zeros((6, 6, 6), dtype=np.uint8)
    array[1, 1, 1 : 1 + length] = 1
    return array


@pytest.fixture()
def oracle_prediction(tmp_path: Path) -> Path:
    require(ISLES_DWI, ISLES_MASK)
    image = nib.load(ISLES_DWI)
    dwi = image.get_fdata()
    return save(tmp_path / "pred_0001.nii.gz", dwi > np.percentile(dwi[dwi > 0], 99), image.affine)


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Three cases with Dice 1, 2/3 and 0 (GT of 2 voxels; predictions of 2, 1 and 0 voxels)."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for case, length in [("001", 2), ("002", 1), ("003", 0)]:
        save(pred_dir / f"pred_{case}.nii.gz", line_mask(length))
        save(gt_dir / f"gt_{case}.nii.gz", line_mask(2))
    return pred_dir, gt_dir


def test_single_pair_json_is_the_oracle(oracle_prediction: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--pred", str(oracle_prediction), "--gt", str(ISLES_MASK), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dice"] == pytest.approx(0.166376, abs=1e-6)
    assert result["avd_ml"] == pytest.approx(5.008, abs=1e-6)
    assert result["ald"] == 57
    assert result["lf1"] == pytest.approx(0.368421, abs=1e-6)
    assert result["gt_volume_ml"] == pytest.approx(835 * 0.008, abs=1e-6)
    assert result["pred_volume_ml"] == pytest.approx(1461 * 0.008, abs=1e-6)


def test_single_pair_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, gt = save(tmp_path / "p.nii.gz", line_mask(1)), save(tmp_path / "g.nii.gz", line_mask(2))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 0
    out = capsys.readouterr().out
    assert "dice" in out and "0.6667" in out and "size_category" in out


def test_dataset_json_has_rows_and_mean_sd(dataset: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pred_dir, gt_dir = dataset
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--case-regex", r"_(\d+)\.",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["case_id"] for row in result["cases"]] == ["001", "002", "003"]
    assert [row["dice"] for row in result["cases"]] == pytest.approx([1.0, 2 / 3, 0.0])
    dice = result["summary"]["dice"]
    assert dice["n"] == 3
    assert dice["mean"] == pytest.approx(5 / 9)
    assert dice["sd"] == pytest.approx(np.std([1.0, 2 / 3, 0.0], ddof=1))
    assert result["summary"]["voxel_precision"]["n"] == 2  # the empty prediction has no precision
    assert result["unpaired_skipped"] == []


def test_dataset_table(dataset: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pred_dir, gt_dir = dataset
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["case", "dice"]
    assert "summary over 3 case(s)" in out
    assert "0.5556 ± 0.5092 (n=3)" in out


def test_unpaired_files_are_an_error_unless_allowed(dataset: tuple[Path, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pred_dir, gt_dir = dataset
    save(gt_dir / "gt_004.nii.gz", line_mask(1))
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gt_004" in err and "--allow-unpaired" in err
    assert main(["evaluate", "--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--allow-unpaired"]) == 0
    assert "warning: skipped unpaired" in capsys.readouterr().out


def test_grids_differ_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shifted = AFFINE.copy()
    shifted[2, 3] = 1.0
    pred, gt = save(tmp_path / "p.nii.gz", line_mask(1), shifted), save(tmp_path / "g.nii.gz", line_mask(2))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedlesion: error: grids differ: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pred", "{tmp}/missing.nii.gz", "--gt", "{gt}"], "prediction file not found"),
        (["--pred-dir", "{tmp}/nowhere", "--gt-dir", "{tmp}"], "prediction folder not found"),
        (["--pred", "{gt}", "--gt-dir", "{tmp}"], "--pred goes with --gt"),
        (["--pred", "{gt}", "--gt", "{gt}", "--case-regex", "x"], "only apply to --pred-dir"),
        (["--gt", "{gt}"], "needs --pred with --gt"),
        (["--pred-dir", "{tmp}"], "--pred-dir goes with --gt-dir"),
    ],
)
def test_bad_arguments_cost_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                     message: str) -> None:
    gt = save(tmp_path / "g.nii.gz", line_mask(2))
    argv = [arg.format(tmp=tmp_path, gt=gt) for arg in argv]
    assert main(["evaluate", *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_pred_and_pred_dir_are_mutually_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--pred", "a.nii", "--pred-dir", str(tmp_path), "--gt", "b.nii"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and err.count("\n") == 1


def test_console_script(tmp_path: Path) -> None:
    pred, gt = save(tmp_path / "p.nii.gz", line_mask(1)), save(tmp_path / "g.nii.gz", line_mask(2))
    script = Path(sys.executable).with_name("fedlesion")
    completed = subprocess.run([str(script), "evaluate", "--pred", str(pred), "--gt", str(gt), "--json"],
                               capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["dice"] == pytest.approx(2 / 3)
