"""Task-vector operations on tensors, in fp32.

These are the formulas; ``merging.engine`` streams them over checkpoints key by key (and, for
the element-wise ones, in flat chunks of a tensor). Every function takes and returns fp32
tensors; callers convert storage dtypes on the way in and out.

DARE masks are reproducible: the keep-mask of a tensor is a function of ``(seed, stream, key)``
only, drawn in fixed blocks of ``MASK_BLOCK`` elements, each block from its own generator seeded
by a hash of ``(seed, stream, key, block index)``. So a mask is the same whether the tensor is
processed whole or in chunks, on any machine, and two vectors drawn with different ``stream``
names (the ED recipe's dynamics and control vectors) get independent masks.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

__all__ = [
    "MASK_BLOCK",
    "task_vector",
    "scaled_sum",
    "extrapolate",
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
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def dare_keep_mask(numel: int, p: float, seed: int, key: str, stream: str = "", offset: int = 0, length: int | None = None) -> torch.Tensor:
    """The DARE keep-mask (bool, flat) of elements ``[offset, offset + length)`` of a tensor.

    Each element is kept with probability ``1 - p``. ``numel`` is the whole tensor's size (the
    last block is shorter); the result does not depend on how the tensor is chunked.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    length = numel - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > numel:
        raise ValueError(f"mask range {offset}..{offset + length} outside a tensor of {numel} elements")
    out = torch.empty(length, dtype=torch.bool)
    pos = offset
    while pos < offset + length:
        block = pos // MASK_BLOCK
        b_start = block * MASK_BLOCK
        b_len = min(MASK_BLOCK, numel - b_start)
        g = torch.Generator().manual_seed(_block_seed(seed, stream, key, block))
        u = torch.rand(b_len, generator=g)
        lo = pos - b_start
        hi = min(b_len, offset + length - b_start)
        torch.ge(u[lo:hi], p, out=out[pos - offset : pos - offset + hi - lo])
        pos = b_start + hi
    return out


def dare(x: torch.Tensor, p: float, seed: int, key: str, stream: str = "", shape: Sequence[int] | None = None, offset: int = 0) -> torch.Tensor:
    """DARE: drop each entry with probability ``p``, rescale survivors by ``1 / (1 - p)``.

    Tensors of fewer than 2 dimensions (biases, norm scales) pass through whole, as in the ED
    reference. ``x`` may be a flat chunk starting at flat ``offset`` of a tensor of ``shape``
    (default: ``x`` is the whole tensor).
    """
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if len(shape) < 2 or p == 0.0:
        return x
    numel = 1
    for s in shape:
        numel *= s
    keep = dare_keep_mask(numel, p, seed, key, stream, offset, x.numel()).view(x.shape)
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype))


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
