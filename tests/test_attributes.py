"""One reading of DICOM attributes (issue 10 §4): per-frame functional groups, then shared, then top level.

Pinned on the shared enhanced files (Canon Galan DTI, Philips Achieva field map, Siemens Vida XA10, pydicom-data's
emri_small): the values read agree with the dcm2niix oracles beside them, and a conflicting value planted in a
lower place (shared group, top level) never overrides a higher one (per-frame group), while removing the higher one
lets the next place through.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
from conftest import SHARED_DATA, require
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_gateway.attributes import (
    frame_value,
    functional_item,
    image_type_tokens,
    is_enhanced,
    number_of_frames,
)
from dicom_gateway.diffusion import diffusion_info
from dicom_gateway.study_files import open_dicom
from dicom_gateway.volumes import VolumeNotProcessed, series_volumes

DICOM = SHARED_DATA / "dicom"
CANON = DICOM / "dcm_qa_canon_61"
CANON_ENHANCED = CANON / "dicom/enh_3000_DTI_PA-ortho/3000.dcm.gz"
PHILIPS = DICOM / "dcm_qa_enh/dicom/Philips/IM_0027_fMAP.dcm"
XA10 = DICOM / "dcm_qa_enh/dicom/Siemens/XA10"
EMRI_SMALL = DICOM / "pypi/pydicom-data_1.0.0/emri_small.dcm"
PIXEL_VALUES = "PixelValueTransformationSequence"


def read(path: Path) -> Dataset:
    require(path)
    return open_dicom(path, stop_before_pixels=True)


def group_item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def shared_group(dataset: Dataset) -> Dataset:
    if not dataset.get("SharedFunctionalGroupsSequence"):
        dataset.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    return dataset.SharedFunctionalGroupsSequence[0]


def test_canon_per_frame_diffusion_and_shared_geometry_match_dcm2niix() -> None:
    """Canon keeps b-values and positions per frame, pixel spacing and orientation shared."""
    dataset = read(CANON_ENHANCED)
    ref = CANON / "ref/3000_DTI_PA-ortho_enh.nii.gz"
    require(ref)
    frames = number_of_frames(dataset)
    assert is_enhanced(dataset) and frames == 520
    b_values = [diffusion_info(dataset, frame).b_value for frame in range(frames)]
    ref_b = [float(b) for b in ref.with_suffix("").with_suffix(".bval").read_text().split()]
    assert sorted(set(b_values)) == sorted(set(ref_b))
    assert b_values.count(1500.0) == 40 * ref_b.count(1500.0)  # 40 slices per volume
    column, row, _ = nib.load(ref).header.get_zooms()[:3]
    spacings = {tuple(frame_value(dataset, frame, "PixelMeasuresSequence", "PixelSpacing")) for frame in range(frames)}
    assert len(spacings) == 1 and list(spacings.pop()) == [pytest.approx(row), pytest.approx(column)]

    # A per-frame value that differs from the shared one wins for that frame only.
    planted = read(CANON_ENHANCED)  # a second reading to plant values in
    planted.PerFrameFunctionalGroupsSequence[5].PixelMeasuresSequence = Sequence([group_item(PixelSpacing=[9.0, 8.0])])
    assert list(frame_value(planted, 5, "PixelMeasuresSequence", "PixelSpacing")) == [9.0, 8.0]
    assert list(frame_value(planted, 4, "PixelMeasuresSequence", "PixelSpacing")) == [pytest.approx(row), pytest.approx(column)]
    assert list(frame_value(planted, None, "PixelMeasuresSequence", "PixelSpacing")) == [pytest.approx(row), pytest.approx(column)]


def test_philips_per_frame_rescale_beats_shared_and_top_level_and_matches_dcm2niix() -> None:
    """The field map holds magnitude and Hz frames, each with its own per-frame rescale (dcm2niix's e1 and e2)."""
    dataset = read(PHILIPS)
    oracle = set()
    for name in ("Philips_WIP_B0_NS_801_e1", "Philips_WIP_B0_NS_801_e2_fieldmaphz"):
        sidecar = DICOM / f"dcm_qa_enh/ref/{name}.json"
        require(sidecar)
        fields = json.loads(sidecar.read_text())
        oracle.add((round(fields["PhilipsRescaleSlope"], 3), round(fields["PhilipsRescaleIntercept"], 3)))

    def rescale(ds: Dataset, frame: int) -> tuple[float, float]:
        slope = frame_value(ds, frame, PIXEL_VALUES, "RescaleSlope")
        intercept = frame_value(ds, frame, PIXEL_VALUES, "RescaleIntercept")
        return round(float(slope), 3), round(float(intercept), 3)

    frames = range(number_of_frames(dataset))
    assert {rescale(dataset, frame) for frame in frames} == oracle

    planted = read(PHILIPS)
    shared_group(planted).PixelValueTransformationSequence = Sequence(
        [group_item(RescaleSlope="99", RescaleIntercept="1", RescaleType="US")]
    )
    planted.RescaleSlope, planted.RescaleIntercept = "77", "2"
    assert [rescale(planted, frame) for frame in frames] == [rescale(dataset, frame) for frame in frames]
    del planted.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence
    assert rescale(planted, 0) == (99.0, 1.0)  # no per-frame item: the shared one
    del planted.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    assert rescale(planted, 0) == (77.0, 2.0)  # neither: the top level
    assert rescale(planted, 1) == rescale(dataset, 1)


def test_siemens_xa10_per_frame_positions_beat_a_planted_shared_position() -> None:
    require(XA10)
    ref = DICOM / "dcm_qa_enh/ref/Siemens_REST1_w_SMS_PF7-8_6.nii"
    require(ref)
    column, row, _ = nib.load(ref).header.get_zooms()[:3]
    for path in sorted(XA10.iterdir()):
        dataset = read(path)
        frames = range(number_of_frames(dataset))
        positions = [tuple(frame_value(dataset, f, "PlanePositionSequence", "ImagePositionPatient")) for f in frames]
        assert len(set(positions)) == len(positions) > 1  # one slice per frame
        for frame in frames:
            spacing = frame_value(dataset, frame, "PixelMeasuresSequence", "PixelSpacing")
            assert [float(v) for v in spacing] == [pytest.approx(row), pytest.approx(column)]
            assert image_type_tokens(dataset, frame) >= {"ORIGINAL", "PRIMARY"}

        planted = read(path)
        shared_group(planted).PlanePositionSequence = Sequence([group_item(ImagePositionPatient=[1.0, 2.0, 3.0])])
        planted.ImagePositionPatient = [4.0, 5.0, 6.0]
        assert [tuple(frame_value(planted, f, "PlanePositionSequence", "ImagePositionPatient")) for f in frames] == positions
        assert list(frame_value(planted, None, "PlanePositionSequence", "ImagePositionPatient")) == [1.0, 2.0, 3.0]
        assert functional_item(planted, 0, "PlanePositionSequence") is not None


def test_enhanced_sop_class_without_functional_groups_reads_the_top_level_and_is_refused_without_geometry() -> None:
    """pydicom-data's emri_small is an Enhanced MR instance stripped of its functional groups (and geometry)."""
    dataset = read(EMRI_SMALL)
    assert not is_enhanced(dataset) and number_of_frames(dataset) == 10
    assert frame_value(dataset, 3, "MRImageFrameTypeSequence", "ImageType") == dataset.ImageType
    assert image_type_tokens(dataset, 3) == {"ORIGINAL", "PRIMARY", "T1", "NONE"}
    assert frame_value(dataset, 3, "PlanePositionSequence", "ImagePositionPatient") is None
    with pytest.raises(VolumeNotProcessed, match="lacks position"):
        series_volumes([open_dicom(EMRI_SMALL)])
