"""The decision record of a study's series roles: what `roles.classify_headers` chose for each series, and why.

`StudyRoles` is stored as the studies table's roles_json and read back by the jobs, the volume assembler and the
web page, so its JSON form is a stored format: `ROLES_JSON_VERSION` changes whenever that form does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from dicom_gateway.diffusion import VolumeKey

ROLES_JSON_VERSION = 1


class SeriesRole(StrEnum):
    DWI = "dwi"
    ADC = "adc"
    FLAIR = "flair"
    DWI_SOURCE = "dwi-source"  # directional DWI kept only as the source of a computed trace or ADC
    IGNORED = "ignored"


class DwiKind(StrEnum):
    TRACE = "trace"  # made by the scanner
    COMPUTED = "computed"  # geometric mean over directions at one b


class AdcSource(StrEnum):
    SCANNER = "scanner"
    COMPUTED = "computed"  # 10⁶·ln(S0/Sb)/b from a DWI series' b0 and b volumes


@dataclass
class VolumeSummary:
    """One split volume of a series, in acquisition order."""

    b_value: float
    direction: tuple[float, float, float] | None
    repeat: int
    frames: int
    trace: bool

    @property
    def key(self) -> VolumeKey:
        return VolumeKey(self.b_value, self.direction, self.repeat)


@dataclass
class SeriesDecision:
    series_uid: str
    sop_class_uid: str
    number: int | None
    description: str
    modality: str
    role: SeriesRole
    reason: str
    b_values: list[float]
    volumes: list[VolumeSummary]
    instances: int
    frames: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class DwiChoice:
    series_uid: str
    sop_class_uid: str
    series_number: int | None
    b_value: float
    kind: DwiKind
    volumes: list[VolumeKey]  # the trace volume, or the directional volumes to average geometrically


@dataclass
class AdcChoice:
    source: AdcSource
    series_uid: str
    sop_class_uid: str
    series_number: int | None
    b_value: float | None = None  # computed only: the b of `b_volumes`
    b0_volumes: list[VolumeKey] = field(default_factory=list)  # computed only: averaged into S0
    b_volumes: list[VolumeKey] = field(default_factory=list)  # computed only: their geometric mean is Sb


@dataclass
class FlairChoice:
    series_uid: str
    sop_class_uid: str
    series_number: int | None
    acquisition_type: str


@dataclass
class StudyRoles:
    study_uid: str
    series: list[SeriesDecision]
    dwi: DwiChoice | None
    adc: AdcChoice | None
    flair: FlairChoice | None
    warnings: list[str]
    dwi_b_value: int
    dwi_b_range: tuple[int, int]

    def decision(self, series_uid: str, sop_class_uid: str | None = None) -> SeriesDecision:
        """The decision for a series (UID, and SOP class where one UID holds several); KeyError when absent."""
        for decision in self.series:
            if decision.series_uid == series_uid and sop_class_uid in (None, decision.sop_class_uid):
                return decision
        raise KeyError(series_uid)

    def by_number(self, number: int) -> SeriesDecision:
        """The image series with this SeriesNumber (tests and people think in numbers); KeyError when absent."""
        matches = [d for d in self.series if d.number == number]
        images = [d for d in matches if d.volumes and d.role != SeriesRole.IGNORED] or matches
        if not images:
            raise KeyError(number)
        return images[0]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = ROLES_JSON_VERSION
        for decision in data["series"]:
            for volume in decision["volumes"]:
                volume["direction"] = list(volume["direction"]) if volume["direction"] else None
        for choice in ("dwi", "adc"):
            if data[choice] is not None:
                for key in ("volumes", "b0_volumes", "b_volumes"):
                    if key in data[choice]:
                        data[choice][key] = [_key_to_dict(k) for k in getattr(getattr(self, choice), key)]
        data["dwi_b_range"] = list(self.dwi_b_range)
        return data

    @classmethod
    def from_json(cls, text: str) -> StudyRoles:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"roles_json is not JSON: {error}") from error
        if not isinstance(data, dict) or data.get("version") != ROLES_JSON_VERSION:
            raise ValueError(f"roles_json version must be {ROLES_JSON_VERSION}")
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"roles_json is malformed: {error!r}") from error

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> StudyRoles:
        series = [
            SeriesDecision(
                **{
                    **decision,
                    "role": SeriesRole(decision["role"]),
                    "volumes": [
                        VolumeSummary(**{**volume, "direction": _direction(volume["direction"])})
                        for volume in decision["volumes"]
                    ],
                }
            )
            for decision in data["series"]
        ]
        dwi = data["dwi"]
        adc = data["adc"]
        flair = data["flair"]
        return cls(
            study_uid=data["study_uid"],
            series=series,
            dwi=None
            if dwi is None
            else DwiChoice(
                **{**dwi, "kind": DwiKind(dwi["kind"]), "volumes": [_key_from_dict(k) for k in dwi["volumes"]]}
            ),
            adc=None
            if adc is None
            else AdcChoice(
                **{
                    **adc,
                    "source": AdcSource(adc["source"]),
                    "b0_volumes": [_key_from_dict(k) for k in adc["b0_volumes"]],
                    "b_volumes": [_key_from_dict(k) for k in adc["b_volumes"]],
                }
            ),
            flair=None if flair is None else FlairChoice(**flair),
            warnings=list(data["warnings"]),
            dwi_b_value=int(data["dwi_b_value"]),
            dwi_b_range=(int(data["dwi_b_range"][0]), int(data["dwi_b_range"][1])),
        )


def _key_to_dict(key: VolumeKey) -> dict[str, Any]:
    return {"b_value": key.b_value, "direction": list(key.direction) if key.direction else None, "repeat": key.repeat}


def _direction(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    x, y, z = (float(item) for item in value)
    return (x, y, z)


def _key_from_dict(data: dict[str, Any]) -> VolumeKey:
    return VolumeKey(float(data["b_value"]), _direction(data["direction"]), int(data["repeat"]))
