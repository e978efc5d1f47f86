"""`fedlesion segment`'s path: one study from a folder through the node's own model choice, roles and pipeline.

Why here and not in the CLI: the model is chosen as the node chooses it (`ModelService` over the node's registry,
started without seeding or watching it, so the registry is left as found) and a DICOM study's series by
`study_plan.plan_study`, so a folder and the same study sent to the node give the same result.

PATH is a DICOM folder (or DICOMDIR), or a folder with dwi.nii.gz + adc.nii.gz and/or flair.nii.gz, plus study.json
when `fedlesion convert` wrote it. NIfTI ADC comes in 10⁻⁶ mm²/s as study.json says, in a unit judged from its
median in the head, or computed from a b0 given with the DWI.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np

from dicom_gateway.adc_maps import computed_adc
from dicom_gateway.roles import classify_headers
from dicom_gateway.study_files import read_path
from dicom_gateway.study_inputs import load_study_inputs
from inference.engine import Engine
from inference.models import ModelService, ModelSource, ModelUnavailable, ServingModel, trust_from_bundle, warm_up
from inference.pipeline import SegmentationResult, SeriesUsed, StudySource, segment_channels, segment_study
from inference.report import write_result
from inference.settings import InferenceSettings
from inference.study_plan import default_task, plan_study, present_roles
from models.adc import adc_in_micrometres
from models.manifest import ADC_UNIT, Manifest, Role, Task
from models.package import LoadedPackage, load_package

NIFTI_ROLES = ("dwi", "adc", "flair")
Images = dict[str, nib.Nifti1Image]


@dataclass(frozen=True)
class GivenModel:
    """One package named on the command line, verified and warmed up as the node would; serves its own task only."""

    path: Path
    serving: ServingModel

    def current(self, task: Task) -> ServingModel:
        if self.serving.task is not task:
            raise ValueError(f"model {self.path} is for {self.serving.task.value}, the study needs {task.value}")
        return self.serving

    def served_versions(self) -> dict[Task, int]:
        return {self.serving.task: self.serving.version}


def segment_folder(
    path: Path,
    out_dir: Path,
    *,
    registry_dir: Path,
    enrollment_bundle: Path | None,
    inference: InferenceSettings,
    task: Task | None = None,
    model: Path | None = None,
    b0: Path | None = None,
) -> SegmentationResult:
    """Segment the study in `path` and write mask.nii.gz and report.json to `out_dir`.

    The model: `model` (a package directory), else what the node would serve for the task from `registry_dir`
    (its newest verified version, else the embedded default on a demo node). The task: `task`, else stroke when
    a DWI is present, else MS. ValueError with the reason when the study or the model cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    nifti = path.is_dir() and any((path / f"{role}.nii.gz").is_file() for role in NIFTI_ROLES)
    if not nifti and b0 is not None:
        raise ValueError("--b0 applies to NIfTI input; a DICOM study's ADC comes from its own series")

    def serving_model(chosen: Task) -> tuple[ModelSource, ServingModel]:
        models = _models(chosen, registry_dir, enrollment_bundle, inference.threads, model)
        try:
            return models, models.current(chosen)
        except ModelUnavailable as error:
            raise ValueError(f"{error} from the registry {registry_dir}{_refusal(models)}") from None

    options = {"adc_core_threshold": inference.adc_core_threshold, "flip_tta": inference.flip_tta}
    started = time.perf_counter()
    if nifti:
        images, source = _read_nifti_folder(path)
        task = task or default_task({Role(role) for role in images})
        _, serving = serving_model(task)
        used = {channel.role.value for channel in serving.manifest.inputs}
        images = {role: image for role, image in images.items() if role in used}
        source = replace(source, series=tuple(series for series in source.series if series.role in used))
        images, source = _adc_in_micrometres(images, source, serving.manifest, b0)
        result = segment_channels(
            images, serving.engine, source=source, load_seconds=time.perf_counter() - started, **options
        )
    else:
        study = read_path(path).only_study()
        roles = classify_headers(study)  # the default b range; plan_study re-classifies for the model's
        task = task or default_task(present_roles(roles))
        models, _ = serving_model(task)
        plan = plan_study(study, task, models, roles)
        inputs = load_study_inputs(plan.roles, study)
        result = segment_study(inputs, plan.model.engine, load_seconds=time.perf_counter() - started, **options)
    write_result(result, out_dir)
    return result


def _models(
    task: Task, registry_dir: Path, enrollment_bundle: Path | None, threads: int, model: Path | None
) -> ModelSource:
    trust = trust_from_bundle(enrollment_bundle, [task])

    def engine(package: LoadedPackage) -> Engine:
        return Engine(package, threads=threads or None)

    if model is not None:
        return GivenModel(model, warm_up(load_package(model, trust), engine))
    service = ModelService(registry_dir, trust, [task], engine_factory=engine)
    service.start(watch=False, seed=False)
    return service


def _refusal(models: ModelSource) -> str:
    refusals = models.refusals() if isinstance(models, ModelService) else []
    return f" ({refusals[0].kind}: {refusals[0].reason})" if refusals else ""


def _read_nifti_folder(path: Path) -> tuple[Images, StudySource]:
    """The role images present and what study.json (when there) says about them."""
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


def _adc_in_micrometres(
    images: Images, source: StudySource, manifest: Manifest, b0_path: Path | None
) -> tuple[Images, StudySource]:
    """ADC in 10⁻⁶ mm²/s: as study.json says, detected from the median in the head, or computed from --b0."""
    if Role.ADC not in {channel.role for channel in manifest.inputs}:
        if b0_path is not None:
            raise ValueError(f"--b0 applies to stroke studies; the {manifest.task.value} model uses no ADC")
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
    return _computed_adc(images, source, manifest, nib.load(b0_path))


def _computed_adc(
    images: Images, source: StudySource, manifest: Manifest, b0: nib.Nifti1Image
) -> tuple[Images, StudySource]:
    """10⁶·ln(S0/Sb)/b from the b0 and the DWI on one grid, by the gateway's own formula."""
    dwi = nib.funcs.squeeze_image(images["dwi"])
    b0 = nib.funcs.squeeze_image(b0)
    if b0.shape != dwi.shape or not np.allclose(b0.affine, dwi.affine, atol=1e-3):
        raise ValueError(f"--b0 is not on the DWI's grid (shape {b0.shape} vs {dwi.shape}, or a different affine)")
    warnings = list(source.warnings)
    b_value = source.dwi_b_value
    if b_value is None:
        b_value = next(channel.b_value for channel in manifest.inputs if channel.role is Role.DWI)
        warnings.append(f"DWI b-value unknown: b={b_value} (the model's nominal b) assumed for the computed ADC")
    if not math.isfinite(float(b_value)) or float(b_value) <= 0:
        raise ValueError(f"DWI b-value must be positive to compute the ADC, got {b_value}")

    def volume(image: nib.Nifti1Image) -> hd.Volume:
        return hd.Volume.from_nibabel(nib.Nifti1Image(np.asarray(image.get_fdata(dtype=np.float32)), image.affine))

    adc = computed_adc(volume(b0), volume(dwi), float(b_value))
    images = {**images, "adc": nib.Nifti1Image(np.asarray(adc.array, dtype=np.float32), dwi.affine)}
    series = (*source.series, SeriesUsed("b0", None, None, "--b0 (ADC computed with the DWI)"))
    return images, replace(
        source, series=series, adc_unit_detected=f"computed ({ADC_UNIT})", warnings=tuple(warnings), dwi_b_value=b_value
    )
