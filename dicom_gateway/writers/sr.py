"""Comprehensive 3D SR, TID 1500 Measurement Report (design.md §4 "Outputs" 3).

One TID 1411 volumetric group per SEG segment (referencing it, with its volume in ml; the same tracking UID and
identifier as the segment), then one TID 1501 group "All lesions" with the total volume, the lesion count and, for
stroke, the ADC-confirmed core volume. TID 1501 because a group over all lesions has no single region to reference,
which TID 1411 requires. The numbers are the ones passed in (report.json's), never recomputed here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

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
    check_adc_core_volume,
    check_lesions,
    check_total_volume,
    contributing_equipment,
    make_context,
    output_datetime,
    output_series_number,
    plan_segments,
    reference_grid,
    stamp,
)
from models.manifest import Task

MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
LESION_COUNT_UNIT = hd.sr.CodedConcept("{lesions}", "UCUM", "lesions")
NUMBER_OF_LESIONS = hd.sr.CodedConcept("246206008", "SCT", "Number of lesions")
MR_BRAIN = hd.sr.CodedConcept("24590-2", "LN", "MR Brain")
# The ADC-confirmed infarct core has no standard concept; a private scheme, declared in the SOP Common module.
LOCAL_SCHEME = "99FEDLES"
ADC_CORE_VOLUME = hd.sr.CodedConcept("ADC-CORE-VOL", LOCAL_SCHEME, "Infarct core volume confirmed by ADC")
ALL_LESIONS = "All lesions"


def write_sr(
    reference_datasets: Sequence[Dataset],
    segmentation: Dataset,
    lesions: Sequence[Lesion],
    model: ModelInfo,
    task: Task,
    study_revision: int,
    existing_series_numbers: Collection[int],
    total_volume_ml: float,
    adc_core_volume_ml: float | None,
    *,
    max_lesion_segments: int = DEFAULT_MAX_LESION_SEGMENTS,
    created: dt.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for `segmentation` (written by `write_seg` from the same lesions and cap): it must hold the segments."""
    grid = reference_grid(reference_datasets)
    context = make_context(str(grid.first.StudyInstanceUID), study_revision, task, model)
    items = check_lesions(lesions)
    check_total_volume(items, total_volume_ml)
    check_adc_core_volume(adc_core_volume_ml, context.task)
    segments = plan_segments(items, context, max_lesion_segments)
    check_segmentation(segmentation, segments, grid)
    return build_sr(
        grid,
        segmentation,
        segments,
        len(items),
        total_volume_ml,
        adc_core_volume_ml,
        context,
        existing_series_numbers,
        output_datetime(grid.datasets, created),
    )


def check_segmentation(segmentation: Dataset, segments: Sequence[SegmentSpec], grid: ReferenceGrid) -> None:
    """The SEG belongs to this study and holds exactly the planned segments (labels and tracking UIDs)."""
    if not isinstance(segmentation, Dataset) or "SegmentSequence" not in segmentation:
        raise ValueError("segmentation must be the DICOM SEG dataset written by write_seg")
    if segmentation.StudyInstanceUID != grid.first.StudyInstanceUID:
        raise ValueError("segmentation belongs to another study than reference_datasets")
    found = [
        (int(item.SegmentNumber), str(item.SegmentLabel), str(item.TrackingUID))
        for item in segmentation.SegmentSequence
    ]
    planned = [(segment.number, segment.label, str(segment.tracking_uid)) for segment in segments]
    if found != planned:
        raise ValueError(
            f"segmentation segments {[(n, label) for n, label, _ in found]} differ from the lesions' "
            f"{[(n, label) for n, label, _ in planned]}: write SEG and SR from the same inputs"
        )


def build_sr(
    grid: ReferenceGrid,
    segmentation: Dataset,
    segments: Sequence[SegmentSpec],
    lesion_count: int,
    total_volume_ml: float,
    adc_core_volume_ml: float | None,
    context: OutputContext,
    existing_series_numbers: Collection[int],
    when: dt.datetime,
) -> hd.sr.Comprehensive3DSR:
    """The SR from already validated inputs."""
    model = context.model
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version, manufacturer=OWN_MANUFACTURER)
    finding_type = FINDING_TYPES[context.task]
    source_series = hd.sr.SourceSeriesForSegmentation(str(grid.first.SeriesInstanceUID))
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=segment.tracking_uid, identifier=segment.label),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=segment.number,
                source_series=source_series,
            ),
            finding_type=finding_type,
            finding_category=FINDING_CATEGORY,
            algorithm_id=algorithm,
            measurements=[_volume(codes.SCT.Volume, segment.volume_ml)],
        )
        for segment in segments
        if segment.lesion_ids
    ]
    summary = [
        _volume(codes.SCT.Volume, total_volume_ml),
        hd.sr.Measurement(name=NUMBER_OF_LESIONS, value=lesion_count, unit=LESION_COUNT_UNIT),
    ]
    if context.task is Task.STROKE_DWI_ADC:
        summary.append(_volume(ADC_CORE_VOLUME, adc_core_volume_ml))  # type: ignore[arg-type]
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=context.uid(OutputKind.SR, "all-lesions"), identifier=ALL_LESIONS
            ),
            finding_type=finding_type,
            finding_category=FINDING_CATEGORY,
            algorithm_id=algorithm,
            measurements=summary,
        )
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=context.uid(OutputKind.SR, "observer-device"),
        name=model.name,
        manufacturer_name=OWN_MANUFACTURER,
        model_name=f"{model.name} {model.version}",
        serial_number=model.manifest_sha256,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=MR_BRAIN,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*grid.datasets, segmentation],
        content=report,
        series_instance_uid=context.series_uid(OutputKind.SR),
        series_number=output_series_number(grid.first, OutputKind.SR, existing_series_numbers),
        sop_instance_uid=context.instance_uid(OutputKind.SR, 1),
        instance_number=1,
        manufacturer=OWN_MANUFACTURER,
        is_complete=True,
        is_final=False,  # PRELIMINARY, UNVERIFIED: an AI result awaiting a reader
        contributing_equipment=[contributing_equipment(model)],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    sr.ManufacturerModelName = model.name
    sr.SoftwareVersions = model.version
    if context.task is Task.STROKE_DWI_ADC:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = LOCAL_SCHEME
        scheme.CodingSchemeName = "fedlesion local codes"
        scheme.CodingSchemeResponsibleOrganization = OWN_MANUFACTURER
        sr.CodingSchemeIdentificationSequence = [scheme]
    stamp(sr, when, OutputKind.SR, demo=model.demo)
    return sr


def _volume(name: hd.sr.CodedConcept, value_ml: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value_ml), unit=MILLILITER)
