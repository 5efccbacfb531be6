"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``<root>/step_<NNNNNNNN>/`` holding

* ``model.safetensors``     trainable parameters and buffers (fp32/bf16 as trained);
* ``optimizer.safetensors`` every tensor of ``optimizer.state_dict()["state"]`` as ``state.<i>.<name>``
  and the torch CPU RNG state as ``rng.torch_cpu`` (uint8);
* ``state.json``            written last: step, optimizer param groups and non-tensor state,
  scheduler state, python/numpy RNG state, loss/eval history, the run's config.

It is written into a hidden temporary folder next to its final place and renamed into place
only when complete (``os.replace`` of a folder is atomic on POSIX), so a crash or SIGKILL at any
moment leaves either the previous checkpoints untouched or the new one complete. Loading tries
the newest checkpoint first and falls back to older ones if it cannot be read.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging.fileformat import atomic_path, save_safetensors_atomic

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "motiondial.train_checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model/optimizer being resumed."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``model`` and ``optimizer`` tensors and the JSON ``state``."""

    path: str
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict[str, Any]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask_mode() -> int:
    """Mode a plain ``open()`` would give a new file (mkstemp's 0600 would hide outputs from other users)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def atomic_save_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to a temporary name, flushed to disk, then ``os.replace`` onto ``path``."""
    save_safetensors_atomic({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
                            metadata or {}, fsync=True)


# ----------------------------------------------------------------------------------------------
# Optimizer / RNG state <-> (tensors, JSON)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def optimizer_to_tensors(opt_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(opt_state["param_groups"]), "scalars": scalars}


def optimizer_from_tensors(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_to_tensors``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in rest["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])  # torch compares/unpacks betas as a tuple
        groups.append(g)
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current torch CPU / numpy / python RNG states as (tensors, JSON)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return (
        {"rng.torch_cpu": torch.get_rng_state()},
        {
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
    )


def restore_rng(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
    if "python" in rest:
        v, state, gauss = rest["python"]
        random.setstate((v, tuple(state), gauss))
    if "numpy" in rest:
        name, keys, pos, has_gauss, cached = rest["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def clean_partial(root: str) -> None:
    """Remove temporary folders left by a checkpoint write that was killed."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".tmp-step_") or name.startswith(".old-step_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(
    root: str,
    step: int,
    model_tensors: Mapping[str, torch.Tensor],
    optimizer_tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` atomically under ``root`` and keep only the newest ``keep``."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, step_dir_name(step))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{step_dir_name(step)}-", dir=root)
    try:
        meta = {"format": FORMAT, "version": str(VERSION), "step": str(step)}
        save_file({k: v.detach().contiguous().cpu() for k, v in model_tensors.items()},
                  os.path.join(tmp, "model.safetensors"), metadata=meta)
        save_file({k: v.detach().contiguous().cpu() for k, v in optimizer_tensors.items()},
                  os.path.join(tmp, "optimizer.safetensors"), metadata=meta)
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        for name in ("model.safetensors", "optimizer.safetensors"):
            _fsync_file(os.path.join(tmp, name))
        _fsync_dir(tmp)
        os.chmod(tmp, _umask_mode() | ((_umask_mode() & 0o444) >> 2))  # mkdtemp gives 0700: make it like mkdir's
        if os.path.exists(final):  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            old = tempfile.mkdtemp(prefix=f".old-{step_dir_name(step)}-", dir=root)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str, tensors: bool = True) -> Checkpoint:
    """Read one checkpoint folder; raises ``CheckpointError`` naming the file that is wrong.

    ``tensors=False`` reads only ``state.json`` and the RNG tensors (``rng.*`` of
    ``optimizer.safetensors``): what a process needs when another one loads the model and
    optimizer tensors and broadcasts them (sharded training)."""
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: cannot read checkpoint state ({e})") from e
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: not a MotionDial training checkpoint (format {state.get('format')!r})")
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}}
    for name in ("model", "optimizer") if tensors else ("optimizer",):
        p = os.path.join(path, f"{name}.safetensors")
        try:
            if tensors:
                out[name] = load_file(p)
            else:
                with safe_open(p, framework="pt") as f:
                    out[name] = {k: f.get_tensor(k) for k in f.keys() if k.startswith("rng.")}
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{p}: cannot read checkpoint tensors ({e})") from e
    return Checkpoint(path=path, step=int(state["step"]), model=out["model"], optimizer=out["optimizer"], state=state)


def load_latest(root: str, warn=print) -> Checkpoint | None:
    """The newest readable checkpoint under ``root`` (older ones are tried if it is damaged)."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: skipping unreadable checkpoint: {e}")
    return None
