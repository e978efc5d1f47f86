"""Geometry oracle (design.md §4): every shared series with a dcm2niix NIfTI, split and assembled by the node.

Split volume k must equal `ref[..., k]` in stored values (the NIfTI's raw integers, before its scl_slope), and
the affines must agree within 1e-3 mm and 1e-5 in direction cosines after `nibabel.as_closest_canonical` on both.
Secondary Capture series (XA30 15001, colour FA) have no geometry oracle and are left out. nibabel's siemens_dwi
mosaics have no reference NIfTI: nibabel.nicom's MosaicWrapper (an independent implementation) is their oracle.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_gateway.mosaic import is_mosaic, mosaic_image_count
from dicom_gateway.volumes import SeriesVolume, series_volumes, volume_to_nifti
from models.geometry import slice_normal, swap_ras_lps

AFFINE_ATOL_MM = 1e-3
COSINE_ATOL = 1e-5
PHILIPS_REF = "ref_generated_dcm2niix_v1.0.20260724"

# (shared folder, series folder under it, reference NIfTI (gunzipped name), volume index of ref[..., 0])
CASES = [
    ("dcm_qa_xa30i", "dicom/11001_DWI_dir80_AP", "ref/11001_DWI_dir80_AP.nii", 0),
    ("dcm_qa_xa30i", "dicom/12001_DWI_dir80_AP", "ref/12001_DWI_dir80_AP.nii", 0),
    ("dcm_qa_xa30i", "dicom/13001_DWI_dir80_AP", "ref/13001_DWI_dir80_AP.nii", 0),
    ("dcm_qa_xa30i", "dicom/14001_DWI_dir80_AP", "ref/14001_DWI_dir80_AP.nii", 0),
    ("dcm_qa_xa30i", "dicom/17001_DWI_dir80_AP", "ref/17001_DWI_dir80_AP.nii", 0),
    ("dcm_qa_xa30i", "dicom/5001_anat-T1w_acq-tfl", "ref/5001_anat-T1w_acq-tfl.nii", 0),
    ("dcm_qa_canon_61", "dicom/cl_3000_DTI_PA-ortho", "ref/3000_DTI_PA-ortho_cl.nii", 0),
    ("dcm_qa_canon_61", "dicom/enh_3000_DTI_PA-ortho", "ref/3000_DTI_PA-ortho_enh.nii", 0),
    ("dcm_qa_philips_dwi", "dicom/cl/DICOM", f"{PHILIPS_REF}/701_DTI_Biobank_2mm_MB3S2_EPI.nii", 0),
    ("dcm_qa_ge", "dicom/01_Ax_DWI_TENSOR_R2", "ref/Ax_DWI_TENSOR_R2_1.nii", 0),
    ("dcm_qa_ge", "dicom/04_Ax_DWI_TENSOR_R2MB2", f"{PHILIPS_REF}/4_Brain_Advanced_Sequences.nii", 0),
    ("dcm_qa_enh", "dicom/Siemens/XA10", "ref/Siemens_REST1_w_SMS_PF7-8_6.nii", 0),
    ("dcm_qa_enh", "dicom/Philips", "ref/Philips_WIP_B0_NS_801_e1.nii", 0),  # magnitude frames
    ("dcm_qa_enh", "dicom/Philips", "ref/Philips_WIP_B0_NS_801_e2_fieldmaphz.nii", 1),  # field-map frames
]


def read_series(folder: Path) -> dict[str, list[pydicom.Dataset]]:
    """Image datasets of a folder by Series Instance UID (DICOMDIR, presentation states and the like skipped)."""
    series: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == "DICOMDIR":
            continue
        dataset = pydicom.dcmread(path)
        if "PixelData" in dataset:
            series.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    return series


def reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Canonical stored values (4-D) and canonical affine of a dcm2niix NIfTI."""
    image = nib.load(path)
    stored = np.asarray(image.dataobj.get_unscaled())
    if stored.ndim == 3:
        stored = stored[..., None]
    canonical = nib.as_closest_canonical(nib.Nifti1Image(stored, image.affine))
    return np.asarray(canonical.dataobj), canonical.affine


