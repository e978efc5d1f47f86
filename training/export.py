"""Checkpoint → ONNX → signed model package (design.md §2, §8).

`export_onnx` wraps the logits network with a sigmoid and runs torch's dynamo exporter with the three spatial axes
dynamic, so the graph takes any grid the manifest's `size_divisible` allows and outputs probabilities. Before a
package is built, `check_parity` compares torch (eval, no_grad) with onnxruntime (CPU) on a fixed, seeded,
preprocessed synthetic case cropped to two different sizes: max |Δp| < 1e-4 and no thresholded voxel may differ
unless its probability lies within 1e-3 of the threshold. A failed check is an `ExportError` carrying the numbers,
and nothing is written or published.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.manifest import (
    Manifest,
    OnnxSpec,
    OutputSpec,
    Preprocessing,
    Task,
    default_inputs,
    default_manifest,
)
from models.networks import build_network, network_info
from models.package import build_package, external_data_tensors, sha256_hex
from models.preprocessing import Channel, preprocess
from models.registry import Registry
from models.signing import demo_public_key, public_key_fingerprint
from models.version import distribution_version
from training.checkpoint import checkpoint_plan, checkpoint_threshold, load_checkpoint

MAX_ABS_DIFF = 1e-4  # design.md §8
THRESHOLD_BAND = 1e-3  # mask disagreements are tolerated only this close to the threshold
PARITY_SEED = 20240611
DEMO_PHRASE = "not for clinical use"
# The exporter's passes log every rewrite at INFO; the CLI logs at INFO.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo")

__all__ = [
    "ExportError",
    "ExportResult",
    "ParityReport",
    "check_parity",
    "export_checkpoint",
    "export_onnx",
    "export_package",
    "is_demo_key",
    "parity_inputs",
]


class ExportError(ValueError):
    """The checkpoint cannot be exported, or its ONNX graph does not match the torch network."""


@dataclass(frozen=True)
class ParityReport:
    shape: tuple[int, ...]  # spatial shape of the input checked
    max_abs_diff: float
    mask_disagreements: int  # voxels whose thresholded label differs between torch and ONNX Runtime
    disagreements_outside_band: int  # … of which |p_torch − threshold| ≥ 1e-3
    threshold: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff < MAX_ABS_DIFF and self.disagreements_outside_band == 0

    def describe(self) -> str:
        size = "×".join(str(n) for n in self.shape)
        return (
            f"{size}: max |Δp| {self.max_abs_diff:.3g} (limit {MAX_ABS_DIFF:g}), "
            f"mask disagreements {self.mask_disagreements} "
            f"({self.disagreements_outside_band} with |p − {self.threshold:g}| ≥ {THRESHOLD_BAND:g})"
        )


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the published version directory, or the package directory when nothing was published
    manifest: Manifest
    onnx_sha256: str
    onnx_bytes: int
    parity: tuple[ParityReport, ...]
    export_seconds: float
    parity_seconds: float
    published: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)


class _Probabilities(torch.nn.Module):
    """The logits network with the sigmoid appended: what the ONNX graph computes."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(image))


