"""The demo model: a scaled-down Stable Video Diffusion, small enough to train on a CPU.

It is a genuine member of the ``svd`` family (``StableVideoDiffusionPipeline`` with a
``UNetSpatioTemporalConditionModel``, ``AutoencoderKLTemporalDecoder``, CLIP vision encoder,
``EulerDiscreteScheduler``), so ``pipelines.load_model``, ``pipelines.sample``, the nodes and
``merging`` run it unchanged. Only the sizes differ (see docs/demo_model.md for why):

* **UNet**: two levels (32, 64 channels), one layer per level, *no cross-attention down/up
  blocks* (``DownBlockSpatioTemporal`` / ``UpBlockSpatioTemporal``): convolutions shift content
  naturally, attention over 1,024 pixels would dominate a CPU step. The mid block (8x8: the
  second level halves the 16x16 latents) keeps SVD's spatial+temporal transformer.
  ``time_embed_dim`` = 4 x 32 = 128.
* **VAE**: two levels, **2x spatial downsampling** and 8 latent channels (latents are
  8 x 16 x 16 for a 32 x 32 clip: only 1.5x fewer numbers than pixels, so it can be nearly
  lossless), trained briefly as a plain autoencoder by ``training.train_demo`` (stage "vae") so
  that latents are a pixel-aligned re-coding of the frames; ``scaling_factor`` is set from the
  latents' standard deviation. (No downsampling at all made the full-resolution UNet level 4x
  dearer per step; see docs/demo_model.md.)
* **CLIP vision**: tiny and random, frozen (the image condition reaches the UNet mainly through
  the first-frame latents concatenated on channels, as in SVD).

``build_demo_model(folder, DemoModelConfig(), seed)`` writes the *untrained* folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DemoModelConfig:
    """Sizes of the demo model. ``size`` is the pixel side the UNet is configured for."""

    size: int = 32
    frames: int = 8
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers: int = 1
    unet_heads: int = 2
    # two levels: 2x spatial downsampling. 64 channels, not 32: diffusers hard-codes
    # GroupNorm(32 groups), and with 32 channels every group is one channel, so the norms before
    # both ``conv_out`` layers erase each frame's per-channel mean and contrast (colours); with
    # pairs of channels per group the difference survives (measured: 20.0 vs 17.6 dB PSNR after
    # 1,000 steps; with 8 groups of 4 the 32-channel model learned 1.5x faster).
    vae_channels: tuple[int, ...] = (64, 64)
    latent_channels: int = 8
    clip_dim: int = 32
    #: make the VAE's temporal decoder an exact per-frame decoder (temporal residual branches
    #: and ``time_conv_out`` set to identity and kept frozen by ``train_demo``): a briefly
    #: trained temporal decoder smears and flickers frames, most at the clip's ends where its
    #: time convolutions see zero padding, which the flow estimator reads as object motion.
    frame_wise_decoder: bool = True

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["unet_channels"] = list(self.unet_channels)
        d["vae_channels"] = list(self.vae_channels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DemoModelConfig":
        d = dict(d)
        d["unet_channels"] = tuple(d["unet_channels"])
        d["vae_channels"] = tuple(d["vae_channels"])
        return cls(**d)


def demo_components(cfg: DemoModelConfig = DemoModelConfig()) -> dict[str, Any]:
    """Fresh (random) components of the demo SVD pipeline; seed torch before calling."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    vae_scale = 2 ** (len(cfg.vae_channels) - 1)
    levels = len(cfg.unet_channels)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=cfg.size // vae_scale,
        in_channels=2 * cfg.latent_channels,  # noisy latents + first-frame latents
        out_channels=cfg.latent_channels,
        down_block_types=("DownBlockSpatioTemporal",) * levels,
        up_block_types=("UpBlockSpatioTemporal",) * levels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers,
        cross_attention_dim=cfg.clip_dim,
        num_attention_heads=cfg.unet_heads,
        transformer_layers_per_block=1,
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=96,  # 3 added time ids (fps, motion bucket, noise aug) x 32
        num_frames=cfg.frames,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, latent_channels=cfg.latent_channels,
        sample_size=cfg.size, scaling_factor=1.0,
    )
    # The log-variance half of the encoder's last convolution starts at zero / -10. This does not
    # fix the posterior std (``quant_conv``, a 1x1 convolution, mixes both halves afterwards);
    # ``fix_posterior_std`` does that once the autoencoder is trained. Kept because it shapes the
    # seeded trajectory of the shipped weights.
    with torch.no_grad():
        vae.encoder.conv_out.weight[cfg.latent_channels:].zero_()
        vae.encoder.conv_out.bias[cfg.latent_channels:].fill_(-10.0)
    if cfg.frame_wise_decoder:
        make_decoder_frame_wise(vae)
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    # SVD's pipeline resizes the image to the CLIP size (224) itself; big patches keep it cheap.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=cfg.clip_dim, projection_dim=cfg.clip_dim, num_hidden_layers=1,
                         num_attention_heads=4, image_size=224, intermediate_size=2 * cfg.clip_dim, patch_size=32)
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    return {"vae": vae, "image_encoder": image_encoder, "unet": unet, "scheduler": scheduler,
            "feature_extractor": feature_extractor}


