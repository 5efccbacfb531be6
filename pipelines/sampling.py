"""``sample()``: image -> video on diffusers' own pipelines, with two extension points.

The sampling loop, the scheduler and classifier-free guidance are diffusers' own
(``CogVideoXImageToVideoPipeline``, ``StableVideoDiffusionPipeline``). MotionDial only adds
PyTorch hooks for the duration of one call:

* a forward pre-hook on the denoiser (``with_kwargs=True``) reads the step's timestep, maps it to
  the common noise level (0 clean .. 1 pure noise) and lets a ``merging.patcher.WeightPatcher``
  set the scheduled weights before the denoiser runs;
* a forward hook on the family's timestep-embedding module adds the motion embedder's output,
  ``[uncond; cond]`` over the CFG batch;
* for SVD with a ``text_control`` (``textadapter.TextControl``), the text adapter's hooks on the
  UNet's temporal blocks, so that the prompt steers the temporal layers.

Both are removed, and the weights restored bit for bit, in ``finally``: after success, an
exception, ``KeyboardInterrupt`` or a progress callback that raises.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from merging.patcher import ScheduledWeights, WeightPatcher

from .loading import I2VModel

logger = logging.getLogger(__name__)

MAX_STEPS = 500
CFG_RANGE = (1.0, 30.0)
SCORE_RANGE = (1.0, 10.0)
MAX_SIDE = 4096
# CogVideoX: frames = 8j+1 (9, 17, ..., 49, ..., 81, ..., 161). The VAE compresses time 4x
# keeping the first frame (4k+1 frames -> k+1 latents), and its decoder returns 4k+1 frames only
# for an odd number of latents (an even count decodes to 4(k+1) frames: measured on diffusers 0.42).
COGVIDEOX_FRAMES = (9, 161)
SVD_FRAMES = (2, 128)
# A resolution-locked model takes an image whose aspect ratio is within this factor of its own:
# it is scaled and centre-cropped (at most ~20% of one side is lost). Beyond that we refuse
# rather than silently crop away much of the picture.
LOCKED_ASPECT_TOLERANCE = 1.25


@dataclass
class StepTrace:
    """What one denoiser call saw: step index, raw timestep, noise level, delta weights used.

    For a prediction-mixing schedule ``weights`` is ``None`` and ``mix`` lists the models run
    in that step, ``[(delta weights, mix weight), ...]``.
    """

    step: int
    timestep: float
    noise_level: float
    weights: Optional[dict[str, float]]
    mix: Optional[list[tuple[dict[str, float], float]]] = None


@dataclass
class Video:
    """Sampled frames ``[T, H, W, 3]`` float32 in 0..1 (CPU) and their frame rate.

    ``trace`` lists every denoiser call of the run (see ``StepTrace``); ``settings`` the
    resolved settings (size, frames, steps, ...).
    """

    frames: torch.Tensor
    fps: float
    trace: list[StepTrace] = field(default_factory=list, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def uint8(self) -> np.ndarray:
        """The frames as ``[T, H, W, 3]`` uint8 RGB (rounded)."""
        return (self.frames.clamp(0, 1).mul(255).add(0.5)).to(torch.uint8).numpy()


# -- inputs ------------------------------------------------------------------------------------
def load_image(image: Any, name: str = "image"):
    """Accept a path, PIL image, ``[H,W,3]`` uint8/float array or ``[H,W,3]`` / ``[1,H,W,3]``
    float tensor in 0..1 (ComfyUI IMAGE); return an RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: {path} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}: {path} is not a readable image ({e})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        image = image.float().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) == 0:
            raise ValueError(f"{name}: expected an [H, W, 3] image, got shape {tuple(image.shape)}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise ValueError(f"{name}: expected uint8 0..255 or finite floats 0..1, got dtype {arr.dtype}")
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    raise ValueError(f"{name}: expected a path, PIL image, array or tensor, got {type(image).__name__}")


def _size_multiple(model: I2VModel) -> int:
    pipe = model.pipeline
    if model.family.denoiser == "transformer":
        return int(pipe.vae_scale_factor_spatial) * int(model.denoiser.config.patch_size)
    # SVD: the VAE's 8x, then one 2x downsampling per UNet block but the last; the pipeline also
    # insists on multiples of 8.
    return math.lcm(8, int(pipe.vae_scale_factor) * 2 ** (len(model.denoiser.config.block_out_channels) - 1))


# CogVideoX 1.5 I2V was trained around 768 x 1360; diffusers' default (the full rotary grid,
# sample_h*8 x sample_w*8 = 2400 x 2400 for the real model) is far too large, so we default to
# this pixel area (capped by the grid).
COGVIDEOX15_DEFAULT_AREA = 768 * 1360


def _default_area(model: I2VModel) -> int:
    cfg = model.denoiser.config
    if model.family.denoiser == "transformer":
        s = int(model.pipeline.vae_scale_factor_spatial)
        return min(COGVIDEOX15_DEFAULT_AREA, int(cfg.sample_height) * s * int(cfg.sample_width) * s)
    # SVD: (sample_size * 8)^2 = 768^2 for the real model, the area of its 576 x 1024 default.
    return (int(cfg.sample_size) * int(model.pipeline.vae_scale_factor)) ** 2


def resolve_size(model: I2VModel, image_size: tuple[int, int], height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """Output ``(height, width)`` in pixels for an image of ``image_size = (w, h)``.

    Resolution-locked models take only their size (the image must be close to its aspect
    ratio). Otherwise: the given height/width (multiples of the model's size step, within its
    cap); a missing one follows the image's aspect ratio; with neither, the image's aspect ratio
    at the family's default pixel area, shrunk to fit the model's cap.
    """
    iw, ih = image_size
    if min(iw, ih) < 8:
        raise ValueError(f"image: {iw}x{ih} pixels is too small (need at least 8 pixels per side)")
    m = _size_multiple(model)
    locked = model.resolution_locked
    if locked is not None:
        lh, lw = locked
        if (height is not None and int(height) != lh) or (width is not None and int(width) != lw):
            raise ValueError(
                f"height/width {height}x{width}: this {model.family.name} model ({model.path}) only takes "
                f"{lh}x{lw} (learned positional embeddings lock its resolution)"
            )
        ratio = (iw / ih) / (lw / lh)
        if not 1 / LOCKED_ASPECT_TOLERANCE <= ratio <= LOCKED_ASPECT_TOLERANCE:
            raise ValueError(
                f"image: {iw}x{ih} (aspect {iw / ih:.2f}) cannot be taken by this resolution-locked "
                f"{model.family.name} model, which only generates {lw}x{lh} (aspect {lw / lh:.2f}); crop the image "
                f"to an aspect ratio within {LOCKED_ASPECT_TOLERANCE}x of {lw / lh:.2f} first"
            )
        return lh, lw
    cap_h, cap_w = model.max_resolution or (MAX_SIDE, MAX_SIDE)
    for what, v, cap in (("height", height, cap_h), ("width", width, cap_w)):
        if v is not None and (int(v) != v or v <= 0 or v % m or v > min(cap, MAX_SIDE)):
            raise ValueError(f"{what}={v}: must be a positive multiple of {m} up to {min(cap, MAX_SIDE)} for this "
                             f"{model.family.name} model ({model.path})")
    aspect = iw / ih
    if height is not None and width is not None:
        return int(height), int(width)
    if height is not None:
        return int(height), min(cap_w, max(m, int(round(height * aspect / m)) * m))
    if width is not None:
        return min(cap_h, max(m, int(round(width / aspect / m)) * m)), int(width)
    area = _default_area(model)
    h, w = math.sqrt(area / aspect), math.sqrt(area * aspect)
    shrink = min(1.0, cap_h / h, cap_w / w, MAX_SIDE / h, MAX_SIDE / w)
    return max(m, int(h * shrink / m) * m), max(m, int(w * shrink / m) * m)


def fit_image(img, height: int, width: int):
    """Scale ``img`` to cover ``width x height`` and centre-crop it (aspect kept, no stretching)."""
    from PIL import Image

    iw, ih = img.size
    if (iw, ih) == (width, height):
        return img
    s = max(width / iw, height / ih)
    rw, rh = max(width, round(iw * s)), max(height, round(ih * s))
    img = img.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.crop((left, top, left + width, top + height))


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r}: expected an integer in [{lo}, {hi}]")
    return int(value)


def _check_float(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a number in [{lo}, {hi}]") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name}={value!r}: expected a number in [{lo}, {hi}]")
    return v


def check_frames(model: I2VModel, frames: Any) -> int:
    """Validate a frame count for the model's family (CogVideoX: 8j+1 in 9..161; SVD: 2..128)."""
    if model.family.denoiser == "transformer":
        lo, hi = COGVIDEOX_FRAMES
        n = _check_int("frames", frames, lo, hi)
        k = 2 * int(model.pipeline.vae_scale_factor_temporal)
        if (n - 1) % k:
            below = n - (n - 1) % k
            raise ValueError(f"frames={n}: {model.family.name} takes {k}j+1 frames (e.g. {max(below, lo)} or {below + k}): "
                             f"its VAE compresses time {k // 2}x and decodes an odd number of latent frames")
        return n
    lo, hi = SVD_FRAMES
    return _check_int("frames", frames, lo, hi)


# -- prediction mixing ---------------------------------------------------------------------------
def mixing_forward(forward: Callable[..., Any], patcher: WeightPatcher, calls: Callable[[Any], list],
                   timestep_of: Callable[[tuple, dict], Any]) -> Callable[..., Any]:
    """Wrap a denoiser's ``forward`` so that one call runs every model of a prediction mix.

    For the step's ``calls(timestep) = [(delta weights, mix), ...]`` it sets each model's
    weights with ``patcher.set_weights`` (written only when they change), runs ``forward`` and
    returns ``sum_k mix_k * prediction_k`` (accumulated in fp32, returned in the prediction's
    dtype). Denoisers are called with ``return_dict=False`` by the pipelines: the prediction is
    element 0 of the returned tuple.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        plan = calls(timestep_of(args, kwargs))
        if len(plan) == 1 and plan[0][1] == 1.0:
            patcher.set_weights(plan[0][0])
            return forward(*args, **kwargs)
        acc, dtype = None, None
        for weights, mix in plan:
            patcher.set_weights(weights)
            out = forward(*args, **kwargs)
            if not isinstance(out, tuple):
                raise TypeError("prediction mixing expects the denoiser to be called with return_dict=False")
            pred = out[0]
            dtype = pred.dtype
            acc = pred.float().mul(mix) if acc is None else acc.add_(pred.float(), alpha=mix)
        return (acc.to(dtype),)

    return run


def _timestep_of(args: tuple, kwargs: dict) -> Any:
    return kwargs["timestep"] if "timestep" in kwargs else args[1]


# -- the motion embedding ----------------------------------------------------------------------
@torch.no_grad()
def _motion_embeddings(embedder: torch.nn.Module, obj: float, cam: float, cfg: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uncond [1, D], cond [1, D])`` for one sample; embedders may define ``cfg_embedding``
    (``motion.embedding.MotionScoreEmbedding``) or just ``uncond_scores``."""
    o = torch.tensor([obj], dtype=torch.float32)
    c = torch.tensor([cam], dtype=torch.float32)
    if callable(getattr(embedder, "cfg_embedding", None)):
        e_u, e_c = embedder.cfg_embedding(o, c, cfg)
    else:
        e_c = embedder(o, c)
        pair = getattr(embedder, "uncond_scores", None)
        e_u = embedder(torch.tensor([float(pair[0])]), torch.tensor([float(pair[1])])) if pair is not None and cfg > 1 else e_c
    for what, e in (("conditional", e_c), ("unconditional", e_u)):
        if not isinstance(e, torch.Tensor) or tuple(e.shape) != (1, dim):
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"motion_embedder ({type(embedder).__name__}) returned {shape} for the {what} half; "
                             f"expected [1, {dim}] (the model's time_embed_dim)")
        if not torch.isfinite(e).all():
            raise ValueError(f"motion_embedder ({type(embedder).__name__}) returned non-finite values")
    return e_u, e_c


