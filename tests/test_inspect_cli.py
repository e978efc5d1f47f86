"""`fedlesion inspect PATH [--json]`: a synthetic study, gzip-compressed folders, and bad paths (one line, exit 2).

Run as a subprocess, as a user would, so the one-line error contract covers logging and the real exit code.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA, require


def fedlesion(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedlesion", *args]
    return subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12×10×4 synthetic study (2 mm pixels, 4 mm slices) with FLAIR, DWI, ADC and the negative series."""
    from training.synthetic.case import SyntheticCase
    from training.synthetic.dicom_writer import write_dicom_study

    shape = (12, 10, 4)
    head = np.zeros(shape, np.float32)
    head[2:10, 2:8, :] = 1.0
    case = SyntheticCase(
        case_id="inspect",
        kind="stroke",
        seed=11,
        geometry="axial",
        affine=np.diag([2.0, 2.0, 4.0, 1.0]),
        images={"dwi_b0": head, "dwi_b1000": head * np.float32(0.45), "adc": head * 800.0, "flair": head * 1.5},
        lesion_labels=np.zeros(shape, np.int16),
        lesions=[],
    )
    root = tmp_path_factory.mktemp("inspect-study")
    write_dicom_study(case, root, negatives=True)
    return root


def test_text_table(synthetic_study: Path) -> None:
    result = fedlesion("inspect", str(synthetic_study))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "DWI:   series 4, scanner trace at b=1000" in out
    assert "ADC:   series 5 (scanner)" in out
    assert "FLAIR: series 2" in out
    for reason in (
        "3: ignored: T1-FLAIR (TI < 1500 ms)",
        "6: ignored: eADC (exponential ADC) map",
        "10: ignored: post-contrast FLAIR (contrast agent Gadobutrol)",
    ):
        assert reason in out
    dwi_row = next(line for line in out.splitlines() if line.startswith("4 "))
    assert "b=0 (1), b=1000 (1)" in dwi_row and "10×12×4" in dwi_row and "2×2×4" in dwi_row and "axial" in dwi_row


def test_json(synthetic_study: Path) -> None:
    result = fedlesion("inspect", "--json", str(synthetic_study))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    roles = {series["number"]: series["role"] for series in report["series"]}
    assert roles == {2: "flair", 3: "ignored", 4: "dwi", 5: "adc", 6: "ignored", 10: "ignored"}
    assert report["dwi"]["series_number"] == 4 and report["dwi"]["kind"] == "trace"
    assert report["adc"]["source"] == "scanner" and report["flair"]["series_number"] == 2
    dwi = next(series for series in report["series"] if series["number"] == 4)
    assert dwi["b_values"] == [0.0, 1000.0] and dwi["volumes_by_b"] == {"b=0": 1, "b=1000": 1}
    assert (dwi["instances"], dwi["frames"]) == (8, 8)
    geometry = dwi["geometry"]
    assert (geometry["rows"], geometry["columns"], geometry["slices"]) == (10, 12, 4)
    assert geometry["pixel_spacing_mm"] == [2.0, 2.0] and geometry["slice_spacing_mm"] == 4.0
    assert geometry["orientation"] == "axial"
    assert report["warnings"] == [] and report["skipped"] == []


def test_gzip_folder_found_by_magic_with_a_missing_slice(synthetic_study: Path, tmp_path: Path) -> None:
    """Every file gzip-compressed under a name without .gz, one FLAIR slice left out, one text file beside them."""
    for path in sorted(synthetic_study.rglob("*.dcm")):
        if path.parent.name == "2_flair" and path.name == "IM_0002.dcm":
            continue
        target = tmp_path / path.parent.name / path.stem
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(gzip.compress(path.read_bytes()))
    (tmp_path / "README.txt").write_text("not DICOM\n")
    result = fedlesion("inspect", "--json", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dwi"]["series_number"] == 4
    assert [item["path"] for item in report["skipped"]] == [str(tmp_path / "README.txt")]
    flair = next(series for series in report["series"] if series["number"] == 2)
    assert flair["geometry"]["slices"] == 3 and flair["geometry"]["slice_spacing_mm"] is None
    # slices at 0, 4, 8, 12 mm along the normal; without the one at 4 the first gap is 8 mm
    assert flair["warnings"] == ["uneven slice spacing (smallest 4 mm; gaps at 0.00→8.00 mm)"]


def test_shared_gzip_folder() -> None:
    """The shared GE data as upstream stores it (*.gz): the 9-slice series is the DWI."""
    folder = SHARED_DATA / "dicom/dcm_qa_ge/dicom"
    require(folder)
    result = fedlesion("inspect", "--json", str(folder))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dwi"]["series_number"] == 4 and report["adc"]["source"] == "computed"
    nine = next(series for series in report["series"] if series["number"] == 4)
    assert (nine["geometry"]["rows"], nine["geometry"]["columns"], nine["geometry"]["slices"]) == (256, 256, 9)
    assert nine["volumes_by_b"] == {"b=0": 1, "b=1000": 6}


@pytest.mark.parametrize("case", ["missing", "no-dicom"])
def test_bad_path_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    if case == "missing":
        path, message = tmp_path / "nowhere", "no such file or folder"
    else:
        (tmp_path / "notes.txt").write_text("hello\n")
        path, message = tmp_path, "no DICOM instances found"
    result = fedlesion("inspect", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"fedlesion: error: {message}")


def test_mosaic_geometry_counts_slices_from_the_csa_header_and_uih_grids() -> None:
    """inspect reads mosaics as the assembler does: a Siemens mosaic whose MR header lost NumberOfImagesInMosaic
    still counts its slices from the CSA image header, and a UIH grid its own way (5 slices in 2 × 3 tiles)."""
    import pydicom

    from dicom_gateway.inspection import series_geometry
    from dicom_gateway.study_files import SeriesHeaders
    from tests.test_uih_grid_dwi import SLICES, TILE_COLUMNS, TILE_ROWS, grid_image

    source = SHARED_DATA / "dicom/pypi/nibabel_5.4.2/siemens_dwi_1000.dcm.gz"
    require(source)
    with gzip.open(source) as stream:
        mosaic = pydicom.dcmread(stream, stop_before_pixels=True)
    del mosaic[mosaic.private_block(0x0019, "SIEMENS MR HEADER").get_tag(0x0A)]
    uih = grid_image(1000.0, 1, np.zeros((SLICES, TILE_ROWS, TILE_COLUMNS), np.uint16))

    def geometry(dataset: pydicom.Dataset) -> dict:
        series = SeriesHeaders("1.2.3", "1.2.3.4", str(dataset.SOPClassUID), 1, "dwi", "MR", [(Path("x.dcm"), dataset)])
        return series_geometry(series)

    assert (geometry(mosaic)["slices"], geometry(mosaic)["rows"], geometry(mosaic)["columns"]) == (48, 128, 128)
    assert (geometry(uih)["slices"], geometry(uih)["rows"], geometry(uih)["columns"]) == (SLICES, TILE_ROWS, TILE_COLUMNS)
