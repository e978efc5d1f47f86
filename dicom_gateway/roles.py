"""Series roles of a study from headers alone: which series is the DWI, the ADC and the FLAIR, and why.

The rules are data (`role_rules`, design.md §4); this module applies them and records, for every series, one
decision with a human reason (`role_decisions`), so `fedlesion inspect` and the web page can show why a series was
used or not. The result (`StudyRoles`) is stored as the studies table's roles_json and read by the jobs and the
volume assembler, which split series into volumes with `diffusion.volume_keys` exactly as counted here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_gateway.attributes import first_number, frame_value, image_type_tokens, is_enhanced, number_of_frames
from dicom_gateway.diffusion import (
    DiffusionInfo,
    VolumeKey,
    frame_diffusion_infos,
    ordered_volume_keys,
    volume_keys,
)
from dicom_gateway.role_decisions import (
    AdcChoice,
    AdcSource,
    DwiChoice,
    DwiKind,
    FlairChoice,
    SeriesDecision,
    SeriesRole,
    StudyRoles,
    VolumeSummary,
)
from dicom_gateway.role_rules import RoleRules, default_rules
from dicom_gateway.study_files import (
    SeriesHeaders,
    StudyHeaders,
    header_values,
    read_files,
)
from dicom_gateway.uids import OWN_MANUFACTURER

logger = logging.getLogger(__name__)


def classify_study(
    paths: list[Path],
    dwi_b_value: int = 1000,
    dwi_b_range: tuple[int, int] = (700, 1500),
    rules: RoleRules | None = None,
) -> StudyRoles:
    """Roles of the one study whose instance files are `paths` (header reads only)."""
    study = read_files(paths).only_study()
    return classify_headers(study, dwi_b_value, dwi_b_range, rules)


def classify_headers(
    study: StudyHeaders,
    dwi_b_value: int = 1000,
    dwi_b_range: tuple[int, int] = (700, 1500),
    rules: RoleRules | None = None,
) -> StudyRoles:
    """Roles of a study already read with study_files; `dwi_b_value`/`dwi_b_range` come from the model manifest."""
    _check_b_parameters(dwi_b_value, dwi_b_range)
    rules = rules if rules is not None else default_rules()
    profiles = [_profile(series, rules) for series in study.series]
    warnings: list[str] = []

    dwi_options = [option for profile in profiles for option in profile.dwi_options]
    dwi_pick = _choose_dwi(dwi_options, rules, dwi_b_value, dwi_b_range)
    if dwi_pick is not None and not dwi_b_range[0] <= dwi_pick.b_value <= dwi_b_range[1]:
        warnings.append(
            f"DWI b={_b_text(dwi_pick.b_value)} outside the model's trained range {dwi_b_range[0]}–{dwi_b_range[1]}"
        )
    adc_choice, adc_profile, adc_warnings = _choose_adc(profiles, dwi_pick)
    warnings += adc_warnings
    flair_profile = _choose_flair(profiles, rules)

    for profile in profiles:
        _decide(profile, dwi_pick, dwi_options, adc_choice, adc_profile, flair_profile)
        if profile.role != SeriesRole.IGNORED or profile.dwi_options:
            logger.info("series %s (%s): %s", profile.series.number, profile.series.description, profile.reason)

    return StudyRoles(
        study_uid=study.study_uid,
        series=[profile.decision() for profile in profiles],
        dwi=None
        if dwi_pick is None
        else DwiChoice(
            dwi_pick.profile.series.series_uid,
            dwi_pick.profile.series.sop_class_uid,
            dwi_pick.profile.series.number,
            dwi_pick.b_value,
            dwi_pick.kind,
            dwi_pick.volumes,
        ),
        adc=adc_choice,
        flair=None
        if flair_profile is None
        else FlairChoice(
            flair_profile.series.series_uid,
            flair_profile.series.sop_class_uid,
            flair_profile.series.number,
            flair_profile.acquisition_type,
        ),
        warnings=warnings,
        dwi_b_value=dwi_b_value,
        dwi_b_range=dwi_b_range,
    )


def _check_b_parameters(dwi_b_value: int, dwi_b_range: tuple[int, int]) -> None:
    if isinstance(dwi_b_value, bool) or not isinstance(dwi_b_value, (int, float)) or dwi_b_value <= 0:
        raise ValueError(f"dwi_b_value must be a positive number, got {dwi_b_value!r}")
    if (
        not isinstance(dwi_b_range, (tuple, list))
        or len(dwi_b_range) != 2
        or not dwi_b_range[0] <= dwi_b_value <= dwi_b_range[1]
    ):
        raise ValueError(f"dwi_b_range must be (low, high) around dwi_b_value {dwi_b_value}, got {dwi_b_range!r}")


def _b_text(b_value: float) -> str:
    return f"{b_value:g}"


@dataclass
class _DwiOption:
    profile: _Profile
    b_value: float
    kind: DwiKind
    volumes: list[VolumeKey]


@dataclass
class _Profile:
    """What the headers say about one series, and (after the choices) its role and reason."""

    series: SeriesHeaders
    volumes: list[VolumeSummary]
    tokens: frozenset[str]
    acquired: str
    exclusion: str | None = None  # "ignored: ..." when a rule excludes the series before any role
    is_scanner_adc: bool = False
    is_diffusion: bool = False
    flair_verdict: str | None = None  # None: not IR; "" candidate; else an "ignored: ..." reason
    acquisition_type: str = ""
    geometry: tuple = ()
    dwi_options: list[_DwiOption] = field(default_factory=list)
    role: SeriesRole = SeriesRole.IGNORED
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    def decision(self) -> SeriesDecision:
        series = self.series
        return SeriesDecision(
            series_uid=series.series_uid,
            sop_class_uid=series.sop_class_uid,
            number=series.number,
            description=series.description,
            modality=series.modality,
            role=self.role,
            reason=self.reason,
            b_values=sorted({volume.b_value for volume in self.volumes}) if self.is_diffusion else [],
            volumes=self.volumes,
            instances=len(series.instances),
            frames=sum(number_of_frames(dataset) for dataset in series.datasets),
            warnings=self.warnings,
        )

    def has_b0(self) -> bool:
        return any(volume.b_value == 0.0 for volume in self.volumes)


def _profile(series: SeriesHeaders, rules: RoleRules) -> _Profile:
    datasets = series.datasets
    tokens = frozenset(token for dataset in datasets for token in _image_type_tokens(dataset))
    profile = _Profile(series, [], tokens, _acquired(datasets))
    if series.sop_class_uid not in rules.image_sop_classes:
        profile.exclusion = f"ignored: not an MR image ({_sop_class_name(series.sop_class_uid)})"
        return profile
    if series.modality.upper() not in rules.modalities:
        profile.exclusion = f"ignored: modality {series.modality or 'missing'}"
        return profile
    if any(str(dataset.get("Manufacturer", "")) == OWN_MANUFACTURER for dataset in datasets):
        profile.exclusion = "ignored: a fedlesion output"
        return profile

    infos = frame_diffusion_infos(datasets)
    keys = volume_keys(datasets, infos)
    profile.volumes = _volume_summaries(datasets, infos, keys, rules)
    profile.geometry = _geometry(datasets)
    frame_counts = Counter(volume.frames for volume in profile.volumes)
    if len(frame_counts) > 1:
        usual = frame_counts.most_common(1)[0][0]
        odd = [f"{volume.key.label()} ({volume.frames})" for volume in profile.volumes if volume.frames != usual]
        profile.warnings.append(f"volumes with a frame count other than {usual}: {', '.join(odd)}")

    for rule in rules.exclusions:
        if rule.matches(tokens, series.description):
            profile.exclusion = f"ignored: {rule.reason}"
            return profile
    if rules.adc.matches(tokens, series.description):
        profile.is_scanner_adc = True
        return profile

    all_infos = [info for frame_infos in infos for info in frame_infos]
    with_b = [info for info in all_infos if info.b_value is not None]
    if with_b and any(info.b_value > 0 for info in with_b):
        profile.is_diffusion = True
        if len(with_b) < len(all_infos):
            missing = len(all_infos) - len(with_b)
            profile.warnings.append(f"{missing} of {len(all_infos)} frames have no b-value (taken as b0)")
        profile.dwi_options = _dwi_options(profile, rules)
        if not profile.dwi_options:
            profile.exclusion = "ignored: diffusion series without a usable trace (too few directions)"
        return profile
    if with_b:
        profile.exclusion = "ignored: diffusion series with b=0 only"
        return profile

    profile.flair_verdict, profile.acquisition_type = _flair_verdict(datasets, series.description, rules)
    return profile


def _image_type_tokens(dataset: Dataset) -> frozenset[str]:
    """The image's ImageType tokens and, for an enhanced image, those of every frame's FrameType."""
    tokens = image_type_tokens(dataset)
    if is_enhanced(dataset):
        tokens = tokens.union(*(image_type_tokens(dataset, frame) for frame in range(number_of_frames(dataset))))
    return tokens


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else "no SOP class"
    return name if name != uid else f"private SOP class {uid}"


def _acquired(datasets: Sequence[Dataset]) -> str:
    """Earliest acquisition date+time of the series (else series date+time), comparable as text."""
    stamps = []
    for dataset in datasets:
        for date_key, time_key in (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime")):
            date, time = str(dataset.get(date_key, "") or ""), str(dataset.get(time_key, "") or "")
            if time:
                stamps.append(f"{date:0>8}{time.split('.')[0]:0>6}.{(time.split('.') + [''])[1]:0<6}")
                break
    return min(stamps) if stamps else ""


def _volume_summaries(
    datasets: Sequence[Dataset], infos: list[list[DiffusionInfo]], keys: list[list[VolumeKey]], rules: RoleRules
) -> list[VolumeSummary]:
    frames = Counter(key for frame_keys in keys for key in frame_keys)
    trace_keys: set[VolumeKey] = set()
    for dataset, frame_infos, frame_keys in zip(datasets, infos, keys, strict=True):
        enhanced = is_enhanced(dataset)
        for frame, (info, key) in enumerate(zip(frame_infos, frame_keys, strict=True)):
            if key.b_value <= 0 or key in trace_keys:
                continue
            if info.isotropic or info.direction is None:
                trace_keys.add(key)
                continue
            if image_type_tokens(dataset, frame if enhanced else None) & rules.trace_image_type_any:
                trace_keys.add(key)
    return [
        VolumeSummary(key.b_value, key.direction, key.repeat, frames[key], key in trace_keys)
        for key in ordered_volume_keys(datasets, keys)
    ]


def _geometry(datasets: Sequence[Dataset]) -> tuple:
    """(rows, columns, orientation, slice positions) rounded, to tell whether two series share a grid."""
    first = datasets[0]
    first_frame = 0 if is_enhanced(first) else None
    orientation = header_values(frame_value(first, first_frame, "PlaneOrientationSequence", "ImageOrientationPatient"))
    positions = set()
    for dataset in datasets:
        frames = range(number_of_frames(dataset)) if is_enhanced(dataset) else (None,)
        for frame in frames:
            position = header_values(frame_value(dataset, frame, "PlanePositionSequence", "ImagePositionPatient"))
            if len(position) == 3:
                positions.add(tuple(round(float(value), 1) for value in position))
    return (
        first.get("Rows"),
        first.get("Columns"),
        tuple(round(float(value), 3) for value in orientation),
        tuple(sorted(positions)),
    )


def _dwi_options(profile: _Profile, rules: RoleRules) -> list[_DwiOption]:
    options = []
    for b_value in sorted({volume.b_value for volume in profile.volumes if volume.b_value > 0}):
        at_b = [volume for volume in profile.volumes if volume.b_value == b_value]
        traces = [volume.key for volume in at_b if volume.trace]
        directional = [volume.key for volume in at_b if not volume.trace and volume.direction is not None]
        if traces:
            options.append(_DwiOption(profile, b_value, DwiKind.TRACE, traces[-1:]))
        elif len({key.direction for key in directional}) >= rules.min_directions_for_computed_trace:
            options.append(_DwiOption(profile, b_value, DwiKind.COMPUTED, directional))
    return options


def _choose_dwi(
    options: list[_DwiOption], rules: RoleRules, nominal: float, b_range: tuple[int, int]
) -> _DwiOption | None:
    recency = _recency([option.profile for option in options])

    def rank(option: _DwiOption) -> tuple:
        parts = {
            "trace": 0 if option.kind == DwiKind.TRACE else 1,
            "in_range": 0 if b_range[0] <= option.b_value <= b_range[1] else 1,
            "closest_b": abs(option.b_value - nominal),
            "latest": recency[id(option.profile)],
        }
        return tuple(parts[name] for name in rules.dwi_preference) + (option.profile.series.series_uid,)

    return min(options, key=rank) if options else None


def _recency(profiles: list[_Profile]) -> dict[int, int]:
    """id(profile) → 0 for the latest acquired (then highest series number), 1 for the one before, ..."""
    ordered = sorted(
        {id(profile): profile for profile in profiles}.values(),
        key=lambda profile: (profile.acquired, profile.series.number or 0),
        reverse=True,
    )
    return {id(profile): rank for rank, profile in enumerate(ordered)}


def _scanner_adc(profile: _Profile) -> AdcChoice:
    series = profile.series
    return AdcChoice(AdcSource.SCANNER, series.series_uid, series.sop_class_uid, series.number)


def _choose_adc(
    profiles: list[_Profile], dwi: _DwiOption | None
) -> tuple[AdcChoice | None, _Profile | None, list[str]]:
    """The scanner's ADC on the DWI's grid, else one computed from a b0 + b series on that grid."""
    warnings: list[str] = []
    scanner = [profile for profile in profiles if profile.is_scanner_adc]
    if dwi is None:
        if scanner:
            warnings.append("ADC series present but no DWI: ADC not used")
        return None, None, warnings
    grid = dwi.profile.geometry
    matching = [profile for profile in scanner if profile.geometry == grid]
    if matching:
        chosen = max(matching, key=lambda p: (p.acquired, p.series.number or 0))
        return _scanner_adc(chosen), chosen, warnings

    sources = [dwi.profile] + [
        p for p in profiles if p is not dwi.profile and p.is_diffusion and p.geometry == grid and p.exclusion is None
    ]
    for source in sources:
        b0 = [volume.key for volume in source.volumes if volume.b_value == 0.0]
        option = next((o for o in source.dwi_options if o.b_value == dwi.b_value and o.kind == dwi.kind), None)
        option = option or next((o for o in source.dwi_options if o.b_value == dwi.b_value), None)
        if b0 and option is not None:
            if scanner:
                numbers = ", ".join(str(p.series.number) for p in scanner)
                warnings.append(f"scanner ADC series {numbers} not on the DWI's slice grid: ADC computed instead")
            return (
                AdcChoice(
                    AdcSource.COMPUTED,
                    source.series.series_uid,
                    source.series.sop_class_uid,
                    source.series.number,
                    b_value=dwi.b_value,
                    b0_volumes=b0,
                    b_volumes=option.volumes,
                ),
                source,
                warnings,
            )
    if scanner:
        chosen = max(scanner, key=lambda p: (p.acquired, p.series.number or 0))
        warnings.append(f"ADC series {chosen.series.number} is not on the DWI's slice grid")
        return _scanner_adc(chosen), chosen, warnings
    warnings.append(f"no ADC: no scanner ADC and no b0 volume with the DWI's b={_b_text(dwi.b_value)}")
    return None, None, warnings


def _first_frame_number(dataset: Dataset, sequence: str, keyword: str) -> float | None:
    """A numeric attribute of the image's first frame (`attributes.frame_value`'s precedence)."""
    return first_number(frame_value(dataset, 0, sequence, keyword))


def _flair_verdict(datasets: Sequence[Dataset], description: str, rules: RoleRules) -> tuple[str | None, str]:
    """None when the series is not inversion recovery; "" for a FLAIR candidate; else the ignore reason."""
    first = datasets[0]
    scanning = {str(token).strip().upper() for token in header_values(first.get("ScanningSequence"))}
    sequence_name = str(first.get("SequenceName", "") or first.get("PulseSequenceName", "") or "")
    enhanced_ir = str(first.get("InversionRecovery", "") or "").upper() == "YES"
    is_ir = (
        bool(scanning & rules.flair_scanning_sequence_any)
        or enhanced_ir
        or any(pattern.search(sequence_name) for pattern in rules.flair_sequence_name_regex)
    )
    named_flair = any(pattern.search(description) for pattern in rules.flair_description_regex)
    acquisition_type = str(first.get("MRAcquisitionType", "") or "").upper()
    if not is_ir and not named_flair:
        return None, acquisition_type
    inversion = first_number(first.get("InversionTime")) or _first_frame_number(
        first, "MRModifierSequence", "InversionTimes"
    )
    repetition = _first_frame_number(first, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
    contrast = str(first.get("ContrastBolusAgent", "") or "").strip()
    if contrast or any(pattern.search(description) for pattern in rules.post_contrast_description_regex):
        return "ignored: post-contrast FLAIR" + (f" (contrast agent {contrast})" if contrast else ""), acquisition_type
    minimum_ti = rules.flair_inversion_time_min_ms
    if inversion is not None and inversion < minimum_ti:
        return f"ignored: T1-FLAIR (TI < {minimum_ti:g} ms)", acquisition_type
    if any(pattern.search(description) for pattern in rules.t1_flair_description_regex):
        return f"ignored: T1-FLAIR (described as T1; TI {_ms(inversion)})", acquisition_type
    if inversion is None:
        return "ignored: inversion recovery without an inversion time", acquisition_type
    if repetition is None or repetition < rules.flair_repetition_time_min_ms:
        minimum_tr = rules.flair_repetition_time_min_ms
        return f"ignored: not FLAIR (TR {_ms(repetition)} < {minimum_tr:g} ms)", acquisition_type
    if not is_ir:
        return "ignored: described as FLAIR but not inversion recovery", acquisition_type
    return "", acquisition_type


def _ms(value: float | None) -> str:
    return "missing" if value is None else f"{value:g} ms"


def _choose_flair(profiles: list[_Profile], rules: RoleRules) -> _Profile | None:
    candidates = [profile for profile in profiles if profile.flair_verdict == ""]
    if not candidates:
        return None
    preference = rules.flair_acquisition_preference
    recency = _recency(candidates)

    def rank(profile: _Profile) -> tuple:
        kind = profile.acquisition_type
        order = preference.index(kind) if kind in preference else len(preference)
        return (order, recency[id(profile)])

    return min(candidates, key=rank)


def _decide(
    profile: _Profile,
    dwi: _DwiOption | None,
    dwi_options: list[_DwiOption],
    adc: AdcChoice | None,
    adc_profile: _Profile | None,
    flair: _Profile | None,
) -> None:
    """Set the profile's role and reason from the study-level choices."""
    number = profile.series.number
    if profile.exclusion is not None:
        profile.role, profile.reason = SeriesRole.IGNORED, profile.exclusion
        return
    if dwi is not None and profile is dwi.profile:
        how = (
            f"scanner trace at b={_b_text(dwi.b_value)}"
            if dwi.kind == DwiKind.TRACE
            else f"computed trace at b={_b_text(dwi.b_value)} (geometric mean of {len(dwi.volumes)} directions)"
        )
        profile.role, profile.reason = SeriesRole.DWI, f"dwi: {how}"
        if adc is not None and adc.source == AdcSource.COMPUTED and adc_profile is profile:
            profile.reason += f"; ADC computed from the mean of {len(adc.b0_volumes)} b0 volume(s)"
        return
    if profile.is_scanner_adc:
        if adc_profile is profile:
            profile.role, profile.reason = SeriesRole.ADC, "adc: scanner ADC (ImageType ADC)"
        else:
            if adc is None:
                chosen = "none"
            else:
                chosen = "computed" if adc.source == AdcSource.COMPUTED else f"series {adc.series_number}"
            profile.role, profile.reason = SeriesRole.IGNORED, f"ignored: ADC not used (chosen ADC: {chosen})"
        return
    if profile.is_diffusion:
        _decide_diffusion(profile, dwi, dwi_options, adc, adc_profile)
        return
    if profile.flair_verdict is None:
        profile.role, profile.reason = SeriesRole.IGNORED, "ignored: not diffusion"
    elif profile.flair_verdict:
        profile.role, profile.reason = SeriesRole.IGNORED, profile.flair_verdict
    elif profile is flair:
        profile.role = SeriesRole.FLAIR
        profile.reason = f"flair: inversion recovery, {profile.acquisition_type or 'acquisition type unknown'}"
    else:
        profile.role = SeriesRole.IGNORED
        profile.reason = f"ignored: another FLAIR preferred (series {flair.series.number if flair else '?'})"
    logger.debug("series %s decided: %s", number, profile.reason)