def export_onnx(
    network: torch.nn.Module, in_channels: int, opset: int = 18, *, example_size: Sequence[int] = (64, 64, 64)
) -> bytes:
    """A self-contained ONNX model (weights embedded) mapping `image` (1, C, X, Y, Z) to `probabilities`.

    The three spatial axes are dynamic; the batch is fixed at 1 (a node segments one study at a time).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: must be an integer ≥ 1, got {in_channels!r}")
    was_training = network.training
    wrapper = _Probabilities(network).eval()
    example = torch.zeros((1, in_channels, *(int(n) for n in example_size)), dtype=torch.float32)
    dims = [torch.export.Dim(axis, min=2, max=4096) for axis in ("x", "y", "z")]
    quiet = {name: logging.getLogger(name) for name in _CHATTY_LOGGERS}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="fedlesion-export-") as tmp:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[OnnxSpec.input_name],
                output_names=[OnnxSpec.output_name],
                opset_version=opset,
                dynamic_shapes={"image": {2: dims[0], 3: dims[1], 4: dims[2]}},
                optimize=True,
                verbose=False,
            )
            if program is None:  # pragma: no cover - only the legacy exporter returns None
                raise ExportError("the ONNX exporter returned no program")
            target = Path(tmp) / "model.onnx"
            program.save(target, external_data=False)  # initializers embedded, never beside the file
            data = target.read_bytes()
    except ExportError:
        raise
    except Exception as error:  # the exporter's own errors are many and deep; report them as one
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {error}") from error
    finally:
        network.train(was_training)
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
    external = external_data_tensors(data)
    if external:
        raise ExportError(f"exported ONNX keeps tensors in external data: {', '.join(external)}")
    return data


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(bytes(onnx_bytes), options, providers=["CPUExecutionProvider"])


def check_parity(
    network: torch.nn.Module, onnx_bytes: bytes, case_image: np.ndarray, threshold: float, *, session: Any = None
) -> ParityReport:
    """Torch (eval, no_grad, sigmoid) against onnxruntime CPU on one preprocessed image (C, X, Y, Z)."""
    image = np.asarray(case_image, dtype=np.float32)
    if image.ndim == 4:
        image = image[None]
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"case_image must be (C, X, Y, Z) or (1, C, X, Y, Z), got shape {image.shape}")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    session = session if session is not None else _session(onnx_bytes)
    input_name = session.get_inputs()[0].name
    onnx_p = np.asarray(session.run(None, {input_name: np.ascontiguousarray(image)})[0], dtype=np.float64)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            torch_p = torch.sigmoid(network(torch.from_numpy(np.ascontiguousarray(image)))).double().numpy()
    finally:
        network.train(was_training)
    if onnx_p.shape != torch_p.shape:
        raise ExportError(f"ONNX output shape {onnx_p.shape} differs from torch's {torch_p.shape}")
    diff = np.abs(onnx_p - torch_p)
    max_diff = float(diff.max()) if diff.size else 0.0
    if not math.isfinite(max_diff) or not (np.all(np.isfinite(onnx_p)) and np.all(np.isfinite(torch_p))):
        max_diff = math.inf
    differs = (onnx_p >= threshold) != (torch_p >= threshold)
    outside = differs & (np.abs(torch_p - threshold) >= THRESHOLD_BAND)
    return ParityReport(
        shape=tuple(int(n) for n in image.shape[2:]),
        max_abs_diff=max_diff,
        mask_disagreements=int(differs.sum()),
        disagreements_outside_band=int(outside.sum()),
        threshold=float(threshold),
    )


def _channels(task: Task, seed: int) -> list[Channel]:
    from training.synthetic import generate_case

    if task is Task.STROKE_DWI_ADC:
        case = generate_case("stroke", seed)
        return [
            Channel(case.images["dwi_b1000"], case.affine, "dwi"),
            Channel(case.images["adc"], case.affine, "adc"),
        ]
    case = generate_case("ms", seed)
    return [Channel(case.images["flair"], case.affine, "flair")]


@functools.lru_cache(maxsize=4)
def _preprocessed(task: Task, spec: Preprocessing, seed: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    case = preprocess(_channels(task, seed), spec, pad_for_inference=True)
    coords = np.argwhere(case.head_mask)
    centre = tuple(int(n) for n in ((coords.min(0) + coords.max(0)) // 2)) if len(coords) else None
    centre = centre or tuple(n // 2 for n in case.image.shape[1:])
    case.image.setflags(write=False)
    return case.image, centre  # type: ignore[return-value]


def _crop(image: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """A (C, *size) block centred on `centre`, zero-padded (the background value after z-scoring) where it leaves."""
    out = np.zeros((image.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for n, c, s in zip(image.shape[1:], centre, size):
        start = c - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


def parity_inputs(
    task: Task, preprocessing: Preprocessing, in_channels: int, size_divisible: int, *, seed: int = PARITY_SEED
) -> list[np.ndarray]:
    """The seeded synthetic case for `task`, preprocessed per the manifest, cropped to two different sizes."""
    task = Task(task)
    expected = len(default_inputs(task))
    if in_channels != expected:
        raise ExportError(f"task {task.value} has {expected} input channel(s), the checkpoint's network {in_channels}")
    image, centre = _preprocessed(task, preprocessing, seed)
    k = max(16, size_divisible)
    sizes = [(3 * k, 3 * k, 2 * k), (4 * k, 3 * k, 2 * k)]
    return [_crop(image, centre, size) for size in sizes]


def is_demo_key(private_key: Any) -> bool:
    return public_key_fingerprint(private_key.public_key()) == public_key_fingerprint(demo_public_key())


def _numbers(values: Any) -> dict[str, float] | None:
    if not isinstance(values, Mapping):
        return None
    out = {
        str(k): float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    return out or None


def site_metrics_from_history(history: Sequence[Any]) -> dict[str, dict[str, float]]:
    """The last validation metrics in the training history, as {site: {metric: value}}.

    Understood entry shapes: `{"site_metrics": {site: {metric: v}}}`, `{"val": {metric: v}}` or
    `{"val": {site: {metric: v}}}`, and flat `{"val_dice": v, ...}` (reported under site "local").
    """
    for entry in reversed(list(history)):
        if not isinstance(entry, Mapping):
            continue
        sites = entry.get("site_metrics")
        if isinstance(sites, Mapping):
            parsed = {str(site): m for site, values in sites.items() if (m := _numbers(values))}
            if parsed:
                return parsed
        val = entry.get("val")
        if isinstance(val, Mapping):
            nested = {str(site): m for site, values in val.items() if (m := _numbers(values))}
            if nested:
                return nested
            if flat := _numbers(val):
                return {"local": flat}
        flat = _numbers({k[4:]: v for k, v in entry.items() if isinstance(k, str) and k.startswith("val_")})
        if flat:
            return {"local": flat}
    return {}


def _provenance(state: Any, plan: Any, trained_on: str | None, hardware: str | None) -> dict[str, Any]:
    """What the manifest says of a local run; nothing when the caller describes neither data nor hardware."""
    if trained_on is None and hardware is None:
        return {}
    hours = sum(float(row.get("seconds") or 0.0) for row in state["history"] if "threshold" not in row) / 3600.0
    return {"data": trained_on, "hardware": hardware, "patches_seen": int(state["epoch"]) * plan.iterations_per_epoch,
            "hours": round(hours, 2)}


def export_package(
    checkpoint_path: Path,
    out_dir: Path,
    *,
    private_key: Any,
    version: int | None = None,
    demo: bool = False,
    description: str = "",
    registry: Registry | None = None,
    sites_contributed: int | None = None,
    sites_invited: int | None = None,
    trained_on: str | None = None,
    hardware: str | None = None,
) -> ExportResult:
    """Everything `export_checkpoint` does, returning the numbers as well (the CLI prints them).

    A federated round passes how many of its invited sites contributed; the manifest records them with the
    fedlesion version that built it. `trained_on` and `hardware` describe a local run; the manifest gets them with
    the patches the checkpoint's epochs drew and the hours its history recorded.
    """
    try:
        state = load_checkpoint(checkpoint_path)
        plan = checkpoint_plan(state)
    except (TypeError, KeyError, ValueError) as error:
        raise ExportError(f"{checkpoint_path}: {error}") from None
    task = Task(plan.task)
    network = build_network(plan.in_channels, 1, plan.network)
    try:
        network.load_state_dict(state["model"], strict=True)
    except (RuntimeError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"{checkpoint_path}: weights do not fit the plan's network ({first})") from None
    network.eval()
    served = registry.versions(task) if registry is not None else []
    if version is not None and served and version <= served[-1]:
        raise ExportError(f"{task.value} version {version} is not newer than {served[-1]} in the registry")
    size_divisible = max(plan.preprocessing.size_divisible, plan.network.size_divisible)
    inputs = parity_inputs(task, plan.preprocessing, plan.in_channels, size_divisible)

    started = time.perf_counter()
    onnx_bytes = export_onnx(network, plan.in_channels, OnnxSpec.opset)
    export_seconds = time.perf_counter() - started

    started = time.perf_counter()
    session = _session(onnx_bytes)
    threshold = checkpoint_threshold(state)
    reports = tuple(check_parity(network, onnx_bytes, image, threshold, session=session) for image in inputs)
    parity_seconds = time.perf_counter() - started
    failed = [report for report in reports if not report.passed]
    if failed:
        raise ExportError("ONNX parity failed, nothing built: " + "; ".join(r.describe() for r in failed))

    notes: list[str] = []
    if is_demo_key(private_key):
        if not demo:
            notes.append("signed with the demo key: package marked demo")
        demo = True
    if demo and DEMO_PHRASE not in description.lower():
        description = f"{description} (demo model, {DEMO_PHRASE})".strip()
    if version is None:
        version = (registry.versions(task)[-1] + 1) if registry and registry.versions(task) else 1
    try:
        manifest = default_manifest(
            task,
            version,
            plan_sha256=plan.sha256(),
            demo=demo,
            description=description,
            federated_round=state["federated_round"],
            strategy=state["strategy"],
            site_metrics=site_metrics_from_history(state["history"]),
            sites_contributed=sites_contributed,
            sites_invited=sites_invited,
            fedlesion_version=distribution_version(),
            provenance=_provenance(state, plan, trained_on, hardware),
            preprocessing=plan.preprocessing,
            onnx=OnnxSpec(),
            output=OutputSpec(threshold=threshold),
            network=network_info(network, plan.network),
        )
    except ExportError:
        raise
    except ValueError as error:
        raise ExportError(f"manifest: {error}") from None

    package_dir = build_package(Path(out_dir), onnx_bytes, manifest, private_key)
    path, published = package_dir, False
    if registry is not None:
        loaded = registry.publish(package_dir)
        path, published = registry.root / loaded.manifest.task.value / str(loaded.manifest.version), True
    return ExportResult(
        path=path,
        manifest=manifest,
        onnx_sha256=sha256_hex(onnx_bytes),
        onnx_bytes=len(onnx_bytes),
        parity=reports,
        export_seconds=export_seconds,
        parity_seconds=parity_seconds,
        published=published,
        warnings=tuple(notes),
    )


def export_checkpoint(
    checkpoint_path: Path,
    out_dir: Path,
    *,
    private_key: Any,
    version: int | None,
    demo: bool,
    description: str,
    registry: Registry | None = None,
) -> Path:
    """Checkpoint → ONNX (parity-checked at two sizes) → signed package in `out_dir` → registry when given.

    Returns the published version directory, or `out_dir` without a registry. `version=None` means the registry's
    latest + 1 (1 without a registry). The demo key always yields a demo package.
    """
    return export_package(
        checkpoint_path,
        out_dir,
        private_key=private_key,
        version=version,
        demo=demo,
        description=description,
        registry=registry,
    ).path
