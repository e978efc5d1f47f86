"""Each center's partition, made once per study folder: the same splits for every arm of the study.

A center's cases become CSV manifests (`training.datasets.read_csv_manifest`), one per split: a large center's
train, val (the validation it reports each round) and test (the held-out cases its final model is scored on); a
limited center's cases are all test cases (it never trains, and evaluates on all of them each round). Synthetic
cases are generated once into `DIR/data/CENTER/cases/` as NIfTI (a site process then loads files instead of
generating again for every arm); real datasets are referenced where they lie. `center.json`, written last, marks a
center as made: an interrupted study makes only the centers it had not finished.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from models.durable import write_text_atomic
from models.manifest import Task, default_inputs
from training.datasets import (
    CaseFiles,
    SyntheticSpec,
    TrainingCase,
    load_training_cases,
    open_dataset,
    split_cases,
    synthetic_cases,
)
from training.study.config import CenterConfig, CenterRole, StudyConfig
from training.synthetic import derived_seed

__all__ = ["CENTER_FILE", "SPLITS", "CenterData", "prepare_centers"]

log = logging.getLogger(__name__)

CENTER_FILE = "center.json"
SPLITS = ("train", "val", "test")
SPLIT_STREAM = 2  # derived_seed(center seed, this) orders a center's cases for its splits


@dataclass(frozen=True)
class CenterData:
    """A center as the study uses it: its CSV manifest per split and case counts, or why it was left out."""

    name: str
    role: CenterRole
    manifests: dict[str, str]  # split → CSV path (only the splits the center has cases in)
    counts: dict[str, int]
    skipped: str = ""  # non-empty: the center takes no part in the study

    @property
    def large(self) -> bool:
        return self.role is CenterRole.TRAIN

    def manifest(self, split: str) -> Path | None:
        return Path(self.manifests[split]) if split in self.manifests else None

    @classmethod
    def read(cls, path: Path) -> CenterData:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["name"], CenterRole(data["role"]), data["manifests"], data["counts"], data["skipped"])


def prepare_centers(config: StudyConfig, data_dir: Path, workers: int = 1) -> list[CenterData]:
    """Every center's partition under `data_dir`, made where it is not yet (in `workers` processes)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    missing = [center for center in config.centers if not (data_dir / center.name / CENTER_FILE).is_file()]
    if missing:
        log.info("making the partitions of %s", ", ".join(center.name for center in missing))
    if workers > 1 and len(missing) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_prepare_center, [config] * len(missing), missing, [data_dir] * len(missing)))
    else:
        for center in missing:
            _prepare_center(config, center, data_dir)
    return [CenterData.read(data_dir / center.name / CENTER_FILE) for center in config.centers]


def _prepare_center(config: StudyConfig, center: CenterConfig, data_dir: Path) -> None:
    folder = data_dir / center.name
    folder.mkdir(parents=True, exist_ok=True)
    absent = [spec for spec in center.data if SyntheticSpec.parse(spec) is None and not Path(spec).exists()]
    if absent and not center.optional:
        raise ValueError(f"center {center.name}: {absent[0]} does not exist")
    if absent:
        _write_center(folder, CenterData(center.name, center.role, {}, {},
                                         skipped=f"{absent[0]} is absent, so the center is left out"))
        return
    files = _case_files(config, center, folder)
    if not files:
        raise ValueError(f"center {center.name}: no usable case")
    seed = derived_seed(_center_seed(center, config.seed), SPLIT_STREAM)
    if center.role is CenterRole.TRAIN:
        rest, test = split_cases(files, config.test_fraction, seed)
        train, val = split_cases(rest, config.val_fraction, seed)
        splits = {"train": train, "val": val, "test": test}
    else:
        splits = {"test": files}
    manifests = {}
    for split, cases in splits.items():
        if cases:
            manifests[split] = str(folder / f"{split}.csv")
            write_text_atomic(folder / f"{split}.csv", _csv(cases, config.task, folder))
    _write_center(folder, CenterData(center.name, center.role, manifests,
                                     {split: len(cases) for split, cases in splits.items()}))
    log.info("center %s: %s", center.name, ", ".join(f"{len(c)} {s}" for s, c in splits.items()))


def _center_seed(center: CenterConfig, study_seed: int) -> int:
    return center.synthetic.seed if center.synthetic is not None else study_seed


def _case_files(config: StudyConfig, center: CenterConfig, folder: Path) -> list[CaseFiles]:
    """The center's cases as files: real ones where they lie, synthetic ones written under `folder/cases`."""
    if center.synthetic is not None:
        source = center.synthetic
        generated = synthetic_cases(config.task, source.cases, source.seed, site=source.scanner,
                                    lesion_sizes=source.lesion_sizes)
        return [_write_case(case, folder / "cases", config.task) for case in generated]
    files: list[CaseFiles] = []
    for spec in center.data:
        if SyntheticSpec.parse(spec) is not None:
            cases, _ = load_training_cases(spec, config.task, config.seed)
            files += [_write_case(case, folder / "cases", config.task) for case in cases]
        else:
            index = open_dataset(spec, config.task)
            for skipped in index.skipped:
                log.warning("center %s: case %s skipped: %s", center.name, skipped.case_id, skipped.reason)
            files += [case for case in index.cases if case.mask is not None]
    ids = [case.case_id for case in files]
    if len(set(ids)) < len(ids):
        raise ValueError(f"center {center.name}: a case id appears in two of its datasets")
    return files


def _write_case(case: TrainingCase, folder: Path, task: Task) -> CaseFiles:
    """A generated case as NIfTI files, one per channel and the mask, on the grids the case has."""
    target = folder / case.case_id
    target.mkdir(parents=True, exist_ok=True)
    channels = {}
    for channel in case.channels:
        channels[channel.name] = target / f"{channel.name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(channel.data, dtype=np.float32), channel.affine), channels[channel.name])
    mask = target / "mask.nii.gz"
    nib.save(nib.Nifti1Image(case.mask.astype(np.uint8), case.channels[0].affine), mask)
    return CaseFiles(case.case_id, channels, mask)


def _csv(cases: list[CaseFiles], task: Task, folder: Path) -> str:
    """`read_csv_manifest`'s columns; files under `folder` relative to it (the study folder can move)."""
    names = [channel.name for channel in default_inputs(task)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case_id", *names, "mask"])
    for case in cases:
        paths = [case.channels[name] for name in names] + [case.mask]
        writer.writerow([case.case_id, *(_relative(Path(path), folder) for path in paths)])
    return out.getvalue()


def _relative(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path.resolve())


def _write_center(folder: Path, center: CenterData) -> None:
    data = asdict(center)
    data["role"] = center.role.value
    write_text_atomic(folder / CENTER_FILE, json.dumps(data, indent=2) + "\n")
