"""b-values and directions from each vendor's tags (design.md §4), on hand-built datasets and on real Siemens files.

Private elements are placed in a non-default block behind a decoy creator that holds a wrong value at the
"usual" element number, so a reader that used fixed element numbers would fail here.
"""

from __future__ import annotations

import gzip
import struct

import pytest
from conftest import SHARED_DATA, require
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_gateway.attributes import siemens_csa
from dicom_gateway.diffusion import (
    DiffusionInfo,
    VolumeKey,
    diffusion_info,
    ordered_volume_keys,
    round_b_value,
    volume_keys,
)

DECOY = "DECOY VENDOR 01"


def _with_decoy(dataset: Dataset, group: int, element_offset: int, vr: str, value: object) -> None:
    """Reserve block 0x10 of `group` for another creator holding a wrong value at the offset we read."""
    dataset.private_block(group, DECOY, create=True).add_new(element_offset, vr, value)


def _private(dataset: Dataset, group: int, creator: str, element_offset: int, vr: str, value: object) -> None:
    dataset.private_block(group, creator, create=True).add_new(element_offset, vr, value)


def test_standard_top_level_tags() -> None:
    dataset = Dataset()
    dataset.DiffusionBValue = 998.0
    dataset.DiffusionGradientOrientation = [0.0, 2.0, 0.0]
    info = diffusion_info(dataset)
    assert info.b_value == 1000.0  # rounded to a multiple of 5
    assert info.stored_b_value == 998.0
    assert info.direction == (0.0, 1.0, 0.0)  # normalised


def test_siemens_mr_header_in_a_non_default_block() -> None:
    dataset = Dataset()
    _with_decoy(dataset, 0x0019, 0x0C, "IS", 7777)
    _with_decoy(dataset, 0x0019, 0x0E, "FD", [1.0, 0.0, 0.0])
    _private(dataset, 0x0019, "SIEMENS MR HEADER", 0x0C, "IS", 2500)
    _private(dataset, 0x0019, "SIEMENS MR HEADER", 0x0E, "FD", [0.0, 0.0, -1.0])
    assert dataset.private_block(0x0019, "SIEMENS MR HEADER").block_start == 0x1100
    assert diffusion_info(dataset) == DiffusionInfo(2500.0, (0.0, 0.0, -1.0), False, 2500.0)


def _csa(tags: dict[str, list[str]]) -> bytes:
    """A CSA2 ("SV10") image header with string items."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, items in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(items), b"DS\0\0", 3, len(items), 77)
        for item in items:
            data = item.encode() + b"\0"
            out += struct.pack("<4i", len(data), len(data), 77, len(data)) + data + b"\0" * (-len(data) % 4)
    return out


def test_siemens_csa_b_value_when_the_mr_header_lacks_it() -> None:
    dataset = Dataset()
    _with_decoy(dataset, 0x0029, 0x10, "OB", _csa({"B_value": ["9999"]}))
    _private(dataset, 0x0029, "SIEMENS CSA HEADER", 0x10, "OB", _csa({"EchoTime": ["80"], "B_value": ["1500"]}))
    assert diffusion_info(dataset).b_value == 1500.0
    damaged = Dataset()
    _private(damaged, 0x0029, "SIEMENS CSA HEADER", 0x10, "OB", b"garbage!")
    assert siemens_csa(damaged) is None  # a damaged CSA header is no value, never an exception
    assert diffusion_info(damaged).b_value is None


def test_real_siemens_mosaic_csa_fallback(tmp_path) -> None:
    """nibabel's TrioTim DWI mosaic: (0019,100C) says 1000; with it removed the CSA header still says 1000."""
    source = SHARED_DATA / "dicom/pypi/nibabel_5.4.2/siemens_dwi_1000.dcm.gz"
    require(source)
    import pydicom

    with gzip.open(source) as stream:
        dataset = pydicom.dcmread(stream)
    assert diffusion_info(dataset).b_value == 1000.0
    del dataset[dataset.private_block(0x0019, "SIEMENS MR HEADER").get_tag(0x0C)]
    assert diffusion_info(dataset).b_value == 1000.0


def test_ge_parm_with_the_1e9_offset_and_acqu_direction() -> None:
    dataset = Dataset()
    _with_decoy(dataset, 0x0043, 0x39, "IS", [5, 0, 0, 0])
    _private(dataset, 0x0043, "GEMS_PARM_01", 0x39, "IS", [1_000_001_000, 8, 0, 0])
    _with_decoy(dataset, 0x0019, 0xBB, "DS", "0.9")
    _private(dataset, 0x0019, "GEMS_ACQU_01", 0xBB, "DS", "0.6")
    _private(dataset, 0x0019, "GEMS_ACQU_01", 0xBC, "DS", "0.8")
    _private(dataset, 0x0019, "GEMS_ACQU_01", 0xBD, "DS", "0")
    info = diffusion_info(dataset)
    assert info.b_value == 1000.0
    assert info.direction == (0.6, 0.8, 0.0)


