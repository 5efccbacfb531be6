"""A tiny random CLIP text encoder saved like a user's folder (tests, demos, benchmarks; no hub).

The tokenizer is byte-level BPE with no merges (every byte is a token), built in memory.
"""
from __future__ import annotations

import os

TINY_TEXT_WIDTH = 32


def build_tiny_clip_text(folder: str | os.PathLike, width: int = TINY_TEXT_WIDTH, *, layout: str = "flat",
                         max_length: int = 24, seed: int = 0) -> str:
    """Save a random ``CLIPTextModel`` of hidden size ``width`` plus its tokenizer into ``folder``.

    Args:
        layout: ``"flat"`` (config, weights and tokenizer side by side) or ``"subfolders"``
            (``text_encoder/`` + ``tokenizer/``, as in a Stable Diffusion model folder).
        max_length: tokens per prompt (the model's ``max_position_embeddings``).
    Returns:
        the folder (str).
    """
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if layout not in ("flat", "subfolders"):
        raise ValueError(f"layout must be 'flat' or 'subfolders', got {layout!r}")
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(config)
    folder = os.fspath(folder)
    if layout == "flat":
        tok_dir = enc_dir = folder
    else:
        tok_dir, enc_dir = os.path.join(folder, "tokenizer"), os.path.join(folder, "text_encoder")
    tokenizer.save_pretrained(tok_dir)
    encoder.save_pretrained(enc_dir)
    return folder
