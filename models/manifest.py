"""The model manifest: what a package's network expects, how to prepare its input and read its output.

The manifest is the contract between training (which writes it) and every node (which obeys it), and it is the
one file the publisher signs, so parsing is strict: unknown keys, wrong types and out-of-range values are a
`ValueError` naming the field (`preprocessing.target_spacing_mm`), never a silent default. `to_json_bytes` is
canonical so that the same manifest always yields the same signed bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Mapping

SCHEMA_VERSION = 1
ADC_UNIT = "1e-6 mm2/s"  # the one internal ADC unit (µm²/s), design.md §4
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Role(StrEnum):
    DWI = "dwi"
    ADC = "adc"
    FLAIR = "flair"
    T1 = "t1"


class Task(StrEnum):
    """The tasks a node runs: the one task vocabulary of packages, jobs, outputs and the web page.

    The value names a package's task (manifest, registry paths, report.json). `short_name` is the name a person
    reads and every store already holds: SeriesDescription and output UIDs, the job queue's task column, the
    results folder, the outbox key, the web page and its metrics.
    """

    STROKE_DWI_ADC = "stroke-dwi-adc"
    MS_FLAIR = "ms-flair"

    @property
    def short_name(self) -> str:
        return _SHORT_NAMES[self]

    @property
    def priority(self) -> int:
        """Claim order, lowest first: stroke before MS (design.md §4), a stroke result is time-critical."""
        return 0 if self is Task.STROKE_DWI_ADC else 1

    @property
    def roles(self) -> tuple[Role, ...]:
        """The series roles the task needs, first the channel every other one is resampled onto (design.md §3)."""
        return (Role.DWI, Role.ADC) if self is Task.STROKE_DWI_ADC else (Role.FLAIR,)

    @classmethod
    def from_short_name(cls, name: str) -> Task:
        for task in cls:
            if task.short_name == name:
                return task
        raise ValueError(f"unknown task {name!r}: one of {', '.join(t.short_name for t in cls)}")


_SHORT_NAMES = {Task.STROKE_DWI_ADC: "stroke", Task.MS_FLAIR: "ms"}


class NormalizationMethod(StrEnum):
    ZSCORE_HEAD_MASK = "zscore-head-mask"  # relative contrast: clipped to percentiles and z-scored in the head mask
    FIXED_SCALE = "fixed-scale"  # a quantitative map (ADC in µm²/s): clipped to fixed values and scaled, so the
    # network sees the physical value a radiologist reads (an infarct's ADC < ~620) on every scanner alike
    MEDIAN_RATIO = "median-ratio"  # a quantitative map over its own median in the head mask, counted only within
    # clip_values (ADC: the parenchyma, not CSF nor background), times scale, clipped to [0, 4]: relative ADC

    @property
    def takes_values(self) -> bool:
        """Whether the method is parameterized by clip_values and scale (not clip_percentiles)."""
        return self in (NormalizationMethod.FIXED_SCALE, NormalizationMethod.MEDIAN_RATIO)


class LayerNormalization(StrEnum):
    """The network's normalization layers: what decides whether its output depends on the window it sees."""

    BATCH = "batch"  # a fixed affine map at inference: any window, or the whole volume, gives the same output
    INSTANCE = "instance"  # statistics of each window: the window size is part of the model
    NONE = "none"


class PredictionKind(StrEnum):
    """What the network's output tensor holds (the DICOM output series are `dicom_gateway.writers.OutputKind`)."""

    PROBABILITIES = "probabilities"


class Activation(StrEnum):
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"


@dataclass(frozen=True)
class InputChannel:
    """One input channel, in network order; diffusion channels carry the b-value the model was trained on."""

    name: str
    role: Role
    b_value: int | None = None
    b_value_range: tuple[int, int] | None = None
    unit: str | None = None


@dataclass(frozen=True)
class Normalization:
    """zscore-head-mask uses `clip_percentiles`; fixed-scale maps clip(value, *clip_values) · scale; median-ratio maps
    value · scale / (median in the head mask of the values within clip_values), clipped to [0, 4]."""

    method: NormalizationMethod = NormalizationMethod.ZSCORE_HEAD_MASK
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    clip_values: tuple[float, float] | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        fixed = self.method.takes_values
        if fixed != (self.clip_values is not None) or fixed != (self.scale is not None):
            raise ValueError(f"normalization {self.method.value}: clip_values and scale belong to fixed-scale and "
                             "median-ratio only")
        if fixed and not (self.clip_values[0] < self.clip_values[1] and self.scale > 0):
            raise ValueError(f"normalization {self.method.value}: need low < high and scale > 0, got "
                             f"{self.clip_values}, {self.scale}")


