"""Write a `SyntheticCase` as a classic single-frame MR DICOM study, the way a PACS would push it to the node.

Why: the DICOM node (design §4) must be tested end to end on studies with a known lesion, known ADC unit and
known geometry, and the shared data holds no DICOM study with a lesion mask. Output is deterministic: UIDs,
dates and bytes depend only on the case (seed, case_id) and the arguments.

Pixel-axis convention (the usual NIfTI↔DICOM one): for a case array `vol[i, j, k]`,
  * array axis 0 (i) → DICOM columns: the column index c runs along i, so ImageOrientationPatient's *row*
    cosine (direction of increasing column index) is the LPS direction of affine column 0;
  * array axis 1 (j) → DICOM rows: the row index r runs along j, so the *column* cosine is affine column 1;
  * array axis 2 (k) → slices: instance k's ImagePositionPatient is the LPS centre of voxel (0, 0, k).
So the pixel matrix of slice k is `vol[:, :, k].T` (shape Rows = nj, Columns = ni) and
PixelSpacing = [row spacing, column spacing] = [|affine[:, 1]|, |affine[:, 0]|]. Slice positions come from the
affine (a gap case has SpacingBetweenSlices > SliceThickness); SliceThickness is `case.slice_thickness_mm`.

Stored values (uint16): ADC is stored as integer 10⁻⁶ mm²/s (µm²/s), clipped to [0, 5000], RescaleSlope 1,
RescaleIntercept 0. Magnitude series (DWI, FLAIR, T1-FLAIR, eADC) are scaled per series: stored =
round(value / slope), slope = series maximum / 4095 (RescaleIntercept 0), so the modality transform gives back
the case's values within slope / 2 and ratios between the b0 and b1000 volumes of the DWI series are kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from models.geometry import affine_spacing, slice_normal, swap_ras_lps
from training.synthetic.case import SyntheticCase

MANUFACTURER = "fedlesion-synthetic"
B_VALUE = 1000.0  # s/mm², the b of the `dwi_b1000` trace image
ADC_MAX = 5000.0  # µm²/s, the clip of design §4
MAGNITUDE_MAX_STORED = 4095  # 12-bit range, as scanners store magnitude images
CHARSET_CODECS = {"ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "synthetic.fedlesion")


def derived_uid(*parts: str) -> UID:
    """A deterministic UID: 2.25 + a name-based (v5) UUID of `parts`.

    Not `pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`: with prefix None it ignores the entropy and
    returns a random UUID; with a prefix it joins the parts without a separator and is not a valid 2.25 UID.
    """
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}")


_IMPLEMENTATION_UID = derived_uid("implementation")


@dataclass(frozen=True)
class Protocol:
    """MR acquisition parameters of one series (times in ms)."""

    scanning_sequence: str  # e.g. "EP", "SE\\IR"
    sequence_variant: str
    scan_options: str
    repetition_time: float
    echo_time: float
    echo_train_length: int
    inversion_time: float | None = None
    acquisition_type: str = "2D"


@dataclass(frozen=True)
class VolumeSpec:
    """One 3-D volume of a series; a DWI series holds two (b0, b1000) at the same positions."""

    data: np.ndarray  # (i, j, k), see the module docstring for the pixel-axis convention
    image_type: tuple[str, ...]
    sequence_name: str
    b_value: float | None = None  # written as DiffusionBValue (+ DiffusionDirectionality) when set


@dataclass(frozen=True)
class SeriesSpec:
    role: str  # directory suffix and UID entropy, e.g. "dwi"
    number: int
    description: str
    protocol: Protocol
    volumes: tuple[VolumeSpec, ...]
    integer_values: bool = False  # True: values stored as rounded integers (ADC); False: per-series slope
    contrast_agent: str | None = None


@dataclass(frozen=True)
class StudyInfo:
    """Patient/study attributes shared by every series of a study, plus its UID root and start time."""

    study_uid: str
    frame_of_reference_uid: str
    charset: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    accession_number: str
    study_description: str
    study_start: dt.datetime
    station: str


FLAIR_PROTOCOL = Protocol("SE\\IR", "SK\\SP\\MP", "IR", 9000.0, 90.0, 16, inversion_time=2500.0)
T1_FLAIR_PROTOCOL = Protocol("SE\\IR", "SK\\SP\\MP", "IR", 2000.0, 10.0, 4, inversion_time=860.0)
DWI_PROTOCOL = Protocol("EP", "SK\\SP", "FS", 5000.0, 80.0, 1)


def write_dicom_study(
    case: SyntheticCase,
    out_dir: Path | str,
    *,
    patient_name: str = "Synthetic^Stroke",
    patient_id: str | None = None,
    charset: str = "ISO_IR 192",
    negatives: bool = False,
    study_uid: str | None = None,
    study_description: str | None = None,
) -> list[Path]:
    """Write every series the case's images allow; `negatives` adds look-alike series no role should pick.

    Series (SeriesNumber_role): 2_flair, 4_dwi (b0 + b1000), 5_adc; negatives: 3_t1_flair (from
    `images["t1_flair"]`, else derived from ADC), 6_eadc (exp(−b·ADC)), 10_flair_post (FLAIR pixels with a contrast
    agent). Returns the written files in series then instance order.
    """
    study = study_info(
        case,
        patient_name=patient_name,
        patient_id=patient_id,
        charset=charset,
        study_uid=study_uid,
        study_description=study_description,
    )
    out = Path(out_dir)
    paths: list[Path] = []
    for spec in study_series(case, negatives=negatives):
        paths += write_series(spec, case.affine, case.slice_thickness_mm, study, out / f"{spec.number}_{spec.role}")
    return paths


def study_info(
    case: SyntheticCase,
    *,
    patient_name: str = "Synthetic^Stroke",
    patient_id: str | None = None,
    charset: str = "ISO_IR 192",
    study_uid: str | None = None,
    study_description: str | None = None,
) -> StudyInfo:
    """Validate the identity arguments and derive the rest (dates, sex, accession) from the case seed."""
    if charset not in CHARSET_CODECS:
        raise ValueError(f"charset must be one of {sorted(CHARSET_CODECS)}, got {charset!r}")
    patient_id = patient_id if patient_id is not None else f"SYN-{case.case_id}"
    description = study_description if study_description is not None else f"MRI brain ({case.kind}, synthetic)"
    _check_text("patient_name", patient_name, charset, max_chars=64 * 3)
    _check_person_name(patient_name)
    _check_text("patient_id", patient_id, charset, max_chars=64)
    _check_text("study_description", description, charset, max_chars=64)
    if study_uid is None:
        study_uid = derived_uid(str(case.seed), case.case_id, "study")
    elif not _UID_RE.match(study_uid) or len(study_uid) > 64:
        raise ValueError(f"study_uid {study_uid!r} is not a valid DICOM UID (digits and dots, at most 64 chars)")

    digest = int.from_bytes(hashlib.sha256(f"{case.seed}/{case.case_id}".encode()).digest()[:8], "big")
    rng = np.random.default_rng(digest)
    study_start = dt.datetime(2024, 1, 1, 7, 30) + dt.timedelta(
        days=int(rng.integers(0, 366)), minutes=int(rng.integers(0, 12 * 60))
    )
    age = int(rng.integers(35, 90))
    birth = dt.date(study_start.year - age - 1, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    age = study_start.year - birth.year - ((study_start.month, study_start.day) < (birth.month, birth.day))
    return StudyInfo(
        study_uid=study_uid,
        frame_of_reference_uid=derived_uid(study_uid, "frame-of-reference"),
        charset=charset,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex=str(rng.choice(["F", "M"])),
        patient_age=f"{age:03d}Y",
        accession_number=f"A{digest % 10**15:015d}",
        study_description=description,
        study_start=study_start,
        station=case.site.name[:16],
    )


def study_series(case: SyntheticCase, *, negatives: bool = False) -> list[SeriesSpec]:
    """The series a case's images allow, in acquisition (SeriesNumber) order."""
    images = case.images
    shapes = {key: np.shape(arr) for key, arr in images.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"all case images must share one shape, got {shapes}")
    if not images:
        raise ValueError(f"case {case.case_id!r} has no images to write")
    adc = images.get("adc")
    series: list[SeriesSpec] = []
    if "flair" in images:
        flair = VolumeSpec(images["flair"], ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tir2d1_16")
        series.append(SeriesSpec("flair", 2, "t2_tirm_tra_dark-fluid", FLAIR_PROTOCOL, (flair,)))
    if negatives and ("t1_flair" in images or adc is not None):
        t1 = images["t1_flair"] if "t1_flair" in images else _derived_t1_flair(adc)  # type: ignore[arg-type]
        vol = VolumeSpec(t1, ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tir2d1_4")
        series.append(SeriesSpec("t1_flair", 3, "t1_tirm_tra", T1_FLAIR_PROTOCOL, (vol,)))
    dwi = [
        VolumeSpec(images[key], ("ORIGINAL", "PRIMARY", "DIFFUSION", token), name, b)
        for key, token, name, b in (
            ("dwi_b0", "NONE", "*ep_b0", 0.0),
            ("dwi_b1000", "TRACEW", f"*ep_b{B_VALUE:.0f}t", B_VALUE),
        )
        if key in images
    ]
    if dwi:
        series.append(SeriesSpec("dwi", 4, "ep2d_diff_3scan_trace_p2", DWI_PROTOCOL, tuple(dwi)))
    if adc is not None:
        vol = VolumeSpec(adc, ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), f"ep_b0_{B_VALUE:.0f}")
        series.append(SeriesSpec("adc", 5, "ep2d_diff_3scan_trace_p2_ADC", DWI_PROTOCOL, (vol,), integer_values=True))
        if negatives:
            # Background (ADC 0) stays 0 as on scanners, not exp(0) = 1.
            eadc = np.where(adc > 0, np.exp(-B_VALUE * np.clip(adc, 0.0, ADC_MAX) * 1e-6), 0.0).astype(np.float32)
            vol = VolumeSpec(eadc, ("DERIVED", "PRIMARY", "DIFFUSION", "EADC"), f"ep_b0_{B_VALUE:.0f}")
            series.append(SeriesSpec("eadc", 6, "ep2d_diff_3scan_trace_p2_EADC", DWI_PROTOCOL, (vol,)))
    if negatives and "flair" in images:
        post = VolumeSpec(images["flair"], ("ORIGINAL", "PRIMARY", "M", "NORM"), "*tir2d1_16")
        series.append(
            SeriesSpec(
                "flair_post", 10, "t2_tirm_tra_dark-fluid_POST", FLAIR_PROTOCOL, (post,), contrast_agent="Gadobutrol"
            )
        )
    return series


def write_series(
    spec: SeriesSpec, affine: np.ndarray, slice_thickness_mm: float, study: StudyInfo, out_dir: Path | str
) -> list[Path]:
    """Write one series as `out_dir/IM_0001.dcm`…, volumes one after another (InstanceNumber 1..N)."""
    geometry = slice_geometry(affine)
    if not np.isfinite(slice_thickness_mm) or slice_thickness_mm <= 0:
        raise ValueError(f"slice thickness must be a positive number of mm, got {slice_thickness_mm}")
    if not spec.volumes:
        raise ValueError(f"series {spec.role!r} has no volumes")
    shape = spec.volumes[0].data.shape
    for vol in spec.volumes:
        if vol.data.ndim != 3 or vol.data.shape != shape:
            raise ValueError(f"series {spec.role!r}: volumes must be 3-D of one shape, got {vol.data.shape}")
        if not np.all(np.isfinite(vol.data)):
            raise ValueError(f"series {spec.role!r}: volume {vol.image_type} holds non-finite values")
    if max(shape[:2]) > 65535:
        raise ValueError(f"series {spec.role!r}: in-plane size {shape[:2]} exceeds 65535")

    stored, slope = _to_stored(spec)
    series_uid = derived_uid(study.study_uid, "series", spec.role)
    acquired = study.study_start + dt.timedelta(minutes=3 * spec.number)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    n_slices = shape[2]
    for v, (vol, pixels) in enumerate(zip(spec.volumes, stored, strict=True)):
        for k in range(n_slices):
            number = v * n_slices + k + 1
            ds = _instance(spec, vol, study, geometry, k, slice_thickness_mm, series_uid, number, acquired)
            ds.RescaleSlope = format_number_as_ds(slope)
            ds.RescaleIntercept = "0"
            ds.Rows, ds.Columns = shape[1], shape[0]
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).astype("<u2").tobytes()
            path = out / f"IM_{number:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


