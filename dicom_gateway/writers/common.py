"""What every output writer shares: validated inputs, the reference grid, UIDs, series numbers, provenance, dates.

Why one module: the SEG, the overlay series and the SR must agree on the grid (label_map axis 0 = slice in the
spatial order of the `highdicom.Volume` built from the source instances), on segment numbering (lesions ordered by
volume) and on identity (deterministic UIDs per study revision, task, model version and output kind), or a viewer
would link the wrong segment to the wrong measurement.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

import highdicom as hd
import numpy as np
from highdicom.spatial import get_series_volume_positions
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from dicom_gateway.uids import OWN_MANUFACTURER, is_valid_uid, output_uid
from models.manifest import Task

DEFAULT_MAX_LESION_SEGMENTS = 50
NOT_FOR_DIAGNOSIS = "AI RESULT – NOT FOR PRIMARY DIAGNOSIS"
# design.md §2: a demo-signed model's outputs say so in every SeriesDescription (ASCII: any character set holds it).
DEMO_MARK = "DEMO MODEL - NOT FOR CLINICAL USE"
# Type 2 patient/study attributes highdicom reads from the first source instance (present, possibly empty).
_REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "Modality",
)
_GRID_ATTRIBUTES = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class OutputKind(StrEnum):
    """Output series kinds; the value is part of their UIDs."""

    SEG = "seg"
    OVERLAY = "sc"
    SR = "sr"
    NOT_PROCESSED = "not-processed"


# SeriesNumber = source SeriesNumber + offset (design.md §4); the not-processed notice is an SC like the overlay.
SERIES_NUMBER_OFFSETS = {
    OutputKind.SEG: 1000,
    OutputKind.OVERLAY: 2000,
    OutputKind.SR: 3000,
    OutputKind.NOT_PROCESSED: 2000,
}
SERIES_NUMBER_STEP = 10000
SERIES_DESCRIPTIONS = {
    OutputKind.SEG: "AI lesion SEG (not for diagnosis)",
    OutputKind.OVERLAY: "AI lesion overlay (not for diagnosis)",
    OutputKind.SR: "AI lesion report (not for diagnosis)",
    OutputKind.NOT_PROCESSED: "AI not performed (not for diagnosis)",
}
DEMO_SERIES_DESCRIPTIONS = {  # at most 64 characters (LO)
    OutputKind.SEG: f"{DEMO_MARK} - AI SEG",
    OutputKind.OVERLAY: f"{DEMO_MARK} - AI overlay",
    OutputKind.SR: f"{DEMO_MARK} - AI report",
    OutputKind.NOT_PROCESSED: f"{DEMO_MARK} - AI not performed",
}
# Segmented property type per task (design.md §4) and the one category for both.
FINDING_TYPES = {
    Task.STROKE_DWI_ADC: hd.sr.CodedConcept("55641003", "SCT", "Infarct"),
    Task.MS_FLAIR: hd.sr.CodedConcept("52988006", "SCT", "Lesion"),
}
FINDING_NAMES = {Task.STROKE_DWI_ADC: "Infarct", Task.MS_FLAIR: "Lesion"}
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
OTHER_LESIONS_LABEL = "Other lesions"


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced the result: recorded as provenance on every output (IHE AI Results)."""

    name: str
    version: str
    federated_round: int | None
    manifest_sha256: str
    demo: bool = False  # signed with the demo key: every output is marked DEMO_MARK

    def __post_init__(self) -> None:
        for field in ("name", "version"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
                raise ValueError(
                    f"ModelInfo.{field} must be a non-empty string of at most 64 characters, got {value!r}"
                )
        if self.federated_round is not None and (
            isinstance(self.federated_round, bool)
            or not isinstance(self.federated_round, int)
            or self.federated_round < 0
        ):
            raise ValueError(f"ModelInfo.federated_round must be None or an integer ≥ 0, got {self.federated_round!r}")
        if not isinstance(self.manifest_sha256, str) or not _SHA256.match(self.manifest_sha256):
            raise ValueError(f"ModelInfo.manifest_sha256 must be 64 lowercase hex digits, got {self.manifest_sha256!r}")

    @property
    def round_text(self) -> str:
        return "not federated" if self.federated_round is None else f"federated round {self.federated_round}"


@dataclass(frozen=True)
class Lesion:
    """One lesion the node found (a 26-connected component, already size-filtered): `id` is its value in the label
    map. A synthetic case's known lesions are `training.synthetic.GroundTruthLesion`.

    `centroid_mm` is in patient LPS millimetres (DICOM's patient coordinate system).
    """

    id: int
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    voxel_count: int

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, (int, np.integer)) or self.id < 1:
            raise ValueError(f"Lesion.id must be an integer ≥ 1 (its label value), got {self.id!r}")
        if not _finite_number(self.volume_ml) or self.volume_ml <= 0:
            raise ValueError(f"Lesion {self.id}: volume_ml must be a finite number > 0, got {self.volume_ml!r}")
        if len(self.centroid_mm) != 3 or not all(_finite_number(c) for c in self.centroid_mm):
            raise ValueError(
                f"Lesion {self.id}: centroid_mm must be 3 finite LPS coordinates, got {self.centroid_mm!r}"
            )
        if (
            isinstance(self.voxel_count, bool)
            or not isinstance(self.voxel_count, (int, np.integer))
            or self.voxel_count < 1
        ):
            raise ValueError(f"Lesion {self.id}: voxel_count must be an integer ≥ 1, got {self.voxel_count!r}")