@dataclass(frozen=True)
class Preprocessing:
    """`channel_normalization` overrides `normalization` for the channels it names (by input name)."""

    target_spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    size_divisible: int
    normalization: Normalization = Normalization()
    channel_normalization: tuple[tuple[str, Normalization], ...] = ()

    def normalization_of(self, channel: str) -> Normalization:
        return dict(self.channel_normalization).get(channel, self.normalization)


@dataclass(frozen=True)
class OnnxSpec:
    file: str = "model.onnx"
    input_name: str = "image"
    output_name: str = "probabilities"
    opset: int = 18


@dataclass(frozen=True)
class OutputSpec:
    kind: PredictionKind = PredictionKind.PROBABILITIES
    activation: Activation = Activation.SIGMOID
    threshold: float = 0.5


@dataclass(frozen=True)
class Postprocessing:
    min_lesion_ml: float


@dataclass(frozen=True)
class NetworkInfo:
    """What the graph is; `normalization` tells the engine which windows it may run (design.md §5)."""

    architecture: str
    normalization: LayerNormalization
    parameters: int

    @property
    def window_invariant(self) -> bool:
        return self.normalization is not LayerNormalization.INSTANCE


@dataclass(frozen=True)
class TrainingInfo:
    """Provenance: which approved plan produced the weights, in which federated round, and how sites scored it.

    A federated round also says how many of the sites it invited contributed ("N of M"; each contributor's case
    count is among its `site_metrics`) and which fedlesion built the package; a released one also holds, under each
    evaluator site's name, its means over the candidate with their case count (`evaluated_cases`). A locally trained model says what it
    was trained on, how many training patches it saw, for how many hours and on what hardware. These keys are
    written only when set, so manifests recorded before them keep their bytes.
    """

    plan_sha256: str
    federated_round: int | None = None
    strategy: str | None = None
    site_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    sites_contributed: int | None = None
    sites_invited: int | None = None
    fedlesion_version: str | None = None
    data: str | None = None
    patches_seen: int | None = None
    hours: float | None = None
    hardware: str | None = None


OPTIONAL_TRAINING_KEYS = ("sites_contributed", "sites_invited", "fedlesion_version", "data", "patches_seen", "hours",
                          "hardware")


