"""Base-model fingerprints: tell cheaply whether two sets of weights are the same model.

A fingerprint records every key with its shape, and for every tensor a digest of 8 values at
flat positions chosen deterministically from the key (always the first and the last element).
Reading it from a checkpoint touches only the header and those few elements (no full read), and
``fingerprint_state`` (a loaded model's state dict) and ``fingerprint_checkpoint`` (the same
weights on disk) give identical results.

Precision (our choice): values are digested twice, **exactly** (as fp32; bf16/fp16 storage
converts to fp32 without loss) and **rounded to bf16**. ``check_fingerprint`` accepts either a
match of the exact digests or of the bf16 digests, so a delta built from an fp32 checkpoint is
accepted for the same model loaded in bf16 (rounded to nearest, as every loader does) — but
the fine-tuned model, or any other weights of the same architecture, are refused. fp16 copies
of an fp32 model are *not* guaranteed to match (double rounding); fingerprint the fp16 files.
Storage dtypes are not part of the identity (a loader may cast an fp64 buffer to fp32).
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Any, Mapping

import torch

from .errors import FingerprintMismatchError

__all__ = ["fingerprint_state", "fingerprint_checkpoint", "fingerprint_with_delta", "check_fingerprint", "describe_fingerprint",
           "same_weights"]

FINGERPRINT_FORMAT = "motiondial.fingerprint"
FINGERPRINT_VERSION = 1
SAMPLES_PER_TENSOR = 8


def sample_indices(key: str, numel: int, k: int = SAMPLES_PER_TENSOR) -> list[int]:
    """Deterministic flat indices for ``key`` (first, last, and ``k-2`` spread pseudo-randomly)."""
    if numel <= k:
        return list(range(numel))
    # splitmix64 seeded from the key's hash: stable across Python versions and platforms.
    state = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    out = [0, numel - 1]
    mask = (1 << 64) - 1
    while len(out) < k:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append(z % numel)
    return out


def _digests(values: list[float]) -> tuple[str, str]:
    exact = struct.pack(f"<{len(values)}f", *values)
    rounded = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).tolist()
    bf16 = struct.pack(f"<{len(rounded)}h", *rounded)
    return hashlib.sha256(exact).hexdigest()[:12], hashlib.sha256(bf16).hexdigest()[:12]


def _assemble(entries: dict[str, tuple[list[int], str, str]]) -> dict[str, Any]:
    keys = sorted(entries)
    structure = hashlib.sha256(
        "\n".join(f"{k}:{','.join(map(str, entries[k][0]))}" for k in keys).encode("utf-8")
    ).hexdigest()[:16]
    values = hashlib.sha256("".join(entries[k][1] for k in keys).encode()).hexdigest()[:16]
    values_bf16 = hashlib.sha256("".join(entries[k][2] for k in keys).encode()).hexdigest()[:16]
    return {
        "format": FINGERPRINT_FORMAT,
        "version": FINGERPRINT_VERSION,
        "n_keys": len(keys),
        "n_params": sum(math.prod(entries[k][0]) for k in keys),
        "structure": structure,
        "values": values,
        "values_bf16": values_bf16,
        # key -> [shape, exact digest, bf16 digest]: lets a mismatch name the first keys that differ.
        "tensors": {k: [entries[k][0], entries[k][1], entries[k][2]] for k in keys},
    }


def fingerprint_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fingerprint a mapping of tensors (a state dict; keys without a component prefix).

    Cheap: reads 8 elements per tensor. Tensors may live on any device and in any dtype.
    """
    entries: dict[str, tuple[list[int], str, str]] = {}
    for key, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {key!r}: it is on the meta device (weights not loaded)")
        idx = sample_indices(key, t.numel())
        flat = t.reshape(-1)  # a view for contiguous parameters
        values = flat[torch.tensor(idx, dtype=torch.long, device=t.device)].float().tolist() if idx else []
        entries[key] = (list(t.shape), *_digests(values))
    return _assemble(entries)