@dataclass(frozen=True)
class SegmentSpec:
    """One SEG segment (and one SR TID 1411 group): which lesion labels it holds and their summed volume."""

    number: int
    label: str
    lesion_ids: tuple[int, ...]
    volume_ml: float
    tracking_uid: UID


@dataclass(frozen=True)
class OutputContext:
    """Identity shared by all outputs of one (study revision, task, model version)."""

    study_uid: str
    revision: int
    task: Task
    model: ModelInfo

    def uid(self, kind: OutputKind, index: str) -> UID:
        return output_uid(
            self.study_uid,
            str(self.revision),
            self.task.short_name,
            self.model.version,
            kind.value,
            index,
        )

    def series_uid(self, kind: OutputKind) -> UID:
        return self.uid(kind, "series")

    def instance_uid(self, kind: OutputKind, instance_number: int) -> UID:
        return self.uid(kind, str(instance_number))


def make_context(study_uid: str, revision: int, task: Task, model: ModelInfo) -> OutputContext:
    """Validate the identity arguments (clear ValueError) and bundle them."""
    if not is_valid_uid(study_uid):
        raise ValueError(f"StudyInstanceUID of the reference instances is not a valid UID: {study_uid!r}")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ValueError(f"study_revision must be an integer ≥ 1, got {revision!r}")
    try:
        task_value = Task(task)
    except ValueError:
        raise ValueError(f"task must be one of {[t.value for t in Task]}, got {task!r}") from None
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo, got {type(model).__name__}")
    return OutputContext(study_uid, revision, task_value, model)


@dataclass(frozen=True)
class ReferenceGrid:
    """The chosen volume's source instances, sorted spatially as `highdicom.get_volume_from_series` sorts them.

    `datasets[k]` is the instance whose pixel matrix is slice k of the grid; a label map on this grid has shape
    (slices, Rows, Columns): axis 0 = k, axis 1 = the source row index, axis 2 = the source column index.
    """

    datasets: tuple[Dataset, ...]
    geometry: hd.VolumeGeometry

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.spatial_shape

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    def volume(self, array: np.ndarray) -> hd.Volume:
        return self.geometry.with_array(array)

    def pixel_volume(self) -> np.ndarray:
        """Modality values (Rescale or Real World Value Mapping applied), float32, in grid order."""
        without = [index for index, ds in enumerate(self.datasets) if "PixelData" not in ds]
        if without:
            raise ValueError(f"{len(without)} reference instances carry no PixelData: the overlay needs the pixels")
        return hd.get_volume_from_series(list(self.datasets), dtype=np.float32).array


