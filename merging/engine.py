"""The streaming engine: apply a recipe to checkpoints key by key, write bounded shards atomically.

Memory: inputs are read one tensor (or one flat chunk of ``CHUNK_ELEMENTS`` elements, for
element-wise recipes) at a time with plain reads, arithmetic runs in fp32 on that chunk, and the
result is streamed straight into the output file whose header was written up front (shapes
and dtypes are known before any arithmetic). Peak memory is therefore a few chunks plus, for
whole-tensor recipes (top-k, TIES), a few fp32 copies of the largest tensor; never a model.

Atomicity: everything is written into a hidden temporary folder next to ``out_dir``
(``.<name>.tmp-<pid>-<n>``) which is renamed to ``out_dir`` only after every file is complete
and synced. Any error, Ctrl-C or a progress callback that raises removes it: nothing is left.

Outputs: each ``OutputSpec`` becomes ``<stem>.safetensors`` or, above ``max_shard_bytes``,
``<stem>-00001-of-0000N.safetensors`` shards plus a diffusers-style
``<stem>.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {...}}``).
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping, Protocol, Sequence

import torch

from families import Family

from .checkpoint import Checkpoint
from .errors import CheckpointError, MismatchError, OutputError
from .safetensors_io import SafetensorsWriter, TensorInfo, dtype_name, read_range, read_tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "DEFAULT_SHARD_BYTES",
    "OutputSpec",
    "Recipe",
    "Plan",
    "resolve_scope",
    "check_compatible",
    "plan",
    "run",
    "parse_dtype",
    "short_dtype",
]

CHUNK_ELEMENTS = 1 << 22  # 4 Mi elements: 16 MiB per fp32 chunk; a multiple of ops.MASK_BLOCK
DEFAULT_SHARD_BYTES = 500 * 1000 * 1000

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def short_dtype(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names the CLI and the metadata use)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, dtype_name(dtype).lower())


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"output dtype must be fp32, bf16 or fp16, got {name}")
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"output dtype must be one of fp32, bf16, fp16; got {name!r}") from None


@dataclass
class OutputSpec:
    """One output checkpoint of a run.

    Attributes:
        name: the recipe's output name (``"dynamics"``, ``"dynamics_model"``).
        stem: path inside the output folder without extension (``"dynamics"``,
            ``"dynamics_model/transformer/diffusion_pytorch_model"``).
        kind: ``"delta"`` holds only the keys in scope; ``"full"`` holds every key of the base,
            keys out of scope copied from it.
        dtype: storage dtype of floating-point tensors (others keep their dtype).
        metadata: ``__metadata__`` written into every shard (strings).
    """

    name: str
    stem: str
    kind: Literal["delta", "full"]
    dtype: torch.dtype
    metadata: dict[str, str] = field(default_factory=dict)


class Recipe(Protocol):
    """What the engine runs. Tensors in and out are fp32.

    ``compute(key, inputs, shape, offset)``: ``inputs`` maps each input name to the tensor (or,
    when ``elementwise``, to a flat chunk starting at flat ``offset`` of a tensor of ``shape``);
    returns a tensor per output name, same shape as the inputs given.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    elementwise: bool

    def compute(self, key: str, inputs: Mapping[str, torch.Tensor], shape: tuple[int, ...], offset: int) -> Mapping[str, torch.Tensor]: ...


def resolve_scope(scope: str, keys: Sequence[str], family: Family | None) -> list[str]:
    """Keys a recipe changes: ``"all"``, ``"temporal"`` (the family's temporal keys) or a regex.

    A regex is matched with ``re.search`` against state-dict keys (no component prefix).
    Raises ``ValueError`` for an invalid regex, ``"temporal"`` without a known family, or a
    scope that selects nothing.
    """
    if scope == "all":
        chosen = list(keys)
    elif scope == "temporal":
        if family is None:
            raise ValueError(
                "scope 'temporal' needs the model family: give a diffusers model folder (with model_index.json) "
                "or name the family explicitly"
            )
        chosen = family.temporal_keys(keys)
    else:
        try:
            rx = re.compile(scope)
        except re.error as e:
            raise ValueError(f"scope {scope!r} is neither 'all', 'temporal' nor a valid regex: {e}") from None
        chosen = [k for k in keys if rx.search(k)]
    if not chosen:
        raise ValueError(f"scope {scope!r} selects none of the {len(keys)} keys (first keys: {', '.join(list(keys)[:3])})")
    return chosen


