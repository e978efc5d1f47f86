"""Shared fixtures. Real third-party data lives in ../shared/data beside the repository (design.md §10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ISLES_CASE = SHARED_DATA / "nifti" / "isles22" / "case0001_dwi_adc_plus_gt"
ISLES_DWI = ISLES_CASE / "rawdata/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_dwi.nii.gz"
ISLES_ADC = ISLES_CASE / "rawdata/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_adc.nii.gz"
ISLES_MASK = ISLES_CASE / "derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz"
ISLES_MASK_0003 = SHARED_DATA / "nifti/isles22/gt_masks_only_case0002_0003/sub-strokecase0003_ses-0001_dwi.nii.gz"
MS_CASE = SHARED_DATA / "nifti" / "open_ms_data" / "patient07"
MS_FLAIR = MS_CASE / "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
MS_MASK = MS_CASE / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"
MNI_T1 = SHARED_DATA / "nifti/templates/nilearn_0.14.1/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

# Prepended to a `python -c` script: the process runs as a limited center's node (design.md §1), where torch, MONAI
# and onnx cannot be imported.
WITHOUT_TORCH = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai", "onnx", "onnxscript"):
            raise ModuleNotFoundError(f"{name} is blocked: not part of a limited center's install")
        return None

sys.meta_path.insert(0, Blocker())
"""


def write_labelled_cases(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` small stroke cases (a noisy ellipsoid head, a DWI-bright, ADC-dark sphere, its mask; 3 mm voxels) as
    NIfTI files and the CSV manifest naming them: a dataset that loads in milliseconds where generated synthetic
    heads take seconds each."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    grid = np.stack(np.meshgrid(*(np.arange(size) for size in (48, 56, 32)), indexing="ij"), axis=-1)
    head = (((grid - (24, 28, 16)) / (20, 24, 13)) ** 2).sum(-1) < 1
    rows = ["case_id,dwi,adc,mask"]
    for index in range(n):
        centre = (24, 28, 16) + rng.integers(-6, 7, 3)
        lesion = (((grid - centre) / rng.uniform(2, 5)) ** 2).sum(-1) < 1
        dwi = np.where(head, 300 + 20 * rng.standard_normal(head.shape), 0) + 500 * lesion
        adc = np.where(head, 800 + 30 * rng.standard_normal(head.shape), 0) - 450 * lesion
        for name, data in (("dwi", dwi), ("adc", adc), ("mask", lesion)):
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), folder / f"case{index}_{name}.nii.gz")
        rows.append(f"case{index},case{index}_dwi.nii.gz,case{index}_adc.nii.gz,case{index}_mask.nii.gz")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


def require(*paths: Path) -> None:
    """Skip, naming the file, when the shared data folder is not beside the repository."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"shared test data missing: {path}")


@pytest.fixture(scope="session")
def shared_dicom(tmp_path_factory: pytest.TempPathFactory):
    """`shared_dicom("dcm_qa_xa30i/dicom")`: that shared folder, gunzipped, cached for the session."""
    from tests.dicom_support import unpack_shared

    root = tmp_path_factory.mktemp("shared-dicom")
    return lambda relative: unpack_shared(relative, root)


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths os.fsync is called on, in call order (the calls still sync)."""
    calls: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls
