"""`synthetic-stream:P`: its spec, the per-epoch pools drawn in worker processes, and lesion-first patch sampling."""

from __future__ import annotations

import numpy as np
import pytest

from models.manifest import Normalization, Preprocessing, Task
from tests.conftest import require
from training.patches import PatchSampler, PreparedCase, prepare_case
from training.stream import CaseStream, SyntheticStreamSpec, randomized_case, validation_cases
from training.synthetic import derived_seed
from training.synthetic.anatomy import shared_data_dir

STROKE_PRE = Preprocessing((2.0, 2.0, 2.0), (64, 64, 48), 16, Normalization())


@pytest.mark.parametrize("text, expected", [
    ("synthetic-stream:8", SyntheticStreamSpec(8)),
    ("synthetic-stream:4:seed=3:workers=2", SyntheticStreamSpec(4, seed=3, workers=2)),
    ("synthetic:8", None),
    ("/data/isles", None),
])
def test_spec_parses(text, expected) -> None:
    assert SyntheticStreamSpec.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("synthetic-stream:0", "P ≥ 1"),
    ("synthetic-stream:x", "P ≥ 1"),
    ("synthetic-stream:4:site=1", "seed=… and workers=…"),
    ("synthetic-stream:4:seed=1:seed=2", "at most once"),
    ("synthetic-stream:4:workers=0", "at least 1"),
])
def test_bad_specs_name_the_part(text, message) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticStreamSpec.parse(text)


def test_pools_come_from_worker_processes_reproducibly_and_never_repeat() -> None:
    """Volume i of epoch e is the one `derived_seed(seed, e, i)` draws in this process, so a resumed run sees what a
    straight run would; the next epoch's pool is new, and validation seeds are none of them."""
    require(shared_data_dir() / "nifti" / "templates", shared_data_dir() / "nifti" / "soop_lesions")
    with CaseStream(Task.STROKE_DWI_ADC, SyntheticStreamSpec(1), seed=5, preprocessing=STROKE_PRE) as stream:
        first = stream.pool(0)
        second = stream.pool(1)
    assert stream.drawn == 2 and "volumes/s" in stream.report(10.0)
    local = randomized_case(Task.STROKE_DWI_ADC, derived_seed(5, 1, 0), 2.0)
    assert np.array_equal(second[0].source_mask, local.mask)
    assert np.array_equal(second[0].image, prepare_case(local, STROKE_PRE).image)
    ids = {case.case_id for case in first + second}
    assert len(ids) == 2
    validation = {case.case_id for case in validation_cases(Task.STROKE_DWI_ADC, 2, 5, STROKE_PRE)}
    assert not validation & ids


def test_a_stream_needs_an_isotropic_spacing() -> None:
    anisotropic = Preprocessing((1.0, 1.0, 3.0), (64, 64, 16), 16, Normalization())
    with pytest.raises(ValueError, match="isotropic"):
        CaseStream(Task.MS_FLAIR, SyntheticStreamSpec(1), seed=0, preprocessing=anisotropic)


def test_patches_centre_on_small_lesions_as_often_as_on_the_large_one() -> None:
    label = np.zeros((60, 60, 60), dtype=np.uint8)
    label[5:45, 5:45, 5:45] = 1  # 64,000 voxels
    label[55, 55, 55] = 1  # one voxel
    lesions = (np.argwhere(label[:50, :50, :50]).astype(np.int32), np.array([[55, 55, 55]], dtype=np.int32))
    case = PreparedCase("c", np.zeros((1, *label.shape), np.float32), label, lesions, None, label, 0.008)  # type: ignore[arg-type]
    sampler = PatchSampler([case], (8, 8, 8), foreground_fraction=1.0)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        _, patch = sampler.sample(rng)
        hits += int(patch[0].sum() == 1)  # only the single-voxel lesion is in view
    assert 150 < hits < 250  # drawing voxels instead of lesions would give ~0


def test_workers_end_with_a_killed_trainer(tmp_path) -> None:
    """A trainer killed with SIGKILL leaves no worker drawing volumes for nobody (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import time\n"
        "from training.stream import CaseStream, SyntheticStreamSpec\n"
        "from models.manifest import Normalization, Preprocessing\n"
        "stream = CaseStream('ms-flair', SyntheticStreamSpec(2), 0,"
        " Preprocessing((1.5, 1.5, 1.5), (64, 64, 64), 16, Normalization()))\n"
        "stream._submit(0)\n"
        "while not stream._executor._processes: time.sleep(0.05)\n"
        "print(*stream._executor._processes, flush=True)\n"
        "time.sleep(120)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers = [int(pid) for pid in trainer.stdout.readline().split()]
    assert workers and all(os.path.exists(f"/proc/{pid}") for pid in workers)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
