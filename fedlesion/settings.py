"""Settings: one TOML file plus `FEDLESION_SECTION__KEY` environment overrides.

The schema is the dataclasses below. An unknown section or key, a value of the wrong type or out of range stops
start-up with a `SettingsError` that names the key (`node.dicom_port`), so a typo in a hospital's config file never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

ENV_PREFIX = "FEDLESION_"
CONFIG_ENV = "FEDLESION_CONFIG"
_AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")  # DICOM AE: ≤16 chars, no backslash


class SettingsError(ValueError):
    """A settings file or override that cannot be used; the message names the offending key."""


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port between 0 and 65535"


def _ae_title(value: str) -> str | None:
    return None if _AE_TITLE.match(value) and value.strip() else "must be a DICOM AE title (1-16 characters)"


def _log_level(value: str) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if value.upper() in levels else f"must be one of {', '.join(levels)}"


def _check(validator: Any) -> dict[str, Any]:
    return {"validator": validator}


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM node and its web page."""

    ae_title: str = field(default="FEDLESION", metadata=_check(_ae_title))
    dicom_port: int = field(default=11112, metadata=_check(_port))
    web_host: str = "127.0.0.1"
    web_port: int = field(default=8080, metadata=_check(_port))
    web_secure_cookies: bool = False  # true when TLS is terminated in front of the page (cookies get Secure)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _ae_titles(values: tuple[str, ...]) -> str | None:
    bad = [v for v in values if _ae_title(v)]
    return f"holds {bad[0]!r}, which is not a DICOM AE title" if bad else None


_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})$")


def _destinations(values: tuple[str, ...]) -> str | None:
    for value in values:
        match = _DESTINATION.match(value)
        if not match or _ae_title(match["ae"]) or _port(int(match["port"])):
            return f"holds {value!r}; each destination is written AE_TITLE@host:port"
    return None