def test_philips_b0_stored_as_a_thousandth_counts_as_b0() -> None:
    dataset = Dataset()
    _private(dataset, 0x2001, "Philips Imaging DD 001", 0x03, "FL", 0.001)
    for offset, value in zip((0xB0, 0xB1, 0xB2), (0.57735, 0.57735, 0.57735), strict=True):
        _private(dataset, 0x2005, "Philips MR Imaging DD 001", offset, "FL", value)
    info = diffusion_info(dataset)
    assert info.b_value == 0.0
    assert info.direction is None  # a b0 has no gradient direction, whatever Philips writes
    assert info.stored_b_value == pytest.approx(0.001)


def test_philips_isotropic_trace_flag() -> None:
    dataset = Dataset()
    _private(dataset, 0x2001, "Philips Imaging DD 001", 0x03, "FL", 1000.0)
    _private(dataset, 0x2001, "Philips Imaging DD 001", 0x04, "CS", "I")
    info = diffusion_info(dataset)
    assert info.isotropic and info.b_value == 1000.0 and info.direction is None


def test_uih_b_value() -> None:
    dataset = Dataset()
    _with_decoy(dataset, 0x0065, 0x09, "FD", 3.0)
    _private(dataset, 0x0065, "Image Private Header", 0x09, "FD", 800.0)
    assert diffusion_info(dataset).b_value == 800.0


def _frame(b_value: float, direction: list[float] | None, z: float) -> Dataset:
    diffusion = Dataset()
    diffusion.DiffusionBValue = b_value
    diffusion.DiffusionDirectionality = "DIRECTIONAL" if direction else "NONE"
    if direction:
        gradient = Dataset()
        gradient.DiffusionGradientOrientation = direction
        diffusion.DiffusionGradientDirectionSequence = Sequence([gradient])
    position = Dataset()
    position.ImagePositionPatient = [0.0, 0.0, z]
    group = Dataset()
    group.MRDiffusionSequence = Sequence([diffusion])
    group.PlanePositionSequence = Sequence([position])
    return group


def test_enhanced_per_frame_and_shared_groups() -> None:
    dataset = Dataset()
    dataset.NumberOfFrames = 4
    dataset.PerFrameFunctionalGroupsSequence = Sequence(
        [_frame(0.0, None, 0.0), _frame(0.0, None, 5.0), _frame(1500.0, [1, 0, 0], 0.0), _frame(1500.0, [1, 0, 0], 5.0)]
    )
    assert diffusion_info(dataset, 0).b_value == 0.0
    assert diffusion_info(dataset, 3) == DiffusionInfo(1500.0, (1.0, 0.0, 0.0), False, 1500.0)
    shared_only = Dataset()
    shared_only.SharedFunctionalGroupsSequence = Sequence([_frame(700.0, [0, 1, 0], 0.0)])
    assert diffusion_info(shared_only, 0).b_value == 700.0
    keys = volume_keys([dataset])[0]
    b0, b1500 = VolumeKey(0.0, None), VolumeKey(1500.0, (1.0, 0.0, 0.0))
    assert keys == [b0, b0, b1500, b1500]  # two volumes of two slices each
    with pytest.raises(ValueError, match="frame_index"):
        diffusion_info(dataset, -1)


def test_no_tags_means_no_b_value() -> None:
    assert diffusion_info(Dataset()) == DiffusionInfo(None, None)


@pytest.mark.parametrize(
    ("stored", "rounded"), [(0.004, 0.0), (49.9, 0.0), (50.0, 50.0), (2497.0, 2495.0), (1002.6, 1005.0)]
)
def test_rounding(stored: float, rounded: float) -> None:
    assert round_b_value(stored) == rounded


def _classic(stored_b: float, z: float, instance: int) -> Dataset:
    dataset = Dataset()
    dataset.DiffusionBValue = stored_b
    dataset.ImagePositionPatient = [0.0, 0.0, z]
    dataset.InstanceNumber = instance
    dataset.AcquisitionTime = "120000"
    return dataset


def test_repeated_b0_volumes_split_by_their_stored_b_in_instance_order() -> None:
    """Philips style: b0 volumes written as 0 and 0.001, same direction-less key, same positions."""
    # volume order: b0 (0), b1000, b0 (0.001); two slices each; instance numbers slice-major as Philips writes them
    datasets = [
        _classic(0.0, 0.0, 1), _classic(1000.0, 0.0, 2), _classic(0.001, 0.0, 3),
        _classic(0.0, 5.0, 4), _classic(1000.0, 5.0, 5), _classic(0.001, 5.0, 6),
    ]  # fmt: skip
    keys = [frame_keys[0] for frame_keys in volume_keys(datasets)]
    assert keys == [VolumeKey(0.0, None, 0), VolumeKey(1000.0, None, 0), VolumeKey(0.0, None, 1)] * 2
    assert [key.b_value for key in ordered_volume_keys(datasets)] == [0.0, 1000.0, 0.0]
    assert ordered_volume_keys(datasets)[2].label() == "b=0 #2"
