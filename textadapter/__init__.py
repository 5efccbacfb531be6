"""Text control for image-to-video models without a text path (ED stage 1 on SVD).

``TemporalTextAdapter`` (per-frame queries that read the prompt, fused into every temporal
transformer block), ``attach`` (hooks it into a UNet for a ``with`` block), ``save_adapter`` /
``load_adapter`` (safetensors + JSON metadata), ``load_clip_text`` (a local CLIP text tower) and
``prompted`` (encode a prompt and attach, for samplers), ``load_text_control`` (adapter file +
its text encoder, checked against each other and the model). Imports only torch and transformers.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .clip_text import ClipText, TextEncoderError, check_text_width, load_clip_text
from .adapter import (
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


@dataclass
class TextControl:
    """A trained text adapter with the text encoder it reads prompts with (what a sampler needs)."""

    adapter: TemporalTextAdapter
    text: ClipText
    path: str

    def prompted(self, unet: nn.Module, prompt: str, negative_prompt: str = ""):
        """``with control.prompted(model.denoiser, "camera pans left"): sample(...)``."""
        return prompted(unet, self.adapter, self.text, prompt, negative_prompt)


def load_text_control(
    adapter_path: str | os.PathLike,
    text_encoder: str | os.PathLike | None = None,
    *,
    base_fingerprint: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextControl:
    """Load an adapter file and its text encoder, checking that they fit each other and the model.

    Args:
        adapter_path: ``text_adapter.safetensors`` from ``train_adapter``.
        text_encoder: the CLIP text-encoder folder; default: the folder recorded in the adapter
            file at training time (an error names it if it is gone).
        base_fingerprint: the UNet's fingerprint (``I2VModel.fingerprint()``); refuses an
            adapter trained on another base.
        device / dtype: where the adapter and the text encoder run.
    """
    loaded = load_adapter(adapter_path, base_fingerprint=base_fingerprint, device=device, dtype=dtype)
    folder = text_encoder or loaded.text_encoder.get("path")
    if not folder:
        raise TextEncoderError(f"{adapter_path}: records no text encoder; pass the CLIP text encoder folder")
    if text_encoder is None and not os.path.isdir(folder):
        raise TextEncoderError(
            f"{adapter_path} was trained with the text encoder {folder!r}, which does not exist here; "
            "pass the folder of the same CLIP text encoder"
        )
    text = load_clip_text(folder, device=device, dtype=dtype)
    check_text_width(loaded.adapter, text)
    return TextControl(adapter=loaded.adapter, text=text, path=loaded.path)


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
    "TextControl",
    "TextEncoderError",
    "attach",
    "check_text_width",
    "load_adapter",
    "load_clip_text",
    "load_text_control",
    "prompted",
    "read_adapter_metadata",
    "save_adapter",
    "temporal_blocks",
]
