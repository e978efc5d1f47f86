"""Output writers (design.md §4 "Outputs"): DICOM SEG, Secondary Capture overlay series, TID 1500 SR.

Inputs (validated up front, ValueError/TypeError with the reason):
  * `reference_datasets`: the chosen volume's source instances, single-frame, one per slice, any order. The writers
    sort them spatially with highdicom's volume tools (the order `highdicom.get_volume_from_series` uses).
  * `label_map`: integer labels 0..N, shape (slices, Rows, Columns): axis 0 is the slice in that spatial order,
    axes 1 and 2 the source rows and columns, i.e. the array of the `highdicom.Volume` built from the instances.
    Each lesion is one label (`Lesion.id`) with `Lesion.voxel_count` voxels.
  * `lesions`: already size-filtered 26-connected components; `head_mask` (optional) on the same grid.
Every output lands in the source study with Manufacturer `OWN_MANUFACTURER`, the model as Contributing Equipment,
a SeriesDescription saying "(not for diagnosis)", and UIDs from `output_uid(study, revision, task, model version,
kind, index)`: the same inputs give the same UIDs and bytes (dates come from `created` or the source instances).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_gateway.writers.common import (
    DEFAULT_MAX_LESION_SEGMENTS,
    Lesion,
    ModelInfo,
    OutputKind,
    check_adc_core_volume,
    check_label_map,
    check_lesions,
    check_total_volume,
    make_context,
    output_datetime,
    output_series_number,
    plan_segments,
    reference_grid,
)
from dicom_gateway.writers.overlay import (
    build_overlay,
    check_head_mask,
    write_not_processed,
    write_overlay,
)
from dicom_gateway.writers.seg import build_seg, write_seg
from dicom_gateway.writers.sr import build_sr, write_sr
from models.manifest import Task

__all__ = [
    "DEFAULT_MAX_LESION_SEGMENTS",
    "Lesion",
    "ModelInfo",
    "OutputKind",
    "OutputSet",
    "output_series_number",
    "write_not_processed",
    "write_outputs",
    "write_overlay",
    "write_seg",
    "write_sr",
]


@dataclass(frozen=True)
class OutputSet:
    """The three outputs of one job, ready to store and send."""

    seg: hd.seg.Segmentation
    overlay: list[hd.sc.SCImage]
    sr: hd.sr.Comprehensive3DSR

    @property
    def datasets(self) -> list[Dataset]:
        return [self.seg, *self.overlay, self.sr]

    @property
    def series_uids(self) -> dict[OutputKind, UID]:
        return {
            OutputKind.SEG: UID(self.seg.SeriesInstanceUID),
            OutputKind.OVERLAY: UID(self.overlay[0].SeriesInstanceUID),
            OutputKind.SR: UID(self.sr.SeriesInstanceUID),
        }

    @property
    def sop_instance_uids(self) -> list[UID]:
        return [UID(ds.SOPInstanceUID) for ds in self.datasets]


def write_outputs(
    reference_datasets: Sequence[Dataset],
    label_map: np.ndarray,
    lesions: Sequence[Lesion],
    model: ModelInfo,
    task: Task,
    study_revision: int,
    existing_series_numbers: Collection[int],
    total_volume_ml: float,
    adc_core_volume_ml: float | None,
    head_mask: np.ndarray | None = None,
    *,
    max_lesion_segments: int = DEFAULT_MAX_LESION_SEGMENTS,
    created: dt.datetime | None = None,
) -> OutputSet:
    """SEG, overlay series and SR of one job; every input is checked before anything is built."""
    grid = reference_grid(reference_datasets)
    context = make_context(str(grid.first.StudyInstanceUID), study_revision, task, model)
    items = check_lesions(lesions)
    labels = check_label_map(label_map, items, grid)
    check_total_volume(items, total_volume_ml)
    check_adc_core_volume(adc_core_volume_ml, context.task)
    mask = check_head_mask(head_mask, grid)
    segments = plan_segments(items, context, max_lesion_segments)
    when = output_datetime(grid.datasets, created)
    seg = build_seg(grid, labels, segments, context, existing_series_numbers, when)
    overlay = build_overlay(
        grid,
        labels,
        len(items),
        total_volume_ml,
        context,
        existing_series_numbers,
        mask,
        when,
    )
    sr = build_sr(
        grid,
        seg,
        segments,
        len(items),
        total_volume_ml,
        adc_core_volume_ml,
        context,
        existing_series_numbers,
        when,
    )
    return OutputSet(seg, overlay, sr)
