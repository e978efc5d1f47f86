"""Segmentation metrics with the ISLES'22 definitions (design.md §9): per case, then mean ± SD over a dataset.

Masks are binarized as `value > 0`: ground-truth masks arrive as uint8, uint16 or float and predictions as label maps,
so "any positive value is lesion" is the one rule that reads all of them the same. A probability map must be
thresholded before it is evaluated (0.01 would count as lesion). Lesions are 26-connected components
(`models.postprocessing.label_components`), the same definition the node uses for its lesion count.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from numpy.typing import ArrayLike, NDArray

from models.geometry import voxel_volume_ml
from models.postprocessing import label_components

GRID_TOLERANCE_MM = 1e-3
DEFAULT_CASE_REGEX = r"(\d+)"
SMALL_BELOW_ML = 5.0
LARGE_ABOVE_ML = 70.0


@dataclass(frozen=True)
class CaseMetrics:
    """Every number for one case; NaN marks a ratio whose denominator is zero (excluded from dataset means)."""

    dice: float
    avd_ml: float
    ald: int
    lf1: float
    gt_volume_ml: float
    pred_volume_ml: float
    gt_lesions: int
    pred_lesions: int
    tp_lesions: int
    fp_lesions: int
    fn_lesions: int
    voxel_sensitivity: float
    voxel_precision: float
    lesion_sensitivity: float
    lesion_precision: float
    size_category: str

    def as_dict(self) -> dict[str, float | int | str | None]:
        """JSON-safe: NaN becomes None (null), since JSON has no NaN."""
        return {key: _json_number(value) for key, value in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class MetricSummary:
    """Mean and sample SD (ddof=1) over the cases where the metric is defined; SD is NaN when n < 2."""

    mean: float
    sd: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": _json_number(self.mean), "sd": _json_number(self.sd), "n": self.n}


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    pred_path: Path
    gt_path: Path
    metrics: CaseMetrics

    def as_dict(self) -> dict[str, object]:
        return {"case_id": self.case_id, "pred": str(self.pred_path), "gt": str(self.gt_path), **self.metrics.as_dict()}


@dataclass(frozen=True)
class DatasetResult:
    """Per-case rows, the summary per numeric metric, and the files skipped as unpaired (only if allowed)."""

    cases: list[CaseResult]
    summary: dict[str, MetricSummary]
    unpaired: list[str]

    def as_dict(self) -> dict[str, object]:
        return {
            "n_cases": len(self.cases),
            "cases": [case.as_dict() for case in self.cases],
            "summary": {name: stats.as_dict() for name, stats in self.summary.items()},
            "unpaired_skipped": self.unpaired,
        }


NUMERIC_METRICS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(CaseMetrics) if field.name != "size_category"
)


def size_category(gt_volume_ml: float, small_below_ml: float = SMALL_BELOW_ML,
                  large_above_ml: float = LARGE_ABOVE_ML) -> str:
    """small < small_below_ml ≤ medium ≤ large_above_ml < large, by total GT volume (an empty GT is small)."""
    if not 0 < small_below_ml <= large_above_ml:
        raise ValueError(f"size thresholds need 0 < small ({small_below_ml}) <= large ({large_above_ml})")
    if gt_volume_ml < small_below_ml:
        return "small"
    return "large" if gt_volume_ml > large_above_ml else "medium"


def compute_metrics(pred: ArrayLike, gt: ArrayLike, voxel_ml: float, *, small_below_ml: float = SMALL_BELOW_ML,
                    large_above_ml: float = LARGE_ABOVE_ML) -> CaseMetrics:
    """All metrics of one case from two 3-D masks on the same grid (binarized as > 0) and the voxel volume in ml."""
    p = _binarize(pred, "prediction")
    g = _binarize(gt, "ground truth")
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise ValueError(f"voxel volume must be a positive number of ml, got {voxel_ml}")

    n_p, n_g = int(p.sum()), int(g.sum())
    overlap = p & g
    n_both = int(np.count_nonzero(overlap))
    gt_labels, gt_lesions = label_components(g)
    pred_labels, pred_lesions = label_components(p)
    # A component "touches" the other mask when it shares at least one voxel with it.
    tp = int(np.unique(gt_labels[overlap]).size)
    pred_hits = int(np.unique(pred_labels[overlap]).size)
    fn = gt_lesions - tp
    fp = pred_lesions - pred_hits

    gt_volume, pred_volume = n_g * voxel_ml, n_p * voxel_ml
    return CaseMetrics(
        dice=_dice(n_both, n_p, n_g),
        avd_ml=abs(gt_volume - pred_volume),
        ald=abs(gt_lesions - pred_lesions),
        lf1=1.0 if gt_lesions + pred_lesions == 0 else tp / (tp + (fp + fn) / 2.0),
        gt_volume_ml=gt_volume,
        pred_volume_ml=pred_volume,
        gt_lesions=gt_lesions,
        pred_lesions=pred_lesions,
        tp_lesions=tp,
        fp_lesions=fp,
        fn_lesions=fn,
        voxel_sensitivity=_ratio(n_both, n_g),
        voxel_precision=_ratio(n_both, n_p),
        lesion_sensitivity=_ratio(tp, gt_lesions),
        lesion_precision=_ratio(pred_hits, pred_lesions),
        size_category=size_category(gt_volume, small_below_ml, large_above_ml),
    )


def dice_at_thresholds(probabilities: ArrayLike, gt: ArrayLike, thresholds: Sequence[float]) -> list[float]:
    """Dice of `probabilities >= t` against `gt` at each threshold t: what threshold calibration compares, without
    the component labelling the lesion-wise metrics need (`compute_metrics` costs that once per threshold)."""
    p = np.asarray(probabilities)
    g = _binarize(gt, "ground truth")
    if p.shape != g.shape:
        raise ValueError(f"probabilities shape {p.shape} differs from ground-truth shape {g.shape}")
    inside, n_g = p[g], int(np.count_nonzero(g))
    return [_dice(int(np.count_nonzero(inside >= t)), int(np.count_nonzero(p >= t)), n_g) for t in thresholds]


def evaluate_files(pred_path: str | Path, gt_path: str | Path, *, small_below_ml: float = SMALL_BELOW_ML,
                   large_above_ml: float = LARGE_ABOVE_ML) -> CaseMetrics:
    """Metrics of one NIfTI pair; the grids must match (shape, and affine within 1e-3 mm) or nothing is compared."""
    pred_image = _load(Path(pred_path), "prediction")
    gt_image = _load(Path(gt_path), "ground truth")
    if pred_image.shape != gt_image.shape:
        raise ValueError(f"grids differ: prediction shape {pred_image.shape} vs ground truth {gt_image.shape} "
                         f"({pred_path} vs {gt_path})")
    affine_gap = float(np.max(np.abs(pred_image.affine - gt_image.affine)))
    if not affine_gap <= GRID_TOLERANCE_MM:
        raise ValueError(f"grids differ: affines differ by up to {affine_gap:.6g} mm (tolerance {GRID_TOLERANCE_MM}) "
                         f"({pred_path} vs {gt_path})")
    return compute_metrics(
        _voxels(pred_image, "prediction"), _voxels(gt_image, "ground truth"), voxel_volume_ml(gt_image.affine),
        small_below_ml=small_below_ml, large_above_ml=large_above_ml,
    )


def evaluate_dataset(pred_dir: str | Path, gt_dir: str | Path, case_regex: str = DEFAULT_CASE_REGEX, *,
                     allow_unpaired: bool = False, small_below_ml: float = SMALL_BELOW_ML,
                     large_above_ml: float = LARGE_ABOVE_ML) -> DatasetResult:
    """Evaluate every NIfTI pair of two folders, paired by the case ID `case_regex` finds in each file name.

    The ID is the regex's first group (the whole match if it has none), compared as text. A file without a partner
    is an error by default, because silently dropping a case would bias the means; `allow_unpaired` skips such files
    and lists them in the result instead.
    """
    try:
        pattern = re.compile(case_regex)
    except re.error as error:
        raise ValueError(f"invalid case regex {case_regex!r}: {error}") from None
    preds, pred_misses = _cases_by_id(Path(pred_dir), pattern, "prediction")
    gts, gt_misses = _cases_by_id(Path(gt_dir), pattern, "ground truth")
    unpaired = sorted(
        [f"{path} (no case ID)" for path in pred_misses + gt_misses]
        + [f"{preds[case]} (prediction without ground truth)" for case in preds.keys() - gts.keys()]
        + [f"{gts[case]} (ground truth without prediction)" for case in gts.keys() - preds.keys()]
    )
    if unpaired and not allow_unpaired:
        raise ValueError(f"{len(unpaired)} unpaired file(s), pass --allow-unpaired to skip them: "
                         + "; ".join(unpaired))
    paired = sorted(preds.keys() & gts.keys())
    if not paired:
        raise ValueError(f"no case ID of {pred_dir} matches one of {gt_dir} (case regex {case_regex!r})")
    cases = [
        CaseResult(case, preds[case], gts[case],
                   evaluate_files(preds[case], gts[case], small_below_ml=small_below_ml,
                                  large_above_ml=large_above_ml))
        for case in paired
    ]
    return DatasetResult(cases=cases, summary=summarize([case.metrics for case in cases]), unpaired=unpaired)


def summarize(rows: list[CaseMetrics]) -> dict[str, MetricSummary]:
    """Mean ± sample SD per numeric metric; NaN values (undefined ratios) are left out, so n can differ per metric."""
    summary: dict[str, MetricSummary] = {}
    for name in NUMERIC_METRICS:
        values = np.array([getattr(row, name) for row in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        n = int(values.size)
        mean = float(values.mean()) if n else math.nan
        sd = float(values.std(ddof=1)) if n >= 2 else math.nan
        summary[name] = MetricSummary(mean=mean, sd=sd, n=n)
    return summary


def _binarize(mask: ArrayLike, what: str) -> NDArray[np.bool_]:
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"{what} must be a 3-D mask, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{what} must be numeric or boolean, got dtype {array.dtype}")
    return array > 0


def _dice(n_both: int, n_p: int, n_g: int) -> float:
    """2|P∩G| / (|P| + |G|) from voxel counts; both empty → 1."""
    return 1.0 if n_p + n_g == 0 else 2.0 * n_both / (n_p + n_g)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _json_number(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


def _load(path: Path, what: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        image = nib.load(path)
    except ImageFileError as error:
        raise ValueError(f"cannot read {what} {path} as NIfTI: {error}") from None
    if len(image.shape) != 3:
        raise ValueError(f"{what} {path} must be a 3-D image, got shape {image.shape}")
    return image


def _voxels(image: nib.Nifti1Image, what: str) -> np.ndarray:
    """Read the stored values (scaled, not cast to float64); a truncated .gz surfaces here, not at load time."""
    try:
        return np.asanyarray(image.dataobj)
    except (EOFError, zlib.error) as error:
        raise ValueError(f"cannot read {what} {image.get_filename()}: {error}") from None


def _cases_by_id(folder: Path, pattern: re.Pattern[str], what: str) -> tuple[dict[str, Path], list[Path]]:
    """Map case ID → NIfTI file in one folder; also return the files the regex finds no ID in."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ValueError(f"no .nii or .nii.gz files in {what} folder {folder}")
    by_id: dict[str, Path] = {}
    misses: list[Path] = []
    for path in files:
        match = pattern.search(path.name)
        case = None if match is None else match.group(1) if pattern.groups else match.group(0)
        if not case:
            misses.append(path)
            continue
        if case in by_id:
            raise ValueError(f"case ID {case!r} found twice in {what} folder: {by_id[case].name}, {path.name}")
        by_id[case] = path
    return by_id, misses
