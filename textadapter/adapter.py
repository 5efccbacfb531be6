"""ED stage 1 for SVD: a text adapter feeding a prompt into every temporal transformer block.

SVD has no text path. The adapter gives it one without touching the UNet's own modules:

1. ``num_queries`` learnable queries (one per frame, width = the text encoder's width) attend
   once to the prompt's text tokens (one multi-head cross-attention layer): one vector per frame.
2. Before every ``TemporalBasicTransformerBlock`` (the temporal path of each
   ``TransformerSpatioTemporalModel``, whose input is already past the model's ``proj_in``), that
   frame vector is concatenated to every token's channels and projected back with
   ``Linear(text_dim + inner, inner)``. The projection starts as the identity on the video
   channels and zero on the text channels, so a fresh adapter leaves the UNet's output
   bit-identical and training starts from the base model.

Everything is attached by composition (forward pre-hooks, see ``attach``): the UNet keeps its
class and its state-dict keys, so the fine-tuned UNet can be diffed against the base key by key
and the adapter lives in its own file.

Frame counts: the query bank is a function of time sampled at ``num_queries`` points. A clip with
another number of frames gets the bank resampled linearly along time (``frame_mismatch =
"interpolate"``, the default: SVD runs at 14 or 25 frames, and the same adapter should serve
both) or, with ``frame_mismatch = "error"``, a clear error.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_FORMAT = "motiondial.temporal_text_adapter"
ADAPTER_VERSION = 1

# The temporal blocks of SVD's TransformerSpatioTemporalModel; one fuse projection per match.
_TEMPORAL_BLOCK = re.compile(r"(^|\.)temporal_transformer_blocks\.\d+$")


class AdapterError(ValueError):
    """An adapter file, text encoder or model that does not fit; the message names what and why."""


@dataclass
class AdapterConfig:
    """Everything needed to rebuild a ``TemporalTextAdapter`` (stored in the file's metadata).

    Attributes:
        text_dim: width of the text encoder's token embeddings (CLIP-L 768, OpenCLIP-H 1024).
        block_names: module names, inside the UNet, of the temporal blocks it feeds, in order.
        block_dims: channel width ``inner`` of each of those blocks.
        num_queries: number of per-frame queries (the reference uses 16).
        num_heads: heads of the query/text cross-attention (``text_dim`` must divide by it).
        frame_mismatch: ``"interpolate"`` (resample the queries linearly over time) or ``"error"``.
    """

    text_dim: int
    block_names: list[str]
    block_dims: list[int]
    num_queries: int = 16
    num_heads: int = 8
    frame_mismatch: str = "interpolate"

    def __post_init__(self) -> None:
        if self.text_dim <= 0 or self.num_queries <= 0 or self.num_heads <= 0:
            raise AdapterError(f"adapter config: text_dim, num_queries, num_heads must be positive, got {self}")
        if self.text_dim % self.num_heads:
            raise AdapterError(
                f"adapter config: text_dim {self.text_dim} is not divisible by num_heads {self.num_heads}"
            )
        if len(self.block_names) != len(self.block_dims) or not self.block_names:
            raise AdapterError("adapter config: block_names and block_dims must be non-empty and of equal length")
        if self.frame_mismatch not in ("interpolate", "error"):
            raise AdapterError(
                f"adapter config: frame_mismatch must be 'interpolate' or 'error', got {self.frame_mismatch!r}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        data = json.loads(text)
        return cls(
            text_dim=int(data["text_dim"]),
            block_names=[str(n) for n in data["block_names"]],
            block_dims=[int(d) for d in data["block_dims"]],
            num_queries=int(data.get("num_queries", 16)),
            num_heads=int(data.get("num_heads", 8)),
            frame_mismatch=str(data.get("frame_mismatch", "interpolate")),
        )


def temporal_blocks(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """The temporal transformer blocks of an SVD-style UNet: ``[(name, module, inner_dim)]``.

    ``inner_dim`` is read from the block's ``norm_in`` (the first op on its input).
    """
    found = []
    for name, module in unet.named_modules():
        if _TEMPORAL_BLOCK.search(name) and isinstance(getattr(module, "norm_in", None), nn.LayerNorm):
            found.append((name, module, int(module.norm_in.normalized_shape[0])))
    return found


class TemporalTextAdapter(nn.Module):
    """Per-frame text queries plus one fuse projection per temporal block.

    Parameters (state-dict keys): ``queries`` ``[num_queries, text_dim]``; ``attn.*`` (a
    ``nn.MultiheadAttention``); ``fuse.<i>.weight`` ``[inner_i, inner_i + text_dim]`` and
    ``fuse.<i>.bias`` ``[inner_i]``, the weight's first ``inner_i`` columns acting on the video
    channels and the last ``text_dim`` on the text vector.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        d = config.text_dim
        # Small random queries: distinct per frame so frames can read different parts of the prompt.
        self.queries = nn.Parameter(torch.randn(config.num_queries, d) * d**-0.5)
        self.attn = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.fuse = nn.ModuleList(nn.Linear(inner + d, inner) for inner in config.block_dims)
        self.reset_fuse()

    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        text_dim: int,
        *,
        num_queries: int = 16,
        num_heads: int = 8,
        frame_mismatch: str = "interpolate",
    ) -> "TemporalTextAdapter":
        """A fresh adapter shaped for ``unet`` (an SVD ``UNetSpatioTemporalConditionModel``)."""
        blocks = temporal_blocks(unet)
        if not blocks:
            raise AdapterError(
                f"{type(unet).__name__} has no temporal transformer blocks; the text adapter is for "
                "SVD-style UNets (CogVideoX already sees the prompt: fine-tune it instead)"
            )
        config = AdapterConfig(
            text_dim=int(text_dim),
            block_names=[n for n, _, _ in blocks],
            block_dims=[d for _, _, d in blocks],
            num_queries=num_queries,
            num_heads=num_heads,
            frame_mismatch=frame_mismatch,
        )
        return cls(config)

    @torch.no_grad()
    def reset_fuse(self) -> None:
        """Identity on the video channels, zero on the text channels and bias: a no-op adapter."""
        for lin, inner in zip(self.fuse, self.config.block_dims):
            lin.weight.zero_()
            lin.weight[:, :inner].copy_(torch.eye(inner))
            lin.bias.zero_()

    def frame_queries(self, num_frames: int) -> torch.Tensor:
        """The query bank resampled to ``num_frames``: ``[num_frames, text_dim]``."""
        q = self.queries
        n = q.shape[0]
        if num_frames == n:
            return q
        if self.config.frame_mismatch == "error":
            raise AdapterError(
                f"the text adapter has {n} per-frame queries but the video has {num_frames} frames; "
                f"generate {n} frames or use an adapter with frame_mismatch='interpolate'"
            )
        if num_frames == 1 or n == 1:
            return q.mean(0, keepdim=True).expand(num_frames, -1)
        # Linear interpolation along time with the end frames pinned to the end queries.
        return F.interpolate(q.t()[None], size=num_frames, mode="linear", align_corners=True)[0].t()

    def frame_vectors(self, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Per-frame text vectors.

        Args:
            text: prompt token embeddings ``[B, L, text_dim]`` (a text encoder's last hidden state).
            num_frames: frames of the video.
        Returns:
            ``[B, num_frames, text_dim]`` in the adapter's dtype.
        """
        if text.ndim != 3 or text.shape[-1] != self.config.text_dim:
            raise AdapterError(
                f"text embeddings of shape {tuple(text.shape)} do not fit the adapter: expected "
                f"[batch, tokens, {self.config.text_dim}]; was the adapter trained with another text encoder?"
            )
        q = self.frame_queries(num_frames).to(self.queries.dtype)
        text = text.to(device=q.device, dtype=q.dtype)
        q = q[None].expand(text.shape[0], -1, -1)
        out, _ = self.attn(q, text, text, need_weights=False)
        return out

    def fuse_block(self, index: int, hidden: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Concatenate each frame's text vector to its tokens and project back.

        Computed as ``h + ((W_video - I) h + W_text v + b)``: the same ``Linear`` on the
        concatenation, without materialising the broadcast text channels for every token, and with
        the identity path kept out of the matmul — so an untrained adapter returns ``h`` bit for bit
        even under bf16 autocast (where ``W_video h`` would round ``h`` to bf16).

        Args:
            index: which temporal block (position in ``config.block_names``).
            hidden: the block's input ``[B*F, S, inner]`` (frame-major, as SVD lays it out).
            vectors: ``[B, F, text_dim]`` from ``frame_vectors``.
        Returns:
            ``[B*F, S, inner]`` in ``hidden``'s dtype.
        """
        lin = self.fuse[index]
        inner = self.config.block_dims[index]
        if hidden.shape[-1] != inner:
            raise AdapterError(
                f"temporal block {self.config.block_names[index]!r} has {hidden.shape[-1]} channels, "
                f"the adapter was built for {inner}: it belongs to another model"
            )
        w = lin.weight
        eye = torch.eye(inner, device=w.device, dtype=w.dtype)
        # .to(...) is a no-op when the adapter lives with the UNet; it keeps offloaded UNets working.
        w_video = (w[:, :inner] - eye).to(device=hidden.device, dtype=hidden.dtype)
        w_text = w[:, inner:].to(device=hidden.device, dtype=hidden.dtype)
        bias = lin.bias.to(device=hidden.device, dtype=hidden.dtype)
        text_part = F.linear(vectors.to(device=hidden.device, dtype=hidden.dtype), w_text, bias)
        text_part = text_part.reshape(-1, 1, inner)  # [B*F, 1, inner], frame-major like hidden
        return hidden + (F.linear(hidden, w_video) + text_part).to(hidden.dtype)


def _expand_text(text: torch.Tensor, negative: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Match the prompt batch to the denoiser batch.

    Diffusers' SVD pipeline stacks classifier-free guidance as ``[uncond, cond]``; with a
    ``negative`` the unconditional half reads it, otherwise both halves read the prompt.
    """
    b = text.shape[0]
    if b == batch:
        return text
    if negative is not None and 2 * b == batch:
        return torch.cat([negative.to(text).expand(b, -1, -1), text], 0)
    if batch % b == 0:
        return text.repeat(batch // b, 1, 1)
    raise AdapterError(f"prompt batch {b} does not fit the denoiser batch {batch}")


class AdapterBinding:
    """The live link between an attached adapter and the prompt; change the prompt with ``set_text``."""

    def __init__(self, adapter: TemporalTextAdapter) -> None:
        self.adapter = adapter
        self.text: torch.Tensor | None = None
        self.negative: torch.Tensor | None = None
        self._cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def set_text(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None = None) -> None:
        """Prompt ``[B, L, text_dim]`` (and optional negative ``[1 or B, L, text_dim]``) for later calls."""
        for what, t in (("prompt_embeds", prompt_embeds), ("negative_embeds", negative_embeds)):
            if t is not None and (t.ndim != 3 or t.shape[-1] != self.adapter.config.text_dim):
                raise AdapterError(
                    f"{what} of shape {tuple(t.shape)} does not fit the adapter: expected "
                    f"[batch, tokens, {self.adapter.config.text_dim}] (text encoder width mismatch?)"
                )
        self.text, self.negative = prompt_embeds, negative_embeds
        self._cache = None

    def _vectors(self, batch: int, num_frames: int) -> torch.Tensor:
        # Computed once per denoiser call and shared by every temporal block of that call.
        key = (batch, num_frames)
        if self._cache is None or self._cache[0] != key:
            if self.text is None:
                raise AdapterError("the text adapter is attached but no prompt was given (call set_text)")
            text = _expand_text(self.text, self.negative, batch)
            self._cache = (key, self.adapter.frame_vectors(text, num_frames))
        return self._cache[1]

    def _clear(self) -> None:
        self._cache = None


@contextmanager
def attach(
    unet: nn.Module,
    adapter: TemporalTextAdapter,
    prompt_embeds: torch.Tensor | None = None,
    negative_embeds: torch.Tensor | None = None,
) -> Iterator[AdapterBinding]:
    """Hook ``adapter`` into ``unet`` for the duration of the ``with`` block.

    Args:
        unet: the SVD UNet (or any module whose temporal blocks match ``adapter.config``).
        adapter: the adapter; its parameters stay in their own module (not registered in ``unet``).
        prompt_embeds: ``[B, L, text_dim]``; may also be set later with ``binding.set_text``.
        negative_embeds: for the unconditional half of a CFG batch (``[uncond, cond]``).
    Yields:
        the ``AdapterBinding``. Hooks are removed on exit, also on error or interrupt.
    """
    modules = dict(unet.named_modules())
    cfg = adapter.config
    missing = [n for n in cfg.block_names if n not in modules]
    if missing:
        raise AdapterError(
            f"the text adapter was built for another UNet: temporal block(s) {missing[:3]} are missing"
        )
    binding = AdapterBinding(adapter)
    if prompt_embeds is not None:
        binding.set_text(prompt_embeds, negative_embeds)

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            num_frames = kwargs.get("num_frames", rest[0] if rest else None)
            if num_frames is None:
                raise AdapterError(f"{cfg.block_names[index]} was called without num_frames")
            num_frames = int(num_frames)
            vectors = binding._vectors(hidden.shape[0] // num_frames, num_frames)
            return (adapter.fuse_block(index, hidden, vectors), *rest), kwargs

        return hook

    handles = [unet.register_forward_pre_hook(lambda m, a: binding._clear())]
    try:
        for i, name in enumerate(cfg.block_names):
            handles.append(modules[name].register_forward_pre_hook(make_hook(i), with_kwargs=True))
        yield binding
    finally:
        for h in handles:
            h.remove()
        binding._clear()


def save_adapter(
    path: str | os.PathLike,
    adapter: TemporalTextAdapter,
    *,
    base_fingerprint: Mapping[str, Any] | None = None,
    text_encoder: Mapping[str, Any] | None = None,
) -> str:
    """Write the adapter as safetensors (fp32) with JSON metadata, atomically.

    Metadata: ``format``, ``format_version``, ``config`` (``AdapterConfig``), ``base_fingerprint`` (of the
    UNet it was trained with) and ``text_encoder`` (width, name: which encoder it expects).
    """
    from merging.fileformat import save_safetensors_atomic

    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": str(ADAPTER_VERSION),
        "config": adapter.config.to_json(),
        "base_fingerprint": json.dumps(dict(base_fingerprint or {}), sort_keys=True),
        "text_encoder": json.dumps(dict(text_encoder or {}), sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}
    return save_safetensors_atomic(tensors, path, meta)


@dataclass
class LoadedAdapter:
    """``load_adapter``'s result: the module and the file's metadata."""

    adapter: TemporalTextAdapter
    path: str
    base_fingerprint: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an adapter file; raises ``AdapterError`` if it is not one."""
    from merging.fileformat import read_metadata

    return read_metadata(path, format=ADAPTER_FORMAT, version=ADAPTER_VERSION, what="text adapter", error=AdapterError)


def load_adapter(
    path: str | os.PathLike,
    *,
    base_fingerprint: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedAdapter:
    """Load an adapter file written by ``save_adapter``.

    Args:
        path: the ``.safetensors`` file.
        base_fingerprint: if given, the fingerprint of the UNet it will be attached to; a
            different base recorded in the file raises a clear error.
        device, dtype: where the adapter's parameters go.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    meta = read_adapter_metadata(path)
    try:
        config = AdapterConfig.from_json(meta["config"])
        recorded = json.loads(meta.get("base_fingerprint") or "{}")
        text_info = json.loads(meta.get("text_encoder") or "{}")
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{path}: malformed adapter metadata ({type(e).__name__}: {e})") from None
    if base_fingerprint is not None and recorded:
        from merging.fingerprint import check_fingerprint

        check_fingerprint(recorded, dict(base_fingerprint), f"text adapter {path}")
    adapter = TemporalTextAdapter(config)
    tensors = load_file(path)
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{path}: adapter tensors do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise AdapterError(f"{path}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}")
    adapter.load_state_dict(tensors)
    adapter.to(device=device, dtype=dtype)
    return LoadedAdapter(
        adapter=adapter,
        path=path,
        base_fingerprint=recorded,
        text_encoder=text_info,
    )
