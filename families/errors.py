"""Errors raised when a folder is not a model we can use. Messages name the path."""


class ModelFolderError(ValueError):
    """A folder is not a usable diffusers-format model (missing, malformed, incomplete)."""


class UnsupportedFamilyError(ModelFolderError):
    """A valid diffusers folder whose pipeline class MotionDial does not support."""
