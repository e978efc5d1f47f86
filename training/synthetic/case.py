"""The synthetic case: what the phantom generator produces and the NIfTI/DICOM writers consume.

Coordinates: `affine` maps voxel indices (i, j, k) of every array in `images` and `mask` to patient RAS+
millimetres (NIfTI convention: +x towards the patient's Right, +y Anterior, +z Superior). The head's mid-sagittal
plane is x = 0, so a lesion in the patient's left hemisphere has x < 0. DICOM writers convert to LPS themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from models.geometry import affine_spacing

Side = Literal["left", "right"]
CaseKind = Literal["stroke", "ms"]
Geometry = Literal["axial", "flipped", "oblique", "sagittal"]

# Image keys a case may carry; writers write what is present.
#   dwi_b0, dwi_b1000: diffusion-weighted magnitude (arbitrary units); adc: 10⁻⁶ mm²/s (µm²/s), float32;
#   flair: T2-FLAIR; t1_flair: T1-weighted FLAIR (a negative fixture for the FLAIR role).
IMAGE_KEYS = ("dwi_b0", "dwi_b1000", "adc", "flair", "t1_flair")


@dataclass(frozen=True)
class GroundTruthLesion:
    """One ground-truth lesion. `label` is its value in `SyntheticCase.lesion_labels`."""

    label: int
    kind: Literal["infarct", "ms"]
    side: Side  # patient's side, from the centroid's RAS x (x < 0 → left)
    centroid_ras_mm: tuple[float, float, float]
    volume_ml: float
    location: str = ""  # e.g. "MCA territory", "periventricular", "juxtacortical"


@dataclass(frozen=True)
class SiteProfile:
    """Per-site domain shift (a scanner/protocol): applied when a case is acquired."""

    name: str = "site-0"
    intensity_scale: float = 1.0
    bias_strength: float = 0.0  # peak relative amplitude of a smooth multiplicative bias field
    noise_sigma: float = 0.02  # Rician noise, relative to white-matter signal
    in_plane_mm: float = 2.0
    slice_thickness_mm: float = 2.0
    slice_spacing_mm: float = 2.0  # > thickness means a gap between slices
    contrast_gamma: float = 1.0


@dataclass
class SyntheticCase:
    case_id: str
    kind: CaseKind
    seed: int
    geometry: Geometry
    affine: np.ndarray  # 4×4 voxel → RAS+ mm, shared by all arrays below
    images: dict[str, np.ndarray]  # keys from IMAGE_KEYS, float32, all the same shape
    lesion_labels: np.ndarray  # int16, 0 background, GroundTruthLesion.label inside each lesion
    lesions: list[GroundTruthLesion]
    site: SiteProfile = field(default_factory=SiteProfile)
    skull_stripped: bool = False
    slice_thickness_mm: float = 2.0  # may be smaller than the slice spacing (a gap)
    brain_mask: np.ndarray | None = None  # uint8, intracranial (brain + CSF) on the grid: tests and skull-stripping
    anatomy_source: str = ""  # "mni152" or "procedural": the same seed differs between them

    @property
    def mask(self) -> np.ndarray:
        """Binary lesion mask (uint8), the ground truth the metrics compare against."""
        return (self.lesion_labels > 0).astype(np.uint8)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in affine_spacing(self.affine))  # type: ignore[return-value]
