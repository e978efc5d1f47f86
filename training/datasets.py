"""Training datasets on disk (ISLES'22 BIDS, one-folder-per-case MS, CSV manifests) and seeded synthetic ones.

Torch-free, so a site can index, check and fingerprint its data without the `train` extra. Finding files and loading
them are separate steps: a site's data is messy, so a case that cannot be used is skipped with a reason (logged,
and returned to the caller) instead of stopping a run that has hundreds of other cases.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np

from models.adc import adc_in_micrometres
from models.manifest import Role, Task, default_inputs
from models.preprocessing import Channel
from models.resampling import resample

__all__ = [
    "CaseError",
    "CaseFiles",
    "DatasetIndex",
    "Skipped",
    "SyntheticSpec",
    "TrainingCase",
    "find_isles",
    "find_ms",
    "load_case",
    "load_cases",
    "mask_on",
    "open_dataset",
    "read_csv_manifest",
    "synthetic_cases",
]

log = logging.getLogger(__name__)

# The mask must lie on the first channel's grid: the loss is computed there, so no silent resampling of labels.
AFFINE_TOLERANCE_MM = 1e-3
# What a broken file raises: nibabel's ImageFileError for unreadable headers, the others for truncated/corrupt data.
_READ_ERRORS = (ValueError, OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError)
# ISLES'22 file names: <case>_dwi.nii.gz, <case>_adc.nii.gz, <case>_msk.nii.gz, case = sub-…_ses-…
_ISLES_FILE = re.compile(r"^(?P<case>sub-[^/]+?)_(?P<kind>dwi|adc|msk)\.nii(\.gz)?$")
_ISLES_KINDS = {"dwi": "dwi", "adc": "adc", "msk": "mask"}
_GEOMETRIES = ("axial", "flipped", "oblique")
SKULL_STRIPPED_PROBABILITY = 0.3
PARTIAL_COVERAGE_PROBABILITY = 0.3  # a clinical DWI slab that cuts the brain: its edges must not look like lesions
PARTIAL_COVERAGE_MM = (60.0, 130.0)
# Network channel → SyntheticCase image (whose ADC is already in 10⁻⁶ mm²/s).
_SYNTHETIC_IMAGES = {"dwi": "dwi_b1000", "adc": "adc", "flair": "flair"}
LESION_SIZE_STREAM = 1  # derived_seed(case seed, this): the lesion-size draw of a case mix


CaseT = TypeVar("CaseT")  # split_cases splits loaded cases and case files alike


class CaseError(ValueError):
    """One case cannot be used for training; the message says why."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case; `channels` is in network order (first = the grid everything goes onto)."""

    case_id: str
    channels: dict[str, Path]
    mask: Path | None


@dataclass(frozen=True)
class Skipped:
    case_id: str
    reason: str


@dataclass
class DatasetIndex:
    task: Task
    cases: list[CaseFiles]
    skipped: list[Skipped]


@dataclass
class TrainingCase:
    """A loaded case: channels on their own grids (preprocessing resamples them), ADC in 10⁻⁶ mm²/s, mask on the
    first channel's grid; `adc_unit_detected` records what the file was in (None without a detected ADC)."""

    case_id: str
    channels: list[Channel]
    mask: np.ndarray
    adc_unit_detected: str | None = None


def find_isles(root: str | Path) -> DatasetIndex:
    """ISLES'22 cases under `root`, BIDS-nested (rawdata/…, derivatives/…) or flat; matched by file name."""
    root = _existing_dir(root)
    found: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(root.rglob("sub-*")):
        match = _ISLES_FILE.match(path.name)
        if match and path.is_file():
            kinds = found.setdefault(match["case"], {})
            kinds.setdefault(_ISLES_KINDS[match["kind"]], []).append(path)
    cases, skipped = [], []
    for case_id, kinds in sorted(found.items()):
        problems = [f"no {name} file" for name in ("dwi", "adc") if name not in kinds]
        problems += [f"{len(paths)} {name} files" for name, paths in kinds.items() if len(paths) > 1]
        if problems:
            skipped.append(Skipped(case_id, ", ".join(problems)))
            continue
        masks = kinds.get("mask")
        cases.append(CaseFiles(case_id, {"dwi": kinds["dwi"][0], "adc": kinds["adc"][0]}, masks[0] if masks else None))
    return DatasetIndex(Task.STROKE_DWI_ADC, cases, skipped)


