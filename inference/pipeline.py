"""One path from a study's inputs to a result: the job worker and `fedlesion segment` both go through here.

Why one module: the numbers a radiologist reads in the SR, on the web page and in report.json must come from one
computation. The engine gives probabilities on the source grid of the first channel (design.md §3); this module
thresholds them there, drops components below the manifest's minimum lesion size, labels 26-connected lesions,
measures them with the source voxel volume (DICOM: row × column spacing × the distance between slice positions,
never SliceThickness), measures the ADC-confirmed core for stroke, and collects the input QA warnings (design.md §5).

The mask is a NIfTI label image on the source grid: 0 background, 1..N the lesions of `lesions` (id 1 is the
largest), uint8 (uint16 past 255 lesions). For DICOM input `label_map` holds the same labels on the writers'
reference grid: (slices, Rows, Columns), slices in the spatial order highdicom gives the first channel's reference
instances (`dicom_gateway.writers.common.reference_grid`), so SEG, overlay and SR get it as is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_gateway.study_inputs import RoleVolume, StudyInputs
from dicom_gateway.writers import Lesion, ModelInfo
from dicom_gateway.writers.common import reference_grid
from inference.engine import FLIPS, Engine
from models.geometry import affine_spacing, swap_ras_lps, voxel_volume_ml
from models.manifest import Manifest, Role, Task
from models.postprocessing import label_components
from models.preprocessing import (
    Channel,
    PreprocessedCase,
    head_mask,
    preprocess,
    to_source,
)
from models.resampling import resample

__all__ = [
    "ADC_CORE_THRESHOLD",
    "ModelUsed",
    "SegmentationResult",
    "SeriesUsed",
    "StudySource",
    "segment_channels",
    "segment_study",
]

ADC_CORE_THRESHOLD = 620.0  # µm²/s: lesion voxels below it are the ADC-confirmed core (design.md §5)
ADC_MEDIAN_RANGE = (500.0, 1200.0)  # µm²/s inside the head; outside it the ADC map or its unit is suspect
MIN_SLICES = 10
MIN_COVERAGE_MM = 100.0
VOLUME_DECIMALS = 6  # ml: report, SR and web page show the same rounded numbers
STAGES = ("load", "preprocess", "inference", "postprocess")
# Transfer syntaxes that never lose information; any other compressed one may have (JPEG baseline, JPEG-LS near
# lossless, JPEG 2000 "lossy or lossless", HTJ2K, video).
_LOSSLESS_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Lossless Only
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)


@dataclass(frozen=True)
class SeriesUsed:
    """One input series: which role it filled."""

    role: str
    series_uid: str | None
    series_number: int | None
    description: str


@dataclass(frozen=True)
class StudySource:
    """What is known about where the inputs came from; NIfTI input knows what study.json says, or nothing."""

    study_uid: str | None = None
    series: tuple[SeriesUsed, ...] = ()
    dwi_b_value: float | None = None
    adc_unit_detected: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelUsed:
    """The model behind a result (every result records the version it used, design.md §5)."""

    name: str
    task: Task
    version: int
    federated_round: int | None
    manifest_sha256: str
    demo: bool
    providers: tuple[str, ...]

    @classmethod
    def of(cls, engine: Engine) -> ModelUsed:
        manifest = engine.manifest
        return cls(
            name=manifest.name,
            task=manifest.task,
            version=manifest.version,
            federated_round=manifest.training.federated_round,
            manifest_sha256=engine.package.manifest_sha256,
            demo=engine.package.demo,
            providers=tuple(engine.providers),
        )

    def info(self) -> ModelInfo:
        """The writers' provenance record (IHE AI Results Contributing Equipment)."""
        return ModelInfo(self.name, str(self.version), self.federated_round, self.manifest_sha256, self.demo)


@dataclass(frozen=True)
class SegmentationResult:
    """Everything one (study, task) produced; `report` (report.json) and the DICOM writers read only this."""

    task: Task
    model: ModelUsed
    source: StudySource
    mask: nib.Nifti1Image  # labels 0..N on the first channel's source grid
    label_map: np.ndarray | None  # the same labels on the writers' reference grid; None for NIfTI input
    reference_datasets: tuple[Dataset, ...] | None  # the first channel's instances (slice order), DICOM only
    lesions: tuple[Lesion, ...]  # id 1..N by decreasing volume; centroid_mm in patient LPS
    voxel_volume_ml: float
    total_volume_ml: float
    adc_core_volume_ml: float | None  # stroke only: lesion voxels with ADC < adc_core_threshold
    adc_core_threshold: float | None
    warnings: tuple[str, ...]
    timings: Mapping[str, float]  # seconds per stage: load, preprocess, inference, postprocess
    created: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)

    @property
    def report(self) -> dict[str, Any]:
        """report.json's content; the same numbers the SR carries."""
        from inference.report import build_report

        return build_report(self)