def _first(items: Sequence[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_compatible(base: Checkpoint, others: Mapping[str, Checkpoint], *, allow_dtype_mismatch: bool = False, partial: Iterable[str] = ()) -> None:
    """Raise ``MismatchError`` unless every checkpoint in ``others`` lines up with ``base``.

    Compares key sets (counts and first mismatches both ways), shapes, and storage dtypes (a
    bf16 base with an fp32 fine-tune would fold the base's rounding error into the task
    vector). ``partial`` names inputs that may hold a subset of the keys (deltas).
    """
    partial = set(partial)
    for name, other in others.items():
        missing = [k for k in base.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in base.tensors]
        if name in partial:
            missing = []
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} key(s) of the base are missing from it: {_first(missing)}")
            if extra:
                parts.append(f"{len(extra)} key(s) it has are not in the base: {_first(extra)}")
            raise MismatchError(
                f"{name} ({other.path}, {len(other)} keys) does not match the base ({base.path}, {len(base)} keys): "
                + "; ".join(parts)
            )
        shapes = [k for k in other.tensors if other.tensors[k].shape != base.tensors[k].shape]
        if shapes:
            first = "; ".join(f"{k}: {list(base.tensors[k].shape)} vs {list(other.tensors[k].shape)}" for k in shapes[:5])
            raise MismatchError(
                f"{name} ({other.path}) and the base ({base.path}) differ in the shape of {len(shapes)} key(s): {first}"
            )
        if not allow_dtype_mismatch and name not in partial:
            dtypes = [k for k in other.tensors if other.tensors[k].dtype != base.tensors[k].dtype]
            if dtypes:
                k = dtypes[0]
                raise MismatchError(
                    f"{name} ({other.path}) stores {len(dtypes)} key(s) in another dtype than the base ({base.path}), "
                    f"e.g. {k}: {dtype_name(other.tensors[k].dtype)} vs {dtype_name(base.tensors[k].dtype)}. "
                    "Differences would mix rounding error into the task vector; convert both to the same dtype, "
                    "or allow it explicitly (allow_dtype_mismatch / --allow-dtype-mismatch)"
                )


@dataclass
class Plan:
    """What a run will read and write (for ``--dry-run`` and up-front checks)."""

    keys: list[str]  # keys processed, base order
    scope_keys: list[str]
    read_bytes: int
    outputs: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]  # name -> [(key, dtype, shape)]
    shards: dict[str, list[list[str]]]  # name -> keys per shard
    write_bytes: dict[str, int]
    peak_memory_bytes: int  # estimate of what the arithmetic needs, above the interpreter

    @property
    def total_write_bytes(self) -> int:
        return sum(self.write_bytes.values())


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan(base: Checkpoint, inputs: Mapping[str, Checkpoint], recipe: Recipe, outputs: Sequence[OutputSpec], scope_keys: Sequence[str], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    """Lay out every output (keys, dtypes, shards) and estimate bytes and memory; reads nothing."""
    in_scope = set(scope_keys)
    floating = {k for k, i in base.tensors.items() if i.dtype.is_floating_point}
    keys = list(base.tensors)
    out_entries: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {}
    for spec in outputs:
        entries = []
        for k in keys:
            info = base.tensors[k]
            if spec.kind == "delta":
                if k in in_scope and k in floating:
                    entries.append((k, spec.dtype, info.shape))
            else:
                # fp64 / fp8 buffers (e.g. a fixed sin-cos table) keep their own dtype in full models.
                keep = k not in floating or info.dtype not in (torch.float32, torch.bfloat16, torch.float16)
                entries.append((k, info.dtype if keep else spec.dtype, info.shape))
        out_entries[spec.name] = entries
    shards: dict[str, list[list[str]]] = {}
    write_bytes: dict[str, int] = {}
    for name, entries in out_entries.items():
        groups: list[list[str]] = [[]]
        size = 0
        total = 0
        for k, dt, shape in entries:
            nb = _nbytes(dt, shape)
            if groups[-1] and size + nb > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += nb
            total += nb
        shards[name] = groups
        write_bytes[name] = total
    full = any(s.kind == "full" for s in outputs)
    read_keys = keys if full else [k for k in keys if k in in_scope]
    read_bytes = 0
    for k in read_keys:
        read_bytes += base.tensors[k].nbytes
        if k in in_scope:
            read_bytes += sum(c.tensors[k].nbytes for c in inputs.values() if k in c.tensors and c is not base)
    # Working set. Element-wise: per input an fp32 buffer and its raw bytes, per output an fp32
    # scratch and its cast copy, up to 4 chunks queued for the writer thread (fp32 at worst),
    # and one DARE mask block (8-byte draws + bool). Whole-tensor: fp32 copies of the largest
    # tensor in scope for every input, output and temporary.
    n_in, n_out = len(recipe.inputs), len(recipe.outputs)
    if recipe.elementwise:
        chunk = min(CHUNK_ELEMENTS, max((base.tensors[k].numel for k in read_keys), default=0))
        peak = chunk * (n_in * (4 + 4) + n_out * (4 + 4) + 4 * 4) + (1 << 20) * 9
    else:
        largest = max((base.tensors[k].numel for k in scope_keys), default=0)
        peak = largest * 4 * (2 * n_in + 2 * n_out + 3)
    return Plan(keys, list(scope_keys), read_bytes, out_entries, shards, write_bytes, peak)


def _shard_names(stem: str, n: int) -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


_tmp_counter = itertools.count()


def _make_tmp_dir(out_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    name = os.path.basename(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write {out_dir}: the folder {parent} does not exist")
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{next(_tmp_counter)}")
    try:
        os.mkdir(tmp)
    except PermissionError:
        raise OutputError(f"cannot write {out_dir}: the folder {parent} is not writable") from None
    except OSError as e:
        raise OutputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    return tmp


def _finish(tmp: str, out_dir: str, overwrite: bool) -> None:
    old = None
    if os.path.exists(out_dir):
        if not overwrite:
            raise OutputError(f"{out_dir} already exists (appeared during the run); not replacing it")
        old = f"{tmp}.old"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_job(writer_for: Callable[[str, str], SafetensorsWriter], name: str, key: str, data: torch.Tensor) -> Callable[[], None]:
    def job() -> None:
        w = writer_for(name, key)  # opens the key's shard even for an empty tensor
        if data.numel():
            w.write(key, data)

    return job


class _AsyncWriter:
    """Runs the file writes on one background thread, in submission order.

    ``write()`` releases the GIL, so the next chunk's reads and arithmetic overlap with the
    kernel copying (and throttling) the previous chunk's bytes; the bounded queue keeps at most
    ``depth`` chunks in flight (memory stays bounded). An error on the thread (disk full...) is
    re-raised in the caller at the next ``submit`` or at ``finish``; ``stop`` abandons the queue.
    """

    def __init__(self, depth: int = 3) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="merging-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is None and not self._stopped:
                try:
                    job()
                except BaseException as e:  # handed to the main thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._q.put(job)

    def finish(self) -> None:
        """Wait for every submitted write; re-raise the first error."""
        self._q.put(None)
        self._thread.join()
        self._raise()

    def stop(self) -> None:
        """Drop pending writes and wait for the thread (used on errors and interrupts)."""
        self._stopped = True
        if self._thread.is_alive():
            # Drain so that the sentinel fits even if the queue is full.
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._q.put(None)
            self._thread.join()


class _Buffers:
    """Scratch tensors reused from chunk to chunk.

    Allocating fresh multi-MB tensors per chunk costs page faults on every allocation (the
    allocator hands large blocks back to the OS on free); on a busy 2-core machine that was
    a large share of the build time. Buffers grow to the largest chunk and stay.
    """

    def __init__(self) -> None:
        self._t: dict[tuple, torch.Tensor] = {}
        self._raw: dict[str, bytearray] = {}

    def get(self, name: tuple, dtype: torch.dtype, n: int) -> torch.Tensor:
        t = self._t.get((name, dtype))
        if t is None or t.numel() < n:
            t = self._t[(name, dtype)] = torch.empty(max(n, 1), dtype=dtype)
        return t[:n]

    def raw(self, name: str, nbytes: int) -> bytearray:
        b = self._raw.get(name)
        if b is None or len(b) < nbytes:
            b = self._raw[name] = bytearray(nbytes)
        return b


class _Readers:
    """One open handle per input at a time; a handle is closed as soon as its shard changes."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, object]] = {}

    def handle(self, name: str, info: TensorInfo):
        cur = self._open.get(name)
        if cur is None or cur[0] != info.file:
            if cur is not None:
                cur[1].close()
            try:
                f = open(info.file, "rb")
            except OSError as e:
                raise CheckpointError(f"{info.file}: cannot open ({e.strerror or e})") from None
            self._open[name] = (info.file, f)
            return f
        return cur[1]

    def close(self) -> None:
        for _, f in self._open.values():
            f.close()
        self._open.clear()


def _all_finite(t: torch.Tensor) -> bool:
    # A finite sum proves every element finite (NaN and Inf propagate) and costs a tenth of
    # isfinite().all(); only a non-finite sum (or an overflowing one) needs the exact check.
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _nonfinite_error(key: str, inputs: Mapping[str, torch.Tensor], infos: Mapping[str, TensorInfo | None], what: str) -> CheckpointError:
    for name, x in inputs.items():
        if not bool(torch.isfinite(x).all()):
            info = infos.get(name)
            where = info.file if info is not None else name
            return CheckpointError(f"{where}: tensor {key!r} ({name}) holds non-finite values (NaN or Inf)")
    return CheckpointError(f"tensor {key!r}: the {what} produced non-finite values (overflow in the chosen output dtype?)")


def run(
    base: Checkpoint,
    inputs: Mapping[str, Checkpoint],
    recipe: Recipe,
    outputs: Sequence[OutputSpec],
    out_dir: str,
    *,
    scope_keys: Sequence[str],
    base_input: str = "base",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    extra_files: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    check_space: bool = True,
) -> Plan:
    """Run ``recipe`` over every key and write ``outputs`` into ``out_dir`` atomically.

    Args:
        base: the base checkpoint (its key order, and the source of out-of-scope keys).
        inputs: every recipe input by name (``base`` included under ``base_input``); inputs
            lacking a key (deltas outside their scope) contribute zeros.
        scope_keys: the keys the recipe computes (see ``resolve_scope``).
        extra_files: called with the temporary folder before it is renamed (to add configs,
            links to other model components...).
        progress: ``progress(bytes_done, bytes_total)`` after each chunk; raising from it cancels
            the run (nothing is written).
    Returns the ``Plan`` that was executed.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise OutputError(f"{out_dir} already exists; choose another output folder or allow overwriting")
    p = plan(base, inputs, recipe, outputs, scope_keys, max_shard_bytes=max_shard_bytes)
    tmp = _make_tmp_dir(out_dir)
    writers: dict[str, SafetensorsWriter | None] = {}
    readers = _Readers()
    bufs = _Buffers()
    aw = _AsyncWriter()
    try:
        if check_space:
            free = shutil.disk_usage(tmp).free
            if p.total_write_bytes > free:
                raise OutputError(
                    f"not enough space for {out_dir}: it needs {p.total_write_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
                )
        specs = {s.name: s for s in outputs}
        # Per output: which shard each key goes to; writers open lazily, one at a time.
        shard_of: dict[str, dict[str, int]] = {}
        files: dict[str, list[str]] = {}
        for s in outputs:
            groups = p.shards[s.name]
            shard_of[s.name] = {k: i for i, g in enumerate(groups) for k in g}
            files[s.name] = _shard_names(s.stem, len(groups))
            os.makedirs(os.path.dirname(os.path.join(tmp, s.stem)) or tmp, exist_ok=True)
        entries = {name: {k: (dt, shape) for k, dt, shape in ents} for name, ents in p.outputs.items()}
        current: dict[str, int] = {}

        def writer_for(name: str, key: str) -> SafetensorsWriter:
            idx = shard_of[name][key]
            if current.get(name) != idx:
                w = writers.get(name)
                if w is not None:
                    w.close()
                group = p.shards[name][idx]
                path = os.path.join(tmp, files[name][idx])
                writers[name] = SafetensorsWriter(path, {k: entries[name][k] for k in group}, specs[name].metadata)
                current[name] = idx
            w = writers[name]
            assert w is not None
            return w

        in_scope = set(scope_keys)
        done = 0
        total = max(p.read_bytes, 1)
        full_outputs = [s for s in outputs if s.kind == "full"]
        for key in p.keys:
            info = base.tensors[key]
            computed = key in in_scope and info.dtype.is_floating_point
            if not computed and not full_outputs:
                continue
            shape = info.shape
            numel = info.numel
            infos = {n: c.tensors.get(key) for n, c in inputs.items()}
            if computed and recipe.elementwise:
                ranges = [(o, min(CHUNK_ELEMENTS, numel - o)) for o in range(0, numel, CHUNK_ELEMENTS)] or [(0, 0)]
            else:
                ranges = [(0, numel)]
            for offset, count in ranges:
                if computed:
                    xs: dict[str, torch.Tensor] = {}
                    for n in recipe.inputs:
                        i = infos.get(n)
                        if recipe.elementwise:
                            # Chunks land in buffers reused for the whole run (see _Buffers).
                            x = bufs.get(("in", n), torch.float32, count)
                            if i is None:  # a partial input (delta) without this key: zeros
                                xs[n] = x.zero_()
                                continue
                            raw = read_range(readers.handle(n, i), i, offset, count, bufs.raw(n, count * i.nbytes // max(numel, 1)))
                            xs[n] = x.copy_(raw)
                        else:
                            if i is None:
                                xs[n] = torch.zeros(shape, dtype=torch.float32)
                                continue
                            xs[n] = read_tensor(readers.handle(n, i), i).float()
                        if i is not None:
                            done += i.nbytes * count // max(numel, 1)
                    ys = recipe.compute(key, xs, shape, offset)
                    for s in outputs:
                        dt = entries[s.name][key][0]
                        y = ys[s.name]
                        # A fresh tensor: the write happens on the writer thread while we go on.
                        out = y.to(dt, copy=True)
                        if not _all_finite(out):
                            raise _nonfinite_error(key, xs, infos, f"output {s.name} in {dtype_name(dt)}")
                        aw.submit(_write_job(writer_for, s.name, key, out.reshape(-1)))
                    del xs, ys
                else:
                    # Out of scope: full outputs copy the base tensor.
                    f = readers.handle(base_input, info)
                    raw = read_tensor(f, info)
                    done += info.nbytes
                    for s in full_outputs:
                        dt = entries[s.name][key][0]
                        out = raw.to(dt) if raw.dtype != dt else raw
                        if out.is_floating_point() and not _all_finite(out):
                            raise CheckpointError(f"{info.file}: tensor {key!r} (base) holds non-finite values (NaN or Inf)")
                        aw.submit(_write_job(writer_for, s.name, key, out.reshape(-1)))
                if progress is not None:
                    progress(min(done, total), total)
        readers.close()
        aw.finish()
        for name in list(writers):
            w = writers.pop(name)
            if w is not None:
                w.close()
        # Outputs with no keys at all never opened a writer: an empty delta is an error upstream.
        for s in outputs:
            n = len(files[s.name])
            if n > 1:
                index = {
                    "metadata": {"total_size": p.write_bytes[s.name], **{k: v for k, v in s.metadata.items() if len(v) < 4096}},
                    "weight_map": {k: os.path.basename(files[s.name][i]) for k, i in shard_of[s.name].items()},
                }
                ipath = os.path.join(tmp, f"{s.stem}.safetensors.index.json")
                try:
                    with open(ipath, "w", encoding="utf-8") as fh:
                        json.dump(index, fh, indent=2, sort_keys=True)
                except OSError as e:
                    raise OutputError(f"error writing {ipath}: {e.strerror or e}") from None
        if extra_files is not None:
            extra_files(tmp)
        _finish(tmp, out_dir, overwrite)
    except BaseException:
        aw.stop()
        readers.close()
        for w in writers.values():
            if w is not None:
                w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return p
