"""The role rule set (role_rules.toml): which series can be the DWI, the ADC and the FLAIR, as data (design.md §4).

A hospital changes what its scanners call a trace or an ADC here, not in code; loading validates every key, so a
typo is a ValueError naming it rather than a rule that silently never matches.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MatchRule:
    """Matches a series when any condition does: a whole ImageType token, or a SeriesDescription regex."""

    image_type_any: frozenset[str] = frozenset()
    description_regex: tuple[re.Pattern[str], ...] = ()
    reason: str = ""

    def matches(self, tokens: frozenset[str], description: str) -> bool:
        return bool(tokens & self.image_type_any) or any(p.search(description) for p in self.description_regex)


@dataclass(frozen=True)
class RoleRules:
    """role_rules.toml, validated: unknown keys or bad values are a ValueError naming the key."""

    image_sop_classes: frozenset[str]
    modalities: frozenset[str]
    exclusions: tuple[MatchRule, ...]
    adc: MatchRule
    trace_image_type_any: frozenset[str]
    min_directions_for_computed_trace: int
    dwi_preference: tuple[str, ...]
    flair_scanning_sequence_any: frozenset[str]
    flair_sequence_name_regex: tuple[re.Pattern[str], ...]
    flair_description_regex: tuple[re.Pattern[str], ...]
    flair_inversion_time_min_ms: float
    flair_repetition_time_min_ms: float
    t1_flair_description_regex: tuple[re.Pattern[str], ...]
    post_contrast_description_regex: tuple[re.Pattern[str], ...]
    flair_acquisition_preference: tuple[str, ...]

    @classmethod
    def load(cls, path: Path | None = None) -> RoleRules:
        """The packaged rules, or those at `path`."""
        if path is None:
            text = resources.files("dicom_gateway").joinpath("role_rules.toml").read_text(encoding="utf-8")
            source = "dicom_gateway/role_rules.toml"
        else:
            text = path.read_text(encoding="utf-8")
            source = str(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{source}: {error}") from error
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "rules") -> RoleRules:
        _known(data, {"version", "image", "exclude", "adc", "dwi", "flair"}, source)
        if data.get("version") != 1:
            raise ValueError(f"{source}: version must be 1, got {data.get('version')!r}")
        image = _table(data, "image", source, {"sop_classes", "modalities"})
        dwi = _table(data, "dwi", source, {"trace_image_type_any", "min_directions_for_computed_trace", "prefer"})
        flair = _table(
            data,
            "flair",
            source,
            {
                "scanning_sequence_any",
                "sequence_name_regex",
                "description_regex",
                "inversion_time_min_ms",
                "repetition_time_min_ms",
                "t1_flair_description_regex",
                "post_contrast_description_regex",
                "prefer_acquisition_type",
            },
        )
        preference = tuple(_strings(dwi, "prefer", f"{source}: dwi"))
        unknown = set(preference) - {"trace", "in_range", "closest_b", "latest"}
        if unknown or len(set(preference)) != len(preference):
            raise ValueError(f"{source}: dwi.prefer has unknown or repeated entries: {preference}")
        exclusions = data.get("exclude", [])
        if not isinstance(exclusions, list):
            raise ValueError(f"{source}: exclude must be an array of tables")  # noqa: TRY004 (file content)
        return cls(
            image_sop_classes=frozenset(_strings(image, "sop_classes", f"{source}: image")),
            modalities=frozenset(token.upper() for token in _strings(image, "modalities", f"{source}: image")),
            exclusions=tuple(
                _match_rule(rule, f"{source}: exclude[{index}]", need_reason=True)
                for index, rule in enumerate(exclusions)
            ),
            adc=_match_rule(_table(data, "adc", source, {"image_type_any", "description_regex"}), f"{source}: adc"),
            trace_image_type_any=frozenset(_tokens(dwi, "trace_image_type_any", f"{source}: dwi")),
            min_directions_for_computed_trace=_positive_int(dwi, "min_directions_for_computed_trace", source),
            dwi_preference=preference,
            flair_scanning_sequence_any=frozenset(_tokens(flair, "scanning_sequence_any", f"{source}: flair")),
            flair_sequence_name_regex=_patterns(flair, "sequence_name_regex", f"{source}: flair"),
            flair_description_regex=_patterns(flair, "description_regex", f"{source}: flair"),
            flair_inversion_time_min_ms=_positive_float(flair, "inversion_time_min_ms", source),
            flair_repetition_time_min_ms=_positive_float(flair, "repetition_time_min_ms", source),
            t1_flair_description_regex=_patterns(flair, "t1_flair_description_regex", f"{source}: flair"),
            post_contrast_description_regex=_patterns(flair, "post_contrast_description_regex", f"{source}: flair"),
            flair_acquisition_preference=tuple(
                token.upper() for token in _strings(flair, "prefer_acquisition_type", f"{source}: flair")
            ),
        )


def _known(table: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = set(table) - keys
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")


def _table(data: dict[str, Any], key: str, source: str, keys: set[str]) -> dict[str, Any]:
    table = data.get(key)
    if not isinstance(table, dict):
        raise ValueError(f"{source}: [{key}] table missing")  # noqa: TRY004 (file content)
    _known(table, keys, f"{source}: {key}")
    return table


def _strings(table: dict[str, Any], key: str, where: str) -> list[str]:
    values = table.get(key, [])
    if not isinstance(values, list) or not all(isinstance(value, str) and value for value in values):
        raise ValueError(f"{where}.{key}: must be a list of non-empty strings")
    return values


def _tokens(table: dict[str, Any], key: str, where: str) -> list[str]:
    return [token.strip().upper() for token in _strings(table, key, where)]


def _patterns(table: dict[str, Any], key: str, where: str) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for text in _strings(table, key, where):
        try:
            patterns.append(re.compile(text))
        except re.error as error:
            raise ValueError(f"{where}.{key}: bad regex {text!r}: {error}") from error
    return tuple(patterns)


def _positive_float(table: dict[str, Any], key: str, source: str) -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{source}: {key} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(table: dict[str, Any], key: str, source: str) -> int:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _match_rule(table: Any, where: str, need_reason: bool = False) -> MatchRule:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table")  # noqa: TRY004 (file content)
    _known(table, {"reason", "image_type_any", "description_regex"}, where)
    reason = table.get("reason", "")
    if need_reason and (not isinstance(reason, str) or not reason):
        raise ValueError(f"{where}: needs a reason")
    rule = MatchRule(
        image_type_any=frozenset(_tokens(table, "image_type_any", where)),
        description_regex=_patterns(table, "description_regex", where),
        reason=reason,
    )
    if not rule.image_type_any and not rule.description_regex:
        raise ValueError(f"{where}: needs image_type_any or description_regex")
    return rule


_DEFAULT_RULES: list[RoleRules] = []


def default_rules() -> RoleRules:
    """The packaged rule set, parsed once."""
    if not _DEFAULT_RULES:
        _DEFAULT_RULES.append(RoleRules.load())
    return _DEFAULT_RULES[0]
