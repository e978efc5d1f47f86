"""Secondary Capture overlay series and the "not performed" notice (design.md §4 "Outputs" 2 and notify).

One RGB SC instance per source slice, in the source's row/column order, so a reader can page through it beside the
source series: the slice windowed at the 1st–99.5th percentile inside the head mask over the whole series, upscaled
by an integer factor (nearest neighbour, so every source pixel stays a whole block) until the short side is
≥ 512 px, each lesion drawn as a full-colour outline plus a 40 % fill, and a banner strip under the image saying
what this is. Text is drawn with a built-in 5×7 bitmap font (no Pillow dependency) from `banner_lines`, which
takes no patient attribute at all, so no identifier can be burned in.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicom_gateway.uids import OWN_MANUFACTURER, is_valid_uid, output_uid
from dicom_gateway.writers.common import (
    DEMO_MARK,
    NOT_FOR_DIAGNOSIS,
    Lesion,
    ModelInfo,
    OutputContext,
    OutputKind,
    ReferenceGrid,
    check_label_map,
    check_lesions,
    check_total_volume,
    contributing_equipment,
    make_context,
    output_datetime,
    output_series_number,
    reference_grid,
    stamp,
)
from models.manifest import Task

MIN_SHORT_SIDE = 512
FILL_OPACITY = 0.4
LESION_RGB = (255, 48, 48)
BANNER_TITLE_RGB = (255, 214, 0)
BANNER_TEXT_RGB = (255, 255, 255)
WINDOW_PERCENTILES = (1.0, 99.5)
NOTICE_SIZE = (256, 512)  # rows, columns of the "not performed" image
_GLYPH_ROWS, _GLYPH_COLUMNS = 7, 5

# 5×7 glyphs, one string per row ('#' = ink). Lower case is drawn as upper case; anything else as '?'.
_FONT: dict[str, tuple[str, ...]] = {
    " ": (".....", ".....", ".....", ".....", ".....", ".....", "....."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "–": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "'": ("..#..", "..#..", ".#...", ".....", ".....", ".....", "....."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
}
_GLYPHS = {char: np.array([[cell == "#" for cell in row] for row in rows], dtype=bool) for char, rows in _FONT.items()}


def write_overlay(
    reference_datasets: Sequence[Dataset],
    label_map: np.ndarray,
    lesions: Sequence[Lesion],
    model: ModelInfo,
    task: Task,
    study_revision: int,
    existing_series_numbers: Collection[int],
    total_volume_ml: float,
    *,
    head_mask: np.ndarray | None = None,
    created: dt.datetime | None = None,
) -> list[hd.sc.SCImage]:
    """One SC instance per source slice (InstanceNumber 1…N in the source's InstanceNumber order)."""
    grid = reference_grid(reference_datasets)
    context = make_context(str(grid.first.StudyInstanceUID), study_revision, task, model)
    items = check_lesions(lesions)
    labels = check_label_map(label_map, items, grid)
    check_total_volume(items, total_volume_ml)
    mask = check_head_mask(head_mask, grid)
    return build_overlay(
        grid,
        labels,
        len(items),
        total_volume_ml,
        context,
        existing_series_numbers,
        mask,
        output_datetime(grid.datasets, created),
    )


def write_not_processed(
    reference_datasets: Sequence[Dataset],
    reason: str,
    *,
    study_revision: int,
    existing_series_numbers: Collection[int],
    task: Task | None = None,
    model_version: str | None = None,
    demo: bool = False,
    created: dt.datetime | None = None,
) -> hd.sc.SCImage:
    """One SC image "AI analysis not performed: <reason>" in the source study (notify_not_processed).

    `reference_datasets`: any instances of the study (patient/study modules and SeriesNumber come from the first
    one; no volume is needed). UIDs depend on (study, revision, task, model version), never on the reason.
    """
    datasets = list(reference_datasets) if reference_datasets is not None else []
    if not datasets or not all(isinstance(ds, Dataset) for ds in datasets):
        raise ValueError("reference_datasets must hold at least one pydicom Dataset of the study")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"reason must be a non-empty string, got {reason!r}")
    if isinstance(study_revision, bool) or not isinstance(study_revision, int) or study_revision < 1:
        raise ValueError(f"study_revision must be an integer ≥ 1, got {study_revision!r}")
    first = datasets[0]
    missing = [
        name
        for name in (
            "StudyInstanceUID",
            "PatientID",
            "PatientName",
            "StudyDate",
            "StudyTime",
        )
        if name not in first
    ]
    if missing:
        raise ValueError(f"reference_datasets[0] lacks {', '.join(missing)}")
    study_uid = str(first.StudyInstanceUID)
    if not is_valid_uid(study_uid):
        raise ValueError(f"StudyInstanceUID of the reference instances is not a valid UID: {study_uid!r}")
    parts = (
        study_uid,
        str(study_revision),
        task.short_name if task is not None else "no-task",
        model_version or "no-model",
        OutputKind.NOT_PROCESSED.value,
    )
    when = output_datetime(datasets, created)
    lines = [
        NOT_FOR_DIAGNOSIS,
        *([DEMO_MARK] if demo else []),
        "AI analysis not performed:",
        *_wrap(reason.strip(), NOTICE_SIZE[1]),
    ]
    image = np.zeros((*NOTICE_SIZE, 3), dtype=np.uint8)
    _draw_lines(image, lines, top=16)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=first,
        pixel_array=image,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=output_uid(*parts, "series"),
        series_number=output_series_number(first, OutputKind.NOT_PROCESSED, existing_series_numbers),
        sop_instance_uid=output_uid(*parts, "1"),
        instance_number=1,
        manufacturer=OWN_MANUFACTURER,
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.PatientOrientation = ""  # Type 2C, empty: a text page has no anatomy (highdicom demands a value)
    _mark_secondary_capture(sc, when, OutputKind.NOT_PROCESSED, demo=demo)
    sc.ImageComments = f"AI analysis not performed: {reason.strip()}"[:10240]
    return sc


