"""The delta file format: weight differences against a named base model.

A delta is one ``.safetensors`` file (or shards with a ``.safetensors.index.json``) whose keys
are the denoiser's state-dict keys without a component prefix, holding ``W_new - W_base`` for
the keys in its scope (keys absent = zero). ``__metadata__`` (all strings, JSON where
structured):

* ``format`` = ``"motiondial.delta"``, ``format_version`` = ``"1"``;
* ``name`` (``"dynamics"``, ``"control"``, ...), ``recipe`` (``"ed"``, ``"task_vector"``, ...);
* ``params``: JSON of every coefficient of the recipe; ``seed`` (DARE masks);
* ``scope``: JSON ``{"scope": "all"|"temporal"|regex, "n_keys": ...}``;
* ``dtype`` (storage of the delta, e.g. ``"bf16"``), ``arithmetic`` = ``"fp32"``;
* ``family`` (``"cogvideox-i2v"``... or ``""``), ``base_fingerprint`` (JSON, see
  ``merging.fingerprint``) and, when built from one, ``finetuned_fingerprint`` (summary only).

``load_delta`` refuses a delta whose base fingerprint does not match the model it is given.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .engine import short_dtype
from .errors import CheckpointError, OutputError
from .fileformat import check_format
from .fingerprint import check_fingerprint
from .safetensors_io import SafetensorsWriter

__all__ = ["DELTA_FORMAT", "DELTA_VERSION", "Delta", "delta_metadata", "save_delta", "load_delta", "load_deltas", "read_delta_metadata"]

DELTA_FORMAT = "motiondial.delta"
DELTA_VERSION = 1
_JSON_FIELDS = ("params", "scope", "base_fingerprint", "finetuned_fingerprint", "extra")


def compact_fingerprint(fp: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint without its per-tensor table (enough to identify, not to explain)."""
    return {k: v for k, v in fp.items() if k != "tensors"}


