"""Loading a local diffusers folder into an ``I2VModel``.

Only local folders, only safetensors: ``from_pretrained(..., local_files_only=True,
use_safetensors=True)``. Before diffusers sees a file we check every weight file's safetensors
header against its size, so a corrupt or truncated download is reported by path instead of as a
deep stack trace. Loading never writes to the folder (weights are memory-mapped read-only;
in-place edits of the loaded parameters do not reach the files).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from families import Family, ModelFolderError, detect_family, noise_level_from_timestep
from pipelines.transformers_compat import prefer_pil_image_processor

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFLOAD_MODES = ("none", "model", "sequential")

# Components holding torch weights (the rest are tokenizers, schedulers, image processors).
_WEIGHT_COMPONENTS = ("transformer", "unet", "vae", "text_encoder", "image_encoder")
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class ModelLoadError(ModelFolderError):
    """A model folder is recognised but a component cannot be loaded (names the file)."""


def check_safetensors_file(path: str) -> dict[str, Any]:
    """Validate a safetensors file's header against its size without reading the tensors.

    Returns the parsed header. Raises ``ModelLoadError`` naming ``path`` if the file is not
    safetensors, its header is corrupt, or it is truncated (shorter than its header says).
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise ModelLoadError(
                    f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size} bytes)"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path}: corrupt safetensors header (entry {key!r})") from None
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        raise ModelLoadError(
            f"{path}: truncated safetensors file ({size} of {expected} bytes); re-download or re-save it"
        )
    if size > expected:
        raise ModelLoadError(f"{path}: corrupt safetensors file ({size - expected} unexpected trailing bytes)")
    return header


def _check_component_weights(folder: str, component: str) -> None:
    comp_dir = os.path.join(folder, component)
    names = sorted(os.listdir(comp_dir))
    safes = [n for n in names if n.endswith(".safetensors")]
    if not safes:
        unsafe = [n for n in names if n.endswith(_UNSAFE_SUFFIXES)]
        if unsafe:
            raise ModelLoadError(
                f"{comp_dir}: only pickle weights ({', '.join(unsafe)}); MotionDial loads safetensors only "
                "(convert them, e.g. load and save_pretrained(..., safe_serialization=True) in a trusted environment)"
            )
        raise ModelLoadError(f"{comp_dir}: no weights (expected *.safetensors files)")
    for index_name in [n for n in names if n.endswith(".safetensors.index.json")]:
        index_path = os.path.join(comp_dir, index_name)
        try:
            with open(index_path, encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index_path}: corrupt shard index ({e})") from None
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(comp_dir, s)))
        if missing:
            raise ModelLoadError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
    for n in safes:
        check_safetensors_file(os.path.join(comp_dir, n))