def check_head_mask(head_mask: np.ndarray | None, grid: ReferenceGrid) -> np.ndarray | None:
    if head_mask is None:
        return None
    mask = np.asarray(head_mask)
    if mask.shape != grid.shape:
        raise ValueError(f"head_mask has shape {mask.shape}, the reference grid is {grid.shape}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"head_mask must be boolean or integer (nonzero = head), got dtype {mask.dtype}")
    if not mask.any():
        raise ValueError("head_mask is empty: no voxel to window on")
    return mask != 0


def build_overlay(
    grid: ReferenceGrid,
    label_map: np.ndarray,
    lesion_count: int,
    total_volume_ml: float,
    context: OutputContext,
    existing_series_numbers: Collection[int],
    head_mask: np.ndarray | None,
    when: dt.datetime,
) -> list[hd.sc.SCImage]:
    """The overlay series from already validated inputs."""
    values = grid.pixel_volume()
    gray = window(values, head_mask if head_mask is not None else threshold_head_mask(values))
    rows, columns = grid.shape[1:]
    factor = upscale_factor(rows, columns)
    banner = render_banner(banner_lines(context.model, lesion_count, total_volume_ml), columns * factor)
    series_uid = context.series_uid(OutputKind.OVERLAY)
    series_number = output_series_number(grid.first, OutputKind.OVERLAY, existing_series_numbers)
    order = sorted(range(len(grid.datasets)), key=lambda k: (_instance_number(grid.datasets[k]), k))
    pixel_spacing = [float(x) / factor for x in grid.first.PixelSpacing]
    orientation = patient_orientation([float(x) for x in grid.first.ImageOrientationPatient])
    images = []
    for instance_number, k in enumerate(order, start=1):
        frame = np.concatenate([draw_lesions(gray[k], label_map[k] > 0, factor), banner], axis=0)
        source = grid.datasets[k]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=frame,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=context.instance_uid(OutputKind.OVERLAY, instance_number),
            instance_number=instance_number,
            manufacturer=OWN_MANUFACTURER,
            pixel_spacing=pixel_spacing,
            patient_orientation=tuple(o[0] for o in orientation),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            contributing_equipment=[contributing_equipment(context.model)],
        )
        sc.copy_patient_and_study_information(source)
        sc.PatientOrientation = orientation
        _mark_secondary_capture(sc, when, OutputKind.OVERLAY, demo=context.model.demo)
        sc.ManufacturerModelName = context.model.name
        sc.SoftwareVersions = context.model.version
        sc.DerivationDescription = "AI lesion outline and 40 % fill drawn on the windowed, upscaled source slice"
        sc.SourceImageSequence = [_source_reference(source)]
        images.append(sc)
    return images


def threshold_head_mask(values: np.ndarray) -> np.ndarray:
    """Without a head mask: voxels above 10 % of the series' 99th percentile of positive values (air is dark)."""
    positive = values[values > 0]
    if positive.size == 0:
        return np.ones(values.shape, dtype=bool)
    return values > 0.1 * float(np.percentile(positive, 99.0))


