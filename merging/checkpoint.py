"""Resolve a path to the safetensors tensors it holds: a file, a sharded index, or a model folder.

Accepted inputs:

* ``x.safetensors``: a single file;
* ``x.safetensors.index.json``: a sharded checkpoint (diffusers/transformers ``weight_map``);
* a component folder (``transformer/``, ``unet/``, or a folder we wrote) holding one
  ``*.safetensors.index.json`` or one ``*.safetensors`` file;
* a diffusers model folder (with ``model_index.json``): its **denoiser** component, found with
  ``families.detect_family`` (``transformer/`` for CogVideoX, ``unet/`` for SVD).

Keys are the denoiser's state-dict keys, without a component prefix. Nothing here reads tensor
data; ``Checkpoint.iter_tensors`` reads one tensor at a time, opening each shard once.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from families import Family, ModelFolderError, detect_family

from .errors import CheckpointError
from .safetensors_io import TensorInfo, read_elements, read_header, read_tensor

__all__ = ["Checkpoint", "open_checkpoint", "find_weight_files"]

_PREFERRED = ("diffusion_pytorch_model", "model")


@dataclass
class Checkpoint:
    """The tensors of one checkpoint, by key, with where each lives. No tensor data is held.

    Attributes:
        path: what the user gave.
        files: the safetensors files, in shard order.
        tensors: key -> ``TensorInfo`` (file, dtype, shape, byte range), in file order.
        metadata: the ``__metadata__`` of the first file.
        family: the model family when ``path`` was a diffusers model folder, else ``None``.
        component_dir: the folder holding the weights when known (for copying ``config.json``).
    """

    path: str
    files: list[str]
    tensors: "OrderedDict[str, TensorInfo]"
    metadata: dict[str, str] = field(default_factory=dict)
    family: Family | None = None
    component_dir: str | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors.values())

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` in the given order (default: file order), stored dtype.

        Each shard is opened once for a run of keys that live in it and closed when the run
        ends, so no handle (and no mapping) outlives its use.
        """
        keys = list(self.tensors) if keys is None else list(keys)
        f = None
        current = None
        try:
            for key in keys:
                info = self.tensors[key]
                if info.file != current:
                    if f is not None:
                        f.close()
                    f = open(info.file, "rb")
                    current = info.file
                yield key, read_tensor(f, info)
        finally:
            if f is not None:
                f.close()

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor (stored dtype)."""
        info = self.tensors[key]
        with open(info.file, "rb") as f:
            return read_tensor(f, info)

    def read_elements(self, key: str, flat_indices: Iterable[int]) -> list[float]:
        """Read single elements of one tensor as floats (for fingerprints)."""
        info = self.tensors[key]
        with open(info.file, "rb") as f:
            return read_elements(f, info, flat_indices)


def find_weight_files(folder: str) -> str:
    """The index or single safetensors file inside a component folder; errors name the folder."""
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    singles = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) > 1:
        preferred = [n for n in indexes if n.split(".")[0] in _PREFERRED]
        indexes = preferred if len(preferred) == 1 else indexes
    if len(indexes) == 1:
        return os.path.join(folder, indexes[0])
    if indexes:
        raise CheckpointError(f"{folder}: several sharded indexes {indexes}; give the one to use")
    if len(singles) > 1:
        preferred = [n for n in singles if n.rsplit(".", 1)[0] in _PREFERRED]
        singles = preferred if len(preferred) == 1 else singles
    if len(singles) == 1:
        return os.path.join(folder, singles[0])
    if singles:
        raise CheckpointError(f"{folder}: several .safetensors files {singles}; give the one to use")
    other = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {other}: only safetensors is loaded, never pickle)" if other else ""
    raise CheckpointError(f"{folder}: no .safetensors weights found{hint}")


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt index, not valid JSON ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path}: corrupt index, expected a non-empty 'weight_map'")
    return wm


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint (file, sharded index, component folder or diffusers model folder).

    Validates every shard's header (truncation, corrupt JSON, index entries that point to a
    missing file or a key absent from its shard) and raises ``CheckpointError`` naming the file.
    """
    path = os.fspath(path)
    family = None
    target = path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            try:
                match = detect_family(path)
            except ModelFolderError as e:
                raise CheckpointError(str(e)) from None
            family = match.family
            target = os.path.join(path, family.denoiser)
        target = find_weight_files(target)
    elif not os.path.exists(path):
        raise CheckpointError(f"{path}: does not exist (expected a .safetensors file, an index or a model folder)")
    component_dir = os.path.dirname(os.path.abspath(target))

    tensors: OrderedDict[str, TensorInfo] = OrderedDict()
    metadata: dict[str, str] = {}
    if target.endswith(".index.json"):
        wm = _read_index(target)
        folder = os.path.dirname(target)
        files = list(OrderedDict.fromkeys(wm.values()))
        headers = {}
        for name in files:
            fpath = os.path.join(folder, name)
            if os.path.basename(name) != name:
                raise CheckpointError(f"{target}: shard name {name!r} must be a plain file name")
            headers[name], meta = read_header(fpath)
            metadata = metadata or meta
        for key, name in wm.items():
            info = headers[name].get(key)
            if info is None:
                raise CheckpointError(f"{target}: index maps {key!r} to {name} but that shard has no such tensor")
            tensors[key] = info
        # Read in storage order: shard by shard, front to back (sequential I/O).
        rank = {os.path.join(folder, n): i for i, n in enumerate(files)}
        tensors = OrderedDict(sorted(tensors.items(), key=lambda kv: (rank[kv[1].file], kv[1].start)))
        file_paths = [os.path.join(folder, n) for n in files]
    elif target.endswith(".safetensors"):
        infos, metadata = read_header(target)
        tensors.update(sorted(infos.items(), key=lambda kv: kv[1].start))
        file_paths = [target]
    else:
        raise CheckpointError(f"{target}: expected a .safetensors file or a .safetensors.index.json")
    if not tensors:
        raise CheckpointError(f"{target}: holds no tensors")
    return Checkpoint(path, file_paths, tensors, metadata, family, component_dir)
