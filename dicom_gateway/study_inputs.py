"""The model inputs of a classified study: DWI, ADC (µm²/s) and FLAIR volumes, and the instances behind them.

Why one module: the inference jobs and `fedlesion convert` must see the very same arrays, so both call
`load_study_inputs` with the roles the studies table stored. It turns each role choice (roles.py) into a volume:
the scanner trace or a computed one (geometric mean over directions), the scanner ADC converted to 10⁻⁶ mm²/s or a
computed ADC from the mean b0, and the FLAIR. Each volume keeps the source instances of its slices in slice order,
which the SEG and Secondary Capture writers reference. A role whose volume cannot be built (a missing slice, uneven
spacing) is reported as not processed with the reason instead of stopping the other roles.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
from pydicom.dataset import Dataset

from dicom_gateway.adc_maps import (
    computed_adc,
    geometric_mean,
    mean_volume,
    scanner_adc,
)
from dicom_gateway.diffusion import VolumeKey
from dicom_gateway.role_decisions import AdcSource, DwiKind, StudyRoles
from dicom_gateway.study_files import SeriesHeaders, StudyHeaders, read_path
from dicom_gateway.volumes import (
    SeriesVolume,
    SliceSource,
    VolumeNotProcessed,
    series_volumes,
    volume_to_nifti,
)
from models.manifest import ADC_UNIT

__all__ = ["RoleVolume", "StudyInputs", "load_study_inputs"]

logger = logging.getLogger(__name__)

GRID_ATOL_MM = 1e-3  # DWI and ADC on "the same grid": affines equal within this


@dataclass(frozen=True)
class RoleVolume:
    """One model input on its source grid, and the instances its slices came from (slice order)."""

    role: str  # "dwi", "adc" or "flair"
    series_uid: str
    series_number: int | None
    volume: hd.Volume  # float32 real values; ADC in 10⁻⁶ mm²/s
    sources: tuple[SliceSource, ...]
    reference_datasets: tuple[Dataset, ...]  # header datasets, one per slice, slice order

    def to_nifti(self) -> nib.Nifti1Image:
        return volume_to_nifti(self.volume)


@dataclass(frozen=True)
class StudyInputs:
    study_uid: str
    dwi: RoleVolume | None
    adc: RoleVolume | None
    flair: RoleVolume | None
    dwi_b_value: float | None
    dwi_kind: DwiKind | None
    adc_source: AdcSource | None
    adc_unit_detected: str | None  # the unit the scanner stored and how it was decided; "computed" otherwise
    not_processed: dict[str, str] = field(default_factory=dict)  # role → reason its volume was not built
    warnings: list[str] = field(default_factory=list)

    def nifti(self, role: str) -> nib.Nifti1Image | None:
        """dwi / adc / flair as a Nifti1Image (RAS affine, float32), None when the role has no volume."""
        if role not in ("dwi", "adc", "flair"):
            raise ValueError(f"role must be dwi, adc or flair, got {role!r}")
        volume: RoleVolume | None = getattr(self, role)
        return None if volume is None else volume.to_nifti()


def load_study_inputs(roles: StudyRoles, study: StudyHeaders | Path) -> StudyInputs:
    """Volumes for the roles in `roles` from the study's instances (`study`: headers, or a folder/DICOMDIR)."""
    if isinstance(study, Path):
        study = read_path(study).only_study()
    if study.study_uid != roles.study_uid:
        raise ValueError(f"roles are for study {roles.study_uid}, the files hold study {study.study_uid}")
    not_processed: dict[str, str] = {}
    warnings = list(roles.warnings)

    dwi: RoleVolume | None = None
    if roles.dwi is not None:
        choice = roles.dwi
        try:
            dwi = _dwi_volume(_series(study, choice.series_uid, choice.sop_class_uid), choice.kind, choice.volumes)
        except VolumeNotProcessed as error:
            not_processed["dwi"] = f"series {choice.series_number}: {error}"

    adc: RoleVolume | None = None
    unit_detected: str | None = None
    if roles.adc is not None:
        choice_adc = roles.adc
        series = _series(study, choice_adc.series_uid, choice_adc.sop_class_uid)
        try:
            if choice_adc.source == AdcSource.SCANNER:
                adc, unit_detected = _scanner_adc_volume(series)
            else:
                adc = _computed_adc_volume(series, choice_adc.b0_volumes, choice_adc.b_volumes, choice_adc.b_value)
                unit_detected = f"computed ({ADC_UNIT})"
        except VolumeNotProcessed as error:
            not_processed["adc"] = f"series {choice_adc.series_number}: {error}"

    flair: RoleVolume | None = None
    if roles.flair is not None:
        series = _series(study, roles.flair.series_uid, roles.flair.sop_class_uid)
        try:
            flair = _flair_volume(series)
        except VolumeNotProcessed as error:
            not_processed["flair"] = f"series {roles.flair.series_number}: {error}"

    if dwi is not None and adc is not None and not dwi.volume.geometry_equal(adc.volume, tol=GRID_ATOL_MM):
        warnings.append(f"ADC series {adc.series_number} is not on the DWI's grid (series {dwi.series_number})")
    for role, reason in not_processed.items():
        logger.warning("study %s: %s not processed: %s", study.study_uid, role, reason)
    return StudyInputs(
        study_uid=study.study_uid,
        dwi=dwi,
        adc=adc,
        flair=flair,
        dwi_b_value=roles.dwi.b_value if roles.dwi is not None else None,
        dwi_kind=roles.dwi.kind if roles.dwi is not None else None,
        adc_source=roles.adc.source if roles.adc is not None else None,
        adc_unit_detected=unit_detected,
        not_processed=not_processed,
        warnings=warnings,
    )