# Defaults fit open_ms_data (FLAIR_….nii.gz, GOLD_STANDARD_…, consensus_gt) and BIDS (…_FLAIR.nii.gz). Not "*FLAIR*":
# co-registered files are often named "…regtoFLAIR…"; not "*mask*": that also matches brainmask.nii.gz.
MS_FLAIR_PATTERN = "flair*.nii*|*_flair.nii*"
MS_MASK_PATTERN = "*gold_standard*.nii*|*consensus*.nii*|*lesion*.nii*|*_mask.nii*|mask.nii*"


def find_ms(
    root: str | Path, flair: str = MS_FLAIR_PATTERN, mask: str = MS_MASK_PATTERN, t1: str | None = None
) -> DatasetIndex:
    """One MS case per folder holding a file that matches `flair`; patterns are case-insensitive globs on the file
    name, alternatives separated by `|`. With `t1`, each case also gets a `t1` channel after FLAIR."""
    root = _existing_dir(root)
    patterns = {"flair": flair, "t1": t1, "mask": mask}
    cases, skipped = [], []
    for folder in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        matched = {role: [p for p in files if _matches(p.name, pattern)] for role, pattern in patterns.items() if pattern}
        if not matched["flair"]:
            continue
        case_id = folder.relative_to(root).as_posix() if folder != root else root.name
        problems = [f"{len(paths)} files match the {role} pattern" for role, paths in matched.items() if len(paths) > 1]
        problems += [f"no file matches the {role} pattern" for role in ("t1",) if t1 and not matched["t1"]]
        if len({p for paths in matched.values() for p in paths}) < sum(map(len, matched.values())):
            problems.append("one file matches two patterns")
        if problems:
            skipped.append(Skipped(case_id, ", ".join(problems)))
            continue
        channels = {role: matched[role][0] for role in ("flair", "t1") if matched.get(role)}
        cases.append(CaseFiles(case_id, channels, matched["mask"][0] if matched["mask"] else None))
    return DatasetIndex(Task.MS_FLAIR, cases, skipped)


def read_csv_manifest(path: str | Path, task: Task | str) -> DatasetIndex:
    """Columns `case_id`, one per channel of the task (e.g. dwi, adc) and `mask`; relative paths are relative to
    the CSV. A row with an empty channel cell is skipped; an empty mask cell means no mask."""
    path, task = Path(path), Task(task)
    names = [channel.name for channel in default_inputs(task)]
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("case_id", *names, "mask") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} for task {task.value}")
        rows = list(reader)
    cases, skipped, seen = [], [], set()
    for number, row in enumerate(rows, start=2):
        case_id = (row["case_id"] or "").strip()
        if not case_id:
            raise ValueError(f"{path}, line {number}: empty case_id")
        if case_id in seen:
            raise ValueError(f"{path}, line {number}: case_id {case_id!r} appears twice")
        seen.add(case_id)
        empty = [name for name in names if not (row[name] or "").strip()]
        if empty:
            skipped.append(Skipped(case_id, f"no {', '.join(empty)} path in the CSV"))
            continue
        mask = (row["mask"] or "").strip()
        channels = {name: _relative_to(path.parent, row[name].strip()) for name in names}
        cases.append(CaseFiles(case_id, channels, _relative_to(path.parent, mask) if mask else None))
    return DatasetIndex(task, cases, skipped)


def open_dataset(spec: str | Path, task: Task | str) -> DatasetIndex:
    """`*.csv` → CSV manifest; a folder with `rawdata/` or `sub-*` entries → ISLES'22; any other folder → MS."""
    path, task = Path(spec), Task(task)
    if path.suffix.lower() == ".csv":
        return read_csv_manifest(path, task)
    root = _existing_dir(path)
    isles = (root / "rawdata").is_dir() or any(root.glob("sub-*"))
    if isles != (task is Task.STROKE_DWI_ADC):
        layout = "an ISLES'22 (BIDS) layout" if isles else "one folder per MS case"
        raise ValueError(f"{root} looks like {layout}, which does not fit task {task.value}; use a CSV manifest")
    return find_isles(root) if isles else find_ms(root)