def reference_grid(reference_datasets: Sequence[Dataset]) -> ReferenceGrid:
    """Validate the source instances (one series, single-frame, one per slice, regular spacing) and sort them."""
    datasets = list(reference_datasets) if reference_datasets is not None else []
    if not datasets:
        raise ValueError("reference_datasets is empty: pass the chosen volume's source instances")
    for index, ds in enumerate(datasets):
        if not isinstance(ds, Dataset):
            raise TypeError(f"reference_datasets[{index}] is a {type(ds).__name__}, not a pydicom Dataset")
        missing = [name for name in (*_REQUIRED_SOURCE_ATTRIBUTES, *_GRID_ATTRIBUTES) if name not in ds]
        if missing:
            raise ValueError(f"reference_datasets[{index}] lacks {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(
                f"reference_datasets[{index}] is a multi-frame instance; pass single-frame instances, one per slice"
            )
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(name, "")) for ds in datasets}
        if len(values) != 1:
            raise ValueError(f"reference_datasets must share one {name}, got {sorted(values)}")
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != len(uids):
        raise ValueError("reference_datasets hold a SOPInstanceUID twice: pass each slice's instance once")
    if not all(is_valid_uid(uid) for uid in uids):
        raise ValueError("reference_datasets hold an invalid SOPInstanceUID")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in datasets}) != 1:
        raise ValueError("reference_datasets differ in Rows/Columns: they are not one volume")
    if len(datasets) == 1:
        ordered = datasets
        spacing = float(datasets[0].get("SpacingBetweenSlices") or datasets[0].get("SliceThickness") or 1.0)
    else:
        try:
            spacing_found, positions = get_series_volume_positions(datasets)
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"reference_datasets do not form one volume: {exc}") from exc
        if spacing_found is None or positions is None:
            raise ValueError(
                "reference_datasets are not a regularly spaced stack of parallel slices (a gap, a duplicate "
                "position or mixed orientations): pass exactly one volume's instances"
            )
        spacing = float(spacing_found)
        ordered = [datasets[positions.index(k)] for k in range(len(datasets))]
    first = ordered[0]
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=[float(x) for x in first.ImagePositionPatient],
        image_orientation=[float(x) for x in first.ImageOrientationPatient],
        rows=int(first.Rows),
        columns=int(first.Columns),
        pixel_spacing=[float(x) for x in first.PixelSpacing],
        spacing_between_slices=spacing,
        number_of_frames=len(ordered),
        coordinate_system="PATIENT",
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )
    return ReferenceGrid(tuple(ordered), geometry)


def check_label_map(label_map: np.ndarray, lesions: Sequence[Lesion], grid: ReferenceGrid) -> np.ndarray:
    """An integer label map on the grid whose nonzero labels are exactly the lesions' ids with their voxel counts."""
    array = np.asarray(label_map)
    if array.shape != grid.shape:
        raise ValueError(
            f"label_map has shape {array.shape}, the reference grid is {grid.shape} "
            "(slices in highdicom Volume order, Rows, Columns)"
        )
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"label_map must hold integer labels 0..N, got dtype {array.dtype}")
    if array.size and int(array.min()) < 0:
        raise ValueError("label_map holds negative labels; 0 is background, lesions are 1..N")
    ids = [int(lesion.id) for lesion in lesions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"lesions repeat an id: {sorted(ids)}")
    labels, counts = np.unique(array[array > 0], return_counts=True)
    found = dict(zip(labels.tolist(), counts.tolist()))
    if set(found) != set(ids):
        raise ValueError(
            f"label_map labels {sorted(found)} differ from the lesion ids {sorted(ids)}: each lesion is one label"
        )
    for lesion in lesions:
        if found[int(lesion.id)] != int(lesion.voxel_count):
            raise ValueError(
                f"lesion {lesion.id}: voxel_count {lesion.voxel_count} but the label map holds "
                f"{found[int(lesion.id)]} voxels with that label"
            )
    return array