def sample(
    model: I2VModel,
    image: Any,
    prompt: Optional[str] = "",
    *,
    negative_prompt: str = "",
    frames: int,
    steps: int,
    cfg: float,
    seed: int,
    height: Optional[int] = None,
    width: Optional[int] = None,
    fps: Optional[float] = None,
    object_intensity: Optional[float] = None,
    camera_intensity: Optional[float] = None,
    weight_schedule: Optional[ScheduledWeights] = None,
    motion_embedder: Optional[torch.nn.Module] = None,
    text_control: Optional[Any] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Video:
    """Generate a video from ``image`` (and ``prompt`` for text-conditioned families).

    Args:
        model: from ``pipelines.load_model``.
        image: path, PIL image, ``[H,W,3]`` array or tensor (see ``load_image``); scaled and
            centre-cropped to the output size (see ``resolve_size``).
        prompt / negative_prompt: text. CogVideoX reads it natively. SVD has no text input: it
            reads the prompt only through ``text_control``; without one a non-empty prompt is
            ignored, with a logged warning and ``settings["prompt_ignored"] = True``.
        frames: CogVideoX 8j+1 in 9..161 (49 and 81 are the reference lengths); SVD 2..128. steps: 1..500.
        cfg: classifier-free guidance scale 1..30 (1 = off). For SVD it is the maximum of SVD's
            per-frame guidance ramp (which starts at 1.0).
        seed: same seed and inputs -> same frames.
        height / width: output size in pixels (default: see ``resolve_size``).
        fps: frame rate of the result (SVD is also conditioned on it); default: the family's.
        object_intensity / camera_intensity: motion scores 1..10 for ``motion_embedder``; both
            are required with an embedder and refused without one (a clear error rather than a
            silent no-op: a model without an embedder cannot follow them).
        weight_schedule: ``merging.patcher.ScheduledWeights`` applied to the denoiser per step
            (weight patching), or ``merging.patcher.ScheduledPredictions`` (a ``PredictionBlend``:
            one denoiser run per model, predictions mixed; costs one run per model).
        motion_embedder: module ``(object [B], camera [B]) -> [B, time_embed_dim]`` added to the
            timestep embedding for both CFG halves.
        text_control: SVD only: a ``textadapter.TextControl`` (``load_text_control``: ED stage 1's
            text adapter and its CLIP text encoder). For this call its adapter is attached to the
            UNet's temporal blocks, reading ``prompt`` (conditional half) and ``negative_prompt``
            (unconditional half). Refused for CogVideoX, whose blocks already see the prompt.
        progress: ``progress(step, total)`` after every step; raising from it cancels the run.
    Returns:
        ``Video(frames [T,H,W,3] float32 0..1, fps)``; the denoiser's weights are unchanged.
    """
    if not isinstance(model, I2VModel):
        raise TypeError(f"model must be a pipelines.I2VModel (from load_model), got {type(model).__name__}")
    fam = model.family
    n_frames = check_frames(model, frames)
    n_steps = _check_int("steps", steps, 1, MAX_STEPS)
    cfg = _check_float("cfg", cfg, *CFG_RANGE)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    fps = _check_float("fps", fps if fps is not None else fam.default_fps, 1.0, 240.0)
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable progress(step, total)")
    if text_control is not None:
        if fam.text_conditioned:
            raise ValueError(
                f"text_control: {fam.name} already reads the prompt in every transformer block (its own text "
                "encoder); a text adapter is only for SVD. Pass the prompt alone"
            )
        if not callable(getattr(text_control, "prompted", None)):
            raise ValueError(f"text_control must be a textadapter.TextControl (load_text_control), got "
                             f"{type(text_control).__name__}")

    has_scores = object_intensity is not None or camera_intensity is not None
    if motion_embedder is None and has_scores:
        raise ValueError(
            "object_intensity/camera_intensity need a motion_embedder (a motion-conditioned model); "
            "this call has none, so the scores could not have any effect"
        )
    if motion_embedder is not None:
        if not isinstance(motion_embedder, torch.nn.Module):
            raise ValueError(f"motion_embedder must be a torch.nn.Module, got {type(motion_embedder).__name__}")
        if object_intensity is None or camera_intensity is None:
            raise ValueError("a motion_embedder needs both object_intensity and camera_intensity (scores 1..10)")
        object_intensity = _check_float("object_intensity", object_intensity, *SCORE_RANGE)
        camera_intensity = _check_float("camera_intensity", camera_intensity, *SCORE_RANGE)
    if weight_schedule is not None:
        if not isinstance(weight_schedule, ScheduledWeights):
            raise ValueError(f"weight_schedule must be a merging.patcher.ScheduledWeights, got "
                             f"{type(weight_schedule).__name__}")
        if model.offload == "sequential":
            raise ValueError("weight schedules need the denoiser's weights in memory; load the model with "
                             "offload='none' or 'model', not 'sequential'")

    pil = load_image(image)
    h, w = resolve_size(model, pil.size, height, width)
    pil = fit_image(pil, h, w)
    # SVD has no text path: without a text adapter its prompt cannot have any effect. Say so
    # (log + settings) rather than fail, so one workflow can drive either family.
    prompt_ignored = not fam.text_conditioned and text_control is None and bool(prompt or negative_prompt)
    if prompt_ignored:
        logger.warning("%s has no text input: the prompt is ignored (pass text_control, a trained text adapter, "
                       "to steer its temporal layers with it)", fam.name)

    denoiser = model.denoiser
    trace: list[StepTrace] = []
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # With offload the accelerator's memory is what is short: keep the base copy in host memory.
    patcher = (WeightPatcher(denoiser, weight_schedule, base_device="cpu" if model.offload != "none" else None)
               if weight_schedule is not None else None)
    embeds = (
        _motion_embeddings(motion_embedder, object_intensity, camera_intensity, cfg, model.time_embed_dim)
        if motion_embedder is not None else None
    )

    mixing = weight_schedule is not None and weight_schedule.mode == "predictions"

    def before_denoiser(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = _timestep_of(args, kwargs)
        level = model.noise_level(t)
        used, mix = None, None
        if mixing:
            mix = weight_schedule.calls(level)
        elif patcher is not None:
            patcher.apply(level)
            used = patcher.current_weights
        trace.append(StepTrace(len(trace), float(torch.as_tensor(t).reshape(-1)[0]), level, used, mix))

    extras: dict[tuple, torch.Tensor] = {}  # the [N, D] addend, built once per batch size/dtype/device

    def add_motion(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        n = output.shape[0]
        key = (n, output.dtype, output.device)
        extra = extras.get(key)
        if extra is None:
            e_u, e_c = embeds
            if cfg > 1.0:
                if n % 2:
                    raise RuntimeError(f"expected a CFG batch [uncond; cond] of even size at the time embedding, got {n}")
                extra = torch.cat([e_u.expand(n // 2, -1), e_c.expand(n // 2, -1)])
            else:
                extra = e_c.expand(n, -1)
            extra = extras[key] = extra.to(device=output.device, dtype=output.dtype).contiguous()
        return output + extra

    def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        if progress is not None:
            progress(i + 1, n_steps)
        return kwargs

    handles = []
    wrapped = False
    # accelerate's offload hooks install their own instance-level forward: wrap whatever
    # forward is current and put exactly that back.
    own_forward = denoiser.__dict__.get("forward")
    try:
        with ExitStack() as stack:
            if patcher is not None:
                stack.enter_context(patcher)
            handles.append(denoiser.register_forward_pre_hook(before_denoiser, with_kwargs=True))
            if mixing:
                # An instance attribute shadows the class's forward for this call only; nn.Module's
                # __call__ still runs the hooks around it. Removed in `finally`.
                denoiser.forward = mixing_forward(
                    denoiser.forward, patcher,
                    lambda t: weight_schedule.calls(model.noise_level(t)), _timestep_of)
                wrapped = True
            if embeds is not None:
                handles.append(model.time_embedding.register_forward_hook(add_motion))
            if text_control is not None:
                # Encodes the prompts once; the adapter's hooks are removed when the stack unwinds.
                stack.enter_context(text_control.prompted(denoiser, prompt or "", negative_prompt or ""))
            common = dict(height=h, width=w, num_frames=n_frames, num_inference_steps=n_steps, generator=generator,
                          output_type="pt", callback_on_step_end=on_step_end)
            if fam.name == "svd":
                out = model.pipeline(pil, fps=int(round(fps)), min_guidance_scale=1.0, max_guidance_scale=cfg,
                                     decode_chunk_size=2 if model.vae_slicing else n_frames, **common)
            else:
                out = model.pipeline(pil, prompt=prompt or "", negative_prompt=negative_prompt or "",
                                     guidance_scale=cfg,
                                     max_sequence_length=int(denoiser.config.max_text_seq_length), **common)
    finally:
        if wrapped:
            if own_forward is not None:
                denoiser.forward = own_forward
            else:
                del denoiser.forward
        for hd in handles:
            hd.remove()

    video = out.frames[0].permute(0, 2, 3, 1).to(device="cpu", dtype=torch.float32).contiguous()
    settings = dict(family=fam.name, variant=model.variant, model=model.path, height=h, width=w, frames=n_frames,
                    steps=n_steps, cfg=cfg, seed=seed, fps=fps, prompt=prompt or "", negative_prompt=negative_prompt,
                    object_intensity=object_intensity, camera_intensity=camera_intensity,
                    weight_schedule=type(weight_schedule.schedule).__name__ if weight_schedule is not None else None,
                    weight_writes=patcher.writes if patcher is not None else 0,
                    motion_embedder=type(motion_embedder).__name__ if motion_embedder is not None else None,
                    text_control=getattr(text_control, "path", type(text_control).__name__) if text_control is not None
                    else None, prompt_ignored=prompt_ignored,
                    dtype=str(model.dtype).replace("torch.", ""), device=str(model.device))
    return Video(frames=video, fps=fps, trace=trace, settings=settings)