def segment_study(
    inputs: StudyInputs,
    engine: Engine,
    *,
    adc_core_threshold: float = ADC_CORE_THRESHOLD,
    flip_tta: bool = False,
    load_seconds: float = 0.0,
) -> SegmentationResult:
    """Segment a DICOM study's inputs (`load_study_inputs`) with `engine`; `load_seconds` is the caller's reading
    time, added to the load stage. ValueError ("ADC missing", ...) when a channel the model needs is absent."""
    started = time.perf_counter()
    manifest = engine.manifest
    volumes: list[RoleVolume] = []
    for channel in manifest.inputs:
        volume = getattr(inputs, channel.role.value, None)  # StudyInputs holds dwi, adc and flair
        if volume is None:
            reason = inputs.not_processed.get(channel.role.value)
            raise ValueError(f"{channel.role.value.upper()} missing" + (f" ({reason})" if reason else ""))
        volumes.append(volume)
    images = {channel.role.value: volume.to_nifti() for channel, volume in zip(manifest.inputs, volumes)}
    first = volumes[0]
    slice_spacing = float(first.volume.spacing[0])
    source = StudySource(
        study_uid=inputs.study_uid,
        series=tuple(_series_used(volume) for volume in volumes),
        dwi_b_value=inputs.dwi_b_value,
        adc_unit_detected=inputs.adc_unit_detected if Role.ADC in {c.role for c in manifest.inputs} else None,
        warnings=tuple(inputs.warnings),
    )
    warnings = [*_lossy_warnings(volumes)]
    grid = _Grid(
        voxel_ml=voxel_volume_ml(first.volume.affine),
        slices=int(first.volume.spatial_shape[0]),
        slice_spacing_mm=slice_spacing,
    )
    frames = {
        channel.role.value: volume.volume.frame_of_reference_uid for channel, volume in zip(manifest.inputs, volumes)
    }
    loaded = time.perf_counter() - started + load_seconds
    result = _segment(
        images, engine, grid, source, warnings, frames, adc_core_threshold, flip_tta, loaded
    )
    started = time.perf_counter()
    label_map = _reference_label_map(np.asarray(result.mask.dataobj), first)
    timings = dict(result.timings)
    timings["postprocess"] = round(timings["postprocess"] + time.perf_counter() - started, 3)
    return replace(
        result, label_map=label_map, reference_datasets=tuple(first.reference_datasets), timings=timings
    )


def segment_channels(
    images: Mapping[str, nib.Nifti1Image],
    engine: Engine,
    *,
    adc_core_threshold: float = ADC_CORE_THRESHOLD,
    flip_tta: bool = False,
    source: StudySource | None = None,
    load_seconds: float = 0.0,
) -> SegmentationResult:
    """Segment NIfTI input: `images` by role (dwi, adc, flair), ADC already in 10⁻⁶ mm²/s.

    The slice axis is the third voxel axis (as `fedlesion convert` and dcm2niix write); the voxel volume is the
    affine's determinant.
    """
    started = time.perf_counter()
    manifest = engine.manifest
    missing = [channel.role.value for channel in manifest.inputs if channel.role.value not in images]
    if missing:
        raise ValueError(f"{missing[0].upper()} missing: model {manifest.task.value} needs {_roles(manifest.inputs)}")
    first = nib.funcs.squeeze_image(images[manifest.inputs[0].role.value])
    if first.ndim != 3:
        raise ValueError(f"{manifest.inputs[0].role.value}: expected a 3-D image, got shape {first.shape}")
    spacing = affine_spacing(first.affine)
    grid = _Grid(
        voxel_ml=voxel_volume_ml(first.affine), slices=int(first.shape[2]), slice_spacing_mm=float(spacing[2])
    )
    loaded = time.perf_counter() - started + load_seconds
    return _segment(
        dict(images), engine, grid, source or StudySource(), [], {}, adc_core_threshold, flip_tta, loaded
    )


@dataclass(frozen=True)
class _Grid:
    voxel_ml: float
    slices: int
    slice_spacing_mm: float


