"""`fedlesion segment`: one study through the node's pipeline without the network (mask.nii.gz + report.json).

PATH is a DICOM folder (or DICOMDIR), or a folder with dwi.nii.gz + adc.nii.gz and/or flair.nii.gz, plus study.json
when `fedlesion convert` wrote it. The model is --model, else the registry's latest for the task, else the
embedded default (demo trust).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

NIFTI_ROLES = ("dwi", "adc", "flair")
TASKS = ("stroke-dwi-adc", "ms-flair")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment one study (DICOM folder or NIfTI folder) and write mask.nii.gz and report.json",
        description=(
            "PATH is a DICOM folder (or DICOMDIR), or a folder with dwi.nii.gz + adc.nii.gz and/or flair.nii.gz "
            "(plus study.json from 'fedlesion convert'). Model: --model, else the registry's latest, else the "
            "embedded default (demo mode)."
        ),
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="DICOM folder or DICOMDIR, or a NIfTI folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--json", action="store_true", help="print report.json")
    parser.add_argument("--model", type=Path, metavar="PACKAGE_DIR", help="a signed model package to use")
    parser.add_argument("--task", choices=TASKS, help="default: stroke when a DWI is present, else MS")
    parser.add_argument(
        "--b0", type=Path, metavar="B0.nii.gz", help="NIfTI input without ADC: compute it from this b0 and the DWI"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedlesion.settings import load_settings
    from inference.engine import Engine
    from inference.pipeline import segment_channels, segment_study
    from inference.report import write_result
    from models.manifest import Task

    settings = load_settings(Path(args.config) if args.config else None)
    path: Path = args.path
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    nifti = path.is_dir() and any((path / f"{role}.nii.gz").is_file() for role in NIFTI_ROLES)
    options: dict[str, Any] = {
        "adc_core_threshold": settings.inference.adc_core_threshold,
        "flip_tta": settings.inference.flip_tta,
    }
    started = time.perf_counter()
    if nifti:
        images, source = _read_nifti_folder(path)
        task = Task(args.task) if args.task else _nifti_task(images)
        engine = Engine(_package(args, settings, task), threads=settings.inference.threads or None)
        used = {channel.role.value for channel in engine.manifest.inputs}
        images = {role: image for role, image in images.items() if role in used}
        source = replace(source, series=tuple(series for series in source.series if series.role in used))
        images, source = _adc_in_micrometres(images, source, engine, args.b0)
        result = segment_channels(
            images, engine, source=source, load_seconds=time.perf_counter() - started, **options
        )
    else:
        if args.b0 is not None:
            raise ValueError("--b0 applies to NIfTI input; a DICOM study's ADC comes from its own series")
        inputs, task, engine = _load_dicom(path, args, settings)
        result = segment_study(inputs, engine, load_seconds=time.perf_counter() - started, **options)
    write_result(result, args.out)
    if args.json:
        print(json.dumps(result.report, indent=2, ensure_ascii=False))
    else:
        print(
            f"{task.value}: {result.lesion_count} lesion(s), {result.total_volume_ml:.2f} ml"
            + (f", ADC core {result.adc_core_volume_ml:.2f} ml" if result.adc_core_volume_ml is not None else "")
            + f" (model v{result.model.version}{', demo' if result.model.demo else ''}) → {args.out}"
        )
        for warning in result.warnings:
            print(f"warning: {warning}")
    return 0


def _package(args: argparse.Namespace, settings: Any, task: Any) -> Any:
    """--model, else the registry's latest for `task`, else the embedded default (only a demo node trusts it)."""
    from inference.models import DEFAULTS_DIR, trust_from_bundle
    from models.package import TrustMode, load_package
    from models.registry import Registry

    trust = trust_from_bundle(settings.models.enrollment_bundle, [task])
    if args.model is not None:
        package = load_package(args.model, trust)
        if package.manifest.task is not task:
            raise ValueError(f"model {args.model} is for {package.manifest.task.value}, the study needs {task.value}")
        return package
    latest = Registry(settings.registry_dir, trust).latest(task)
    if latest is not None:
        return latest
    if trust.mode is not TrustMode.DEMO:
        raise ValueError(f"no {task.value} model in the registry {settings.registry_dir} (enrolled node)")
    return load_package(DEFAULTS_DIR / task.value, trust)


def _load_dicom(path: Path, args: argparse.Namespace, settings: Any) -> tuple[Any, Any, Any]:
    from dicom_gateway.roles import classify_headers
    from dicom_gateway.study_files import read_path
    from dicom_gateway.study_inputs import load_study_inputs
    from inference.engine import Engine
    from models.manifest import Role, Task

    study = read_path(path).only_study()
    roles = classify_headers(study)  # the default b range; re-classified below when the model's differs
    if args.task:
        task = Task(args.task)
    elif roles.dwi is not None:
        task = Task.STROKE_DWI_ADC
    elif roles.flair is not None:
        task = Task.MS_FLAIR
    else:
        raise ValueError(f"study {study.study_uid} holds neither a DWI nor a FLAIR series")
    engine = Engine(_package(args, settings, task), threads=settings.inference.threads or None)
    dwi = next((channel for channel in engine.manifest.inputs if channel.role is Role.DWI), None)
    if dwi is not None and (dwi.b_value, dwi.b_value_range) != (roles.dwi_b_value, roles.dwi_b_range):
        roles = classify_headers(study, dwi.b_value, dwi.b_value_range)
    return load_study_inputs(roles, study), task, engine