def temporal_decoder_parameters(vae: torch.nn.Module) -> list[str]:
    """Names of the VAE parameters that mix frames: the temporal residual blocks, the blend
    factors between spatial and temporal paths and ``decoder.time_conv_out``."""
    return [n for n, _ in vae.named_parameters()
            if ".temporal_res_block." in n or ".time_mixer." in n or n.startswith("decoder.time_conv_out.")]


@torch.no_grad()
def make_decoder_frame_wise(vae: torch.nn.Module) -> None:
    """Turn ``AutoencoderKLTemporalDecoder``'s decoder into an exact per-frame decoder.

    Each ``TemporalResnetBlock`` returns ``input + conv2(...)``: a zero ``conv2`` makes it the
    identity, so both paths of every spatio-temporal block agree and the blend factor no longer
    matters; ``time_conv_out`` (a 3x1x1 convolution over frames) gets the identity kernel.
    The result is still a standard SVD VAE (same keys and shapes)."""
    for name, module in vae.named_modules():
        if name.endswith("temporal_res_block"):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    conv = vae.decoder.time_conv_out
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(conv.out_channels):
        conv.weight[c, c, conv.kernel_size[0] // 2, 0, 0] = 1.0


@torch.no_grad()
def fix_posterior_std(vae: torch.nn.Module, log_var: float = -10.0) -> None:
    """Make the VAE's posterior a fixed, tiny Gaussian: log-variance ``log_var`` everywhere.

    ``quant_conv`` (1x1, after the encoder) outputs ``[mean, log-variance]``; zeroing the
    log-variance rows' weights leaves the mean untouched. The demo autoencoder is trained
    deterministically (on the mean), so its log-variance means nothing, yet SVD's training
    objective samples the posterior: a stray variance would bury the latents in noise.
    """
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:].zero_()
    vae.quant_conv.bias[c:].fill_(float(log_var))


def save_pipeline_atomic(pipe: Any, folder: str | os.PathLike) -> str:
    """``pipe.save_pretrained`` (safetensors) into a sibling temporary folder, then rename over
    ``folder`` (an existing folder is replaced only once the new one is complete)."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-demo-", dir=parent)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
            os.replace(folder, os.path.join(old, "m"))
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_demo_pipeline(cfg: DemoModelConfig = DemoModelConfig(), seed: int = 0) -> Any:
    """The untrained demo ``StableVideoDiffusionPipeline`` (in memory), weights from ``seed``."""
    from pipelines.transformers_compat import prefer_pil_image_processor

    prefer_pil_image_processor()  # before diffusers looks the name up
    from diffusers import StableVideoDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StableVideoDiffusionPipeline(**demo_components(cfg))


def build_demo_model(folder: str | os.PathLike, cfg: DemoModelConfig = DemoModelConfig(), seed: int = 0) -> str:
    """Write the untrained demo model as a diffusers folder (safetensors); returns the path.

    Same ``cfg`` and ``seed``, same weights. The caller's torch RNG is left untouched.
    """
    return save_pipeline_atomic(build_demo_pipeline(cfg, seed), folder)


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Parameters per torch component of a pipeline."""
    out = {}
    for name in ("unet", "vae", "image_encoder"):
        m = getattr(pipe, name, None)
        if m is not None:
            out[name] = sum(p.numel() for p in m.parameters())
    return out