def _decide_diffusion(
    profile: _Profile,
    dwi: _DwiOption | None,
    dwi_options: list[_DwiOption],
    adc: AdcChoice | None,
    adc_profile: _Profile | None,
) -> None:
    assert dwi is not None  # a diffusion series always offers an option, so a DWI was chosen
    chosen = f"series {dwi.profile.series.number} ({dwi.kind.value} at b={_b_text(dwi.b_value)}) chosen"
    if adc_profile is profile:
        profile.role = SeriesRole.DWI_SOURCE
        profile.reason = f"dwi-source: source of the computed ADC (b0 and b={_b_text(dwi.b_value)}); {chosen}"
        return
    equivalent = [o for o in profile.dwi_options if o.kind == dwi.kind and o.b_value == dwi.b_value]
    if equivalent:
        profile.role = SeriesRole.IGNORED
        profile.reason = f"ignored: equivalent DWI; the latest acquired, {chosen}"
        return
    if any(volume.direction is not None for volume in profile.volumes):
        directions = len({v.direction for v in profile.volumes if v.direction is not None})
        b_values = "/".join(_b_text(b) for b in sorted({v.b_value for v in profile.volumes}))
        profile.role = SeriesRole.DWI_SOURCE
        profile.reason = f"dwi-source: directional DWI (b={b_values}, {directions} directions); {chosen}"
        return
    profile.role = SeriesRole.IGNORED
    b_values = "/".join(_b_text(option.b_value) for option in profile.dwi_options)
    profile.reason = f"ignored: DWI at b={b_values} not chosen; {chosen}"
