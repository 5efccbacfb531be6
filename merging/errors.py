"""Errors of the merging package. All are ``ValueError``s whose message names the file or input."""


class MergeError(ValueError):
    """Base class: bad input to a merging operation."""


class CheckpointError(MergeError):
    """A checkpoint file or folder is missing, malformed, truncated or holds bad values."""


class MismatchError(MergeError):
    """Two checkpoints that must line up (base / fine-tuned) differ in keys, shapes or dtypes."""


class FingerprintMismatchError(MergeError):
    """A delta (or other file) was built for a different base model than the one given."""


class OutputError(MergeError):
    """The output cannot be written (unwritable folder, disk full, exists already)."""