@dataclass(eq=False)
class I2VModel:
    """One loaded image-to-video model.

    Attributes:
        family / variant / path: what was loaded (``families.Family``; ``"svd-xt"`` etc.).
        pipeline: the diffusers pipeline (CogVideoXImageToVideoPipeline / StableVideoDiffusionPipeline).
        denoiser, vae, scheduler, text_encoder, tokenizer, image_encoder: its components
            (``None`` where the family has none: SVD has no text encoder, CogVideoX no image encoder).
        dtype / device / offload: how it was loaded.
        time_embedding: the denoiser submodule whose output ``[B, time_embed_dim]`` is the
            timestep embedding; the sampler's motion hook adds to it.
        time_embed_dim: width of that embedding.
    """

    family: Family
    variant: str
    path: str
    pipeline: Any
    dtype: torch.dtype
    device: torch.device
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    time_embedding: torch.nn.Module = field(init=False, repr=False)
    time_embed_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.time_embedding = self.denoiser.get_submodule(self.family.time_embedding_module)
        linears = [m for m in self.time_embedding.modules() if isinstance(m, torch.nn.Linear)]
        self.time_embed_dim = int(linears[-1].out_features)

    # Components, read from the pipeline so that they stay the pipeline's own objects.
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        return getattr(self.pipeline, "text_encoder", None)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.pipeline, "tokenizer", None)

    @property
    def image_encoder(self) -> torch.nn.Module | None:
        return getattr(self.pipeline, "image_encoder", None)

    @property
    def resolution_locked(self) -> tuple[int, int] | None:
        """``(height, width)`` in pixels if the model only takes one size (CogVideoX 1.0's learned
        positional embeddings), else ``None``."""
        cfg = self.denoiser.config
        if self.family.denoiser == "transformer" and cfg.get("use_learned_positional_embeddings"):
            s = self.pipeline.vae_scale_factor_spatial
            return int(cfg.sample_height) * s, int(cfg.sample_width) * s
        return None

    @property
    def max_resolution(self) -> tuple[int, int] | None:
        """``(height, width)`` in pixels the model cannot exceed: CogVideoX 1.5's rotary position grid
        is built for at most ``sample_{h,w}`` latents. ``None`` = no cap (beyond memory)."""
        cfg = self.denoiser.config
        if self.family.denoiser == "transformer" and cfg.get("patch_size_t") is not None:
            s = self.pipeline.vae_scale_factor_spatial
            return int(cfg.sample_height) * s, int(cfg.sample_width) * s
        return self.resolution_locked

    def noise_level(self, timestep: Any) -> float:
        """The common noise level (0 clean .. 1 pure noise) of what the denoiser receives as timestep."""
        return noise_level_from_timestep(self.family, timestep, self.scheduler.config)

    def temporal_parameter_names(self) -> list[str]:
        """Denoiser state-dict keys of the family's temporal parameters (``Family.is_temporal``)."""
        return self.family.temporal_keys(self.denoiser.state_dict().keys())

    def fingerprint(self) -> dict:
        """``merging.fingerprint.fingerprint_state`` of the denoiser's (current) state dict."""
        from merging.fingerprint import fingerprint_state

        return fingerprint_state(self.denoiser.state_dict())


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    offload: str = "none",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
) -> I2VModel:
    """Load a local diffusers-format I2V model folder.

    Args:
        path: the model folder (with ``model_index.json``).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for every torch component.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        offload: ``"none"``; ``"model"`` (whole components move to ``device`` when used,
            accelerate's model CPU offload); ``"sequential"`` (layer by layer, least memory,
            slowest; weight schedules are not available with it). Offload needs an accelerator.
        vae_tiling / vae_slicing: decode in tiles / one frame batch at a time to save memory.
            SVD's temporal VAE has no tiling; slicing there decodes 2 frames at a time.
    Raises:
        ``families.ModelFolderError`` (or its subclasses ``UnsupportedFamilyError``,
        ``ModelLoadError``) naming the folder or file; ``ValueError`` for bad arguments.
    """
    prefer_pil_image_processor()  # before diffusers looks the name up
    from diffusers import CogVideoXImageToVideoPipeline, StableVideoDiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (expected e.g. 'cpu', 'cuda', 'cuda:0')") from None
    if offload != "none" and dev.type == "cpu":
        raise ValueError(f"offload={offload!r} moves weights between the CPU and an accelerator; device is 'cpu'. "
                         "Use offload='none' on CPU.")

    match = detect_family(path)
    folder = os.path.abspath(match.path)
    family = match.family
    for comp in family.required_components:
        if comp in _WEIGHT_COMPONENTS:
            _check_component_weights(folder, comp)
    if vae_tiling and family.name == "svd":
        raise ValueError("vae_tiling: SVD's temporal VAE decoder has no tiled decode; use vae_slicing instead")

    cls = StableVideoDiffusionPipeline if family.name == "svd" else CogVideoXImageToVideoPipeline
    try:
        pipe = cls.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 -- any failure inside diffusers/transformers: name the folder
        raise ModelLoadError(f"{folder}: could not load the {family.pipeline_class} ({type(e).__name__}: {e})") from e
    # diffusers leaves components the checkpoint lacks on the meta device; refuse them here
    # rather than fail mid-sampling.
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            meta = [n for n, p in comp.named_parameters() if p.is_meta]
            if meta:
                raise ModelLoadError(f"{os.path.join(folder, name)}: weights missing for {len(meta)} parameter(s), "
                                     f"e.g. {meta[0]!r}")
    pipe.set_progress_bar_config(disable=True)  # sample() reports progress through its own callback

    if offload == "model":
        pipe.enable_model_cpu_offload(device=dev)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing and family.name != "svd":
        # SVD's temporal decoder has no batch slicing (diffusers 0.42 raises NotImplementedError
        # from the inherited enable_slicing); sample() decodes it 2 frames at a time instead.
        pipe.vae.enable_slicing()
    return I2VModel(family=family, variant=match.variant, path=folder, pipeline=pipe, dtype=DTYPES[dtype],
                    device=dev, offload=offload, vae_tiling=vae_tiling, vae_slicing=vae_slicing)
