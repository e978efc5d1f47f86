"""UIH-style mosaic DWI (issue 10 §8): no ImagePositionPatient or ImageOrientationPatient on the instance, the
geometry in the grid's slice items (0065,xx51) and the b-value and gradient in (0065,xx09) and (0065,xx37), all
under "Image Private Header" in a non-default block. dcm2niix converts such a series from those tags; so must the
node. A series that really lacks geometry (no slice items, no position) is still refused with a reason.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_gateway.diffusion import diffusion_info, volume_keys
from dicom_gateway.mosaic import is_mosaic, mosaic_image_count
from dicom_gateway.volumes import VolumeNotProcessed, series_volumes

UIH = "Image Private Header"
SLICES, TILE_ROWS, TILE_COLUMNS = 5, 4, 6  # a 2 × 3 grid: ceil(√5) = 3 tiles per grid row
ROW_COSINE = np.array([np.cos(0.2), np.sin(0.2), 0.0])
COLUMN_COSINE = np.array([-np.sin(0.2) * np.cos(0.3), np.cos(0.2) * np.cos(0.3), -np.sin(0.3)])
NORMAL = np.cross(ROW_COSINE, COLUMN_COSINE)
POSITIONS = np.array([10.0, -20.0, 30.0]) + np.arange(SLICES)[:, None] * 4.5 * NORMAL
PIXEL_SPACING = [2.0, 1.5]


def grid_image(b_value: float, instance: int, slices: np.ndarray, *, with_items: bool = True) -> Dataset:
    """One UIH grid image of `slices` (n, rows, columns); geometry only in the slice items."""
    grid = np.zeros((2 * TILE_ROWS, 3 * TILE_COLUMNS), dtype=np.uint16)
    for k in range(SLICES):
        r, c = divmod(k, 3)
        grid[r * TILE_ROWS : (r + 1) * TILE_ROWS, c * TILE_COLUMNS : (c + 1) * TILE_COLUMNS] = slices[k]
    dataset = Dataset()
    dataset.SOPClassUID = pydicom.uid.MRImageStorage
    dataset.SOPInstanceUID = f"1.2.826.0.1.3680043.2.9.{instance}"
    dataset.SeriesInstanceUID, dataset.StudyInstanceUID = "1.2.826.0.1.3680043.2.2", "1.2.826.0.1.3680043.2.3"
    dataset.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.4"
    dataset.Modality, dataset.Manufacturer, dataset.ImageType = "MR", "UIH", ["ORIGINAL", "PRIMARY", "DIFFUSION"]
    dataset.InstanceNumber = instance
    dataset.PixelSpacing = PIXEL_SPACING
    dataset.Rows, dataset.Columns = grid.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.PixelData = grid.tobytes()
    dataset.private_block(0x0065, "DECOY VENDOR 01", create=True).add_new(0x09, "FD", 7.0)  # block 0x10 taken
    block = dataset.private_block(0x0065, UIH, create=True)
    block.add_new(0x09, "FD", b_value)
    block.add_new(0x37, "FD", [0.0, 0.0, 0.0] if b_value == 0 else [0.0, 0.0, 1.0])
    block.add_new(0x50, "DS", str(SLICES))
    if with_items:
        items = []
        for position in POSITIONS:
            item = Dataset()
            item.ImagePositionPatient = [float(v) for v in position]
            item.ImageOrientationPatient = [float(v) for v in (*ROW_COSINE, *COLUMN_COSINE)]
            items.append(item)
        block.add_new(0x51, "SQ", DicomSequence(items))
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return dataset


def test_uih_grid_dwi_without_instance_position_converts_from_its_private_geometry() -> None:
    rng = np.random.default_rng(8)
    b0_slices, b1000_slices = (rng.integers(0, 4000, size=(SLICES, TILE_ROWS, TILE_COLUMNS), dtype=np.uint16) for _ in "ab")
    series = [grid_image(0.0, 1, b0_slices), grid_image(1000.0, 2, b1000_slices)]
    assert all("ImagePositionPatient" not in ds and "ImageOrientationPatient" not in ds for ds in series)
    assert series[0].private_block(0x0065, UIH).block_start == 0x1100  # not the usual block

    assert all(is_mosaic(ds) and mosaic_image_count(ds) == SLICES for ds in series)
    assert diffusion_info(series[1]).b_value == 1000.0 and diffusion_info(series[1]).direction == (0.0, 0.0, 1.0)
    assert [key.b_value for keys in volume_keys(series) for key in keys] == [0.0, 1000.0]

    b0, b1000 = series_volumes(series)
    for volume, slices in ((b0, b0_slices), (b1000, b1000_slices)):
        tiles = [source.mosaic_tile for source in volume.sources]
        assert tiles in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0])  # highdicom stacks right-handed: either way
        assert np.array_equal(volume.stored.array, slices[tiles])
        assert volume.spacing_mm == pytest.approx((4.5, 2.0, 1.5))
        corners = volume.stored.map_indices_to_reference(np.array([[k, 0, 0] for k in range(SLICES)]))
        np.testing.assert_allclose(corners, POSITIONS[tiles], atol=1e-6)
        np.testing.assert_allclose(volume.stored.direction[:, 2], ROW_COSINE, atol=1e-9)  # columns run along rows
    assert b1000.key.b_value == 1000.0


def test_uih_grid_without_slice_items_or_position_is_still_refused() -> None:
    slices = np.ones((SLICES, TILE_ROWS, TILE_COLUMNS), dtype=np.uint16)
    series = [grid_image(0.0, 1, slices, with_items=False), grid_image(1000.0, 2, slices, with_items=False)]
    assert not is_mosaic(series[0])  # a slice count alone places nothing
    with pytest.raises(VolumeNotProcessed, match="lacks position, orientation or spacing"):
        series_volumes(series)
