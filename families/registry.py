"""The family table and detection from a diffusers folder's ``model_index.json``."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ModelFolderError, UnsupportedFamilyError


@dataclass(frozen=True)
class Family:
    """Static facts about one I2V model family.

    Attributes:
        name: stable identifier stored in files we write (``"cogvideox-i2v"``, ...).
        pipeline_class: the diffusers pipeline ``_class_name`` in ``model_index.json``.
        denoiser: the component name of the denoiser (``"transformer"`` or ``"unet"``).
        required_components: components the folder must provide.
        temporal_pattern: regex (``re.search``) over denoiser state-dict keys selecting the
            parameters that model time. See ``is_temporal``.
        time_embedding_module: dotted path, inside the denoiser, of the module whose output is
            the timestep embedding that feeds every block; an extra embedding added to its
            output conditions the whole network.
        timestep_kind: ``"discrete"`` (integer steps 0..num_train_timesteps-1, passed as
            ``timestep=``) or ``"sigma"`` (EDM: the denoiser gets ``0.25 * ln(sigma)`` as its
            2nd positional argument).
        default_frames / default_fps: what the reference checkpoints were trained for.
        text_conditioned: whether the family's pipeline takes a prompt.
    """

    name: str
    pipeline_class: str
    denoiser: str
    required_components: tuple[str, ...]
    temporal_pattern: str
    time_embedding_module: str
    timestep_kind: Literal["discrete", "sigma"]
    default_frames: int
    default_fps: int
    text_conditioned: bool
    notes: str = ""
    _compiled: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.temporal_pattern))

    def is_temporal(self, key: str) -> bool:
        """Whether a denoiser state-dict key (with or without the component prefix) is temporal."""
        return self._compiled.search(key) is not None

    def temporal_keys(self, keys) -> list[str]:
        """The subset of ``keys`` that ``is_temporal`` selects, in input order."""
        return [k for k in keys if self.is_temporal(k)]


# CogVideoX has no factorised temporal layers: every block runs full 3-D attention over
# (frames x patches). The only parameters that mix information across frames are those
# attention projections; feed-forwards, norms and embeddings act per token. So "temporal" for
# CogVideoX means the attention projections of the transformer blocks (our choice, documented).
_COGVIDEOX_TEMPORAL = r"(^|\.)transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out|norm_q|norm_k)\b"

# SVD factorises space and time. Exactly these submodules are temporal; a naive "time" regex
# would also catch time_embedding / add_embedding / time_emb_proj, which are not.
_SVD_TEMPORAL = r"(temporal_transformer_blocks|temporal_res_block|time_mixer|time_pos_embed)"

COGVIDEOX_I2V = Family(
    name="cogvideox-i2v",
    pipeline_class="CogVideoXImageToVideoPipeline",
    denoiser="transformer",
    required_components=("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
    temporal_pattern=_COGVIDEOX_TEMPORAL,
    time_embedding_module="time_embedding",
    timestep_kind="discrete",
    default_frames=49,
    default_fps=8,
    text_conditioned=True,
    notes="CogVideoX 1.0 image-to-video (e.g. CogVideoX-5b-I2V), 480x720, learned positional "
    "embeddings lock the resolution.",
)

COGVIDEOX15_I2V = Family(
    name="cogvideox1.5-i2v",
    pipeline_class="CogVideoXImageToVideoPipeline",
    denoiser="transformer",
    required_components=("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
    temporal_pattern=_COGVIDEOX_TEMPORAL,
    time_embedding_module="time_embedding",
    timestep_kind="discrete",
    default_frames=81,
    default_fps=16,
    text_conditioned=True,
    notes="CogVideoX 1.5 image-to-video: temporal patching (patch_size_t) and an ofs embedding.",
)

SVD = Family(
    name="svd",
    pipeline_class="StableVideoDiffusionPipeline",
    denoiser="unet",
    required_components=("unet", "vae", "scheduler", "image_encoder", "feature_extractor"),
    temporal_pattern=_SVD_TEMPORAL,
    time_embedding_module="time_embedding",
    timestep_kind="sigma",
    default_frames=14,
    default_fps=7,
    text_conditioned=False,
    notes="Stable Video Diffusion (SVD 14 frames, SVD-XT 25 frames); no text encoder.",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (COGVIDEOX_I2V, COGVIDEOX15_I2V, SVD)}


def get_family(name: str) -> Family:
    """Look a family up by its ``name``; the error lists the known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedFamilyError(
            f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}"
        ) from None


@dataclass(frozen=True)
class FamilyMatch:
    """The result of ``detect_family``: the family, the variant and the folder's index."""

    family: Family
    variant: str  # "cogvideox-i2v", "cogvideox1.5-i2v", "svd", "svd-xt"
    path: str
    model_index: dict[str, Any]


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFolderError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{what}: {path} should hold a JSON object")
    return data


def detect_family(folder: str | os.PathLike) -> FamilyMatch:
    """Recognise the family of a local diffusers-format model folder.

    Reads only JSON files (``model_index.json`` and the denoiser's ``config.json``), so it is
    cheap and never touches weights. Raises ``ModelFolderError`` naming the folder when it is not
    a diffusers model or a required component folder is missing, and ``UnsupportedFamilyError``
    for a pipeline class we do not support.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ModelFolderError(f"model folder {folder!r} does not exist or is not a directory")
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ModelFolderError(
            f"{folder!r} is not a diffusers model folder: it has no model_index.json "
            "(expected a folder saved with save_pretrained, e.g. ComfyUI/models/diffusers/CogVideoX-5b-I2V)"
        )
    index = _read_json(index_path, "model index")
    cls = index.get("_class_name")
    candidates = [f for f in FAMILIES.values() if f.pipeline_class == cls]
    if not candidates:
        supported = sorted({f.pipeline_class for f in FAMILIES.values()})
        raise UnsupportedFamilyError(
            f"{index_path}: pipeline {cls!r} is not supported; MotionDial supports {', '.join(supported)}"
        )
    family = candidates[0]
    missing = [c for c in family.required_components if c not in index or index.get(c) in (None, [None, None])]
    if missing:
        raise ModelFolderError(f"{index_path}: missing component(s) {missing} required by {family.pipeline_class}")
    for comp in family.required_components:
        if not os.path.isdir(os.path.join(folder, comp)):
            raise ModelFolderError(
                f"{folder!r}: component folder {comp!r} is missing (model_index.json lists it)"
            )
    denoiser_cfg = _read_json(os.path.join(folder, family.denoiser, "config.json"), f"{family.denoiser} config")
    if family.pipeline_class == "CogVideoXImageToVideoPipeline":
        # 1.5 adds temporal patching and the "ofs" embedding; 1.0 has neither.
        is_15 = denoiser_cfg.get("patch_size_t") is not None or denoiser_cfg.get("ofs_embed_dim") is not None
        family = COGVIDEOX15_I2V if is_15 else COGVIDEOX_I2V
        variant = family.name
    else:
        variant = "svd-xt" if int(denoiser_cfg.get("num_frames", 14)) >= 25 else "svd"
    return FamilyMatch(family=family, variant=variant, path=folder, model_index=index)
