"""`fedlesion segment`: a DICOM folder, a `fedlesion convert` folder and bare NIfTI give one result; "ADC missing"
is refused unless --b0 is given; --json prints report.json.

The embedded default model runs once (DICOM folder, empty registry); the other runs use a tiny sigmoid ONNX
package published to the node's registry or passed with --model, so they take a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from onnx_graphs import first_channel_sigmoid

from fedlesion.cli import main
from models.manifest import OutputSpec, Task, default_manifest
from models.package import TrustPolicy, build_package
from models.registry import Registry
from models.signing import demo_private_key
from training.synthetic import SiteProfile, SyntheticCase, generate_case
from training.synthetic.dicom_writer import write_dicom_study

SIGMOID_VERSION = 7


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    site = SiteProfile(name="cli", in_plane_mm=2.0, slice_thickness_mm=4.0, slice_spacing_mm=4.0)
    return generate_case("stroke", 5, site=site, size="small", pattern="single", anatomy="procedural")


@pytest.fixture(scope="module")
def dicom_study(case: SyntheticCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dicom")
    write_dicom_study(case, folder)
    return folder


@pytest.fixture(scope="module")
def sigmoid_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = default_manifest(
        Task.STROKE_DWI_ADC, SIGMOID_VERSION, plan_sha256="d" * 64, demo=True, description="test",
        output=OutputSpec(threshold=0.9),
    )
    return build_package(tmp_path_factory.mktemp("pkg") / "p", first_channel_sigmoid(2), manifest, demo_private_key())


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node data directory of the test's own (its registry starts empty), and no settings file."""
    monkeypatch.delenv("FEDLESION_CONFIG", raising=False)
    monkeypatch.setenv("FEDLESION_STORAGE__DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def segment(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["segment", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dicom_folder_with_the_default_model_prints_the_report(
    dicom_study: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: SyntheticCase
) -> None:
    code, out, err = segment(capsys, dicom_study, "--out", tmp_path / "out", "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert printed == json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert printed["task"] == "stroke-dwi-adc" and printed["model_version"] == 1 and printed["model"]["demo"] is True
    assert set(printed["timings"]) == {"load", "preprocess", "inference", "postprocess"}
    assert printed["lesion_count"] == len(printed["lesions"]) >= 1
    assert printed["total_volume_ml"] > 0 and printed["adc_core_volume_ml"] is not None
    assert [s["series_number"] for s in printed["series"]] == [4, 5]
    assert printed["dwi_b_value"] == 1000.0 and printed["adc_unit_detected"].startswith("1e-6 mm2/s")
    mask = nib.load(tmp_path / "out" / "mask.nii.gz")
    assert mask.shape == case.mask.shape  # the source grid (slices in DICOM's spatial order)
    voxels = np.argwhere(np.asarray(mask.dataobj) > 0)
    on_case = np.linalg.solve(case.affine, mask.affine) @ np.c_[voxels, np.ones(len(voxels))].T
    index = np.round(on_case[:3]).astype(int)
    assert np.allclose(on_case[:3], index, atol=1e-3)  # voxel centres coincide with the synthetic case's
    assert case.mask[tuple(index)].mean() > 0.5  # the synthetic infarct was found where it is


def test_convert_folder_and_dicom_folder_agree_and_use_the_registry_latest(
    dicom_study: Path, sigmoid_package: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Registry(data_dir / "registry", TrustPolicy.demo()).publish(sigmoid_package)
    assert main(["convert", str(dicom_study), str(tmp_path / "nifti")]) == 0
    capsys.readouterr()
    code, out, err = segment(capsys, tmp_path / "nifti", "--out", tmp_path / "from-nifti")
    assert code == 0, err
    assert out.startswith("stroke-dwi-adc: ") and f"model v{SIGMOID_VERSION}, demo" in out
    code, _, err = segment(capsys, dicom_study, "--out", tmp_path / "from-dicom")
    assert code == 0, err

    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("from-nifti", "from-dicom")]
    for key in ("model_version", "total_volume_ml", "lesion_count", "lesions", "adc_core_volume_ml", "series",
                "dwi_b_value", "adc_unit_detected", "study_uid"):
        assert reports[0][key] == reports[1][key], key
    assert reports[0]["model_version"] == SIGMOID_VERSION and reports[0]["lesion_count"] >= 1
    masks = [nib.load(tmp_path / name / "mask.nii.gz") for name in ("from-nifti", "from-dicom")]
    dwi = nib.load(tmp_path / "nifti" / "dwi.nii.gz")
    for mask in masks:
        assert mask.shape == dwi.shape and np.allclose(mask.affine, dwi.affine, atol=1e-4)
    assert np.array_equal(np.asarray(masks[0].dataobj), np.asarray(masks[1].dataobj))


def test_bare_nifti_adc_unit_b0_and_refusals(
    case: SyntheticCase, sigmoid_package: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def save(folder: Path, name: str, key: str, scale: float = 1.0) -> Path:
        folder.mkdir(exist_ok=True)
        path = folder / name
        nib.save(nib.Nifti1Image((case.images[key] * scale).astype(np.float32), case.affine), path)
        return path

    micro, milli, bare = tmp_path / "micro", tmp_path / "milli", tmp_path / "dwi-only"
    for folder in (micro, milli, bare):
        save(folder, "dwi.nii.gz", "dwi_b1000")
    save(micro, "adc.nii.gz", "adc")
    save(milli, "adc.nii.gz", "adc", 1e-3)  # 10⁻³ mm²/s, as ISLES'22 stores it
    b0 = save(tmp_path, "b0.nii.gz", "dwi_b0")
    model = ("--model", sigmoid_package)

    results = {}
    for folder in (micro, milli):
        code, _, err = segment(capsys, folder, "--out", tmp_path / f"out-{folder.name}", *model)
        assert code == 0, err
        results[folder.name] = json.loads((tmp_path / f"out-{folder.name}" / "report.json").read_text())
    assert results["micro"]["adc_unit_detected"] == "1e-6 mm2/s"
    assert results["milli"]["adc_unit_detected"] == "1e-3 mm2/s (median inside the head)"
    assert results["milli"]["adc_core_volume_ml"] == pytest.approx(results["micro"]["adc_core_volume_ml"], abs=1e-6)

    code, out, err = segment(capsys, bare, "--out", tmp_path / "refused", *model)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("fedlesion: error: ADC missing") and "--b0" in err
    assert not (tmp_path / "refused").exists()

    code, out, err = segment(capsys, bare, "--out", tmp_path / "computed", "--b0", b0, "--json", *model)
    assert code == 0, err
    report = json.loads(out)
    assert report["adc_unit_detected"] == "computed (1e-6 mm2/s)"
    assert any(w.startswith("DWI b-value unknown: b=1000") for w in report["warnings"])
    assert report["lesion_count"] >= 1 and report["adc_core_volume_ml"] > 0
    # The computed ADC (10⁶·ln(S0/Sb)/b) confirms about the same core as the synthetic scanner ADC.
    assert report["adc_core_volume_ml"] == pytest.approx(results["micro"]["adc_core_volume_ml"], rel=0.25)


def test_usage_errors_are_one_line(
    dicom_study: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = segment(capsys, dicom_study, "--out", tmp_path / "out", "--b0", tmp_path / "b0.nii.gz")
    assert code == 2 and err.count("\n") == 1 and "--b0 applies to NIfTI input" in err
    code, _, err = segment(capsys, tmp_path / "absent", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "no such file or folder" in err
