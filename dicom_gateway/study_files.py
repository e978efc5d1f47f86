"""Read DICOM headers from a folder, a DICOMDIR or a list of files, grouped by Study → Series.

One reader for `fedlesion inspect`, `fedlesion convert` and the studies table, so the three never disagree on what
a study holds. Headers only (stop_before_pixels); `open_dicom` reads a whole instance for the volume assembler.
Gzip-compressed files (as the shared vendor data and some exports store them) are recognised by their magic bytes,
not their names. Files that are not DICOM instances are skipped with a logged reason, never an exception.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import MediaStorageDirectoryStorage

from dicom_gateway.uids import is_valid_uid

logger = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
# What pydicom raises on bytes that are not (or no longer) a DICOM dataset: each means "skip this file".
_GARBAGE_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    NotImplementedError,
    UnicodeDecodeError,
    struct.error,
)


@dataclass
class SeriesHeaders:
    """The instances of one series that share one SOP class, with their header datasets.

    A series is keyed by (Series Instance UID, SOP Class UID): a Philips DTI series also holds a private
    non-image object, and Canon's classic and enhanced copies of a DTI share one Series UID.
    """

    study_uid: str
    series_uid: str
    sop_class_uid: str
    number: int | None
    description: str
    modality: str
    instances: list[tuple[Path, Dataset]] = field(default_factory=list)

    @property
    def datasets(self) -> list[Dataset]:
        return [dataset for _, dataset in self.instances]

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.instances]


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class StudyHeaders:
    study_uid: str
    series: list[SeriesHeaders]

    def find_series(self, series_uid: str, sop_class_uid: str | None = None) -> SeriesHeaders:
        """The series with this UID (and SOP class, where a series UID holds several); ValueError when absent."""
        matches = [
            series
            for series in self.series
            if series.series_uid == series_uid and (sop_class_uid is None or series.sop_class_uid == sop_class_uid)
        ]
        if len(matches) != 1:
            raise ValueError(
                f"study {self.study_uid} has {len(matches)} series with UID {series_uid}"
                + (f" and SOP class {sop_class_uid}" if sop_class_uid else "")
            )
        return matches[0]


@dataclass
class StudyFiles:
    """What a path held: studies (sorted by UID) and the files that were skipped, with reasons."""

    studies: list[StudyHeaders]
    skipped: list[SkippedFile]

    def only_study(self) -> StudyHeaders:
        """The single study; ValueError when there is none or several (inspect and convert take one study)."""
        if not self.studies:
            raise ValueError("no DICOM instances found" + _skipped_summary(self.skipped))
        if len(self.studies) > 1:
            uids = ", ".join(study.study_uid for study in self.studies)
            raise ValueError(f"{len(self.studies)} studies found ({uids}); give one study at a time")
        return self.studies[0]


def header_values(value: Any) -> list[Any]:
    """An element's value as a list: a multi-valued element's values, one value, or none when absent or empty."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [value]
    return list(value)


