"""Task-vector operations on tensors, in fp32.

These are the formulas; ``merging.engine`` streams them over checkpoints key by key (and, for
the element-wise ones, in flat chunks of a tensor). Every function takes and returns fp32
tensors; callers convert storage dtypes on the way in and out.

DARE masks are reproducible: the keep-mask of a tensor is a function of ``(seed, stream, key)``
only, drawn in fixed blocks of ``MASK_BLOCK`` elements, each block from its own generator seeded
by a hash of ``(seed, stream, key, block index)``. So a mask is the same whether the tensor is
processed whole or in chunks, on any machine, and two vectors drawn with different ``stream``
names (the ED recipe's dynamics and control vectors) get independent masks. The uniforms come
from numpy's SFC64 bit generator (raw 32-bit draws), about 3x faster here than torch's CPU
Mersenne twister, which matters: mask drawing is a large share of the ED build's arithmetic.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "MASK_BLOCK",
    "task_vector",
    "scaled_sum",
    "extrapolate",
    "dare_drop_mask",
    "dare_keep_mask",
    "dare",
    "magnitude_topk",
    "ties_merge",
]

# Elements per independently seeded mask block (4 MiB of fp32 uniforms at a time).
MASK_BLOCK = 1 << 20


def task_vector(ft: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``tau = ft - pre``."""
    return ft - pre