def _read_nifti_folder(path: Path) -> tuple[dict[str, Any], Any]:
    """The role images present and what study.json (when there) says about them."""
    import nibabel as nib

    from inference.pipeline import SeriesUsed, StudySource

    images = {role: nib.load(path / f"{role}.nii.gz") for role in NIFTI_ROLES if (path / f"{role}.nii.gz").is_file()}
    summary_path = path / "study.json"
    if not summary_path.is_file():
        series = tuple(SeriesUsed(role, None, None, f"{role}.nii.gz") for role in images)
        return images, StudySource(series=series)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        facts = summary["roles"]
        descriptions = {
            item["series_uid"]: item.get("description", "") for item in summary.get("series", [])
        }
        series = tuple(
            SeriesUsed(
                role,
                facts[role].get("series_uid"),
                facts[role].get("series_number"),
                descriptions.get(facts[role].get("series_uid"), ""),
            )
            for role in images
            if role in facts
        )
        adc = facts.get("adc") or {}
        source = StudySource(
            study_uid=summary.get("study_uid"),
            series=series,
            dwi_b_value=(facts.get("dwi") or {}).get("b_value"),
            adc_unit_detected=adc.get("unit_detected"),
            warnings=tuple(summary.get("warnings", [])),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{summary_path} is not a study.json written by fedlesion convert ({error})") from None
    if "adc" in images and adc.get("unit") is None:
        raise ValueError(f"{summary_path} gives no unit for adc.nii.gz")
    return images, source


def _nifti_task(images: dict[str, Any]) -> Any:
    from models.manifest import Task

    if "dwi" in images:
        return Task.STROKE_DWI_ADC
    return Task.MS_FLAIR


def _adc_in_micrometres(
    images: dict[str, Any], source: Any, engine: Any, b0_path: Path | None
) -> tuple[dict[str, Any], Any]:
    """ADC in 10⁻⁶ mm²/s: as study.json says, detected from the median in the head, or computed from --b0."""
    import nibabel as nib
    import numpy as np

    from models.adc import adc_in_micrometres
    from models.manifest import ADC_UNIT, Role

    needs_adc = any(channel.role is Role.ADC for channel in engine.manifest.inputs)
    if not needs_adc:
        if b0_path is not None:
            raise ValueError(f"--b0 applies to stroke studies; the {engine.manifest.task.value} model uses no ADC")
        return images, source
    if "dwi" not in images:
        raise ValueError("DWI missing: dwi.nii.gz is not in the folder")
    if "adc" in images:
        if b0_path is not None:
            raise ValueError("--b0 given but adc.nii.gz exists: remove one")
        if source.adc_unit_detected is not None:  # from study.json: convert wrote µm²/s
            return images, source
        adc = nib.funcs.squeeze_image(images["adc"])
        converted = adc_in_micrometres(np.asarray(adc.get_fdata(dtype=np.float32)))
        images = {**images, "adc": nib.Nifti1Image(converted.values, adc.affine)}
        unit = converted.unit.value
        detected = unit if unit == ADC_UNIT else f"{unit} (median inside the head)"
        return images, replace(source, adc_unit_detected=detected)
    if b0_path is None:
        raise ValueError("ADC missing: the folder has no adc.nii.gz; give --b0 B0.nii.gz to compute it from the DWI")
    return _computed_adc(images, source, engine, nib.load(b0_path))


def _computed_adc(images: dict[str, Any], source: Any, engine: Any, b0: Any) -> tuple[dict[str, Any], Any]:
    """10⁶·ln(S0/Sb)/b from the b0 and the DWI on one grid, by the gateway's own formula."""
    import highdicom as hd
    import nibabel as nib
    import numpy as np

    from dicom_gateway.adc_maps import computed_adc
    from inference.pipeline import SeriesUsed
    from models.manifest import ADC_UNIT, Role

    dwi = nib.funcs.squeeze_image(images["dwi"])
    b0 = nib.funcs.squeeze_image(b0)
    if b0.shape != dwi.shape or not np.allclose(b0.affine, dwi.affine, atol=1e-3):
        raise ValueError(f"--b0 is not on the DWI's grid (shape {b0.shape} vs {dwi.shape}, or a different affine)")
    warnings = list(source.warnings)
    b_value = source.dwi_b_value
    if b_value is None:
        b_value = next(channel.b_value for channel in engine.manifest.inputs if channel.role is Role.DWI)
        warnings.append(f"DWI b-value unknown: b={b_value} (the model's nominal b) assumed for the computed ADC")
    if not math.isfinite(float(b_value)) or float(b_value) <= 0:
        raise ValueError(f"DWI b-value must be positive to compute the ADC, got {b_value}")

    def volume(image: Any) -> hd.Volume:
        return hd.Volume.from_nibabel(nib.Nifti1Image(np.asarray(image.get_fdata(dtype=np.float32)), image.affine))

    adc = computed_adc(volume(b0), volume(dwi), float(b_value))
    images = {**images, "adc": nib.Nifti1Image(np.asarray(adc.array, dtype=np.float32), dwi.affine)}
    series = (*source.series, SeriesUsed("b0", None, None, "--b0 (ADC computed with the DWI)"))
    return images, replace(
        source, series=series, adc_unit_detected=f"computed ({ADC_UNIT})", warnings=tuple(warnings), dwi_b_value=b_value
    )