def check_lesions(lesions: Sequence[Lesion]) -> list[Lesion]:
    items = list(lesions)
    for index, lesion in enumerate(items):
        if not isinstance(lesion, Lesion):
            raise TypeError(f"lesions[{index}] is a {type(lesion).__name__}, not a dicom_gateway.writers.Lesion")
    return items


def plan_segments(
    lesions: Sequence[Lesion],
    context: OutputContext,
    max_lesion_segments: int = DEFAULT_MAX_LESION_SEGMENTS,
) -> list[SegmentSpec]:
    """Segments in order of decreasing volume: "Infarct 1…N" / "Lesion 1…N", then one "Other lesions" segment.

    At most `max_lesion_segments` lesions get a segment of their own; all smaller ones merge into one extra segment.
    A negative study gets one segment with no lesion (the SEG then holds one empty frame).
    """
    if isinstance(max_lesion_segments, bool) or not isinstance(max_lesion_segments, int) or max_lesion_segments < 1:
        raise ValueError(f"max_lesion_segments must be an integer ≥ 1, got {max_lesion_segments!r}")
    name = FINDING_NAMES[context.task]
    ordered = sorted(lesions, key=lambda lesion: (-float(lesion.volume_ml), int(lesion.id)))
    if not ordered:
        return [
            SegmentSpec(
                1,
                f"No {name.lower()} detected",
                (),
                0.0,
                context.uid(OutputKind.SEG, "segment-1"),
            )
        ]
    own, rest = ordered[:max_lesion_segments], ordered[max_lesion_segments:]
    specs = [
        SegmentSpec(
            number,
            f"{name} {number}",
            (int(lesion.id),),
            float(lesion.volume_ml),
            context.uid(OutputKind.SEG, f"segment-{number}"),
        )
        for number, lesion in enumerate(own, start=1)
    ]
    if rest:
        number = len(specs) + 1
        specs.append(
            SegmentSpec(
                number,
                OTHER_LESIONS_LABEL,
                tuple(int(lesion.id) for lesion in rest),
                math.fsum(float(lesion.volume_ml) for lesion in rest),
                context.uid(OutputKind.SEG, f"segment-{number}"),
            )
        )
    return specs


def segment_label_map(label_map: np.ndarray, segments: Sequence[SegmentSpec]) -> np.ndarray:
    """The label map relabelled to segment numbers (uint8, or uint16 past 255 segments): the SEG's input."""
    values, inverse = np.unique(label_map, return_inverse=True)
    number_of = {lesion_id: segment.number for segment in segments for lesion_id in segment.lesion_ids}
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    numbers = np.array([number_of.get(int(value), 0) for value in values], dtype=dtype)
    return numbers[inverse].reshape(label_map.shape)


def check_total_volume(lesions: Sequence[Lesion], total_volume_ml: float) -> None:
    """The report's total: finite, ≥ 0 and equal to the lesions' summed volume (up to report rounding)."""
    if not _finite_number(total_volume_ml) or total_volume_ml < 0:
        raise ValueError(f"total_volume_ml must be a finite number ≥ 0, got {total_volume_ml!r}")
    summed = math.fsum(float(lesion.volume_ml) for lesion in lesions)
    # Rounded report values may differ from the sum by half a unit in the last place per lesion.
    if abs(summed - float(total_volume_ml)) > 0.005 * max(1, len(lesions)) + 1e-6 * summed:
        raise ValueError(f"total_volume_ml {total_volume_ml} differs from the lesions' summed volume {summed:.6g} ml")


