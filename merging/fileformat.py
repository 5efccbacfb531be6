"""The MotionDial file header: every single-file module MotionDial writes (delta, motion
embedder, learned estimator, text adapter) is a ``.safetensors`` file whose string metadata
holds ``format`` (a name such as ``"motiondial.delta"``) and ``format_version`` (an integer as
a string), next to the config needed to rebuild the module.

This module reads and checks that header and writes such files atomically, once for all
packages; each caller passes its own error class and a word for what the file should be
(``what="text adapter"``), so messages stay specific to the caller. ``atomic_path`` is the one
"temporary name, then rename" used for every output the library writes (videos, caches,
side-car JSON, checkpoints).
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

__all__ = ["atomic_path", "check_format", "read_metadata", "save_safetensors_atomic"]


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


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str],
                            *, fsync: bool = False) -> str:
    """Write ``tensors`` with string ``metadata`` to ``path`` via a temporary file in the same
    folder and ``os.replace``, so an interrupted write never leaves a half-written file.
    Creates the folder if needed; returns ``path`` as a string. ``fsync`` flushes the data to
    disk before the rename (checkpoints: a power cut then leaves the old file or the new one).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    with atomic_path(path) as tmp:
        # safetensors creates its files 0600; give the output the mode an ordinary open() gets
        # here (umask respected), read off an empty file created the ordinary way.
        open(tmp, "wb").close()
        mode = os.stat(tmp).st_mode & 0o777
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """Yield a fresh temporary path beside ``path``; when the block succeeds it is renamed onto
    ``path`` (``os.replace``, atomic on one file system), when it fails it is removed.

    The caller creates the file itself (``open``, ``save_file``, a video writer), so it gets the
    permissions an ordinary write would (``mkstemp`` would force 0600). ``suffix`` ends the
    temporary name, for writers that pick a container from the extension (``".mp4"``).
    The folder is created if needed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
