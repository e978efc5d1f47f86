"""The embedded default models: signed by the demo key, marked not for clinical use, small, runnable, and the
README's test-set numbers are the ones the engine gives today."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SHARED_DATA

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
    # default windows run on the real case in test_readme_reports_todays_test_set_numbers).
    prediction = Engine(package, threads=2, window_voxels=WHOLE_VOLUME_VOXELS).predict(channels)
    probabilities = prediction.probabilities
    assert prediction.windows <= 5
    assert probabilities.shape == case.mask.shape
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0


def readme_default_model_rows(readme: str) -> dict[str, dict[str, str]]:
    """The README's default-model table, keyed by its `task` cell (e.g. "`stroke-dwi-adc` v1"): header → cell."""
    lines = readme.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("| task | test case | Dice |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        rows[cells["task"]] = cells
    return rows


def assert_shown_as(cell: str, value: float, column: str) -> None:
    """`value` rounded to the cell's own number of decimals is what the cell says."""
    decimals = len(cell.partition(".")[2])
    assert float(cell) == round(value, decimals), f"{column}: README {cell}, measured {value}"


@pytest.mark.slow  # the MS case runs sliding windows at 1 mm on the CPU: about a minute
def test_readme_reports_todays_test_set_numbers() -> None:
    """Each number in the README's default-model rows is, column by column and at the README's rounding, what
    benchmarks/default_models.py measures now for the shipped package of that version (n = 1 per task)."""
    if not (SHARED_DATA / "nifti").exists():
        pytest.skip(f"shared test data missing: {SHARED_DATA}")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "default_models.py"), "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    rows = readme_default_model_rows((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    measured = json.loads(result.stdout)
    assert len(rows) == len(measured) == len(list(Task))
    for row in measured:
        cells = rows[f"`{row['task']}` v{row['model_version']}"]
        model, baseline = row["model"], row["baseline_p99"]
        for column, value in (
            ("Dice", model["dice"]),
            ("AVD (ml)", model["avd_ml"]),
            ("lesion F1", model["lf1"]),
            ("predicted (ml)", model["pred_volume_ml"]),
            ("truth (ml)", model["gt_volume_ml"]),
            ("baseline Dice (1st channel > 99th pct)", baseline["dice"]),
        ):
            assert_shown_as(cells[column], value, f"{row['task']} {column}")


def test_readme_cells_are_compared_at_their_own_rounding() -> None:
    """The README check refuses a number that is off in its last shown decimal or sits in another column."""
    readme = (
        "| task | test case | Dice | AVD (ml) |\n|---|---|---|---|\n| `stroke-dwi-adc` v1 | case | 0.002 | 3.10 |\n"
    )
    cells = readme_default_model_rows(readme)["`stroke-dwi-adc` v1"]
    assert_shown_as(cells["Dice"], 0.0021, "Dice")
    assert_shown_as(cells["AVD (ml)"], 3.1049, "AVD")
    with pytest.raises(AssertionError):
        assert_shown_as(cells["AVD (ml)"], 3.106, "AVD")
    with pytest.raises(AssertionError):
        assert_shown_as(cells["Dice"], 3.10, "Dice")  # the AVD's value is not the Dice's