def canonical(volume: SeriesVolume) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(volume_to_nifti(volume.stored))
    return np.asarray(image.dataobj), image.affine


def ref_b_values(path: Path) -> list[float] | None:
    bval = path.with_suffix(".bval")
    return [float(b) for b in bval.read_text().split()] if bval.exists() else None


def assert_affine_close(ours: np.ndarray, ref: np.ndarray, *, translation_atol: float = AFFINE_ATOL_MM) -> None:
    zooms_ours, zooms_ref = np.linalg.norm(ours[:3, :3], axis=0), np.linalg.norm(ref[:3, :3], axis=0)
    np.testing.assert_allclose(zooms_ours, zooms_ref, atol=AFFINE_ATOL_MM)
    np.testing.assert_allclose(ours[:3, :3] / zooms_ours, ref[:3, :3] / zooms_ref, atol=COSINE_ATOL)
    np.testing.assert_allclose(ours[:3, :3], ref[:3, :3], atol=AFFINE_ATOL_MM)
    np.testing.assert_allclose(ours[:3, 3], ref[:3, 3], atol=translation_atol)


@pytest.mark.parametrize(
    ("shared", "series_dir", "ref_name", "first_volume"),
    CASES,
    ids=[f"{shared}:{Path(ref).stem}" for shared, _, ref, _ in CASES],
)
def test_split_volumes_match_dcm2niix(shared_dicom, shared, series_dir, ref_name, first_volume):
    root = shared_dicom(shared)
    series = read_series(root / series_dir)
    assert len(series) == 1, f"{series_dir}: expected one image series, found {len(series)}"
    volumes = series_volumes(next(iter(series.values())))
    ref_path = root / ref_name
    ref_values, ref_affine = reference(ref_path)

    n_ref = ref_values.shape[3]
    if n_ref > 1:
        assert len(volumes) == n_ref, f"{len(volumes)} volumes, the reference has {n_ref}"
    b_values = ref_b_values(ref_path)
    if b_values is not None:
        assert [v.key.b_value for v in volumes[first_volume : first_volume + n_ref]] == [
            0.0 if b < 50 else round(b / 5) * 5 for b in b_values
        ]

    for k in range(n_ref):
        volume = volumes[first_volume + k]
        values, affine = canonical(volume)
        assert values.shape == ref_values.shape[:3], f"volume {k}: shape {values.shape}"
        assert np.array_equal(values, ref_values[..., k]), f"volume {k} ({volume.label()}): stored values differ"
        if ref_name.startswith("ref/5001_"):
            # dcm2niix places the far end of this sagittal stack at slice 0 + 95 × (first-pair spacing 2.0001 mm);
            # the DICOM positions themselves step 2.0001 once and 2.0000 after, so its last slice is 0.0101 mm off.
            assert_affine_close(affine, ref_affine, translation_atol=0.011)
            positions = [float(ds.ImagePositionPatient[0]) for ds in volume.reference_datasets]
            assert -affine[0, 3] == pytest.approx(max(positions), abs=1e-4)  # RAS x of voxel 0 = −LPS x
        else:
            assert_affine_close(affine, ref_affine)
        assert_sources_in_slice_order(volume)


def assert_sources_in_slice_order(volume: SeriesVolume) -> None:
    """Slice i's source is the instance (or frame) whose position is slice i's position in the volume."""
    n_slices = volume.stored.spatial_shape[0]
    assert len(volume.sources) == len(volume.reference_datasets) == n_slices
    assert len(set(volume.sources)) == n_slices
    corners = volume.stored.map_indices_to_reference(np.array([[i, 0, 0] for i in range(n_slices)]))
    for i, (source, dataset) in enumerate(zip(volume.sources, volume.reference_datasets, strict=True)):
        assert dataset.SOPInstanceUID == source.sop_instance_uid
        if source.frame_number is not None:
            frame = dataset.PerFrameFunctionalGroupsSequence[source.frame_number - 1]
            position = frame.PlanePositionSequence[0].ImagePositionPatient
        else:
            position = dataset.ImagePositionPatient
        np.testing.assert_allclose(corners[i], [float(x) for x in position], atol=1e-3)


