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


@pytest.mark.slow  # the MS case runs sliding windows at 1 mm on the CPU: about a minute
def test_readme_reports_todays_test_set_numbers() -> None:
    """The README's Dice per task is what benchmarks/default_models.py measures now (n = 1 per task)."""
    if not (SHARED_DATA / "nifti").exists():
        pytest.skip(f"shared test data missing: {SHARED_DATA}")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "default_models.py"), "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for row in json.loads(result.stdout):
        line = next((line for line in readme.splitlines() if line.startswith(f"| `{row['task']}`")), None)
        assert line is not None, f"README has no default-model row for {row['task']}"
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", line)]
        assert round(row["model"]["dice"], 3) in numbers, (row, line)
        assert round(row["baseline_p99"]["dice"], 3) in numbers, (row, line)
