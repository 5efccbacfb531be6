"""Tiny, randomly initialised models of every supported family, built from configs (no hub).

They exist so that tests, benchmarks and the main job's embedded default can exercise the real
diffusers loaders and pipelines in well under a second on a CPU. Their outputs are noise-like:
nothing here is trained.

The configs follow diffusers' own test suite (see docs/pipelines.md); sizes were chosen so that
a 9-frame, 2-step run of each family takes a few hundredths of a second on one CPU core.
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
from typing import Any

TINY_FAMILIES = ("cogvideox-i2v", "cogvideox1.5-i2v", "svd")

# The tiny CogVideoX transformer's timestep-embedding width. Even, so that a motion embedder
# may split it into an object half and a camera half.
TINY_TIME_EMBED_DIM = 16
# Learned positional embeddings lock CogVideoX 1.0 to sample_{h,w} * 8 pixels (here 32 x 32).
TINY_COGVIDEOX_LATENT = 4
# CogVideoX 1.5's rotary embeddings cap the resolution at sample_{h,w} * 8 (here 128 x 128);
# the grid size costs no parameters.
TINY_COGVIDEOX15_LATENT = 16
TINY_SVD_SIZE = 32  # pixels; the tiny SVD VAE compresses 2x


def _tiny_t5_tokenizer():
    """A T5 tokenizer from an in-memory vocabulary: no sentencepiece file, no hub."""
    from transformers import T5Tokenizer

    words = (
        "a the and of in on with to is cat dog bird car boat person people tree trees sky sea "
        "river city street mountain flower fire water moves move moving runs walks flies drives "
        "camera pan pans zoom zooms tilt orbit slowly quickly fast slow left right up down in out "
        "forward backward sunset night day waves wind clouds smoke"
    ).split()
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0 - 0.001 * i) for i, w in enumerate(words)]
    pieces += [(c, -5.0 - 0.001 * i) for i, c in enumerate(string.ascii_lowercase + string.digits + ".,!?'-")]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _cogvideox_components(family: str) -> dict[str, Any]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    is_15 = family == "cogvideox1.5-i2v"
    text_dim = 32
    max_text = 16
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8,  # noisy latents + first-frame latents, concatenated on channels
        out_channels=4,
        time_embed_dim=TINY_TIME_EMBED_DIM,
        text_embed_dim=text_dim,
        num_layers=2,
        sample_width=TINY_COGVIDEOX15_LATENT if is_15 else TINY_COGVIDEOX_LATENT,
        sample_height=TINY_COGVIDEOX15_LATENT if is_15 else TINY_COGVIDEOX_LATENT,
        sample_frames=9,
        patch_size=2,
        patch_size_t=2 if is_15 else None,
        ofs_embed_dim=TINY_TIME_EMBED_DIM if is_15 else None,  # added to the time embedding
        temporal_compression_ratio=4,
        max_text_seq_length=max_text,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=not is_15,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction",
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=True, snr_shift_scale=1.0,
    )
    tokenizer = _tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae,
            "transformer": transformer, "scheduler": scheduler}


def _svd_components() -> dict[str, Any]:
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),  # GroupNorm uses 32 groups
        layers_per_block=1,
        sample_size=TINY_SVD_SIZE // 2,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=2,
        projection_class_embeddings_input_dim=96,  # 3 added time ids x addition_time_embed_dim
        addition_time_embed_dim=32,
        num_frames=14,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    # The SVD pipeline resizes PIL input to 224 x 224 for CLIP, so the tiny CLIP takes 224 with
    # big patches (7 x 7 tokens) to stay cheap.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=4,
                         image_size=224, intermediate_size=37, patch_size=32)
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    return {"vae": vae, "image_encoder": image_encoder, "unet": unet, "scheduler": scheduler,
            "feature_extractor": feature_extractor}


def build_tiny_model(folder: str | os.PathLike, family: str = "cogvideox-i2v", seed: int = 0) -> str:
    """Build a tiny random model of ``family`` and save it as a diffusers folder.

    Args:
        folder: where to save; created if missing. An existing model there is replaced
            atomically (built in a sibling temporary folder, then renamed).
        family: ``"cogvideox-i2v"`` (1.0, 32x32 px, resolution-locked), ``"cogvideox1.5-i2v"``
            (temporal patching, multiples of 16 px up to 128 x 128) or ``"svd"`` (32x32 px default).
        seed: torch seed for the random weights; same seed, same weights.
    Returns:
        The folder path (str).
    """
    import torch
    from pipelines.transformers_compat import prefer_pil_image_processor

    prefer_pil_image_processor()  # before diffusers looks the name up
    from diffusers import CogVideoXImageToVideoPipeline, StableVideoDiffusionPipeline

    if family not in TINY_FAMILIES:
        raise ValueError(f"build_tiny_model: unknown family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)

    # Seed a private generator state so that building a model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "svd":
            pipe = StableVideoDiffusionPipeline(**_svd_components())
        else:
            pipe = CogVideoXImageToVideoPipeline(**_cogvideox_components(family))

    tmp = tempfile.mkdtemp(prefix=".tmp-tiny-", dir=parent)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if os.path.isdir(folder):
            if os.listdir(folder):
                old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
                os.replace(folder, os.path.join(old, "m"))
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rmdir(folder)
                os.replace(tmp, folder)
        else:
            os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