def fingerprint_checkpoint(path: Any) -> dict[str, Any]:
    """Fingerprint weights on disk (file, sharded index, or model folder -> its denoiser).

    Reads only headers and 8 elements per tensor. Equal to ``fingerprint_state`` of the same
    weights once loaded.
    """
    from .checkpoint import open_checkpoint

    ckpt = path if hasattr(path, "tensors") and hasattr(path, "files") else open_checkpoint(path)
    entries: dict[str, tuple[list[int], str, str]] = {}
    by_file: dict[str, list[str]] = {}
    for key, info in ckpt.tensors.items():
        by_file.setdefault(info.file, []).append(key)
    from .safetensors_io import read_elements

    for file, keys in by_file.items():
        with open(file, "rb") as f:
            for key in keys:
                info = ckpt.tensors[key]
                values = read_elements(f, info, sample_indices(key, info.numel))
                entries[key] = (list(info.shape), *_digests(values))
    return _assemble(entries)


def fingerprint_with_delta(base: Any, delta: Any) -> dict[str, Any]:
    """Fingerprint of ``base + delta`` without materialising it (16 elements read per tensor).

    ``base`` and ``delta`` are checkpoints or paths (``merging.checkpoint.open_checkpoint``);
    keys absent from the delta keep the base's values. The sum is taken in fp32, so the result
    equals ``fingerprint_checkpoint`` of ``base + delta`` written in fp32 (a fine-tune given as
    a delta is identified as the same model as its fp32 full copy).
    """
    from .checkpoint import open_checkpoint
    from .safetensors_io import read_elements

    b = base if hasattr(base, "tensors") and hasattr(base, "files") else open_checkpoint(base)
    d = delta if hasattr(delta, "tensors") and hasattr(delta, "files") else open_checkpoint(delta)
    entries: dict[str, tuple[list[int], str, str]] = {}
    for key, info in b.tensors.items():
        idx = sample_indices(key, info.numel)
        with open(info.file, "rb") as f:
            values = read_elements(f, info, idx)
        if key in d.tensors and idx:
            dinfo = d.tensors[key]
            with open(dinfo.file, "rb") as f:
                dv = read_elements(f, dinfo, idx)
            values = (torch.tensor(values, dtype=torch.float32) + torch.tensor(dv, dtype=torch.float32)).tolist()
        entries[key] = (list(info.shape), *_digests(values))
    return _assemble(entries)


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    """One line for messages: ``"1024 keys, 5.57 B params, id 3fa2c1d09b7e"``."""
    n = fp.get("n_params", 0)
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e5 else str(n)
    return f"{fp.get('n_keys', '?')} keys, {size} params, id {str(fp.get('values', '?'))[:12]}"


def same_weights(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """True when both fingerprints describe the same weights (exactly or at bf16 precision)."""
    if expected.get("structure") != actual.get("structure"):
        return False
    return expected.get("values") == actual.get("values") or expected.get("values_bf16") == actual.get("values_bf16")


def check_fingerprint(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str) -> None:
    """Raise ``FingerprintMismatchError`` unless ``actual`` is the base ``expected`` names.

    ``what`` names the thing being applied (``"delta /x/dynamics.safetensors"``). The message
    gives both models' sizes and ids, how many keys are missing / extra / differ in shape or
    value, and the first few of each.
    """
    for fp, role in ((expected, "expected"), (actual, "actual")):
        if not isinstance(fp, Mapping) or fp.get("format") != FINGERPRINT_FORMAT:
            raise FingerprintMismatchError(f"{what}: the {role} base fingerprint is missing or not a {FINGERPRINT_FORMAT}")
    if same_weights(expected, actual):
        return
    te, ta = expected.get("tensors", {}), actual.get("tensors", {})
    missing = [k for k in te if k not in ta]
    extra = [k for k in ta if k not in te]
    shapes = [k for k in te if k in ta and list(te[k][0]) != list(ta[k][0])]
    values = [
        k for k in te
        if k in ta and list(te[k][0]) == list(ta[k][0]) and te[k][1] != ta[k][1] and te[k][2] != ta[k][2]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the model (first: {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} key(s) the base did not have (first: {', '.join(extra[:3])})")
    if shapes:
        first = "; ".join(f"{k} {te[k][0]} vs {ta[k][0]}" for k in shapes[:3])
        parts.append(f"{len(shapes)} key(s) with other shapes (first: {first})")
    if values:
        parts.append(f"{len(values)} of {len(te)} tensors hold other values (first: {', '.join(values[:3])})")
    detail = "; ".join(parts) or "the fingerprints differ"
    raise FingerprintMismatchError(
        f"{what} was built for base ({describe_fingerprint(expected)}) but the model is "
        f"({describe_fingerprint(actual)}): {detail}. Use the delta with the exact base model it was built from."
    )