def open_dicom(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """Read one file, gunzipping it first when it starts with the gzip magic bytes.

    `force=True` admits files without the 128-byte preamble (valid but rare); callers check the UIDs.
    """
    with path.open("rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    if compressed:
        with gzip.open(path, "rb") as stream:
            return pydicom.dcmread(stream, stop_before_pixels=stop_before_pixels, force=True)
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)


def read_path(path: Path) -> StudyFiles:
    """Headers from a folder (searched recursively) or a DICOMDIR; ValueError when the path is unusable."""
    if not isinstance(path, Path):
        raise TypeError(f"path must be a pathlib.Path, got {type(path).__name__}")
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(candidate for candidate in path.rglob("*") if candidate.is_file())
        return read_files(files)
    if path.is_file():
        if _is_dicomdir(path):
            files, skipped = _dicomdir_files(path)
            found = read_files(files)
            return StudyFiles(found.studies, skipped + found.skipped)
        return read_files([path])
    raise ValueError(f"not a file or folder: {path}")


def read_files(paths: Iterable[Path]) -> StudyFiles:
    """Headers of `paths` grouped by Study → (Series, SOP class); non-DICOM and duplicate files are skipped."""
    skipped: list[SkippedFile] = []
    seen_instances: dict[str, Path] = {}
    grouped: dict[str, dict[tuple[str, str], SeriesHeaders]] = {}
    for path in paths:
        dataset, reason = _read_header(path)
        if dataset is None:
            _skip(skipped, path, reason)
            continue
        sop_instance_uid = str(dataset.SOPInstanceUID)
        if sop_instance_uid in seen_instances:
            _skip(skipped, path, f"duplicate of {seen_instances[sop_instance_uid]} (same SOP Instance UID)")
            continue
        seen_instances[sop_instance_uid] = path
        study_uid = str(dataset.StudyInstanceUID)
        series_uid = str(dataset.SeriesInstanceUID)
        sop_class_uid = _sop_class_uid(dataset)
        series = grouped.setdefault(study_uid, {}).get((series_uid, sop_class_uid))
        if series is None:
            series = SeriesHeaders(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_class_uid=sop_class_uid,
                number=_series_number(dataset),
                description=str(dataset.get("SeriesDescription", "") or ""),
                modality=str(dataset.get("Modality", "") or ""),
            )
            grouped[study_uid][(series_uid, sop_class_uid)] = series
        series.instances.append((path, dataset))
    studies = [
        StudyHeaders(
            study_uid,
            sorted(
                series_map.values(),
                key=lambda s: (s.number if s.number is not None else -1, s.series_uid, s.sop_class_uid),
            ),
        )
        for study_uid, series_map in sorted(grouped.items())
    ]
    return StudyFiles(studies, skipped)


def _read_header(path: Path) -> tuple[Dataset | None, str]:
    try:
        dataset = open_dicom(path, stop_before_pixels=True)
    except gzip.BadGzipFile as error:
        return None, f"not DICOM ({error})"
    except OSError as error:
        return None, f"unreadable ({error})"
    except _GARBAGE_ERRORS as error:
        return None, f"not DICOM ({type(error).__name__}: {error})"
    if _sop_class_uid(dataset) == MediaStorageDirectoryStorage:
        return None, "a DICOMDIR (read it by giving its path)"
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = dataset.get(keyword)
        except _GARBAGE_ERRORS:  # a damaged element raises when it is first parsed
            value = None
        if value is None:
            return None, f"not a DICOM instance (no {keyword})"
        if not is_valid_uid(str(value)):
            return None, f"invalid {keyword} {str(value)[:80]!r}"
    return dataset, ""


def _sop_class_uid(dataset: Dataset) -> str:
    value = dataset.get("SOPClassUID")
    if value is None and hasattr(dataset, "file_meta"):
        value = dataset.file_meta.get("MediaStorageSOPClassUID")
    return str(value or "")


def _series_number(dataset: Dataset) -> int | None:
    try:
        value = dataset.get("SeriesNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        with path.open("rb") as handle:
            preamble = handle.read(132)
        if preamble[128:132] != b"DICM":
            return False
        meta = pydicom.filereader.read_file_meta_info(path)
    except (OSError, InvalidDicomError):
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage


def _dicomdir_files(path: Path) -> tuple[list[Path], list[SkippedFile]]:
    """The files a DICOMDIR's directory records reference, relative to the DICOMDIR's folder.

    Walked record by record rather than through `pydicom.fileset.FileSet`, which silently drops records whose file
    is missing: a missing file whose `.gz` twin exists (as in gzip-compressed exports) is read from the twin.
    """
    try:
        dicomdir = pydicom.dcmread(path, force=True)
    except (OSError, *_GARBAGE_ERRORS) as error:
        raise ValueError(f"unreadable DICOMDIR {path}: {error}") from error
    if "DirectoryRecordSequence" not in dicomdir:
        raise ValueError(f"not a DICOMDIR (no directory records): {path}")
    files: list[Path] = []
    skipped: list[SkippedFile] = []
    root = path.parent.resolve()
    for record in dicomdir.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [str(part) for part in (file_id if isinstance(file_id, (list, MultiValue)) else [file_id])]
        referenced = root.joinpath(*parts)
        if ".." in parts or not referenced.resolve().is_relative_to(root):
            _skip(skipped, referenced, "DICOMDIR record points outside its folder")
            continue
        gz_twin = referenced.with_name(referenced.name + ".gz")
        if referenced.is_file():
            files.append(referenced)
        elif gz_twin.is_file():
            files.append(gz_twin)
        else:
            _skip(skipped, referenced, "referenced by the DICOMDIR but missing")
    return files, skipped


def _skip(skipped: list[SkippedFile], path: Path, reason: str) -> None:
    logger.debug("skipped %s: %s", path, reason)
    skipped.append(SkippedFile(path, reason))


def _skipped_summary(skipped: list[SkippedFile]) -> str:
    if not skipped:
        return ""
    return f" ({len(skipped)} file(s) skipped, first: {skipped[0].path.name}: {skipped[0].reason})"
