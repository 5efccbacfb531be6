"""Each family's own diffusion training loss, with the first frame as the image condition laid
out exactly as the family's diffusers pipeline lays it out at sampling time.

* **CogVideoX-I2V 1.0 / 1.5** (``CogVideoXImageToVideoPipeline``): video latents from the VAE
  (``latent_dist.sample() * scaling_factor``, ``[B, F, C, h, w]``); the first frame encoded
  alone, scaled as ``prepare_latents`` scales it and padded with zero latents along frames,
  concatenated to the noisy latents on channels; T5 prompt embeddings from the pipeline's
  ``encode_prompt``; rotary embeddings from the pipeline's own helper; 1.5's ``ofs`` = 2.0.
  1.5 with an odd number of latent frames: the pipeline samples one extra latent frame in front
  and drops it; here the first latent frame is duplicated in front and left out of the loss.
  Loss: v-prediction MSE, ``noisy = scheduler.add_noise(x0, eps, t)``, target
  ``scheduler.get_velocity(x0, eps, t)`` (``CogVideoXDDIMScheduler``), ``t`` uniform over the
  training timesteps.
* **SVD** (``StableVideoDiffusionPipeline``): latents ``latent_dist.sample() * scaling_factor``
  per frame; CLIP image embedding of the first frame (the pipeline's ``_encode_image`` after the
  same antialiased resize to the CLIP size); the first frame plus ``noise_aug_strength`` noise,
  VAE-encoded (``_encode_vae_image``, mode, unscaled) and repeated over frames, concatenated on
  channels; ``added_time_ids`` from ``_get_add_time_ids(fps - 1, motion_bucket_id, noise_aug)``.
  Loss: EDM with the preconditioning of ``EulerDiscreteScheduler`` (v-prediction, continuous
  timesteps): ``c_in = 1/sqrt(sigma^2+1)``, ``c_noise = 0.25 ln sigma``,
  ``D = c_skip x + c_out F`` with ``c_skip = 1/(sigma^2+1)``, ``c_out = -sigma/sqrt(sigma^2+1)``,
  weight ``(sigma^2+1)/sigma^2``; ``ln sigma ~ N(0.7, 1.6^2)`` (SVD's training distribution),
  clamped to the scheduler's ``[sigma_min, sigma_max]``.

Frozen parts (VAE, text / image encoders) run under ``no_grad`` in ``encode``; only
``loss`` builds a graph. The motion embedder is added to the time embedding through a forward
hook on ``I2VModel.time_embedding`` (the same place the sampler adds it).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: SVD's pipeline defaults, used for the image condition during training too.
SVD_NOISE_AUG_STRENGTH = 0.02
SVD_MOTION_BUCKET_ID = 127
#: EDM log-normal sigma distribution used to train SVD (Blattmann et al. 2023).
SVD_P_MEAN, SVD_P_STD = 0.7, 1.6


@contextlib.contextmanager
def motion_hook(time_embedding: nn.Module, embedder: Optional[nn.Module], object: torch.Tensor, camera: torch.Tensor) -> Iterator[None]:  # noqa: A002
    """Add ``embedder(object, camera)`` ``[B, D]`` to the output of ``time_embedding`` while active."""
    if embedder is None:
        yield
        return

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        extra = embedder(object, camera)
        if extra.shape[0] != output.shape[0]:
            raise RuntimeError(f"motion embedding batch {extra.shape[0]} != time embedding batch {output.shape[0]}")
        return output + extra.to(device=output.device, dtype=output.dtype)

    handle = time_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_frames(family: str, frames: int, temporal_compression: int = 4) -> None:
    """CogVideoX's VAE compresses time 4x with a causal first frame: frames must be 4k+1."""
    if family.startswith("cogvideox") and (frames - 1) % temporal_compression != 0:
        raise ValueError(
            f"--frames {frames}: CogVideoX needs {temporal_compression}k+1 frames (e.g. 9, 13, 49), "
            "because its VAE compresses time 4x after the first frame"
        )
    if frames < 2:
        raise ValueError(f"--frames must be >= 2, got {frames}")


