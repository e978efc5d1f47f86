"""Seconds for the one preprocessing on the real shared cases (ISLES DWI+ADC at 2 mm, MS FLAIR at 1 mm), and for
the inverse mapping back to the source grid. Median of 5 runs. Run: `.venv/bin/python benchmarks/preprocessing.py`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.manifest import Preprocessing  # noqa: E402
from models.preprocessing import Channel, preprocess, to_source  # noqa: E402

NIFTI = REPO.parent / "shared" / "data" / "nifti"
CASES = {
    "ISLES DWI+ADC → 2 mm": (
        [NIFTI / "isles22/case0001_dwi_adc_plus_gt/rawdata/sub-strokecase0001/ses-0001" / f"sub-strokecase0001_ses-0001_{c}.nii.gz"
         for c in ("dwi", "adc")],
        Preprocessing((2.0, 2.0, 2.0), (64, 64, 64), 16),
    ),
    "MS FLAIR → 1 mm": (
        [NIFTI / "open_ms_data/patient07/FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"],
        Preprocessing((1.0, 1.0, 1.0), (96, 96, 48), 16),
    ),
}


def median_seconds(function, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    for name, (paths, spec) in CASES.items():
        channels = [Channel.from_nifti(path, path.name) for path in paths]
        case = preprocess(channels, spec)
        forward = median_seconds(lambda: preprocess(channels, spec))
        backward = median_seconds(lambda: to_source(np.zeros(case.image.shape[1:], np.float32), case))
        print(f"{name:22} preprocess {forward:6.3f} s   to_source {backward:6.3f} s   grid {case.image.shape[1:]}")


if __name__ == "__main__":
    main()