def load_case(files: CaseFiles, task: Task | str) -> TrainingCase:
    """Load one case; raises `CaseError` (or a file error) when it cannot be trained on."""
    task = Task(task)
    inputs = default_inputs(task)
    missing = [channel.name for channel in inputs if channel.name not in files.channels]
    if missing:
        raise CaseError(f"case {files.case_id}: no {', '.join(missing)} channel")
    if next(iter(files.channels)) != inputs[0].name:
        raise CaseError(f"case {files.case_id}: the first channel must be {inputs[0].name}")
    if files.mask is None:
        raise CaseError(f"case {files.case_id}: no lesion mask")
    roles = {channel.name: channel.role for channel in inputs}
    channels = [Channel.from_nifti(path, name) for name, path in files.channels.items()]
    first = channels[0]
    unit_detected = None
    for channel in channels:
        if roles.get(channel.name) is Role.ADC:
            try:
                converted = adc_in_micrometres(channel.data)
            except ValueError as error:
                raise CaseError(f"case {files.case_id}: {error}") from error
            channel.data = converted.values
            unit_detected = converted.unit.value
    mask_img = nib.funcs.squeeze_image(nib.load(files.mask))
    if mask_img.shape != first.data.shape:
        raise CaseError(f"case {files.case_id}: mask shape {mask_img.shape} differs from {first.name}'s "
                        f"{first.data.shape}")
    if not np.allclose(mask_img.affine, first.affine, atol=AFFINE_TOLERANCE_MM):
        raise CaseError(f"case {files.case_id}: mask affine differs from {first.name}'s by more than "
                        f"{AFFINE_TOLERANCE_MM} mm")
    mask = (np.asarray(mask_img.dataobj) > 0).astype(np.uint8)
    return TrainingCase(files.case_id, channels, mask, unit_detected)


def load_cases(index: DatasetIndex) -> tuple[list[TrainingCase], list[Skipped]]:
    """Every loadable case of `index`; the rest (including the index's own skips) come back as `Skipped`, each
    logged as a warning."""
    cases, skipped = [], list(index.skipped)
    for files in index.cases:
        try:
            cases.append(load_case(files, index.task))
        except _READ_ERRORS as error:
            reason = str(error).removeprefix(f"case {files.case_id}: ")
            skipped.append(Skipped(files.case_id, reason or type(error).__name__))
    for item in skipped:
        log.warning("skipped case %s: %s", item.case_id, item.reason)
    return cases, skipped


def synthetic_cases(
    task: Task | str, n: int, seed: int, *, domain_randomization: bool = True, site: int | None = None,
    lesion_sizes: Mapping[str, float] | None = None,
) -> Iterator[TrainingCase]:
    """`n` seeded synthetic cases. With domain randomization each draws a site profile, a geometry (axial, flipped,
    oblique), skull-stripping (p = 0.3) and a partial slab (p = 0.3, 60–130 mm), and stroke cases get healthy
    DWI-bright tissue with a normal ADC as hard negatives; stroke size and pattern are drawn by `generate_case`
    itself unless `lesion_sizes` gives each size class its share (a center's own case mix). `site` acquires every
    case with the one scanner profile `generate_site(site)` instead, as a real center's cases come from its own
    scanners; the other draws stay what they were."""
    from training.synthetic import derived_seed, generate_case, generate_site

    task = Task(task)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    kind = "stroke" if task is Task.STROKE_DWI_ADC else "ms"
    if lesion_sizes is not None and kind != "stroke":
        raise ValueError("lesion_sizes apply to stroke cases only")
    profile = generate_site(site) if site is not None else None
    for index in range(n):
        case_seed = derived_seed(seed, index)
        options = {}
        if domain_randomization:
            rng = np.random.default_rng(case_seed)
            options = {
                "site": generate_site(int(rng.integers(2**31))),
                "geometry": _GEOMETRIES[int(rng.integers(len(_GEOMETRIES)))],
                "skull_stripped": bool(rng.random() < SKULL_STRIPPED_PROBABILITY),
            }
            if rng.random() < PARTIAL_COVERAGE_PROBABILITY:
                options["coverage_mm"] = float(rng.uniform(*PARTIAL_COVERAGE_MM))
            options["dwi_mimics"] = task is Task.STROKE_DWI_ADC
        if profile is not None:
            options["site"] = profile
        if lesion_sizes is not None:  # its own seed stream: the draws above stay what they were
            classes, shares = zip(*lesion_sizes.items())
            size_rng = np.random.default_rng(derived_seed(case_seed, LESION_SIZE_STREAM))
            options["size"] = classes[int(size_rng.choice(len(classes), p=np.array(shares) / sum(shares)))]
        case = generate_case(kind, case_seed, **options)
        channels = [
            Channel(case.images[_SYNTHETIC_IMAGES[channel.name]], case.affine, channel.name)
            for channel in default_inputs(task)
        ]
        yield TrainingCase(case.case_id, channels, case.mask, None)