@dataclass(frozen=True)
class Manifest:
    name: str
    task: Task
    version: int
    created: datetime
    demo: bool
    description: str
    inputs: tuple[InputChannel, ...]
    preprocessing: Preprocessing
    onnx: OnnxSpec
    output: OutputSpec
    postprocessing: Postprocessing
    training: TrainingInfo
    files: Mapping[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    network: NetworkInfo | None = None  # absent in packages exported before it was recorded: windows as trained

    @property
    def window_invariant(self) -> bool:
        """Whether windows other than `preprocessing.patch_size` (the whole volume) give the model's own output."""
        return self.network is not None and self.network.window_invariant

    def __post_init__(self) -> None:
        # Built in code or parsed, the same rules hold (a bad manifest is never signed), and the round trip
        # normalizes types: plain strings become enums, lists tuples, times UTC.
        parsed = parse_manifest(_dumps(_manifest_dict(self)), require_files=False)
        for name in self.__dataclass_fields__:
            object.__setattr__(self, name, getattr(parsed, name))

    def with_files(self, files: Mapping[str, str]) -> Manifest:
        return replace(self, files=dict(files))

    def to_dict(self) -> dict[str, Any]:
        return _manifest_dict(self)

    def to_json_bytes(self) -> bytes:
        """Canonical bytes (sorted keys, indent 2, UTF-8, trailing newline): what the publisher signs."""
        return _dumps(_manifest_dict(self))


def default_inputs(task: Task) -> tuple[InputChannel, ...]:
    if Task(task) is Task.STROKE_DWI_ADC:
        return (
            InputChannel("dwi", Role.DWI, b_value=1000, b_value_range=(700, 1500)),
            InputChannel("adc", Role.ADC, unit=ADC_UNIT),
        )
    return (InputChannel("flair", Role.FLAIR),)


def default_preprocessing(task: Task) -> Preprocessing:
    """2 mm isotropic for stroke (DWI is coarse), 1 mm for MS (small white-matter lesions)."""
    if Task(task) is Task.STROKE_DWI_ADC:
        return Preprocessing(target_spacing_mm=(2.0, 2.0, 2.0), patch_size=(96, 96, 64), size_divisible=16)
    return Preprocessing(target_spacing_mm=(1.0, 1.0, 1.0), patch_size=(128, 128, 128), size_divisible=16)


def default_postprocessing(task: Task) -> Postprocessing:
    return Postprocessing(min_lesion_ml=0.01 if Task(task) is Task.STROKE_DWI_ADC else 0.003)


def default_manifest(
    task: Task,
    version: int,
    *,
    plan_sha256: str,
    demo: bool,
    description: str,
    created: datetime | None = None,
    federated_round: int | None = None,
    strategy: str | None = None,
    site_metrics: Mapping[str, Mapping[str, float]] | None = None,
    sites_contributed: int | None = None,
    sites_invited: int | None = None,
    fedlesion_version: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    onnx: OnnxSpec | None = None,
    output: OutputSpec | None = None,
    network: NetworkInfo | None = None,
) -> Manifest:
    """A manifest with the task's defaults and no `files` yet; `build_package` adds the hashes."""
    task = Task(task)
    return Manifest(
        name=f"fedlesion-{task.value}",
        task=task,
        version=version,
        created=created or datetime.now(timezone.utc).replace(microsecond=0),
        demo=demo,
        description=description,
        inputs=default_inputs(task),
        preprocessing=preprocessing or default_preprocessing(task),
        onnx=onnx or OnnxSpec(),
        output=output or OutputSpec(),
        postprocessing=default_postprocessing(task),
        training=TrainingInfo(plan_sha256, federated_round, strategy, dict(site_metrics or {}), sites_contributed,
                              sites_invited, fedlesion_version, **dict(provenance or {})),
        network=network,
    )


def parse_manifest(data: bytes, *, require_files: bool = True) -> Manifest:
    """Parse and validate manifest bytes; every problem is a `ValueError` naming the field.

    `require_files=False` accepts a manifest not yet packaged (no hash for the ONNX file): what export builds.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"manifest must be bytes, not {type(data).__name__}")
    try:
        raw = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"manifest is not UTF-8 JSON: {error}") from None
    top = _Obj(raw, "manifest")
    schema = top.integer("schema_version", minimum=1)
    if schema != SCHEMA_VERSION:
        raise ValueError(f"manifest.schema_version: {schema} is not supported (this fedlesion reads {SCHEMA_VERSION})")
    task = top.choice("task", Task)
    inputs = tuple(_input(_Obj(item, f"manifest.inputs[{i}]")) for i, item in enumerate(top.items("inputs")))
    if not inputs:
        raise ValueError("manifest.inputs: at least one input channel is required")
    if len({channel.name for channel in inputs}) != len(inputs):
        raise ValueError("manifest.inputs: channel names must be unique")
    if inputs[0].role is not task.roles[0]:
        raise ValueError(f"manifest.inputs[0].role: task {task.value} needs {task.roles[0].value} first")
    onnx = _onnx(top.obj("onnx"))
    files = _files(top.obj("files"))
    if require_files and onnx.file not in files:
        raise ValueError(f"manifest.files: must list the ONNX file {onnx.file!r}")
    manifest = object.__new__(Manifest)  # fields already validated: skip __post_init__'s re-parse
    values = dict(
        schema_version=schema,
        name=top.text("name", pattern=_NAME),
        task=task,
        version=top.integer("version", minimum=1),
        created=_created(top.text("created"), "manifest.created"),
        demo=top.flag("demo"),
        description=top.text("description", allow_empty=True),
        inputs=inputs,
        preprocessing=_preprocessing(top.obj("preprocessing")),
        onnx=onnx,
        output=_output(top.obj("output")),
        postprocessing=Postprocessing(top.obj("postprocessing").number("min_lesion_ml", minimum=0.0)),
        training=_training(top.obj("training")),
        files=files,
        network=None if top.optional("network") is None else _network(top.obj("network")),
    )
    top.done()
    unknown = {name for name, _ in values["preprocessing"].channel_normalization} - {c.name for c in inputs}
    if unknown:
        raise ValueError(f"manifest.preprocessing.channel_normalization.{sorted(unknown)[0]}: not an input channel")
    for key, value in values.items():
        object.__setattr__(manifest, key, value)
    return manifest


class _Obj:
    """A JSON object being consumed key by key, so leftovers (unknown keys) can be reported by path."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: must be an object")
        self.value, self.path, self.seen = value, path, set()

    def _get(self, key: str) -> Any:
        if key not in self.value:
            raise ValueError(f"{self.path}.{key}: missing")
        self.seen.add(key)
        return self.value[key]

    def optional(self, key: str) -> Any:
        self.seen.add(key)
        return self.value.get(key)

    def nullable(self, key: str) -> Any:
        """Required key whose value may be null (provenance that does not apply says so explicitly)."""
        return self._get(key)

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise ValueError(f"{self.path}.{unknown[0]}: unknown key")

    def obj(self, key: str) -> _Obj:
        return _Obj(self._get(key), f"{self.path}.{key}")

    def items(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise ValueError(f"{self.path}.{key}: must be a list")
        return value

    def text(self, key: str, *, pattern: re.Pattern[str] | None = None, allow_empty: bool = False) -> str:
        return _str(self._get(key), f"{self.path}.{key}", pattern=pattern, allow_empty=allow_empty)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise ValueError(f"{self.path}.{key}: must be true or false")
        return value

    def integer(self, key: str, *, minimum: int) -> int:
        return _int(self._get(key), f"{self.path}.{key}", minimum=minimum)

    def number(self, key: str, *, minimum: float, exclusive: bool = False) -> float:
        return _number(self._get(key), f"{self.path}.{key}", minimum=minimum, exclusive=exclusive)

    def choice(self, key: str, kind: type[StrEnum]) -> Any:
        value = self._get(key)
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(member.value for member in kind)
            raise ValueError(f"{self.path}.{key}: {value!r} is not one of {choices}") from None

    def fixed(self, key: str, length: int, item: Any) -> tuple[Any, ...]:
        value = self._get(key)
        path = f"{self.path}.{key}"
        if not isinstance(value, list) or len(value) != length:
            raise ValueError(f"{path}: must be a list of {length} values")
        return tuple(item(element, f"{path}[{i}]") for i, element in enumerate(value))


def _str(value: Any, path: str, *, pattern: re.Pattern[str] | None = None, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"{path}: must be a non-empty string")
    if pattern is not None and not pattern.match(value):
        raise ValueError(f"{path}: {value!r} does not match {pattern.pattern}")
    return value


def _int(value: Any, path: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}: must be an integer")
    if value < minimum:
        raise ValueError(f"{path}: must be ≥ {minimum}, got {value}")
    return value


def _number(value: Any, path: str, *, minimum: float, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: must be a finite number")
    if value < minimum or (exclusive and value == minimum):
        raise ValueError(f"{path}: must be {'>' if exclusive else '≥'} {minimum}, got {value}")
    return float(value)


def _positive(value: Any, path: str) -> float:
    return _number(value, path, minimum=0.0, exclusive=True)


def _size(value: Any, path: str) -> int:
    return _int(value, path, minimum=1)


def _created(value: str, path: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{path}: {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{path}: {value!r} needs a time zone (e.g. ...Z)")
    return parsed.astimezone(timezone.utc)


def _input(obj: _Obj) -> InputChannel:
    role = obj.choice("role", Role)
    name = obj.text("name", pattern=_NAME)
    b_value = obj.optional("b_value")
    b_range = obj.optional("b_value_range")
    unit = obj.optional("unit")
    obj.done()
    if role is Role.DWI:
        if b_value is None or b_range is None:
            raise ValueError(f"{obj.path}: a dwi channel needs b_value and b_value_range")
        b_value = _int(b_value, f"{obj.path}.b_value", minimum=50)
        if not isinstance(b_range, (list, tuple)) or len(b_range) != 2:
            raise ValueError(f"{obj.path}.b_value_range: must be a list of 2 values")
        low, high = (_int(v, f"{obj.path}.b_value_range[{i}]", minimum=50) for i, v in enumerate(b_range))
        if not low <= b_value <= high:
            raise ValueError(f"{obj.path}.b_value_range: [{low}, {high}] must contain b_value {b_value}")
        b_range = (low, high)
    elif b_value is not None or b_range is not None:
        raise ValueError(f"{obj.path}: only a dwi channel has b_value and b_value_range")
    if role is Role.ADC:
        if unit != ADC_UNIT:
            raise ValueError(f"{obj.path}.unit: an adc channel must say {ADC_UNIT!r}, got {unit!r}")
    elif unit is not None:
        raise ValueError(f"{obj.path}.unit: only an adc channel has a unit")
    return InputChannel(name, role, b_value, b_range, unit)


def _normalization(norm: _Obj) -> Normalization:
    method = norm.choice("method", NormalizationMethod)
    if method.takes_values:
        low, high = norm.fixed("clip_values", 2, lambda v, p: _number(v, p, minimum=-math.inf))
        if not low < high:
            raise ValueError(f"{norm.path}.clip_values: need low < high, got [{low}, {high}]")
        normalization = Normalization(method, clip_values=(low, high),
                                      scale=norm.number("scale", minimum=0.0, exclusive=True))
    else:
        low, high = norm.fixed("clip_percentiles", 2, lambda v, p: _number(v, p, minimum=0.0))
        if not low < high <= 100.0:
            raise ValueError(f"{norm.path}.clip_percentiles: need 0 ≤ low < high ≤ 100, got [{low}, {high}]")
        normalization = Normalization(method, (low, high))
    norm.done()
    return normalization


def _preprocessing(obj: _Obj) -> Preprocessing:
    normalization = _normalization(obj.obj("normalization"))
    overrides = obj.optional("channel_normalization")
    per_channel: tuple[tuple[str, Normalization], ...] = ()
    if overrides is not None:
        table = _Obj(overrides, f"{obj.path}.channel_normalization")
        per_channel = tuple((_str(name, f"{table.path}.{name}", pattern=_NAME), _normalization(table.obj(name)))
                            for name in sorted(overrides))
    divisible = obj.integer("size_divisible", minimum=1)
    patch = obj.fixed("patch_size", 3, _size)
    if any(size % divisible for size in patch):
        raise ValueError(f"{obj.path}.patch_size: {list(patch)} must be multiples of size_divisible {divisible}")
    spacing = obj.fixed("target_spacing_mm", 3, _positive)
    obj.done()
    return Preprocessing(spacing, patch, divisible, normalization, per_channel)


def _onnx(obj: _Obj) -> OnnxSpec:
    spec = OnnxSpec(
        file=obj.text("file", pattern=_FILE_NAME),
        input_name=obj.text("input_name"),
        output_name=obj.text("output_name"),
        opset=obj.integer("opset", minimum=7),
    )
    if spec.file in (MANIFEST_FILE, SIGNATURE_FILE):
        raise ValueError(f"{obj.path}.file: {spec.file!r} is reserved")
    obj.done()
    return spec


def _output(obj: _Obj) -> OutputSpec:
    threshold = obj.number("threshold", minimum=0.0, exclusive=True)
    if threshold >= 1.0:
        raise ValueError(f"{obj.path}.threshold: must be < 1, got {threshold}")
    spec = OutputSpec(obj.choice("kind", PredictionKind), obj.choice("activation", Activation), threshold)
    obj.done()
    return spec


def _training(obj: _Obj) -> TrainingInfo:
    plan = obj.text("plan_sha256", pattern=_SHA256)
    round_ = obj.nullable("federated_round")
    strategy = obj.nullable("strategy")
    metrics = obj.obj("site_metrics")
    site_metrics: dict[str, dict[str, float]] = {}
    for site, values in metrics.value.items():
        site_obj = _Obj(values, f"{metrics.path}.{site}")
        site_metrics[site] = {
            name: _number(value, f"{site_obj.path}.{name}", minimum=-math.inf) for name, value in values.items()
        }
    contributed, invited, version, data, patches, hours, hardware = (obj.optional(key)
                                                                     for key in OPTIONAL_TRAINING_KEYS)
    obj.done()
    info = TrainingInfo(
        plan_sha256=plan,
        federated_round=None if round_ is None else _int(round_, f"{obj.path}.federated_round", minimum=0),
        strategy=None if strategy is None else _str(strategy, f"{obj.path}.strategy"),
        site_metrics=site_metrics,
        sites_contributed=None if contributed is None else _int(contributed, f"{obj.path}.sites_contributed", minimum=0),
        sites_invited=None if invited is None else _int(invited, f"{obj.path}.sites_invited", minimum=0),
        fedlesion_version=None if version is None else _str(version, f"{obj.path}.fedlesion_version"),
        data=None if data is None else _str(data, f"{obj.path}.data"),
        patches_seen=None if patches is None else _int(patches, f"{obj.path}.patches_seen", minimum=0),
        hours=None if hours is None else _number(hours, f"{obj.path}.hours", minimum=0.0),
        hardware=None if hardware is None else _str(hardware, f"{obj.path}.hardware"),
    )
    if info.sites_contributed is not None and info.sites_invited is not None:
        if info.sites_contributed > info.sites_invited:
            raise ValueError(f"{obj.path}.sites_contributed: {contributed} of {invited} invited sites")
    return info


def _network(obj: _Obj) -> NetworkInfo:
    network = NetworkInfo(
        architecture=obj.text("architecture", pattern=_NAME),
        normalization=obj.choice("normalization", LayerNormalization),
        parameters=obj.integer("parameters", minimum=1),
    )
    obj.done()
    return network


def _files(obj: _Obj) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, digest in obj.value.items():
        _str(name, f"{obj.path} key", pattern=_FILE_NAME)
        if name in (MANIFEST_FILE, SIGNATURE_FILE):
            raise ValueError(f"{obj.path}.{name}: the manifest and its signature are not listed")
        files[name] = _str(digest, f"{obj.path}.{name}", pattern=_SHA256)
    return files


def _manifest_dict(manifest: Manifest) -> dict[str, Any]:
    created = manifest.created
    if not isinstance(created, datetime) or created.tzinfo is None:
        raise ValueError("manifest.created: must be a timezone-aware datetime")
    stamp = created.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    pre, training = manifest.preprocessing, manifest.training
    out = {
        "schema_version": manifest.schema_version,
        "name": manifest.name,
        "task": str(manifest.task),
        "version": manifest.version,
        "created": stamp,
        "demo": manifest.demo,
        "description": manifest.description,
        "inputs": [_input_dict(channel) for channel in manifest.inputs],
        "preprocessing": preprocessing_dict(pre),
        "onnx": {
            "file": manifest.onnx.file,
            "input_name": manifest.onnx.input_name,
            "output_name": manifest.onnx.output_name,
            "opset": manifest.onnx.opset,
        },
        "output": {
            "kind": str(manifest.output.kind),
            "activation": str(manifest.output.activation),
            "threshold": manifest.output.threshold,
        },
        "postprocessing": {"min_lesion_ml": manifest.postprocessing.min_lesion_ml},
        "training": {
            "plan_sha256": training.plan_sha256,
            "federated_round": training.federated_round,
            "strategy": training.strategy,
            "site_metrics": {site: dict(values) for site, values in training.site_metrics.items()},
        },
        "files": dict(manifest.files),
    }
    for key in OPTIONAL_TRAINING_KEYS:
        if getattr(training, key) is not None:
            out["training"][key] = getattr(training, key)
    if manifest.network is not None:
        out["network"] = {
            "architecture": manifest.network.architecture,
            "normalization": str(manifest.network.normalization),
            "parameters": manifest.network.parameters,
        }
    return out


def preprocessing_dict(pre: Preprocessing) -> dict[str, Any]:
    """The "preprocessing" object of a manifest and of a training plan (the same keys, one parser)."""
    out: dict[str, Any] = {
        "target_spacing_mm": [float(v) for v in pre.target_spacing_mm],
        "patch_size": [int(v) for v in pre.patch_size],
        "size_divisible": int(pre.size_divisible),
        "normalization": _normalization_dict(pre.normalization),
    }
    if pre.channel_normalization:  # absent when empty, so plans written before it keep their hash
        out["channel_normalization"] = {name: _normalization_dict(norm) for name, norm in pre.channel_normalization}
    return out


def _normalization_dict(norm: Normalization) -> dict[str, Any]:
    if norm.method.takes_values:
        assert norm.clip_values is not None
        return {"method": str(norm.method), "clip_values": [float(v) for v in norm.clip_values], "scale": norm.scale}
    return {"method": str(norm.method), "clip_percentiles": [float(v) for v in norm.clip_percentiles]}


def _input_dict(channel: InputChannel) -> dict[str, Any]:
    out: dict[str, Any] = {"name": channel.name, "role": str(channel.role)}
    if channel.b_value is not None:
        out["b_value"] = channel.b_value
    if channel.b_value_range is not None:
        out["b_value_range"] = list(channel.b_value_range)
    if channel.unit is not None:
        out["unit"] = channel.unit
    return out


def _dumps(value: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"manifest cannot be written as JSON: {error}") from None
    return (text + "\n").encode("utf-8")
