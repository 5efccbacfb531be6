"""Facts about the image-to-video model families MotionDial supports.

A leaf package (it imports nothing else of ours) so that both ``pipelines`` (which loads and
samples models) and ``merging`` (which only sees checkpoints on disk) agree on the same facts:
how a family is recognised from ``model_index.json``, which denoiser parameters are temporal,
where the timestep embedding can be hooked, and how the family's timestep maps onto the common
noise-level scale (0 = clean, 1 = pure noise) that schedules use.
"""
from .errors import ModelFolderError, UnsupportedFamilyError
from .registry import FAMILIES, Family, FamilyMatch, detect_family, get_family
from .noise import noise_level_from_timestep

__all__ = [
    "FAMILIES",
    "Family",
    "FamilyMatch",
    "ModelFolderError",
    "UnsupportedFamilyError",
    "detect_family",
    "get_family",
    "noise_level_from_timestep",
]
