"""`fedlesion synth`: N case folders, seeded, one-line errors, optional DICOM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlesion.cli import main


def test_synth_writes_n_cases(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), "--kind", "stroke", "--cases", "2", "--seed", "3"]) == 0
    cases = sorted(p.name for p in out.iterdir())
    assert cases == ["case-000", "case-001"]
    for name in cases:
        files = {p.name for p in (out / name).iterdir()}
        assert {"dwi.nii.gz", "dwi_b0.nii.gz", "adc.nii.gz", "flair.nii.gz", "mask.nii.gz", "lesions.json"} <= files
    seeds = {json.loads((out / n / "lesions.json").read_text())["seed"] for n in cases}
    assert len(seeds) == 2
    assert "synth" in capsys.readouterr().err  # progress bar on stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--cases", "0"], "--cases must be at least 1"), (["--seed", "-2"], "--seed must be non-negative")],
)
def test_synth_rejects_bad_arguments_in_one_line(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    assert main(["synth", "--out", str(tmp_path), "--kind", "ms", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_synth_dicom_study(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["synth", "--out", str(out), "--kind", "stroke", "--geometry", "oblique", "--skull-stripped", "--dicom"]
    assert main(argv) == 0
    meta = json.loads((out / "case-000" / "lesions.json").read_text())
    assert meta["geometry"] == "oblique" and meta["skull_stripped"] is True
    assert len(list((out / "case-000" / "dicom").rglob("*.dcm"))) > 10


def test_synth_dicom_latin1_with_negative_fixtures(tmp_path: Path) -> None:
    import pydicom

    out = tmp_path / "out"
    argv = ["synth", "--out", str(out), "--kind", "stroke", "--dicom", "--charset", "ISO_IR 100", "--negatives"]
    assert main(argv) == 0
    series = {}
    for path in sorted((out / "case-000" / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(ds.SeriesDescription, ds)
    assert len(series) == 6  # DWI, ADC, FLAIR + T1-FLAIR, post-contrast FLAIR, eADC
    some = next(iter(series.values()))
    assert some.SpecificCharacterSet == "ISO_IR 100" and str(some.PatientName) == "Müller^Jürgen"
    assert any("ContrastBolusAgent" in ds for ds in series.values())
    assert any("EADC" in ds.ImageType for ds in series.values())


def test_negatives_need_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path), "--kind", "ms", "--negatives"]) == 2
    assert "--negatives needs --dicom" in capsys.readouterr().err