def _series(study: StudyHeaders, series_uid: str, sop_class_uid: str) -> SeriesHeaders:
    return study.find_series(series_uid, sop_class_uid)


def _role_volume(role: str, series: SeriesHeaders, volume: hd.Volume, source: SeriesVolume) -> RoleVolume:
    return RoleVolume(
        role=role,
        series_uid=series.series_uid,
        series_number=series.number,
        volume=volume,
        sources=source.sources,
        reference_datasets=source.reference_datasets,
    )


def _volumes_by_key(series: SeriesHeaders, keys: Sequence[VolumeKey]) -> list[SeriesVolume]:
    volumes = series_volumes(series.datasets, wanted=set(keys))
    by_key = {volume.key: volume for volume in volumes}
    return [by_key[key] for key in keys]


def _dwi_volume(series: SeriesHeaders, kind: DwiKind, keys: Sequence[VolumeKey]) -> RoleVolume:
    """The trace: the scanner's (one volume) or the geometric mean of the directional volumes at one b.

    A computed trace references the slices of its first directional volume (same grid, same slice positions).
    """
    volumes = _volumes_by_key(series, keys)
    if kind == DwiKind.TRACE:
        return _role_volume("dwi", series, volumes[0].real, volumes[0])
    return _role_volume("dwi", series, geometric_mean([v.real for v in volumes]), volumes[0])


def _scanner_adc_volume(series: SeriesHeaders) -> tuple[RoleVolume, str]:
    volumes = series_volumes(series.datasets)
    if len(volumes) != 1:
        raise VolumeNotProcessed(f"{len(volumes)} volumes where one ADC map was expected")
    try:
        conversion = scanner_adc(volumes[0])
    except ValueError as error:  # no positive value, or a median in no known unit's range
        raise VolumeNotProcessed(str(error)) from error
    detected = f"{conversion.unit.value} ({conversion.unit_source})"
    return _role_volume("adc", series, conversion.adc, volumes[0]), detected


def _computed_adc_volume(
    series: SeriesHeaders, b0_keys: Sequence[VolumeKey], b_keys: Sequence[VolumeKey], b_value: float | None
) -> RoleVolume:
    if not b0_keys or not b_keys or b_value is None:
        raise VolumeNotProcessed("a computed ADC needs b0 volumes and a b-value")
    volumes = _volumes_by_key(series, [*b0_keys, *b_keys])
    b0 = mean_volume([v.real for v in volumes[: len(b0_keys)]])
    sb = geometric_mean([v.real for v in volumes[len(b0_keys) :]])
    return _role_volume("adc", series, computed_adc(b0, sb, b_value), volumes[len(b0_keys)])


def _flair_volume(series: SeriesHeaders) -> RoleVolume:
    volumes = series_volumes(series.datasets)
    if len(volumes) != 1:
        raise VolumeNotProcessed(f"{len(volumes)} volumes where one FLAIR volume was expected")
    return _role_volume("flair", series, volumes[0].real, volumes[0])