class DiffusionObjective:
    """Base class: ``encode(batch, generator)`` (frozen encoders) and ``loss(encoded, embedder, generator)``."""

    def __init__(self, model: Any, *, cache_encodings: bool = False) -> None:
        self.model = model
        self.device = model.device
        # Frozen-encoder outputs per clip index (VAE posterior mean/std, CLIP embedding): the
        # random parts (posterior sample, noise augmentation) are still drawn every step, so
        # caching changes speed, not the loss. Worth it when the data set fits in memory.
        self.cache: Optional[dict[int, dict[str, torch.Tensor]]] = {} if cache_encodings else None

    def _cached(self, batch: dict, compute) -> list[dict[str, torch.Tensor]]:
        """Per-item frozen encodings, from the cache where present; ``compute(rows)`` encodes
        the rows of ``batch`` (a list of positions) and returns one dict per row."""
        idx = [int(i) for i in batch["index"]] if "index" in batch else None
        if self.cache is None or idx is None:
            return compute(list(range(len(batch["caption"]))))
        todo = [r for r, i in enumerate(idx) if i not in self.cache]
        if todo:
            for r, item in zip(todo, compute(todo)):
                self.cache[idx[r]] = {k: v.detach().to("cpu") for k, v in item.items()}
        return [{k: v.to(self.device) for k, v in self.cache[i].items()} for i in idx]

    def _posterior(self, dist) -> tuple[torch.Tensor, torch.Tensor]:
        return dist.mean.float(), dist.std.float()

    def _sample(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Same as DiagonalGaussianDistribution.sample: mean + std * N(0, 1).
        return mean + std * self._randn(mean.shape, generator)

    def encode(self, batch: dict, generator: torch.Generator) -> dict:
        """Run the frozen encoders on ``batch`` (video ``[B,T,3,H,W]`` -1..1, captions, scores).

        Autocast is switched off here: the frozen parts run in the precision they were loaded in
        (and the CLIP image processor refuses bf16 tensors), only the denoiser runs under the
        trainer's mixed precision."""
        with torch.autocast(device_type=torch.device(self.device).type, enabled=False), torch.no_grad():
            return self._encode(batch, generator)

    def _encode(self, batch: dict, generator: torch.Generator) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, enc: dict, denoiser: nn.Module, embedder: Optional[nn.Module], generator: torch.Generator) -> torch.Tensor:  # pragma: no cover
        """The loss of one encoded batch. ``denoiser`` is passed in (not ``self.model.denoiser``)
        so that a trainer can route the call through its own (accelerate-wrapped) module."""
        raise NotImplementedError

    def time_embedding(self, denoiser: nn.Module) -> nn.Module:
        return denoiser.get_submodule(self.model.family.time_embedding_module)

    def _randn(self, shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        # Drawn on the generator's device (CPU) then moved: the same numbers on every device.
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, dtype)