def delta_metadata(
    *,
    name: str,
    recipe: str,
    params: Mapping[str, Any],
    seed: int | None,
    scope: str,
    n_keys: int,
    dtype: torch.dtype,
    family: str | None,
    base_fingerprint: Mapping[str, Any],
    finetuned_fingerprint: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The ``__metadata__`` strings of a delta file (see the module docstring)."""
    meta = {
        "format": DELTA_FORMAT,
        "format_version": str(DELTA_VERSION),
        "name": name,
        "recipe": recipe,
        "params": json.dumps(dict(params), sort_keys=True),
        "seed": "" if seed is None else str(int(seed)),
        "scope": json.dumps({"scope": scope, "n_keys": int(n_keys)}),
        "dtype": short_dtype(dtype),
        "arithmetic": "fp32",
        "family": family or "",
        "base_fingerprint": json.dumps(dict(base_fingerprint), separators=(",", ":")),
    }
    if finetuned_fingerprint is not None:
        meta["finetuned_fingerprint"] = json.dumps(compact_fingerprint(finetuned_fingerprint), separators=(",", ":"))
    if extra:
        meta["extra"] = json.dumps(dict(extra), sort_keys=True)
    return meta


def _parse_metadata(raw: Mapping[str, str], path: str) -> dict[str, Any]:
    # Deltas may be sharded (index + several files), so the header is read by ``open_checkpoint``;
    # only the check is shared with the single-file formats.
    version = check_format(raw, path, format=DELTA_FORMAT, version=DELTA_VERSION, what="delta", error=CheckpointError)
    meta: dict[str, Any] = dict(raw)
    meta["format_version"] = version
    try:
        for k in _JSON_FIELDS:
            if k in meta and meta[k]:
                meta[k] = json.loads(meta[k])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed delta metadata field ({e})") from None
    meta["seed"] = int(meta["seed"]) if meta.get("seed") else None
    return meta


@dataclass(eq=False)
class Delta(Mapping[str, torch.Tensor]):
    """A loaded delta: a read-only mapping key -> tensor (stored dtype), plus its metadata.

    With ``lazy=True`` tensors are read from disk on each access (no copy kept), which keeps
    memory low for large deltas that the patcher reads only when the weights change.
    """

    name: str
    path: str
    metadata: dict[str, Any]
    _checkpoint: Checkpoint
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def base_fingerprint(self) -> dict[str, Any]:
        return self.metadata.get("base_fingerprint") or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        if key not in self._checkpoint.tensors:
            raise KeyError(key)
        return self._checkpoint.read(key)

    def __contains__(self, key: object) -> bool:  # without reading the tensor (lazy deltas)
        return key in self._checkpoint.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._checkpoint.tensors)

    def __len__(self) -> int:
        return len(self._checkpoint.tensors)

    def check_base(self, base_fingerprint: Mapping[str, Any]) -> None:
        """Raise ``FingerprintMismatchError`` unless this delta was built for that base."""
        check_fingerprint(self.base_fingerprint, base_fingerprint, f"delta {self.name!r} ({self.path})")


def read_delta_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed metadata of a delta (file, index or folder holding one delta). Reads headers only."""
    ckpt = open_checkpoint(path)
    return _parse_metadata(ckpt.metadata, ckpt.files[0])


def load_delta(path: str | os.PathLike, base_fingerprint: Mapping[str, Any] | None = None, *, lazy: bool = False) -> Delta:
    """Load a delta; with ``base_fingerprint`` refuse it unless it was built for that base.

    Args:
        path: ``x.safetensors``, ``x.safetensors.index.json``, or a folder holding one delta.
        base_fingerprint: the model's fingerprint (``I2VModel.fingerprint()`` or
            ``fingerprint_checkpoint(folder)``); ``None`` skips the check.
        lazy: read tensors on access instead of now.
    """
    path = os.fspath(path)
    ckpt = open_checkpoint(path)
    meta = _parse_metadata(ckpt.metadata, ckpt.files[0])
    delta = Delta(meta.get("name") or os.path.basename(path).split(".")[0], path, meta, ckpt)
    if base_fingerprint is not None:
        delta.check_base(base_fingerprint)
    if not lazy:
        delta._tensors = dict(ckpt.iter_tensors())
    return delta


def load_deltas(folder: str | os.PathLike, base_fingerprint: Mapping[str, Any] | None = None, *, lazy: bool = False) -> dict[str, Delta]:
    """Every delta in a ``merging.build`` output folder, by name (``{"dynamics": ..., "control": ...}``)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder of deltas")
    names = sorted(os.listdir(folder))
    found: dict[str, Delta] = {}
    for n in names:
        if n.endswith(".safetensors.index.json") or (n.endswith(".safetensors") and "-of-" not in n):
            if open_checkpoint(os.path.join(folder, n)).metadata.get("format") != DELTA_FORMAT:
                continue  # e.g. merged model weights written next to the deltas
            d = load_delta(os.path.join(folder, n), base_fingerprint, lazy=lazy)
            if d.name in found:
                raise CheckpointError(f"{folder}: two deltas named {d.name!r}")
            found[d.name] = d
    if not found:
        raise CheckpointError(f"{folder}: holds no MotionDial delta files")
    return found


def save_delta(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    name: str,
    base_fingerprint: Mapping[str, Any],
    recipe: str = "manual",
    params: Mapping[str, Any] | None = None,
    seed: int | None = None,
    scope: str = "all",
    family: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> str:
    """Write an in-memory delta as one ``.safetensors`` file, atomically (temp name, then rename).

    ``tensors`` are converted to ``dtype`` (default: each tensor's own dtype must be one
    floating type). Non-finite values are refused, naming the key.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise OutputError(f"{path}: a delta file name must end in .safetensors")
    if os.path.exists(path) and not overwrite:
        raise OutputError(f"{path} already exists")
    if not tensors:
        raise ValueError(f"{path}: a delta needs at least one tensor")
    dtypes = {t.dtype for t in tensors.values()}
    if dtype is None:
        if len(dtypes) != 1:
            raise ValueError(f"{path}: tensors have several dtypes {sorted(map(str, dtypes))}; pass dtype=")
        dtype = next(iter(dtypes))
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: delta tensor {k!r} is not floating point ({t.dtype})")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: delta tensor {k!r} holds non-finite values (NaN or Inf)")
    meta = delta_metadata(
        name=name, recipe=recipe, params=params or {}, seed=seed, scope=scope, n_keys=len(tensors),
        dtype=dtype, family=family, base_fingerprint=base_fingerprint,
    )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path}: the folder {folder} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    entries = {k: (dtype, tuple(t.shape)) for k, t in tensors.items()}
    try:
        w = SafetensorsWriter(tmp, entries, meta)
    except PermissionError:
        raise OutputError(f"cannot write {path}: the folder {folder} is not writable") from None
    try:
        for k, t in tensors.items():
            if t.numel():
                w.write(k, t.detach().to("cpu", dtype).reshape(-1))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.abort()
        raise
    return path
