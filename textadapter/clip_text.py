"""A user's local CLIP text encoder: the text tower the SVD text adapter reads prompts with.

SVD ships no text encoder. Any CLIP text tower saved in transformers' format works; the natural
choice is the one matching SVD's image encoder (OpenCLIP ViT-H/14, width 1024, e.g. the
``text_encoder`` + ``tokenizer`` folders of a Stable Diffusion 2.x model). Accepted layouts:

* a folder with ``config.json`` (a ``CLIPTextModel`` or a full ``CLIPModel``) and the tokenizer
  files side by side;
* a diffusers-style folder with ``text_encoder/`` and ``tokenizer/`` subfolders.

Nothing is downloaded: loading is ``local_files_only``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .adapter import AdapterError, TemporalTextAdapter


class TextEncoderError(AdapterError):
    """A text-encoder folder that cannot be used; the message names the folder."""


@dataclass
class ClipText:
    """A loaded CLIP text tower.

    Attributes:
        tokenizer / encoder: transformers' ``CLIPTokenizer`` and ``CLIPTextModel`` (frozen, eval).
        path: the folder it came from.
        width: hidden size of the token embeddings (``text_dim`` of the adapter).
        max_length: tokens per prompt (prompts are padded/truncated to it).
    """

    tokenizer: object
    encoder: torch.nn.Module
    path: str
    width: int
    max_length: int

    def info(self) -> dict:
        """What an adapter file records about the encoder it was trained with."""
        return {"width": self.width, "max_length": self.max_length, "name": os.path.basename(os.path.normpath(self.path))}

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token embeddings ``[B, max_length, width]`` (last hidden state), on the encoder's device/dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        device = next(self.encoder.parameters()).device
        return self.encoder(ids.to(device)).last_hidden_state


def _subfolders(folder: str) -> tuple[str, str]:
    if os.path.isfile(os.path.join(folder, "text_encoder", "config.json")):
        tok = os.path.join(folder, "tokenizer")
        return os.path.join(folder, "text_encoder"), tok if os.path.isdir(tok) else folder
    return folder, folder


def load_clip_text(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ClipText:
    """Load a CLIP text encoder and tokenizer from a local folder (see module doc for layouts).

    Raises ``TextEncoderError`` naming the folder if it is missing, is not CLIP, or lacks a tokenizer.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise TextEncoderError(f"text encoder folder {folder!r} does not exist or is not a directory")
    enc_dir, tok_dir = _subfolders(folder)
    cfg_path = os.path.join(enc_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise TextEncoderError(
            f"{folder!r} is not a CLIP text encoder folder: no config.json (expected a transformers "
            "CLIPTextModel saved with save_pretrained, or text_encoder/ + tokenizer/ subfolders)"
        )
    with open(cfg_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ("clip_text_model", "clip"):
        raise TextEncoderError(f"{cfg_path}: model_type {model_type!r} is not a CLIP text encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError variants for missing files
        raise TextEncoderError(f"{tok_dir!r}: no usable CLIP tokenizer ({e})") from None
    encoder = CLIPTextModel.from_pretrained(enc_dir, local_files_only=True, dtype=dtype)
    encoder.to(device).eval().requires_grad_(False)
    width = int(encoder.config.hidden_size)
    max_length = int(min(encoder.config.max_position_embeddings, tokenizer.model_max_length))
    return ClipText(tokenizer=tokenizer, encoder=encoder, path=folder, width=width, max_length=max_length)


def check_text_width(adapter: TemporalTextAdapter, text: ClipText) -> None:
    """Raise a clear error when the encoder's width is not the adapter's ``text_dim``."""
    if text.width != adapter.config.text_dim:
        raise TextEncoderError(
            f"text encoder {text.path!r} has width {text.width} but the text adapter expects "
            f"{adapter.config.text_dim}: use the text encoder the adapter was trained with"
        )
