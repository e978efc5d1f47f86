"""`fedlesion inspect`: what the node would make of a study, from headers only.

Series, the role of each and why, b-values and volume counts, a geometry summary (rows × columns × slices, pixel
spacing, slice spacing from the slice positions, orientation) and warnings, as a JSON-ready dict and as a table.
The same reader and rules as the node (study_files, roles), so what inspect shows is what a push would do.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_gateway.attributes import frame_value, is_enhanced, number_of_frames
from dicom_gateway.diffusion import VolumeKey, volume_keys
from dicom_gateway.mosaic import is_mosaic, mosaic_grid, mosaic_image_count
from dicom_gateway.role_decisions import SeriesDecision
from dicom_gateway.roles import classify_headers
from dicom_gateway.study_files import SeriesHeaders, header_values, read_path
from models.geometry import slice_normal

SPACING_TOLERANCE_MM = 0.01  # slice gaps differing by more than this (and 1 %) are uneven


def inspect_path(path: Path, dwi_b_value: int = 1000, dwi_b_range: tuple[int, int] = (700, 1500)) -> dict[str, Any]:
    """Inspect the one study at `path` (a folder or DICOMDIR); ValueError when it holds no DICOM or several studies."""
    found = read_path(Path(path))
    study = found.only_study()
    roles = classify_headers(study, dwi_b_value, dwi_b_range)
    series_rows = []
    for headers, decision in zip(study.series, roles.series, strict=True):
        geometry = series_geometry(headers)
        series_rows.append(_series_row(decision, geometry))
    choices = roles.to_dict()
    return {
        "path": str(path),
        "study_uid": study.study_uid,
        "series": series_rows,
        "dwi": choices["dwi"],
        "adc": choices["adc"],
        "flair": choices["flair"],
        "model_b_value": dwi_b_value,
        "model_b_range": list(dwi_b_range),
        "warnings": roles.warnings,
        "skipped": [{"path": str(skipped.path), "reason": skipped.reason} for skipped in found.skipped],
    }


def _series_row(decision: SeriesDecision, geometry: dict[str, Any]) -> dict[str, Any]:
    volume_counts = Counter(_b_label(volume.b_value) for volume in decision.volumes)
    return {
        "number": decision.number,
        "description": decision.description,
        "modality": decision.modality,
        "series_uid": decision.series_uid,
        "sop_class_uid": decision.sop_class_uid,
        "role": decision.role.value,
        "reason": decision.reason,
        "b_values": decision.b_values,
        "volumes": len(decision.volumes),
        "volumes_by_b": dict(volume_counts) if decision.b_values else {},
        "instances": decision.instances,
        "frames": decision.frames,
        "geometry": geometry,
        "warnings": decision.warnings + geometry.pop("warnings"),
    }


def _b_label(b_value: float) -> str:
    return f"b={b_value:g}"


def series_geometry(series: SeriesHeaders) -> dict[str, Any]:
    """Grid of the series' first volume from its headers; slice spacing from positions, never SliceThickness."""
    datasets = series.datasets
    first = datasets[0]
    result: dict[str, Any] = {
        "rows": _int(first.get("Rows")),
        "columns": _int(first.get("Columns")),
        "slices": None,
        "pixel_spacing_mm": None,
        "slice_spacing_mm": None,
        "orientation": None,
        "warnings": [],
    }
    first_frame = 0 if is_enhanced(first) else None
    spacing = _values(frame_value(first, first_frame, "PixelMeasuresSequence", "PixelSpacing"))
    if len(spacing) == 2:
        result["pixel_spacing_mm"] = [round(value, 4) for value in spacing]
    orientation = _values(frame_value(first, first_frame, "PlaneOrientationSequence", "ImageOrientationPatient"))
    mosaic_slices = _mosaic_slices(first)
    if mosaic_slices:
        grid_rows, tiles_per_row = mosaic_grid(first, mosaic_slices)
        if result["rows"] and result["columns"]:
            result["rows"], result["columns"] = result["rows"] // grid_rows, result["columns"] // tiles_per_row
        result["slices"] = mosaic_slices
        result["orientation"] = _orientation_label(orientation)
        return result

    positions = _first_volume_positions(datasets)
    result["slices"] = len(positions) if positions else sum(number_of_frames(d) for d in datasets)
    if not positions:
        return result
    result["orientation"] = _orientation_label(orientation)
    if result["orientation"] is None:
        return result
    normal = slice_normal(orientation)
    distances = sorted(sum(p * n for p, n in zip(position, normal, strict=True)) for position in positions)
    gaps = [b - a for a, b in itertools.pairwise(distances)]
    if not gaps:
        return result
    low, high = min(gaps), max(gaps)
    if high - low <= max(SPACING_TOLERANCE_MM, 0.01 * high):
        result["slice_spacing_mm"] = round(sum(gaps) / len(gaps), 4)
    else:
        # The smallest gap is the acquired spacing; larger ones are missing slices or a gap in the coverage.
        odd = [
            f"{distances[index]:.2f}→{distances[index + 1]:.2f} mm"
            for index, gap in enumerate(gaps)
            if gap - low > max(SPACING_TOLERANCE_MM, 0.01 * high)
        ]
        result["warnings"].append(f"uneven slice spacing (smallest {low:.4g} mm; gaps at {', '.join(odd[:5])})")
    return result