def window(values: np.ndarray, head_mask: np.ndarray) -> np.ndarray:
    """uint8 grey levels: the 1st–99.5th percentile inside the head over the whole series mapped to 0–255."""
    inside = values[head_mask] if head_mask.any() else values.reshape(-1)
    low, high = (float(x) for x in np.percentile(inside, WINDOW_PERCENTILES))
    if high <= low:
        high = low + 1.0
    return np.rint(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def upscale_factor(rows: int, columns: int) -> int:
    return max(1, math.ceil(MIN_SHORT_SIDE / min(rows, columns)))


def draw_lesions(gray: np.ndarray, lesion: np.ndarray, factor: int) -> np.ndarray:
    """RGB slice upscaled by `factor`: lesion pixels get a 40 % colour fill, their inner border full colour.

    Colour never leaves the lesion's own (upscaled) pixels, and every lesion pixel gets some: the overlay, block-
    reduced by `factor`, is exactly the lesion mask.
    """
    big_gray = np.repeat(np.repeat(gray, factor, axis=0), factor, axis=1)
    rgb = np.repeat(big_gray[..., None], 3, axis=2)
    if not lesion.any():
        return rgb
    big = np.repeat(np.repeat(lesion, factor, axis=0), factor, axis=1)
    colour = np.array(LESION_RGB, dtype=np.float32)
    rgb[big] = np.rint((1.0 - FILL_OPACITY) * rgb[big] + FILL_OPACITY * colour).astype(np.uint8)
    thickness = max(1, factor // 3)
    outline = big & ~ndimage.binary_erosion(big, iterations=thickness, border_value=0)
    rgb[outline] = LESION_RGB
    return rgb


def banner_lines(model: ModelInfo, lesion_count: int, total_volume_ml: float) -> list[str]:
    """The banner text: what this is, which model, and the result; built from no patient attribute."""
    lines = [
        NOT_FOR_DIAGNOSIS,
        *([DEMO_MARK] if model.demo else []),
        f"Model {model.name} {model.version} ({model.round_text})",
    ]
    if lesion_count == 0:
        lines.append("AI: no lesion detected")
    else:
        noun = "lesion" if lesion_count == 1 else "lesions"
        lines.append(f"{lesion_count} {noun}, total volume {total_volume_ml:.2f} ml")
    return lines


def render_banner(lines: Sequence[str], width: int) -> np.ndarray:
    """A black strip `width` px wide with the lines drawn in it (title yellow, the rest white)."""
    scale = _text_scale(lines, width)
    line_height = (_GLYPH_ROWS + 3) * scale
    strip = np.zeros((len(lines) * line_height + 2 * scale + 4, width, 3), dtype=np.uint8)
    _draw_lines(strip, lines, top=scale + 2, scale=scale)
    return strip


def render_text(text: str, scale: int) -> np.ndarray:
    """Ink mask of one line of text (upper case; unknown characters as '?')."""
    cell = _GLYPH_COLUMNS + 1
    out = np.zeros((_GLYPH_ROWS, max(1, len(text)) * cell), dtype=bool)
    for index, char in enumerate(text.upper()):
        out[:, index * cell : index * cell + _GLYPH_COLUMNS] = _GLYPHS.get(char, _GLYPHS["?"])
    return np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)


def patient_orientation(image_orientation: Sequence[float]) -> list[str]:
    """PatientOrientation letters (LPS: +x L, +y P, +z H) of the row and column directions, largest first."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    out = []
    for direction in (image_orientation[:3], image_orientation[3:]):
        ranked = sorted(range(3), key=lambda axis: -abs(direction[axis]))
        out.append("".join(letters[axis][direction[axis] > 0] for axis in ranked if abs(direction[axis]) > 1e-3))
    return out


def _text_scale(lines: Sequence[str], width: int) -> int:
    longest = max(len(line) for line in lines)
    return max(1, min(3, (width - 8) // (longest * (_GLYPH_COLUMNS + 1))))


def _draw_lines(image: np.ndarray, lines: Sequence[str], *, top: int, scale: int | None = None) -> None:
    scale = scale if scale is not None else _text_scale(lines, image.shape[1])
    fits = (image.shape[1] - 8) // ((_GLYPH_COLUMNS + 1) * scale)
    y = top
    for index, line in enumerate(lines):
        text = line if len(line) <= fits else line[: max(0, fits - 3)] + "..."
        ink = render_text(text, scale)[:, : image.shape[1] - 4]
        rows = min(ink.shape[0], image.shape[0] - y)
        if rows <= 0:
            break
        region = image[y : y + rows, 4 : 4 + ink.shape[1]]
        region[ink[:rows]] = BANNER_TITLE_RGB if index == 0 else BANNER_TEXT_RGB
        y += (_GLYPH_ROWS + 3) * scale


def _wrap(text: str, width: int) -> list[str]:
    """Words into lines that fit `width` px at scale 2."""
    per_line = max(8, (width - 8) // ((_GLYPH_COLUMNS + 1) * 2))
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= per_line:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _mark_secondary_capture(sc: hd.sc.SCImage, when: dt.datetime, kind: OutputKind, *, demo: bool) -> None:
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.Laterality = ""  # Type 2C (paired body parts); the brain as a whole has none
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = (
        when.strftime("%Y%m%d"),
        when.strftime("%H%M%S"),
    )
    stamp(sc, when, kind, demo=demo)


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def _instance_number(ds: Dataset) -> int:
    value = ds.get("InstanceNumber")
    return int(value) if value not in (None, "") else 0