@dataclass(frozen=True)
class SyntheticSpec:
    """`synthetic:N[:seed=S][:site=K]`: N seeded synthetic cases. `seed` fixes the cases whatever seed the run
    has; `site` acquires them all with scanner profile K, so simulated sites differ. `synthetic:N` draws a profile
    per case from the run's seed, as it always did."""

    count: int
    seed: int | None = None
    site: int | None = None

    PREFIX = "synthetic:"

    @classmethod
    def parse(cls, spec: str) -> SyntheticSpec | None:
        """The spec's parts, None when `spec` is not a synthetic one; ValueError naming the bad part."""
        parsed = parse_counted_spec(spec, cls.PREFIX, "N", ("seed", "site"))
        return None if parsed is None else cls(parsed[0], **parsed[1])


def parse_counted_spec(
    spec: str, prefix: str, count_name: str, keys: tuple[str, ...]
) -> tuple[int, dict[str, int]] | None:
    """`<prefix><count>[:key=value]…` with whole numbers: (count, options), None without the prefix; a ValueError
    names the bad part."""
    if not spec.startswith(prefix):
        return None
    usage = f"{prefix}{count_name}"
    count, *options = spec.removeprefix(prefix).split(":")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--data {spec}: {usage} needs a whole number {count_name} ≥ 1")
    values: dict[str, int] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in keys or key in values or not value.isdigit():
            allowed = " and ".join(f"{name}=…" for name in keys)
            raise ValueError(f"--data {spec}: options after {usage} are {allowed} (whole numbers ≥ 0, each at most "
                             f"once), got {option!r}")
        values[key] = int(value)
    return int(count), values


def load_training_cases(spec: str, task: Task | str, seed: int) -> tuple[list[TrainingCase], list[Skipped]]:
    """(cases, skipped) for a dataset spec (`open_dataset`) or a `SyntheticSpec` (seeded synthetic cases; `seed`
    unless the spec names its own)."""
    synthetic = SyntheticSpec.parse(spec)
    if synthetic is not None:
        case_seed = seed if synthetic.seed is None else synthetic.seed
        options = {} if synthetic.site is None else {"site": synthetic.site}
        return list(synthetic_cases(task, synthetic.count, case_seed, **options)), []
    return load_cases(open_dataset(spec, task))  # its skipped list includes the index's own


def split_cases(cases: list[CaseT], val_fraction: float, seed: int) -> tuple[list[CaseT], list[CaseT]]:
    """Seeded shuffle, then hold out round(F·n) cases (at least one when F > 0 and n ≥ 2; one always trains)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = int(round(val_fraction * len(cases)))
    if val_fraction > 0 and len(cases) >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, len(cases) - 1)
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def mask_on(mask: np.ndarray, source: Channel, target: Channel) -> np.ndarray:
    """A boolean mask on `source`'s grid carried onto `target`'s (nearest neighbour; as is when the grids agree)."""
    if target.data.shape == source.data.shape and np.allclose(target.affine, source.affine, atol=AFFINE_TOLERANCE_MM):
        return np.asarray(mask, dtype=bool)
    return resample(mask.astype(np.float32), source.affine, target.affine, target.data.shape, order=0) > 0.5


def _matches(name: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), alternative.strip().lower()) for alternative in pattern.split("|"))


def _relative_to(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"dataset folder not found: {path}")
    return path