@pytest.mark.parametrize("name", ["siemens_dwi_0", "siemens_dwi_1000"])
def test_nibabel_siemens_dwi_mosaics_match_nibabels_mosaic_wrapper(shared_dicom, name):
    """No reference NIfTI ships with these; nibabel.nicom's MosaicWrapper is the independent oracle instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel.nicom: "DICOM readers are highly experimental"
        from nibabel.nicom.dicomwrappers import wrapper_from_data

    dataset = pydicom.dcmread(shared_dicom("pypi/nibabel_5.4.2") / f"{name}.dcm")
    (volume,) = series_volumes([dataset])
    assert volume.key.b_value == float(name.rsplit("_", 1)[1])
    wrapper = wrapper_from_data(dataset)
    expected = nib.as_closest_canonical(nib.Nifti1Image(wrapper.get_unscaled_data(), swap_ras_lps(wrapper.affine)))
    values, affine = canonical(volume)
    assert values.shape == (128, 128, 48)
    assert np.array_equal(values, np.asarray(expected.dataobj))
    assert_affine_close(affine, expected.affine)


def test_uih_grid_unpacks_row_by_row_with_its_own_slice_positions():
    """A UIH grid (no shared sample here): 5 slices in a 2 × 3 grid, positions from (0065,xx51), oblique planes.

    The layout follows GDCM's SplitUihGridFilter: ceil(√5) = 3 tiles per grid row, filled row by row.
    """
    rng = np.random.default_rng(3)
    slices = rng.integers(0, 4000, size=(5, 4, 6), dtype=np.uint16)
    row_cosine = np.array([np.cos(0.2), np.sin(0.2), 0.0])
    column_cosine = np.array([-np.sin(0.2) * np.cos(0.3), np.cos(0.2) * np.cos(0.3), -np.sin(0.3)])
    normal = slice_normal(np.concatenate([row_cosine, column_cosine]))
    positions = np.array([10.0, -20.0, 30.0]) + np.arange(5)[:, None] * 4.5 * normal
    grid = np.zeros((8, 18), dtype=np.uint16)
    for k in range(5):
        r, c = divmod(k, 3)
        grid[r * 4 : (r + 1) * 4, c * 6 : (c + 1) * 6] = slices[k]

    dataset = Dataset()
    dataset.SOPClassUID = pydicom.uid.MRImageStorage
    dataset.SOPInstanceUID, dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.2"
    dataset.StudyInstanceUID, dataset.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.3", "1.2.826.0.1.3680043.2.4"
    dataset.Modality, dataset.Manufacturer, dataset.ImageType = "MR", "UIH", ["ORIGINAL", "PRIMARY", "M"]
    dataset.ImageOrientationPatient = [float(v) for v in (*row_cosine, *column_cosine)]
    dataset.ImagePositionPatient = [float(v) for v in positions[0]]
    dataset.PixelSpacing = [2.0, 1.5]
    dataset.Rows, dataset.Columns = grid.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.PixelData = grid.tobytes()
    block = dataset.private_block(0x0065, "Image Private Header", create=True)
    block.add_new(0x50, "DS", "5")
    items = []
    for position in positions:
        item = Dataset()
        item.ImagePositionPatient = [float(v) for v in position]
        items.append(item)
    block.add_new(0x51, "SQ", DicomSequence(items))
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian

    assert is_mosaic(dataset) and mosaic_image_count(dataset) == 5
    (volume,) = series_volumes([dataset])
    tiles = [source.mosaic_tile for source in volume.sources]
    assert tiles in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0])  # highdicom stacks right-handed: either way along the normal
    assert np.array_equal(volume.stored.array, slices[tiles])
    assert volume.spacing_mm == pytest.approx((4.5, 2.0, 1.5))
    corners = volume.stored.map_indices_to_reference(np.array([[k, 0, 0] for k in range(5)]))
    np.testing.assert_allclose(corners, positions[tiles], atol=1e-6)
