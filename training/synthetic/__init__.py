"""Synthetic brain-MRI studies (numpy/scipy/nibabel/pydicom only, so limited-center nodes can use them)."""

from training.synthetic.case import IMAGE_KEYS, GroundTruthLesion, SiteProfile, SyntheticCase
from training.synthetic.generate import DEFAULT_SITES, derived_seed, generate_case, generate_site
from training.synthetic.nifti import write_nifti_case

__all__ = [
    "DEFAULT_SITES",
    "IMAGE_KEYS",
    "GroundTruthLesion",
    "SiteProfile",
    "SyntheticCase",
    "derived_seed",
    "generate_case",
    "generate_site",
    "write_nifti_case",
]
