"""Bounded-memory safetensors reading and writing.

We parse the (simple, documented) safetensors layout ourselves instead of going through
``safetensors.safe_open`` for two reasons:

* **memory**: ``safe_open`` memory-maps the whole file; every page touched while a shard is
  open counts towards the process's resident set, so iterating over a 5 GB shard grows RSS by
  5 GB (platform.md). Reading one tensor at a time with ``readinto`` keeps RSS at one tensor's
  size; the page cache is the kernel's business.
* **validation**: a truncated or corrupt file is reported with its name and the first bad entry
  before any arithmetic starts, instead of failing (or silently reading garbage) mid-run.

Layout: 8-byte little-endian header length ``N``, ``N`` bytes of JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data; offsets are relative to the end of the header. Files we write pass ``safe_open``.
"""
from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Mapping

import torch

from .errors import CheckpointError, OutputError

__all__ = [
    "DTYPES",
    "TensorInfo",
    "read_header",
    "read_tensor",
    "read_elements",
    "read_range",
    "SafetensorsWriter",
    "dtype_name",
]

# safetensors dtype names <-> torch dtypes (the float8 names exist from torch 2.1 on).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in DTYPES.items()}

# A header beyond this is not a model checkpoint (safetensors itself caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    file: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors file's header without reading any tensor data.

    Returns ``(tensors, metadata)``. Raises ``CheckpointError`` naming ``path`` when the file is
    missing, not safetensors, truncated (data shorter than the header promises) or inconsistent.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    base = 8 + n
    data_len = size - base
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {key!r} has an unsupported or missing field {e}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {entry!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {key!r}: byte range {begin}..{end} does not match shape {list(shape)} x {itemsize} B"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {base + end} but the file has {size} bytes"
            )
        infos[key] = TensorInfo(path, key, dtype, shape, base + begin, end - begin)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """Read one tensor from an open file into fresh (non-mmap) memory, in its stored dtype."""
    buf = bytearray(info.nbytes)
    f.seek(info.start)
    got = f.readinto(buf)
    if got != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading {info.key!r} ({got} of {info.nbytes} bytes)")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def read_range(f: BinaryIO, info: TensorInfo, offset: int, count: int, buffer: bytearray | None = None) -> torch.Tensor:
    """Read flat elements ``[offset, offset + count)`` of a tensor (1-D, stored dtype).

    With ``buffer`` (large enough) the bytes land there and the result is a view of it: valid
    until the buffer is reused. Reusing one buffer avoids a fresh allocation (and its page
    faults) per chunk.
    """
    size = torch.empty((), dtype=info.dtype).element_size()
    nbytes = count * size
    if nbytes == 0:
        return torch.empty(0, dtype=info.dtype)
    buf = bytearray(nbytes) if buffer is None else buffer
    view = memoryview(buf)[:nbytes]
    f.seek(info.start + offset * size)
    got = f.readinto(view)
    if got != nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading {info.key!r} ({got} of {nbytes} bytes)")
    return torch.frombuffer(view, dtype=info.dtype)


def read_elements(f: BinaryIO, info: TensorInfo, flat_indices: Iterable[int]) -> list[float]:
    """Read single elements (by flat index) as Python floats, exactly as ``tensor.float()`` gives."""
    size = torch.empty((), dtype=info.dtype).element_size()
    out = []
    for i in flat_indices:
        f.seek(info.start + i * size)
        b = f.read(size)
        if len(b) != size:
            raise CheckpointError(f"{info.file}: truncated while reading {info.key!r}")
        out.append(torch.frombuffer(bytearray(b), dtype=info.dtype).float().item())
    return out


def _aligned_header(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    sizes = []
    for key, (dtype, shape) in entries.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, sizes


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, with every shape and dtype declared up front.

    Knowing the layout in advance lets us write the header first and stream each tensor's bytes
    as soon as it is computed, so no shard is ever buffered in memory. ``write`` must be called
    in the declared order with matching shape/dtype. The caller owns atomicity (it writes into a
    temporary folder or name and renames at the end).
    """

    def __init__(self, path: str, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> None:
        self.path = path
        self._entries = list(entries.items())
        header, self._sizes = _aligned_header(entries, metadata or {})
        self._next = 0
        self._written = 0
        while self._next < len(self._entries) and self._sizes[self._next] == 0:
            self._next += 1
        self._f: BinaryIO | None = None
        try:
            self._f = open(path, "wb")
            self._write(header)
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes | memoryview) -> None:
        assert self._f is not None
        try:
            self._f.write(data)
        except OSError as e:
            raise _output_error(self.path, e) from None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append (part of) the current declared tensor, in its declared dtype.

        A tensor may arrive whole or as consecutive flat chunks; the writer moves on to the next
        declared key once all of this one's bytes are in.
        """
        exp_key, (dtype, shape) = self._entries[self._next]
        if key != exp_key or tensor.dtype != dtype:
            raise AssertionError(f"{self.path}: writer expected {exp_key} ({dtype}), got {key} ({tensor.dtype})")
        nbytes = tensor.numel() * tensor.element_size()
        if self._written + nbytes > self._sizes[self._next]:
            raise AssertionError(f"{self.path}: more data than declared for {key} {list(shape)}")
        if nbytes:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._write(memoryview(data))
        self._written += nbytes
        if self._written == self._sizes[self._next]:
            self._next += 1
            self._written = 0
            # Zero-size tensors that follow have nothing to wait for.
            while self._next < len(self._entries) and self._sizes[self._next] == 0:
                self._next += 1

    def close(self) -> None:
        """Flush and close; every declared tensor must have been written."""
        if self._next < len(self._entries):
            raise AssertionError(f"{self.path}: {len(self._entries) - self._next} declared tensors not written")
        assert self._f is not None
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise _output_error(self.path, e) from None
        finally:
            self._f = None

    def abort(self) -> None:
        """Close and delete the file (used on any failure)."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _output_error(path: str, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}; nothing was kept (free space and run again)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: {e.strerror}")
    return OutputError(f"error writing {path}: {e.strerror or e}")
