"""The embedded default models: signed by the demo key, marked not for clinical use, small, runnable; the README's
real-case numbers for the shipped packages are what `fedlesion segment`'s path gives today; the rules beside them
find what they say they find."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA

from benchmarks.default_models import MARKDOWN_HEADER, by_task, mean_of, rule_masks
from inference.engine import WHOLE_VOLUME_VOXELS, Engine
from models.manifest import Task
from models.package import TrustPolicy, load_package
from models.preprocessing import Channel
from training.synthetic import generate_case

DEFAULTS = REPO_ROOT / "models" / "defaults"
MAX_BYTES = 10 * 2**20


@pytest.mark.slow  # MS: 5 windows of 224×224×64 at 1 mm on the CPU
@pytest.mark.parametrize("task", list(Task), ids=lambda t: t.value)
def test_default_package_verifies_and_runs(task: Task) -> None:
    package = load_package(DEFAULTS / task.value, TrustPolicy.demo())
    manifest = package.manifest
    assert manifest.task is task and manifest.demo is True
    assert "not for clinical use" in manifest.description
    assert sum(len(data) for data in package.files.values()) <= MAX_BYTES
    with pytest.raises(ValueError):  # an enrolled node never runs a demo-signed model
        load_package(DEFAULTS / task.value, TrustPolicy.enrolled([]))

    case = generate_case("stroke" if task is Task.STROKE_DWI_ADC else "ms", seed=21)
    images = {"dwi": case.images["dwi_b1000"], "adc": case.images["adc"], "flair": case.images["flair"]}
    channels = [Channel(images[spec.name], case.affine, spec.name) for spec in manifest.inputs]
    # The largest windows within the budget: a third of the work of the manifest's 96×96×48 patches at 1 mm (the
    # default windows run on the real cases in test_readme_reports_todays_real_case_numbers).
    prediction = Engine(package, threads=2, window_voxels=WHOLE_VOLUME_VOXELS).predict(channels)
    probabilities = prediction.probabilities
    assert prediction.windows <= 5
    assert probabilities.shape == case.mask.shape
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0


def readme_default_model_rows(readme: str) -> list[dict[str, str]]:
    """The rows of every README table of default-model scores (header `MARKDOWN_HEADER`), each as header → cell."""
    lines = readme.splitlines()
    rows = []
    for start in (n for n, line in enumerate(lines) if line == MARKDOWN_HEADER):
        header = [cell.strip() for cell in lines[start].strip("|").split("|")]
        for line in lines[start + 2 :]:
            if not line.startswith("|"):
                break
            rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def assert_shown_as(cell: str, value: float, column: str) -> None:
    """`value` rounded to the cell's own number of decimals is what the cell says."""
    decimals = len(cell.partition(".")[2])
    assert float(cell) == round(value, decimals), f"{column}: README {cell}, measured {value}"


@pytest.mark.slow  # the MS case runs sliding windows at 1 mm on the CPU: 1.5 minutes
def test_readme_reports_todays_real_case_numbers() -> None:
    """The README's latest rows for each shipped package's version are, column by column and at the README's
    rounding, what benchmarks/default_models.py measures now, case by case and as the mean per task."""
    if not (SHARED_DATA / "nifti").exists():
        pytest.skip(f"shared real cases missing: {SHARED_DATA}")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "default_models.py"), "--json"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    readme = readme_default_model_rows((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    measured = json.loads(result.stdout)
    assert {row["task"] for row in measured} == {task.value for task in Task}
    for task, task_rows in by_task(measured).items():
        label = f"`{task}` v{task_rows[0]['model_version']}"
        latest = max(row["scored"] for row in readme if row["model"] == label)
        shown = {row["case"]: row for row in readme if row["model"] == label and row["scored"] == latest}
        assert len(shown) == len(task_rows) + (len(task_rows) > 1), f"{label} {latest}: {sorted(shown)}"
        for row in task_rows:
            cells = shown[row["case"]]
            model = row["model"]
            for column, value in (
                ("Dice", model["dice"]),
                ("AVD (ml)", model["avd_ml"]),
                ("lesion F1", model["lf1"]),
                ("predicted (ml)", model["pred_volume_ml"]),
                ("truth (ml)", model["gt_volume_ml"]),
                ("ONNX (MB)", row["onnx_mb"]),
                ("rule A Dice", row["rule_a"]["dice"]),
                ("rule B Dice", row["rule_b"]["dice"]),
            ):
                assert_shown_as(cells[column], value, f"{label} {row['case']} {column}")
        if len(task_rows) > 1:
            cells = shown[f"**mean (n = {len(task_rows)})**"]
            for column, source in (("Dice", "model"), ("rule A Dice", "rule_a"), ("rule B Dice", "rule_b")):
                assert_shown_as(cells[column].strip("*"), mean_of(task_rows, source, "dice"), f"{label} mean {column}")


def test_readme_cells_are_compared_at_their_own_rounding() -> None:
    """The README check refuses a number that is off in its last shown decimal or sits in another column."""
    row = "| `stroke-dwi-adc` v1 | 2026-12-02 | case | 6.68 | 0.002 | 3.10 | 0.053 | 3.58 | 3.4 | 5.53 | 0.15 | 0.17 |"
    (cells,) = readme_default_model_rows(f"{MARKDOWN_HEADER}\n|---|\n{row}\n\ntext")
    assert_shown_as(cells["Dice"], 0.0021, "Dice")
    assert_shown_as(cells["AVD (ml)"], 3.1049, "AVD")
    with pytest.raises(AssertionError):
        assert_shown_as(cells["AVD (ml)"], 3.106, "AVD")
    with pytest.raises(AssertionError):
        assert_shown_as(cells["Dice"], 3.10, "Dice")  # the AVD's value is not the Dice's


def test_rules_find_a_bright_low_adc_blob_and_rule_a_spares_bright_tissue_with_a_normal_adc() -> None:
    """Rule A keeps exactly the DWI-bright voxels with a low ADC; rule B (the brightest 1 % of the brain) takes
    T2 shine-through (bright DWI, normal ADC) as well; without an ADC rule A is the z-score alone."""
    rng = np.random.default_rng(0)
    grid = np.indices((40, 40, 40)) - 20
    brain = (grid**2).sum(axis=0) < 15**2
    dwi = np.where(brain, rng.normal(100.0, 5.0, brain.shape), 0.0)
    adc = np.where(brain, 800.0, 0.0)
    infarct = ((grid - np.array([6, 0, 0])[:, None, None, None]) ** 2).sum(axis=0) < 3**2
    shine_through = ((grid + np.array([6, 0, 0])[:, None, None, None]) ** 2).sum(axis=0) < 3**2
    dwi[infarct | shine_through] = rng.normal(200.0, 5.0, (infarct | shine_through).sum())
    adc[infarct] = 400.0

    rule_a, rule_b = rule_masks(dwi, brain, adc)
    assert np.array_equal(rule_a, infarct)
    assert rule_b.any() and not (rule_b & ~(infarct | shine_through)).any() and (rule_b & shine_through).any()
    z_only, _ = rule_masks(dwi, brain, None)
    assert np.array_equal(z_only, infarct | shine_through)
