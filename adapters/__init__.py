"""Text control for image-to-video models without a text path (ED stage 1 on SVD).

``TemporalTextAdapter`` (per-frame queries that read the prompt, fused into every temporal
transformer block), ``attach`` (hooks it into a UNet for a ``with`` block), ``save_adapter`` /
``load_adapter`` (safetensors + JSON metadata), ``load_clip_text`` (a local CLIP text tower) and
``prompted`` (encode a prompt and attach, for samplers). Imports only torch and transformers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .clip_text import ClipText, TextEncoderError, check_text_width, load_clip_text
from .text_adapter import (
    ADAPTER_FORMAT,
    AdapterBinding,
    AdapterConfig,
    AdapterError,
    LoadedAdapter,
    TemporalTextAdapter,
    attach,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
    temporal_blocks,
)


@contextmanager
def prompted(
    unet: nn.Module, adapter: TemporalTextAdapter, text: ClipText, prompt: str, negative_prompt: str = ""
) -> Iterator[AdapterBinding]:
    """Encode ``prompt`` (and ``negative_prompt`` for the CFG half) and attach ``adapter`` to ``unet``.

    Wrap a sampler call in it: ``with prompted(model.denoiser, adapter, clip, "camera pans left"):``.
    """
    check_text_width(adapter, text)
    pos = text.encode([prompt])
    neg = text.encode([negative_prompt])
    with attach(unet, adapter, pos, neg) as binding:
        yield binding


__all__ = [
    "ADAPTER_FORMAT",
    "AdapterBinding",
    "AdapterConfig",
    "AdapterError",
    "ClipText",
    "LoadedAdapter",
    "TemporalTextAdapter",
    "TextEncoderError",
    "attach",
    "check_text_width",
    "load_adapter",
    "load_clip_text",
    "prompted",
    "read_adapter_metadata",
    "save_adapter",
    "temporal_blocks",
]