@dataclass(frozen=True)
class SliceGeometry:
    """DICOM Image Plane values derived from a voxel→RAS affine (see the module docstring)."""

    orientation: list[str]  # ImageOrientationPatient: row cosine, column cosine (LPS)
    pixel_spacing: list[str]  # [row spacing, column spacing]
    origin_lps: np.ndarray  # centre of voxel (0, 0, 0); slice k lies at origin + k * slice_step
    slice_step_lps: np.ndarray
    normal_lps: np.ndarray


def slice_geometry(affine: np.ndarray) -> SliceGeometry:
    """Convert a RAS+ affine to LPS Image Plane values; refuse shear, since DICOM slices stack along the normal."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4×4 matrix, got shape {a.shape}")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    lps = swap_ras_lps(a)
    cols = lps[:3, :3]
    spacing = affine_spacing(lps)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: spacings {spacing.tolist()}")
    unit = cols / spacing
    if abs(float(unit[:, 0] @ unit[:, 1])) > 1e-6:
        raise ValueError("affine's in-plane axes (0 and 1) are not perpendicular")
    orientation = np.concatenate([unit[:, 0], unit[:, 1]])
    normal = slice_normal(orientation)
    if abs(abs(float(normal @ unit[:, 2])) - 1.0) > 1e-6:
        raise ValueError("affine's slice axis (2) is not along the slice normal (sheared/tilted stack)")
    return SliceGeometry(
        orientation=[_ds(x) for x in orientation],
        pixel_spacing=[_ds(spacing[1]), _ds(spacing[0])],
        origin_lps=lps[:3, 3],
        slice_step_lps=cols[:, 2],
        normal_lps=normal,
    )


def _instance(
    spec: SeriesSpec,
    vol: VolumeSpec,
    study: StudyInfo,
    geometry: SliceGeometry,
    k: int,
    thickness: float,
    series_uid: str,
    number: int,
    acquired: dt.datetime,
) -> Dataset:
    sop_uid = derived_uid(series_uid, "instance", str(number))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FEDLESION_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = study.charset
    ds.ImageType = list(vol.image_type)
    ds.InstanceCreationDate, ds.InstanceCreationTime = _date(acquired), _time(acquired)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = _date(study.study_start), _time(study.study_start)
    ds.SeriesDate, ds.SeriesTime = _date(acquired), _time(acquired)
    ds.AcquisitionDate, ds.AcquisitionTime = _date(acquired), _time(acquired)
    ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S.%f")
    ds.ContentDate, ds.ContentTime = _date(acquired), _time(acquired)
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "fedlesion synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = study.station
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = "phantom"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    if spec.contrast_agent is not None:
        ds.ContrastBolusAgent = spec.contrast_agent
        ds.ContrastBolusRoute = "IV"
    ds.BodyPartExamined = "HEAD"
    p = spec.protocol
    ds.ScanningSequence = p.scanning_sequence.split("\\")
    ds.SequenceVariant = p.sequence_variant.split("\\")
    ds.ScanOptions = p.scan_options.split("\\") if p.scan_options else ""
    ds.MRAcquisitionType = p.acquisition_type
    ds.SequenceName = vol.sequence_name
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(thickness)
    ds.RepetitionTime = _ds(p.repetition_time)
    ds.EchoTime = _ds(p.echo_time)
    if p.inversion_time is not None:
        ds.InversionTime = _ds(p.inversion_time)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.SpacingBetweenSlices = _ds(float(np.linalg.norm(geometry.slice_step_lps)))
    ds.EchoTrainLength = p.echo_train_length
    ds.PatientPosition = "HFS"
    if vol.b_value is not None:
        ds.DiffusionDirectionality = "ISOTROPIC" if vol.b_value > 0 else "NONE"
        ds.DiffusionBValue = float(vol.b_value)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    position = geometry.origin_lps + k * geometry.slice_step_lps
    ds.ImagePositionPatient = [_ds(x) for x in position]
    ds.ImageOrientationPatient = geometry.orientation
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(position @ geometry.normal_lps))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = geometry.pixel_spacing
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _to_stored(spec: SeriesSpec) -> tuple[list[np.ndarray], float]:
    """Stored uint16 volumes and the series' RescaleSlope (see the module docstring)."""
    if spec.integer_values:
        return [np.rint(np.clip(v.data, 0.0, ADC_MAX)).astype(np.uint16) for v in spec.volumes], 1.0
    peak = max(float(np.max(v.data)) for v in spec.volumes)
    # The slope is written as a DS string, so quantise with the value a reader will parse back.
    slope = float(format_number_as_ds(peak / MAGNITUDE_MAX_STORED)) if peak > 0 else 1.0
    return [
        np.rint(np.clip(v.data, 0.0, None) / slope).clip(0, MAGNITUDE_MAX_STORED).astype(np.uint16)
        for v in spec.volumes
    ], slope