def _segment(
    images: dict[str, nib.Nifti1Image],
    engine: Engine,
    grid: _Grid,
    source: StudySource,
    warnings: list[str],
    frames: Mapping[str, str | None],
    adc_core_threshold: float,
    flip_tta: bool,
    load_seconds: float,
) -> SegmentationResult:
    if not math.isfinite(adc_core_threshold) or adc_core_threshold <= 0:
        raise ValueError(f"adc_core_threshold must be a positive number of µm²/s, got {adc_core_threshold!r}")
    manifest = engine.manifest
    started = time.perf_counter()
    channels = []
    for spec in manifest.inputs:
        image = nib.funcs.squeeze_image(images[spec.role.value])
        if image.ndim != 3:
            raise ValueError(f"{spec.role.value}: expected a 3-D image, got shape {image.shape}")
        data = np.asarray(image.get_fdata(dtype=np.float32))
        channels.append(Channel(data, image.affine, spec.name, frames.get(spec.role.value)))
    timings = {"load": load_seconds + time.perf_counter() - started}

    probabilities, case = _predict(engine, channels, flip_tta, timings)
    started = time.perf_counter()
    probabilities = to_source(probabilities, case)
    first = channels[0]
    labels, lesions = _lesions(probabilities, first.affine, grid.voxel_ml, manifest)
    adc = next((c for c, spec in zip(channels, manifest.inputs) if spec.role is Role.ADC), None)
    core_ml: float | None = None
    qa = [*source.warnings, *warnings, *_grid_warnings(grid)]
    if manifest.task is Task.STROKE_DWI_ADC and adc is not None:
        adc_on_first = _on_grid(adc, first)
        core_voxels = int(np.count_nonzero((labels > 0) & (adc_on_first < adc_core_threshold)))
        core_ml = round(core_voxels * grid.voxel_ml, VOLUME_DECIMALS)
        qa += _adc_median_warnings(adc_on_first, first.data)
    mask = nib.Nifti1Image(labels, first.affine)
    mask.header.set_xyzt_units("mm")
    timings["postprocess"] = time.perf_counter() - started
    return SegmentationResult(
        task=manifest.task,
        model=ModelUsed.of(engine),
        source=source,
        mask=mask,
        label_map=None,
        reference_datasets=None,
        lesions=tuple(lesions),
        voxel_volume_ml=grid.voxel_ml,
        total_volume_ml=round(math.fsum(lesion.volume_ml for lesion in lesions), VOLUME_DECIMALS),
        adc_core_volume_ml=core_ml,
        adc_core_threshold=adc_core_threshold if core_ml is not None else None,
        warnings=tuple(dict.fromkeys(qa)),
        timings={stage: round(timings[stage], 3) for stage in STAGES},
    )


def _predict(
    engine: Engine, channels: list[Channel], flip_tta: bool, timings: dict[str, float]
) -> tuple[np.ndarray, PreprocessedCase]:
    """Probabilities on the preprocessed grid, the preprocessing and the network timed apart.

    Flip TTA runs when asked here or when the engine was built with it (never both: the engine's own mirroring
    then covers it).
    """
    started = time.perf_counter()
    case = preprocess(channels, engine.manifest.preprocessing)
    timings["preprocess"] = time.perf_counter() - started
    started = time.perf_counter()
    if flip_tta and not engine.flip_tta:
        probabilities = np.zeros(case.image.shape[1:], np.float32)
        for axes in FLIPS:
            mirrored = np.ascontiguousarray(np.flip(case.image, [axis + 1 for axis in axes]))
            probabilities += np.flip(engine.predict_grid(mirrored).probabilities, axes)
        probabilities /= len(FLIPS)
    else:
        probabilities = engine.predict_grid(case.image).probabilities
    timings["inference"] = time.perf_counter() - started
    return probabilities, case


