"""The dcm_qa_ts mosaic in every transfer syntax: decoded with the base-install decoders and unpacked to the same
64×64×35 volume as its reference NIfTI (stored values, affine as in tests/test_volumes_geometry.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_gateway.mosaic import is_mosaic, mosaic_image_count, unpack_mosaic
from dicom_gateway.volumes import ValueSource, series_volumes, volume_to_nifti
from tests.test_volumes_geometry import assert_affine_close, reference

FILES = [str(n) for n in range(1, 10)]
EXPECTED_SYNTAXES = {
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
}


def test_the_nine_files_cover_seven_transfer_syntaxes(shared_dicom):
    root = shared_dicom("dcm_qa_ts")
    syntaxes = {
        pydicom.dcmread(root / "dicom" / f"{n}.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID
        for n in FILES
    }
    assert syntaxes == EXPECTED_SYNTAXES


@pytest.mark.parametrize("number", FILES)
def test_mosaic_decodes_and_unpacks_to_reference(shared_dicom, number):
    root = shared_dicom("dcm_qa_ts")
    dataset = pydicom.dcmread(root / "dicom" / f"{number}.dcm")
    assert is_mosaic(dataset) and mosaic_image_count(dataset) == 35
    (volume,) = series_volumes([dataset])
    assert volume.stored.spatial_shape == (35, 64, 64)
    assert volume.spacing_mm == pytest.approx((3.6, 3.25, 3.25), abs=1e-6)  # SliceThickness is 3 mm: a gap
    assert volume.value_source in (ValueSource.STORED, ValueSource.RESCALE)
    # slice i's source tile is the tile at slice i's position
    tiles = unpack_mosaic(dataset)
    corners = volume.stored.map_indices_to_reference(np.array([[i, 0, 0] for i in range(35)]))
    assert sorted(s.mosaic_tile for s in volume.sources) == list(range(35))
    for corner, source in zip(corners, volume.sources, strict=True):
        np.testing.assert_allclose(corner, tiles.positions[source.mosaic_tile], atol=1e-4)

    ref_values, ref_affine = reference(root / "ref" / f"{number}.nii")
    image = nib.as_closest_canonical(volume_to_nifti(volume.stored))
    values = np.asarray(image.dataobj)
    assert values.shape == (64, 64, 35) == ref_values.shape[:3]
    assert np.array_equal(values, ref_values[..., 0])
    assert_affine_close(image.affine, ref_affine)