def _derived_t1_flair(adc: np.ndarray) -> np.ndarray:
    """A T1-weighted look-alike: bright where water is restricted (white matter), dark CSF and background."""
    return np.where(adc > 0, np.clip(1.5 - adc / 2000.0, 0.05, None), 0.0).astype(np.float32)


def _check_text(name: str, value: str, charset: str, *, max_chars: int) -> None:
    if not isinstance(value, str) or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{name} must be a single-valued string without backslashes or control characters")
    if len(value) > max_chars:
        raise ValueError(f"{name} is {len(value)} characters, at most {max_chars} allowed")
    try:
        value.encode(CHARSET_CODECS[charset])
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} {value!r} cannot be encoded in {charset}; use 'ISO_IR 192' (UTF-8)") from exc


def _check_person_name(name: str) -> None:
    groups = name.split("=")
    if len(groups) > 3 or any(len(g) > 64 or g.count("^") > 4 for g in groups):
        raise ValueError(f"patient_name {name!r} is not a DICOM PN (≤ 3 '='-groups of ≤ 64 chars and ≤ 5 parts)")


def _ds(x: float) -> str:
    """A DS string; -0 and rounding noise (1e-17) are cleaned so equal geometries write equal bytes."""
    x = round(float(x), 10)
    return format_number_as_ds(x if x != 0 else 0.0)


def _date(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d")


def _time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S")