def _lesions(
    probabilities: np.ndarray, affine: np.ndarray, voxel_ml: float, manifest: Manifest
) -> tuple[np.ndarray, list[Lesion]]:
    """Threshold, 26-connected components, drop those under the minimum size; ids 1..N by decreasing volume."""
    components, count = label_components(probabilities >= manifest.output.threshold)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    # A component of exactly the minimum size stays (the tolerance absorbs the float product).
    kept = [label for label in range(1, count + 1) if sizes[label] * voxel_ml >= manifest.postprocessing.min_lesion_ml - 1e-12]
    kept.sort(key=lambda label: (-int(sizes[label]), label))
    dtype = np.uint8 if len(kept) < 256 else np.uint16
    relabel = np.zeros(count + 1, dtype=dtype)
    relabel[kept] = np.arange(1, len(kept) + 1, dtype=dtype)
    labels = relabel[components]
    lesions = []
    if kept:
        index = np.indices(labels.shape, dtype=np.float64).reshape(3, -1)
        flat = components.ravel()
        sums = np.stack([np.bincount(flat, weights=axis, minlength=count + 1) for axis in index])
        for new_id, label in enumerate(kept, start=1):
            centre = sums[:, label] / sizes[label]
            lps = swap_ras_lps(affine[:3, :3] @ centre + affine[:3, 3])
            lesions.append(
                Lesion(
                    id=new_id,
                    volume_ml=round(int(sizes[label]) * voxel_ml, VOLUME_DECIMALS),
                    centroid_mm=tuple(round(float(c), 2) for c in lps),  # type: ignore[arg-type]
                    voxel_count=int(sizes[label]),
                )
            )
    return labels, lesions


def _on_grid(channel: Channel, target: Channel) -> np.ndarray:
    """`channel`'s values on `target`'s grid (linear), as is when the grids already agree."""
    if channel.data.shape == target.data.shape and np.allclose(channel.affine, target.affine, atol=1e-4):
        return channel.data
    return resample(channel.data, channel.affine, target.affine, target.data.shape, cval=0.0)


def _adc_median_warnings(adc: np.ndarray, first: np.ndarray) -> list[str]:
    """ADC median inside the head outside 500–1200 µm²/s: a wrong unit, a wrong map or a broken scan."""
    try:
        head = head_mask(first)
    except ValueError as error:
        return [f"ADC not checked: no head mask ({error})"]
    values = adc[head & np.isfinite(adc)]
    if values.size == 0:
        return ["ADC not checked: no ADC value inside the head mask"]
    median = float(np.median(values))
    low, high = ADC_MEDIAN_RANGE
    if not low <= median <= high:
        return [f"ADC median {median:.0f} µm²/s inside the head is outside {low:.0f}–{high:.0f} µm²/s"]
    return []


def _grid_warnings(grid: _Grid) -> list[str]:
    warnings = []
    if grid.slices < MIN_SLICES:
        warnings.append(f"only {grid.slices} slices (fewer than {MIN_SLICES})")
    coverage = grid.slices * grid.slice_spacing_mm
    if coverage < MIN_COVERAGE_MM:
        warnings.append(f"coverage {coverage:.0f} mm along the slice axis (less than {MIN_COVERAGE_MM:.0f} mm)")
    return warnings


def _lossy_warnings(volumes: Iterable[RoleVolume]) -> list[str]:
    warnings = []
    for volume in volumes:
        reason = _lossy_reason(volume.reference_datasets)
        if reason:
            warnings.append(f"series {volume.series_number} ({volume.role}) is lossy-compressed: {reason}")
    return warnings


def _lossy_reason(datasets: Sequence[Dataset]) -> str | None:
    for dataset in datasets:
        if str(dataset.get("LossyImageCompression", "")).strip() == "01":
            return "LossyImageCompression 01"
        meta = getattr(dataset, "file_meta", None)
        syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        if syntax and syntax.is_compressed and syntax not in _LOSSLESS_TRANSFER_SYNTAXES:
            return f"transfer syntax {syntax.name}"
    return None


def _series_used(volume: RoleVolume) -> SeriesUsed:
    first = volume.reference_datasets[0] if volume.reference_datasets else Dataset()
    return SeriesUsed(volume.role, volume.series_uid, volume.series_number, str(first.get("SeriesDescription", "")))


def _reference_label_map(labels_xyz: np.ndarray, first: RoleVolume) -> np.ndarray:
    """Labels from the NIfTI layout (column, row, slice) onto the writers' grid (slice, row, column).

    The volume's slices are already in highdicom's spatial order; where the writers can build the reference grid,
    its slices are matched to ours by SOP Instance UID, so the two orders can never silently differ.
    """
    volume_order = np.ascontiguousarray(np.transpose(labels_xyz, (2, 1, 0)))
    try:
        grid = reference_grid(first.reference_datasets)
    except ValueError:  # multi-frame references: the writers refuse them; the volume order is the best we have
        return volume_order
    position = {str(ds.SOPInstanceUID): k for k, ds in enumerate(first.reference_datasets)}
    order = [position[str(ds.SOPInstanceUID)] for ds in grid.datasets]
    return np.ascontiguousarray(volume_order[order])


def _roles(inputs: Iterable[Any]) -> str:
    return " + ".join(channel.role.value for channel in inputs)