class CogVideoXObjective(DiffusionObjective):
    """v-prediction loss of CogVideoX-I2V 1.0 / 1.5 (see module docs)."""

    def __init__(self, model: Any, *, cache_encodings: bool = False) -> None:
        super().__init__(model, cache_encodings=cache_encodings)
        self.pipe = model.pipeline
        self.cfg = model.denoiser.config
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _text(self, captions: list[str]) -> torch.Tensor:
        def embed(prompts: list[str]) -> torch.Tensor:
            emb, _ = self.pipe.encode_prompt(
                prompt=prompts, negative_prompt=None, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=int(self.cfg.max_text_seq_length), device=self.device,
            )
            return emb

        if self.cache is None:
            # One caption's T5 output is 226 x 4096 floats (3.7 MB) on CogVideoX-5B: only small,
            # in-memory data sets keep them.
            return embed(list(captions))
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            for c, e in zip(missing, embed(missing)):
                self._text_cache[c] = e.detach().to("cpu")
        return torch.stack([self._text_cache[c] for c in captions]).to(self.device)

    def _encode(self, batch: dict, generator: torch.Generator) -> dict:
        if batch.get("loss_weight") is not None:
            # Its latents mix 4 frames each (and pad the first); a pixel weight has no clean
            # counterpart there yet.
            raise ValueError("batch['loss_weight']: per-pixel loss weights are supported for SVD only, "
                             "not CogVideoX")
        vae = self.model.vae
        video = batch["video"].to(self.device, vae.dtype)  # [B, T, 3, H, W] in -1..1
        b, t, _, h, w = video.shape
        sf = float(vae.config.scaling_factor)
        x = video.permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]

        def compute(rows: list[int]) -> list[dict[str, torch.Tensor]]:
            vm, vs = self._posterior(vae.encode(x[rows]).latent_dist)
            im, is_ = self._posterior(vae.encode(x[rows][:, :, :1]).latent_dist)
            return [{"vm": vm[j], "vs": vs[j], "im": im[j], "is": is_[j]} for j in range(len(rows))]

        items = self._cached(batch, compute)
        stack = lambda k: torch.stack([it[k] for it in items])  # noqa: E731
        latents = self._sample(stack("vm"), stack("vs"), generator) * sf
        latents = latents.permute(0, 2, 1, 3, 4)  # [B, F, C, h, w]
        img = self._sample(stack("im"), stack("is"), generator).permute(0, 2, 1, 3, 4)
        # As CogVideoXImageToVideoPipeline.prepare_latents: 1.5 checkpoints invert the scale.
        img = img / sf if vae.config.get("invert_scale_latents", False) else img * sf
        nf = latents.shape[1]
        skip = 0
        pt = self.cfg.get("patch_size_t")
        if pt is not None and nf % pt != 0:
            skip = pt - nf % pt
            latents = torch.cat([latents[:, :1].expand(-1, skip, -1, -1, -1), latents], dim=1)
            nf = latents.shape[1]
        image_latents = torch.cat([img, img.new_zeros(b, nf - 1, *img.shape[2:])], dim=1)
        rotary = None
        if self.cfg.use_rotary_positional_embeddings:
            rotary = self.pipe._prepare_rotary_positional_embeddings(h, w, nf, self.device)
        return {
            "latents": latents,
            "image_latents": image_latents,
            "text": self._text(list(batch["caption"])),
            "rotary": rotary,
            "skip": skip,
            "object": batch["object"].to(self.device).float(),
            "camera": batch["camera"].to(self.device).float(),
        }

    def loss(self, enc: dict, denoiser: nn.Module, embedder: Optional[nn.Module], generator: torch.Generator) -> torch.Tensor:
        sched = self.model.scheduler
        x0 = enc["latents"]
        b = x0.shape[0]
        n_train = int(sched.config.num_train_timesteps)
        t = torch.randint(0, n_train, (b,), generator=generator).to(self.device)
        noise = self._randn(x0.shape, generator)
        noisy = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        dtype = next(denoiser.parameters()).dtype
        inp = torch.cat([noisy, enc["image_latents"]], dim=2).to(dtype)
        ofs = None
        if self.cfg.get("ofs_embed_dim") is not None:
            ofs = inp.new_full((1,), 2.0)  # the pipeline's constant
        with motion_hook(self.time_embedding(denoiser), embedder, enc["object"], enc["camera"]):
            pred = denoiser(
                hidden_states=inp, encoder_hidden_states=enc["text"].to(dtype), timestep=t, ofs=ofs,
                image_rotary_emb=enc["rotary"], return_dict=False,
            )[0]
        s = enc["skip"]
        return F.mse_loss(pred[:, s:].float(), target[:, s:].float())


