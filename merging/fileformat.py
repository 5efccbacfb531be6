"""The MotionDial file header: every single-file module MotionDial writes (delta, motion
embedder, learned estimator, text adapter) is a ``.safetensors`` file whose string metadata
holds ``format`` (a name such as ``"motiondial.delta"``) and ``format_version`` (an integer as
a string), next to the config needed to rebuild the module.

This module reads and checks that header and writes such files atomically, once for all
packages; each caller passes its own error class and a word for what the file should be
(``what="text adapter"``), so messages stay specific to the caller.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import torch

__all__ = ["check_format", "read_metadata", "save_safetensors_atomic"]


def check_format(
    meta: Mapping[str, str],
    path: str,
    *,
    format: str,
    version: int,
    what: str,
    error: type[Exception] = ValueError,
) -> int:
    """Raise ``error`` naming ``path`` unless ``meta`` says ``format`` at exactly ``version``.

    Returns the version as an ``int``.
    """
    if meta.get("format") != format:
        raise error(f"{path}: not a MotionDial {what} (format {meta.get('format')!r}, expected {format!r})")
    raw = meta.get("format_version")
    try:
        found = int(raw) if raw is not None else None
    except ValueError:
        found = None
    if found != version:
        raise error(f"{path}: {what} format version {raw!r} is not supported (expected {version})")
    return found


def read_metadata(
    path: str | os.PathLike,
    *,
    format: str,
    version: int,
    what: str,
    error: type[Exception] = ValueError,
) -> dict[str, str]:
    """The string metadata of a MotionDial ``.safetensors`` file, header only (no tensors read).

    A missing file, an unreadable or corrupt header, another format or an unsupported version
    raise ``error`` with a message naming the file and ``what`` it should be.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{what} file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several error types for a corrupt header
        raise error(f"{path}: not a readable safetensors file ({e})") from None
    check_format(meta, path, format=format, version=version, what=what, error=error)
    return meta


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` with string ``metadata`` to ``path`` via a temporary file in the same
    folder and ``os.replace``, so an interrupted write never leaves a half-written file.
    Creates the folder if needed; returns ``path`` as a string.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        # mkstemp (and save_file, which recreates the file) leave it 0600; give it the
        # permissions an ordinary write would. After save_file, or the mode is lost.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