@dataclass(frozen=True)
class Destination:
    """A DICOM peer the node sends its outputs to."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> Destination:
        """`AE_TITLE@host:port`, as written in `dicom.destinations`."""
        match = _DESTINATION.match(value)
        if not match:
            raise ValueError(f"destination {value!r} is not written AE_TITLE@host:port")
        return cls(match["ae"], match["host"], int(match["port"]))


@dataclass(frozen=True)
class DicomSettings:
    """The SCP's policy and the SCU's destinations (design.md §4); sizes in bytes, times in seconds."""

    allowed_calling_aes: tuple[str, ...] = field(default=(), metadata=_check(_ae_titles))  # empty: any
    complete_on_release: tuple[str, ...] = field(default=(), metadata=_check(_ae_titles))
    max_associations: int = field(default=8, metadata=_check(_positive))
    receiver_processes: int = field(default=1, metadata=_check(_positive))  # >1: SCP processes sharing the port
    max_instance_bytes: int = field(default=1 << 30, metadata=_check(_positive))
    max_frame_pixels: int = field(default=4096 * 4096, metadata=_check(_positive))
    max_frames: int = field(default=5000, metadata=_check(_positive))
    max_series_decoded_bytes: int = field(default=2 << 30, metadata=_check(_positive))
    min_free_disk_bytes: int = field(default=2 << 30, metadata=_check(_non_negative))
    inactivity_timeout_s: float = field(default=10.0, metadata=_check(_positive))
    destinations: tuple[str, ...] = field(default=(), metadata=_check(_destinations))
    send_attempts: int = field(default=5, metadata=_check(_positive))
    send_backoff_s: float = field(default=2.0, metadata=_check(_non_negative))
    spool_retention_days: float = field(default=7.0, metadata=_check(_positive))
    output_retention_days: float = field(default=30.0, metadata=_check(_positive))

    @property
    def parsed_destinations(self) -> tuple[Destination, ...]:
        return tuple(Destination.parse(value) for value in self.destinations)


def _regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as error:
        return f"is not a valid regular expression ({error})"
    return None


@dataclass(frozen=True)
class TasksSettings:
    """Which tasks run and on which studies (design.md §4 task routing); a filter is a regex searched in
    StudyDescription, RequestedProcedureDescription and the calling AE title; empty matches every study."""

    stroke: bool = True
    ms: bool = True
    stroke_study_filter: str = field(default="", metadata=_check(_regex))
    ms_study_filter: str = field(default="", metadata=_check(_regex))
    notify_not_processed: bool = False  # send one SC image "AI analysis not performed: reason"


@dataclass(frozen=True)
class InferenceSettings:
    """The workers and the engine (design.md §5)."""

    workers: int = field(default=1, metadata=_check(_positive))
    threads: int = field(default=0, metadata=_check(_non_negative))  # ONNX Runtime intra-op threads; 0: all cores
    flip_tta: bool = False
    adc_core_threshold: float = field(default=620.0, metadata=_check(_positive))  # µm²/s
    max_attempts: int = field(default=3, metadata=_check(_positive))
    registry_poll_s: float = field(default=5.0, metadata=_check(_positive))


@dataclass(frozen=True)
class StorageSettings:
    """Everything the node keeps lives under one data directory (design.md §1)."""

    data_dir: Path = Path("fedlesion-data")


@dataclass(frozen=True)
class ModelSettings:
    """Where signed model packages are kept and which publisher the node trusts (design.md §2)."""

    registry_dir: Path | None = None  # default: <data_dir>/registry
    enrollment_bundle: Path | None = None  # none: demo mode, only the shipped demo key is trusted


@dataclass(frozen=True)
class LoggingSettings:
    level: str = field(default="INFO", metadata=_check(_log_level))


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    tasks: TasksSettings = TasksSettings()
    inference: InferenceSettings = InferenceSettings()
    storage: StorageSettings = StorageSettings()
    models: ModelSettings = ModelSettings()
    logging: LoggingSettings = LoggingSettings()

    @property
    def registry_dir(self) -> Path:
        return self.models.registry_dir or self.storage.data_dir / "registry"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {
            section.name: {
                key: (str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value)
                for key, value in dataclasses.asdict(getattr(self, section.name)).items()
            }
            for section in dataclasses.fields(self)
        }


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (or $FEDLESION_CONFIG, or nothing), apply environment overrides, validate everything."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise SettingsError(f"cannot read settings file {path}: {error.strerror or error}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise SettingsError(f"settings file {path} is not valid TOML: {error}") from None
    sections = {f.name: f.type for f in dataclasses.fields(Settings)}
    overrides = _environment_overrides(environ, sections)
    built: dict[str, Any] = {}
    section_types = get_type_hints(Settings)
    for name, value in raw.items():
        if name not in sections:
            raise SettingsError(f"unknown settings section [{name}] (known: {', '.join(sections)})")
        if not isinstance(value, dict):
            raise SettingsError(f"settings key '{name}' must be a [section], got {type(value).__name__}")
    for name, section_type in section_types.items():
        values = {key: (value, False) for key, value in raw.get(name, {}).items()}
        values.update({key: (value, True) for key, value in overrides.get(name, {}).items()})
        built[name] = _build_section(name, section_type, values)
    return Settings(**built)


def _environment_overrides(environ: Mapping[str, str], sections: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    overrides: dict[str, dict[str, str]] = {}
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue
        section, _, key = variable[len(ENV_PREFIX):].lower().partition("__")
        if section not in sections:
            raise SettingsError(f"unknown settings section '{section}' in environment variable {variable}")
        overrides.setdefault(section, {})[key] = text
    return overrides


def _build_section(section: str, section_type: type, values: Mapping[str, tuple[Any, bool]]) -> Any:
    """`values` maps key → (value, came from the environment); only environment strings are parsed."""
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    hints = get_type_hints(section_type)
    kwargs: dict[str, Any] = {}
    for key, (value, from_env) in values.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise SettingsError(f"unknown settings key '{dotted}' (known: {', '.join(fields)})")
        converted = _convert(dotted, hints[key], value, from_env)
        validator = fields[key].metadata.get("validator")
        problem = validator(converted) if validator and converted is not None else None
        if problem:
            raise SettingsError(f"bad value for settings key '{dotted}': {value!r} {problem}")
        kwargs[key] = converted
    return section_type(**kwargs)


def _convert(dotted: str, hint: Any, value: Any, from_env: bool) -> Any:
    """Coerce a TOML value or an environment string to the schema type, or say which key is wrong."""
    optional = type(None) in getattr(hint, "__args__", ())
    union_members = () if getattr(hint, "__origin__", None) is tuple else getattr(hint, "__args__", ())
    target = next((a for a in union_members if a is not type(None)), hint)
    if optional and from_env and value == "":
        return None
    try:
        if getattr(target, "__origin__", None) is tuple:
            if from_env:  # a comma-separated list; empty means none
                return tuple(item.strip() for item in value.split(",") if item.strip())
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return tuple(value)
            raise ValueError
        if target is bool:
            if isinstance(value, bool):
                return value
            if from_env and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
        elif target is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if from_env:
                return int(value)
        elif target is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if from_env:
                return float(value)
        elif target is str:
            if isinstance(value, str):
                return value
        elif target is Path:
            if isinstance(value, str) and value:
                return Path(value).expanduser()
    except ValueError:
        pass
    raise SettingsError(
        f"bad value for settings key '{dotted}': {value!r} is not a {getattr(target, '__name__', target)}"
    )
