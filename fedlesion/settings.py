"""Settings: one TOML file plus `FEDLESION_SECTION__KEY` environment overrides.

The schema is `Settings` below, composed of the sections each package owns (`dicom_gateway.settings`,
`inference.settings`, `models.settings`); components receive only the sections they read. An unknown section or key,
a value of the wrong type or out of range stops start-up with a `SettingsError` that names the key
(`node.dicom_port`), so a typo in a hospital's config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from dicom_gateway.settings import DicomSettings
from inference.settings import InferenceSettings, NodeSettings, TasksSettings
from models.settings import ModelSettings, StorageSettings, checked

ENV_PREFIX = "FEDLESION_"
CONFIG_ENV = "FEDLESION_CONFIG"


class SettingsError(ValueError):
    """A settings file or override that cannot be used; the message names the offending key."""


def _log_level(value: str) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if value.upper() in levels else f"must be one of {', '.join(levels)}"


@dataclass(frozen=True)
class LoggingSettings:
    level: str = field(default="INFO", metadata=checked(_log_level))


@dataclass(frozen=True)
class Settings:
    """Every section, each owned by the package that reads it; the CLI hands each component its sections."""

    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    tasks: TasksSettings = TasksSettings()
    inference: InferenceSettings = InferenceSettings()
    storage: StorageSettings = StorageSettings()
    models: ModelSettings = ModelSettings()
    logging: LoggingSettings = LoggingSettings()

    @property
    def registry_dir(self) -> Path:
        return self.models.registry_path(self.storage.data_dir)

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