def check_adc_core_volume(adc_core_volume_ml: float | None, task: Task) -> None:
    """The ADC-confirmed core volume: a finite number ≥ 0 for stroke, None for every other task."""
    if task is Task.STROKE_DWI_ADC:
        if not _finite_number(adc_core_volume_ml) or adc_core_volume_ml < 0:  # type: ignore[operator]
            raise ValueError(f"stroke outputs need adc_core_volume_ml, a finite number ≥ 0, got {adc_core_volume_ml!r}")
    elif adc_core_volume_ml is not None:
        raise ValueError(f"adc_core_volume_ml applies to stroke only; task {task.value!r} got {adc_core_volume_ml!r}")


def output_series_number(source: Dataset, kind: OutputKind, existing_series_numbers: Collection[int]) -> int:
    """Source SeriesNumber (0 when empty) + the kind's offset, plus 10000 until no series of the study has it."""
    existing = {int(n) for n in existing_series_numbers}
    raw = source.get("SeriesNumber")
    number = (int(raw) if raw not in (None, "") else 0) + SERIES_NUMBER_OFFSETS[kind]
    while number in existing:
        number += SERIES_NUMBER_STEP
    if number > 2**31 - 1:
        raise ValueError(f"no free SeriesNumber for {kind.value}: every candidate up to {number} is taken")
    return number


def contributing_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """IHE AI Results provenance: the model (name, version, federated round, manifest hash) as processing equipment."""
    return hd.ContributingEquipment(
        manufacturer=OWN_MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=[model.version, model.round_text],
        device_serial_number=model.manifest_sha256,
        contribution_description=(
            f"AI model {model.name} {model.version}, {model.round_text}, manifest sha256 {model.manifest_sha256[:16]}"
        )[:1024],
    )


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.DCM.ArtificialIntelligence,
        version=model.version,
        source=OWN_MANUFACTURER,
        parameters={
            "federated_round": str(model.federated_round),
            "manifest_sha256": model.manifest_sha256,
        },
    )


def output_datetime(datasets: Sequence[Dataset], created: dt.datetime | None) -> dt.datetime:
    """`created`, else the latest source content/series/study date-time: equal inputs give equal bytes."""
    if created is not None:
        if not isinstance(created, dt.datetime):
            raise ValueError(f"created must be a datetime, got {type(created).__name__}")
        return created.replace(tzinfo=None, microsecond=0)
    found = [when for ds in datasets if (when := _source_datetime(ds)) is not None]
    if not found:
        raise ValueError("reference_datasets carry no Content/Series/Study date and time: pass created=datetime")
    return max(found)


def stamp(dataset: Dataset, when: dt.datetime, kind: OutputKind, *, demo: bool) -> None:
    """Fix every date/time highdicom draws from the clock, and mark the series as an AI result (and demo)."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = date, time
    dataset.ContentDate, dataset.ContentTime = date, time
    dataset.SeriesDate, dataset.SeriesTime = date, time
    dataset.SeriesDescription = (DEMO_SERIES_DESCRIPTIONS if demo else SERIES_DESCRIPTIONS)[kind]
    acquisition = hd.sr.CodedConcept.from_code(codes.DCM.AcquisitionEquipment)
    for item in dataset.get("ContributingEquipmentSequence", []):
        if item.PurposeOfReferenceCodeSequence[0] != acquisition:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def _source_datetime(ds: Dataset) -> dt.datetime | None:
    for date_name, time_name in (
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        date, time = str(ds.get(date_name) or ""), str(ds.get(time_name) or "")
        if re.fullmatch(r"\d{8}", date):
            digits = re.match(r"\d{0,6}", time.replace(":", "")).group(0)  # type: ignore[union-attr]
            digits = (digits + "000000")[:6] if len(digits) % 2 == 0 else "000000"
            try:
                return dt.datetime.strptime(date + digits, "%Y%m%d%H%M%S")
            except ValueError:
                continue
    return None


def _finite_number(value: object) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