def scaled_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_i c_i * x_i`` (left to right)."""
    if len(tensors) != len(coefficients) or not tensors:
        raise ValueError(f"scaled_sum needs as many coefficients as tensors (got {len(tensors)} and {len(coefficients)})")
    out = coefficients[0] * tensors[0]
    for c, x in zip(coefficients[1:], tensors[1:]):
        out = out + c * x
    return out


def extrapolate(pre: torch.Tensor, ft: torch.Tensor, alpha: float) -> torch.Tensor:
    """ED stage 2: ``pre + alpha * (pre - ft)``: move *away* from the fine-tuned model, past the base."""
    return pre + alpha * (pre - ft)


def _block_seed(seed: int, stream: str, key: str, block: int) -> int:
    h = hashlib.sha256(f"{int(seed)}\x00{stream}\x00{key}\x00{block}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def _drop_threshold(p: float) -> np.uint32:
    # An element is dropped when its uniform 32-bit draw u < T, T = round(p * 2^32):
    # P(drop) = T / 2^32, within 2^-33 of p (finer than a float32 uniform's 2^-24).
    return np.uint32(min(int(round(p * 2.0**32)), 2**32 - 1))


def _blocks(numel: int, offset: int, length: int):
    """(block index, lo, hi) of every mask block overlapping ``[offset, offset + length)``,
    with ``lo:hi`` the overlap in block coordinates."""
    pos = offset
    while pos < offset + length:
        block = pos // MASK_BLOCK
        b_start = block * MASK_BLOCK
        b_len = min(MASK_BLOCK, numel - b_start)
        hi = min(b_len, offset + length - b_start)
        yield block, pos - b_start, hi
        pos = b_start + hi


def _block_drops(seed: int, stream: str, key: str, block: int, lo: int, hi: int, threshold: np.uint32) -> np.ndarray:
    raw = np.random.SFC64(_block_seed(seed, stream, key, block)).random_raw((hi + 1) // 2).view(np.uint32)
    return raw[lo:hi] < threshold


def _check_range(p: float, numel: int, offset: int, length: int | None) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    length = numel - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > numel:
        raise ValueError(f"mask range {offset}..{offset + length} outside a tensor of {numel} elements")
    return length


def dare_drop_mask(numel: int, p: float, seed: int, key: str, stream: str = "", offset: int = 0, length: int | None = None) -> torch.Tensor:
    """The DARE *drop* mask (bool, flat, True = dropped) of elements ``[offset, offset + length)``.

    Each element is dropped with probability ``p``. Block ``b`` of ``MASK_BLOCK`` elements draws
    its uniforms from numpy's SFC64 generator seeded with a hash of ``(seed, stream, key, b)``
    (raw 32-bit outputs: numpy keeps bit generator streams stable across versions). ``numel``
    is the whole tensor's size; the result does not depend on how the tensor is chunked.
    """
    length = _check_range(p, numel, offset, length)
    t = _drop_threshold(p)
    parts = [_block_drops(seed, stream, key, b, lo, hi, t) for b, lo, hi in _blocks(numel, offset, length)]
    if not parts:
        return torch.empty(0, dtype=torch.bool)
    return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def dare_keep_mask(numel: int, p: float, seed: int, key: str, stream: str = "", offset: int = 0, length: int | None = None) -> torch.Tensor:
    """The complement of ``dare_drop_mask``: True where an element survives (probability ``1 - p``)."""
    return ~dare_drop_mask(numel, p, seed, key, stream, offset, length)


def dare(x: torch.Tensor, p: float, seed: int, key: str, stream: str = "", shape: Sequence[int] | None = None, offset: int = 0, inplace: bool = False) -> torch.Tensor:
    """DARE: drop each entry with probability ``p``, rescale survivors by ``1 / (1 - p)``.

    Computes ``(x / (1 - p)) * keep`` (dropped entries become 0). Tensors of fewer than 2
    dimensions (biases, norm scales) pass through whole, as in the ED reference. ``x`` may be a
    flat chunk starting at flat ``offset`` of a tensor of ``shape`` (default: ``x`` is the whole
    tensor). ``inplace=True`` overwrites ``x`` (saves memory traffic in the streaming engine).
    """
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if len(shape) < 2 or p == 0.0:
        return x
    numel = 1
    for s in shape:
        numel *= s
    length = _check_range(p, numel, offset, x.numel())
    out = x.div_(1.0 - p) if inplace else x / (1.0 - p)
    if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
        # numpy's float * bool multiply is ~30x faster here than torch's masked_fill_ / where.
        flat = out.view(-1).numpy()
        t = _drop_threshold(p)
        pos = 0
        with np.errstate(invalid="ignore"):  # inf * 0 -> nan: non-finite input is reported by the caller
            for b, lo, hi in _blocks(numel, offset, length):
                seg = flat[pos : pos + hi - lo]
                np.multiply(seg, ~_block_drops(seed, stream, key, b, lo, hi, t), out=seg)
                pos += hi - lo
        return out
    keep = dare_keep_mask(numel, p, seed, key, stream, offset, length).view(out.shape).to(out.device)
    return out.mul_(keep)


def magnitude_topk(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest ``|x|`` in this tensor, zero the rest.

    ``k = ceil(density * numel)``; ties at the threshold are all kept. Works on whole tensors.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"top-k density must be in (0, 1], got {density}")
    n = x.numel()
    k = min(n, max(1, int(-(-density * n // 1))))
    if k >= n:
        return x
    mag = x.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values
    return torch.where(x.abs() >= threshold, x, torch.zeros((), dtype=x.dtype))


def ties_merge(deltas: Sequence[torch.Tensor], density: float = 1.0, weights: Sequence[float] | None = None) -> torch.Tensor:
    """TIES-style merge of several task vectors of one tensor.

    1. trim: keep each vector's top ``density`` entries by magnitude (``magnitude_topk``);
    2. elect: per entry, the sign of the (weighted) sum of the trimmed vectors;
    3. disjoint mean: average the (weighted) entries whose sign agrees with the elected sign
       (entries where none agree, or all are zero, give 0).
    """
    if not deltas:
        raise ValueError("ties_merge needs at least one task vector")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError("ties_merge: one weight per task vector")
    trimmed = torch.stack([w * magnitude_topk(d, density) for d, w in zip(deltas, weights)])
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype)).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1).to(trimmed.dtype)
    return total / count
