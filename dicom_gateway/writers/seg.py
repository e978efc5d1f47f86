"""DICOM SEG output: one BINARY segment per lesion on the chosen volume's grid (design.md §4 "Outputs" 1).

Built from a `highdicom.Volume` on the reference grid with the source instances as `source_images`, so highdicom
derives plane positions and per-frame source references itself; uncompressed (Explicit VR Little Endian) because
BINARY segmentations are bit-packed and several PACS refuse encapsulated 1-bit data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_gateway.uids import OWN_MANUFACTURER
from dicom_gateway.writers.common import (
    DEFAULT_MAX_LESION_SEGMENTS,
    FINDING_CATEGORY,
    FINDING_TYPES,
    Lesion,
    ModelInfo,
    OutputContext,
    OutputKind,
    ReferenceGrid,
    SegmentSpec,
    algorithm_identification,
    check_label_map,
    check_lesions,
    contributing_equipment,
    make_context,
    output_datetime,
    output_series_number,
    plan_segments,
    reference_grid,
    segment_label_map,
    stamp,
)
from models.manifest import Task

CONTENT_LABEL = "AI_LESIONS"


def write_seg(
    reference_datasets: Sequence[Dataset],
    label_map: np.ndarray,
    lesions: Sequence[Lesion],
    model: ModelInfo,
    task: Task,
    study_revision: int,
    existing_series_numbers: Collection[int],
    *,
    max_lesion_segments: int = DEFAULT_MAX_LESION_SEGMENTS,
    created: dt.datetime | None = None,
) -> hd.seg.Segmentation:
    """The SEG of `label_map` (shape (slices, Rows, Columns) in highdicom Volume order of `reference_datasets`)."""
    grid = reference_grid(reference_datasets)
    context = make_context(str(grid.first.StudyInstanceUID), study_revision, task, model)
    items = check_lesions(lesions)
    labels = check_label_map(label_map, items, grid)
    segments = plan_segments(items, context, max_lesion_segments)
    return build_seg(
        grid,
        labels,
        segments,
        context,
        existing_series_numbers,
        output_datetime(grid.datasets, created),
    )


def build_seg(
    grid: ReferenceGrid,
    label_map: np.ndarray,
    segments: Sequence[SegmentSpec],
    context: OutputContext,
    existing_series_numbers: Collection[int],
    when: dt.datetime,
) -> hd.seg.Segmentation:
    """The SEG from already validated inputs (write_outputs validates once for all three outputs)."""
    positive = any(segment.lesion_ids for segment in segments)
    if positive:
        pixels = grid.volume(segment_label_map(label_map, segments))
    else:
        # Negative study: highdicom keeps every frame of an all-empty mask, so hand it one slice → one empty frame.
        pixels = grid.volume(np.zeros(grid.shape, dtype=np.uint8))[:1]
    algorithm = algorithm_identification(context.model)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=segment.label,
            segmented_property_category=FINDING_CATEGORY,
            segmented_property_type=FINDING_TYPES[context.task],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=segment.tracking_uid,
            tracking_id=segment.label,
        )
        for segment in segments
    ]
    seg = hd.seg.Segmentation(
        source_images=list(grid.datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=context.series_uid(OutputKind.SEG),
        series_number=output_series_number(grid.first, OutputKind.SEG, existing_series_numbers),
        sop_instance_uid=context.instance_uid(OutputKind.SEG, 1),
        instance_number=1,
        manufacturer=OWN_MANUFACTURER,
        manufacturer_model_name=context.model.name,
        software_versions=context.model.version,
        device_serial_number=context.model.manifest_sha256,
        content_label=CONTENT_LABEL,
        content_description="AI result, not for primary diagnosis",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=positive,
        contributing_equipment=[contributing_equipment(context.model)],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    # highdicom draws the dimension organization UID at random; ours follows the SEG's identity.
    dimension_uid = context.uid(OutputKind.SEG, "dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    stamp(seg, when, OutputKind.SEG, demo=context.model.demo)
    return seg