def _first_volume_positions(datasets: Sequence[Dataset]) -> list[tuple[float, float, float]]:
    """Slice positions of the series' first split volume (a diffusion series repeats every position)."""
    keys = volume_keys(datasets)
    counts = Counter(key for frame_keys in keys for key in frame_keys)
    if not counts:
        return []
    first_key: VolumeKey = min(counts)
    positions = []
    for dataset, frame_keys in zip(datasets, keys, strict=True):
        enhanced = is_enhanced(dataset)
        for frame, key in enumerate(frame_keys):
            if key != first_key:
                continue
            frame_index = frame if enhanced else None
            position = _values(frame_value(dataset, frame_index, "PlanePositionSequence", "ImagePositionPatient"))
            if len(position) == 3:
                positions.append((position[0], position[1], position[2]))
    return positions


def _mosaic_slices(dataset: Dataset) -> int | None:
    """Slices in a Siemens mosaic or UIH grid (`mosaic.mosaic_image_count`); None for other images or no count."""
    if not is_mosaic(dataset):
        return None
    try:
        return mosaic_image_count(dataset)
    except ValueError:
        return None


def _orientation_label(orientation: list[float]) -> str | None:
    """sagittal, coronal, axial or oblique (…); None without a usable ImageOrientationPatient."""
    try:
        normal = slice_normal(orientation)
    except ValueError:  # missing, or row and column parallel
        return None
    axis = max(range(3), key=lambda index: abs(normal[index]))
    label = ("sagittal", "coronal", "axial")[axis]
    return label if abs(normal[axis]) >= 0.99 else f"oblique ({label})"


def _values(value: Any) -> list[float]:
    try:
        return [float(item) for item in header_values(value)]
    except (TypeError, ValueError):
        return []


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def format_table(inspection: dict[str, Any]) -> str:
    """The inspection as text: one line per series, then the chosen roles and the warnings."""
    lines = [f"Study {inspection['study_uid']}  ({inspection['path']})", ""]
    header = ("Series", "Role", "Description", "b-values", "Vols", "Grid", "Spacing (mm)", "Orientation")
    rows = [header]
    for series in inspection["series"]:
        geometry = series["geometry"]
        grid = "×".join(str(value) for value in (geometry["rows"], geometry["columns"], geometry["slices"]) if value)
        spacing = ""
        if geometry["pixel_spacing_mm"]:
            slice_spacing = geometry["slice_spacing_mm"]
            spacing = "×".join(f"{value:g}" for value in geometry["pixel_spacing_mm"])
            spacing += f"×{slice_spacing:g}" if slice_spacing else ""
        b_values = ", ".join(f"{label} ({count})" for label, count in series["volumes_by_b"].items())
        rows.append(
            (
                str(series["number"] if series["number"] is not None else "-"),
                series["role"],
                (series["description"] or "")[:32],
                b_values,
                str(series["volumes"]),
                grid,
                spacing,
                geometry["orientation"] or "",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    lines += ["", "Why:"]
    for series in inspection["series"]:
        lines.append(f"  {series['number'] if series['number'] is not None else '-'}: {series['reason']}")
        lines += [f"      warning: {warning}" for warning in series["warnings"]]
    lines += ["", "Chosen:"]
    lines.append(f"  DWI:   {_describe_dwi(inspection['dwi'])}")
    lines.append(f"  ADC:   {_describe_adc(inspection['adc'])}")
    flair = inspection["flair"]
    lines.append("  FLAIR: " + ("none" if flair is None else f"series {flair['series_number']}"))
    low, high = inspection["model_b_range"]
    lines.append(f"  (model DWI b={inspection['model_b_value']}, trained range {low}–{high})")
    if inspection["warnings"]:
        lines += ["", "Warnings:"] + [f"  {warning}" for warning in inspection["warnings"]]
    if inspection["skipped"]:
        lines += ["", f"Skipped files: {len(inspection['skipped'])}"]
        lines += [f"  {item['path']}: {item['reason']}" for item in inspection["skipped"][:10]]
        if len(inspection["skipped"]) > 10:
            lines.append(f"  … and {len(inspection['skipped']) - 10} more")
    return "\n".join(lines)


def _describe_dwi(dwi: dict[str, Any] | None) -> str:
    if dwi is None:
        return "none"
    volumes = len(dwi["volumes"])
    how = "scanner trace" if dwi["kind"] == "trace" else f"computed trace from {volumes} directions"
    return f"series {dwi['series_number']}, {how} at b={dwi['b_value']:g}"


def _describe_adc(adc: dict[str, Any] | None) -> str:
    if adc is None:
        return "none"
    if adc["source"] == "scanner":
        return f"series {adc['series_number']} (scanner)"
    b0 = len(adc["b0_volumes"])
    return f"computed from series {adc['series_number']} (mean of {b0} b0 volume(s), b={adc['b_value']:g})"