class SVDObjective(DiffusionObjective):
    """EDM loss of Stable Video Diffusion (see module docs)."""

    def __init__(self, model: Any, *, fps: int = 7, motion_bucket_id: int = SVD_MOTION_BUCKET_ID,
                 noise_aug_strength: float = SVD_NOISE_AUG_STRENGTH, cache_encodings: bool = False) -> None:
        super().__init__(model, cache_encodings=cache_encodings)
        self.pipe = model.pipeline
        self.fps = int(fps)
        self.motion_bucket_id = int(motion_bucket_id)
        self.noise_aug_strength = float(noise_aug_strength)
        cfg = model.scheduler.config
        self.sigma_min = float(cfg.get("sigma_min") or 0.002)
        self.sigma_max = float(cfg.get("sigma_max") or 700.0)
        self.prediction_type = cfg.get("prediction_type", "v_prediction")
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"SVD training: scheduler prediction_type {self.prediction_type!r} is not supported")

    def _encode(self, batch: dict, generator: torch.Generator) -> dict:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

        vae = self.model.vae
        video = batch["video"].to(self.device, vae.dtype)  # [B, T, 3, H, W] in -1..1
        b, t = video.shape[:2]
        first = video[:, 0].float()
        size = int(self.model.image_encoder.config.image_size)

        def compute(rows: list[int]) -> list[dict[str, torch.Tensor]]:
            vm, vs = self._posterior(vae.encode(video[rows].flatten(0, 1)).latent_dist)
            vm, vs = vm.reshape(len(rows), t, *vm.shape[1:]), vs.reshape(len(rows), t, *vs.shape[1:])
            # CLIP input exactly as the pipeline prepares a PIL image: antialiased resize in -1..1.
            clip_in = (_resize_with_antialiasing(first[rows], (size, size)) + 1.0) / 2.0
            emb = self.pipe._encode_image(clip_in, self.device, 1, False)
            return [{"vm": vm[j], "vs": vs[j], "clip": emb[j]} for j in range(len(rows))]

        items = self._cached(batch, compute)
        stack = lambda k: torch.stack([it[k] for it in items])  # noqa: E731
        latents = self._sample(stack("vm"), stack("vs"), generator) * float(vae.config.scaling_factor)
        image_embeddings = stack("clip")
        cond = first + self.noise_aug_strength * self._randn(first.shape, generator)
        image_latents = self.pipe._encode_vae_image(cond, self.device, 1, False).float()
        image_latents = image_latents.unsqueeze(1).repeat(1, t, 1, 1, 1)
        added_time_ids = self.pipe._get_add_time_ids(
            self.fps - 1, self.motion_bucket_id, self.noise_aug_strength, image_embeddings.dtype, b, 1, False
        ).to(self.device)
        enc = {
            "latents": latents,
            "image_latents": image_latents,
            "image_embeddings": image_embeddings,
            "added_time_ids": added_time_ids,
            "object": batch["object"].to(self.device).float(),
            "camera": batch["camera"].to(self.device).float(),
        }
        if batch.get("loss_weight") is not None:
            enc["loss_weight"] = _latent_weight(batch["loss_weight"], latents.shape, self.device)
        return enc

    def loss(self, enc: dict, denoiser: nn.Module, embedder: Optional[nn.Module], generator: torch.Generator) -> torch.Tensor:
        x0 = enc["latents"]
        b = x0.shape[0]
        log_sigma = SVD_P_MEAN + SVD_P_STD * torch.randn((b,), generator=generator)
        log_sigma = log_sigma.clamp(math.log(self.sigma_min), math.log(self.sigma_max)).to(self.device)
        sigma = log_sigma.exp().view(b, 1, 1, 1, 1)
        noise = self._randn(x0.shape, generator)
        noisy = x0 + sigma * noise
        c_in = 1.0 / (sigma**2 + 1.0).sqrt()  # EulerDiscreteScheduler.scale_model_input
        c_noise = 0.25 * log_sigma  # EulerDiscreteScheduler's continuous timesteps
        dtype = next(denoiser.parameters()).dtype
        inp = torch.cat([noisy * c_in, enc["image_latents"]], dim=2).to(dtype)
        with motion_hook(self.time_embedding(denoiser), embedder, enc["object"], enc["camera"]):
            out = denoiser(
                inp, c_noise.to(dtype), encoder_hidden_states=enc["image_embeddings"].to(dtype),
                added_time_ids=enc["added_time_ids"].to(dtype), return_dict=False,
            )[0].float()
        if self.prediction_type == "v_prediction":  # EulerDiscreteScheduler.step's x0 formula
            denoised = out * (-sigma / (sigma**2 + 1.0).sqrt()) + noisy / (sigma**2 + 1.0)
        else:
            denoised = noisy - sigma * out
        weight = (sigma**2 + 1.0) / sigma**2
        err = weight * (denoised - x0) ** 2
        if "loss_weight" in enc:
            err = err * enc["loss_weight"]
        return err.mean()


def _latent_weight(weight: torch.Tensor, latent_shape: torch.Size, device: Any) -> torch.Tensor:
    """Per-pixel loss weights ``[B,T,1,H,W]`` → ``[B,T,1,h,w]`` at the latents' size (area
    average), scaled to mean 1 per clip so weighting moves the loss between pixels, not its size."""
    b, t, _, h, w = latent_shape
    if weight.dim() != 5 or tuple(weight.shape[:3]) != (b, t, 1) or (weight < 0).any():
        raise ValueError(f"batch['loss_weight']: expected non-negative weights [B={b}, T={t}, 1, H, W], "
                         f"got shape {tuple(weight.shape)}")
    small = F.interpolate(weight.float().flatten(0, 1), size=(h, w), mode="area").view(b, t, 1, h, w)
    return (small / small.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-8)).to(device)


def objective_for(model: Any, **kwargs: Any) -> DiffusionObjective:
    """The loss of a loaded ``pipelines.I2VModel``'s family (``kwargs`` go to its objective)."""
    name = model.family.name
    if name.startswith("cogvideox"):
        return CogVideoXObjective(model, **kwargs)
    if name == "svd":
        return SVDObjective(model, **kwargs)
    raise ValueError(f"no training objective for family {name!r}")
