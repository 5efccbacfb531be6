"""The generator-side motion-score embedder (MotionStone injection).

``MotionScoreEmbedding`` turns an object-motion score and a camera-motion score (each 1..10)
into a vector of the width of the denoiser's timestep embedding. The sampler adds it to the
output of the family's ``time_embedding`` module, so it modulates every block through the
adaptive norms, exactly where the timestep does.

Decoupled (default): each score gets its own sinusoidal features and its own MLP; the two
outputs are concatenated (object first) to ``time_embed_dim``. The non-decoupled variant (one
MLP on the features of both scores, for the ablation) has the same interface and file format.
The last layer of every MLP is zero-initialised: a fresh embedder outputs exact zeros, and
``x + 0`` is bit-identical to ``x``, so sampling with a fresh embedder equals the base model.

Files: one ``.safetensors`` file holding the weights and, in its metadata, the format name and
version, the config needed to rebuild the module, the family and the base model's fingerprint
(``merging.fingerprint``). ``load_motion_embedder`` refuses a file made for another base.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

FORMAT_NAME = "motiondial.motion_embedder"
FORMAT_VERSION = 1

SCORE_MIN = 1.0
SCORE_MAX = 10.0
#: Neutral scores (the middle of the 1..10 scale) given to the unconditional CFG half when
#: motion guidance is on. Our choice: nothing published fixes a "no preference" score.
NEUTRAL_SCORE = 5.5


class MotionEmbedderFileError(ValueError):
    """An embedder file is missing, malformed, of another format, or made for another base."""


def validate_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Check a score tensor ``[B]`` (float, 1..10) and return it as float32.

    Raises ``ValueError`` naming the input (``name``) when it is not 1-D, not finite or out of
    range.
    """
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim == 0:
        scores = scores.reshape(1)
    if scores.ndim != 1:
        raise ValueError(f"{name} scores must be a 1-D tensor [B], got shape {tuple(scores.shape)}")
    s = scores.float()
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} scores must be finite numbers in {SCORE_MIN:g}..{SCORE_MAX:g}, got {s.tolist()}")
    # A small tolerance so that scores that went through bf16 (10.0 -> 10.0, 5.5 -> 5.5, but
    # e.g. 9.99 -> 10.0) are not refused.
    if (s < SCORE_MIN - 1e-3).any() or (s > SCORE_MAX + 1e-3).any():
        raise ValueError(
            f"{name} scores must lie in {SCORE_MIN:g}..{SCORE_MAX:g} (1 = still, 10 = strongest motion), "
            f"got min {s.min().item():g}, max {s.max().item():g}"
        )
    return s


class SinusoidalScoreFeatures(nn.Module):
    """Fixed sinusoidal features of a score in 1..10.

    The score is mapped to ``x = (s - 1) / 9`` in [0, 1]; features are ``x`` itself and
    ``sin / cos(pi * 2**k * x)`` for ``k = 0 .. num_freqs - 1``, so the lowest frequency covers
    the whole scale once (monotone in ``x`` on half a period) and the highest resolves
    fractions of a score step. Output ``[B, 2 * num_freqs + 1]`` float32.
    """

    def __init__(self, num_freqs: int = 6) -> None:
        super().__init__()
        if num_freqs < 1:
            raise ValueError(f"num_freqs must be >= 1, got {num_freqs}")
        self.num_freqs = int(num_freqs)
        freqs = math.pi * (2.0 ** torch.arange(self.num_freqs, dtype=torch.float32))
        # A buffer (not a parameter): fixed, moves with .to(device), not saved (rebuilt from config).
        self.register_buffer("freqs", freqs, persistent=False)

    @property
    def out_dim(self) -> int:
        return 2 * self.num_freqs + 1

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        x = ((scores.float() - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)).unsqueeze(-1)
        ang = x * self.freqs.to(x.device)
        return torch.cat([x, torch.sin(ang), torch.cos(ang)], dim=-1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
    # Zero the last layer: the embedder starts as an exact no-op on the base model.
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def split_width(time_embed_dim: int) -> tuple[int, int]:
    """How the embedding width is shared between object and camera: object gets the extra
    channel when the width is odd."""
    obj = (time_embed_dim + 1) // 2
    return obj, time_embed_dim - obj


class MotionScoreEmbedding(nn.Module):
    """Embed (object, camera) motion scores into the timestep-embedding space.

    Args:
        time_embed_dim: width of the denoiser's timestep embedding (``I2VModel.time_embed_dim``:
            512 for CogVideoX-5B, 1280 for SVD).
        num_freqs: sinusoidal frequencies per score (see ``SinusoidalScoreFeatures``).
        hidden: hidden width of each MLP; default ``clamp(time_embed_dim // 2, 32, 512)``.
        decoupled: ``True`` = one MLP per score, outputs concatenated (object channels first);
            ``False`` = one MLP on both scores' features (the ablation).
        uncond_scores: ``None`` (default): both CFG halves get the user's scores. A pair
            ``(object, camera)``: "motion guidance" -- the sampler gives the unconditional half
            these (neutral) scores instead; see ``motion_guidance_scale``.
        motion_guidance_scale: the scale of the motion guidance, used only with
            ``uncond_scores``; see ``cfg_embedding``.
        family / base_fingerprint: what the embedder was trained for; written into its file.

    ``forward(object [B], camera [B]) -> [B, time_embed_dim]`` (float32; scores 1..10).
    """

    def __init__(
        self,
        time_embed_dim: int,
        *,
        num_freqs: int = 6,
        hidden: Optional[int] = None,
        decoupled: bool = True,
        uncond_scores: Optional[Sequence[float]] = None,
        motion_guidance_scale: float = 1.0,
        family: Optional[str] = None,
        base_fingerprint: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        if int(time_embed_dim) < 2 and decoupled:
            raise ValueError(f"a decoupled embedder needs time_embed_dim >= 2, got {time_embed_dim}")
        if int(time_embed_dim) < 1:
            raise ValueError(f"time_embed_dim must be >= 1, got {time_embed_dim}")
        self.time_embed_dim = int(time_embed_dim)
        self.num_freqs = int(num_freqs)
        self.hidden = int(hidden) if hidden is not None else max(32, min(512, self.time_embed_dim // 2))
        self.decoupled = bool(decoupled)
        self.family = family
        self.base_fingerprint = dict(base_fingerprint) if base_fingerprint is not None else None
        self.uncond_scores: Optional[tuple[float, float]] = None
        self.motion_guidance_scale = float(motion_guidance_scale)
        self.set_motion_guidance(uncond_scores, motion_guidance_scale)

        self.features = SinusoidalScoreFeatures(self.num_freqs)
        f = self.features.out_dim
        if self.decoupled:
            d_obj, d_cam = split_width(self.time_embed_dim)
            self.object_mlp = _mlp(f, self.hidden, d_obj)
            self.camera_mlp = _mlp(f, self.hidden, d_cam)
        else:
            self.joint_mlp = _mlp(2 * f, self.hidden, self.time_embed_dim)

    # -- configuration -------------------------------------------------------------------
    def set_motion_guidance(self, uncond_scores: Optional[Sequence[float]], scale: float = 1.0) -> None:
        """Turn motion guidance on (``uncond_scores=(obj, cam)``, e.g. ``(5.5, 5.5)``) or off (``None``)."""
        if uncond_scores is None:
            self.uncond_scores = None
        else:
            pair = tuple(float(s) for s in uncond_scores)
            if len(pair) != 2:
                raise ValueError(f"uncond_scores must be a pair (object, camera), got {uncond_scores!r}")
            validate_scores(torch.tensor(pair), "uncond (neutral)")
            self.uncond_scores = pair  # type: ignore[assignment]
        if not math.isfinite(float(scale)) or float(scale) < 0:
            raise ValueError(f"motion_guidance_scale must be a finite number >= 0, got {scale!r}")
        self.motion_guidance_scale = float(scale)

    def config(self) -> dict[str, Any]:
        """The constructor arguments needed to rebuild this module (JSON-serialisable)."""
        return {
            "time_embed_dim": self.time_embed_dim,
            "num_freqs": self.num_freqs,
            "hidden": self.hidden,
            "decoupled": self.decoupled,
        }

    # -- forward -------------------------------------------------------------------------
    def forward(self, object: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """``object``, ``camera``: ``[B]`` scores 1..10 -> ``[B, time_embed_dim]`` float32."""
        o = validate_scores(object, "object")
        c = validate_scores(camera, "camera")
        if o.shape != c.shape:
            raise ValueError(f"object and camera scores must have the same shape [B], got {tuple(o.shape)} and {tuple(c.shape)}")
        dev = self.features.freqs.device
        o, c = o.to(dev), c.to(dev)
        if self.decoupled:
            return torch.cat([self.object_mlp(self.features(o)), self.camera_mlp(self.features(c))], dim=-1)
        return self.joint_mlp(torch.cat([self.features(o), self.features(c)], dim=-1))

    def cfg_embedding(
        self, object: torch.Tensor, camera: torch.Tensor, cfg_scale: float  # noqa: A002
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings for the two halves of a CFG batch: ``(uncond [B,D], cond [B,D])``.

        Without motion guidance (``uncond_scores is None``) both halves get the user's scores
        (the default: CFG then guides the text/image condition only).

        With motion guidance the unconditional half is moved towards the neutral scores'
        embedding ``e_n``: ``e_u = e_c - (motion_guidance_scale / cfg_scale) * (e_c - e_n)``.
        After the sampler's ``u + cfg * (c - u)`` the motion condition is thus extrapolated
        with its own scale (to first order in the embedding), at no extra denoiser call:
        ``motion_guidance_scale = cfg_scale`` is plain "neutral scores on the unconditional
        half"; ``0`` switches motion guidance off. With ``cfg_scale <= 1`` (no CFG batch) the
        conditional embedding is returned for both.
        """
        e_c = self(object, camera)
        if self.uncond_scores is None or cfg_scale <= 1.0 or self.motion_guidance_scale == 0.0:
            return e_c, e_c
        n = torch.full_like(validate_scores(object, "object"), self.uncond_scores[0])
        m = torch.full_like(n, self.uncond_scores[1])
        e_n = self(n, m)
        w = self.motion_guidance_scale / float(cfg_scale)
        return e_c - w * (e_c - e_n), e_c


def build_for_model(model: Any, **kwargs: Any) -> MotionScoreEmbedding:
    """A fresh (zero-output) embedder for a loaded ``pipelines.I2VModel``: width, family and
    base fingerprint come from the model."""
    fp = kwargs.pop("base_fingerprint", None)
    if fp is None and hasattr(model, "fingerprint"):
        fp = model.fingerprint()
    return MotionScoreEmbedding(
        int(model.time_embed_dim), family=getattr(model, "family_name", None) or _family_name(model), base_fingerprint=fp, **kwargs
    )


def _family_name(model: Any) -> Optional[str]:
    fam = getattr(model, "family", None)
    if fam is None:
        return None
    return fam if isinstance(fam, str) else getattr(fam, "name", None)


# -- files ---------------------------------------------------------------------------------
def save_motion_embedder(embedder: MotionScoreEmbedding, path: str | os.PathLike, *, extra: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``embedder`` to ``path`` (``.safetensors``) atomically; returns the path.

    Metadata keys (all strings, JSON where structured): ``format``, ``format_version``,
    ``config`` (constructor args), ``family``, ``base_fingerprint``, ``motion_guidance``
    (``{"uncond_scores", "scale"}``, the defaults the file suggests) and ``extra``.
    """
    from merging.fileformat import save_safetensors_atomic

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in embedder.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(embedder.config(), sort_keys=True),
        "family": embedder.family or "",
        "base_fingerprint": json.dumps(embedder.base_fingerprint, sort_keys=True) if embedder.base_fingerprint else "",
        "motion_guidance": json.dumps(
            {"uncond_scores": list(embedder.uncond_scores) if embedder.uncond_scores else None, "scale": embedder.motion_guidance_scale}
        ),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, default=str),
    }
    return save_safetensors_atomic(tensors, path, meta)


def read_motion_embedder_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed metadata of an embedder file (``config``, ``family``, ``base_fingerprint``, ...),
    without loading weights. Raises ``MotionEmbedderFileError`` naming the file."""
    from merging.fileformat import read_metadata

    path = os.fspath(path)
    meta = read_metadata(path, format=FORMAT_NAME, version=FORMAT_VERSION, what="motion embedder", error=MotionEmbedderFileError)
    try:
        out = {
            "format": meta["format"],
            "format_version": FORMAT_VERSION,
            "config": json.loads(meta["config"]),
            "family": meta.get("family") or None,
            "base_fingerprint": json.loads(meta["base_fingerprint"]) if meta.get("base_fingerprint") else None,
            "motion_guidance": json.loads(meta.get("motion_guidance") or "null"),
            "extra": json.loads(meta.get("extra") or "{}"),
        }
    except (KeyError, json.JSONDecodeError) as e:
        raise MotionEmbedderFileError(f"{path!r}: malformed motion embedder metadata ({e})") from None
    return out


def _describe_fp(fp: Optional[Mapping[str, Any]]) -> str:
    if not fp:
        return "unknown"
    try:
        from merging.fingerprint import describe_fingerprint

        return describe_fingerprint(fp)
    except ImportError:
        return str(fp.get("values", "?"))[:12]


def check_base(meta: Mapping[str, Any], *, family: Optional[str], fingerprint: Optional[Mapping[str, Any]], path: str, base_name: str = "the model") -> None:
    """Refuse an embedder made for another family or base model (clear error naming both)."""
    if family and meta.get("family") and meta["family"] != family:
        raise MotionEmbedderFileError(
            f"motion embedder {path!r} was trained for family {meta['family']!r}, but {base_name} is {family!r}"
        )
    expected = meta.get("base_fingerprint")
    if expected and fingerprint:
        from merging.fingerprint import check_fingerprint

        try:
            check_fingerprint(expected, fingerprint, f"motion embedder {path!r}")
        except ValueError as e:
            raise MotionEmbedderFileError(
                f"motion embedder {path!r} was trained on base ({_describe_fp(expected)}) and cannot be loaded onto "
                f"{base_name} ({_describe_fp(fingerprint)}): {e}"
            ) from None


def load_motion_embedder(
    path: str | os.PathLike,
    model: Any = None,
    *,
    family: Optional[str] = None,
    base_fingerprint: Optional[Mapping[str, Any]] = None,
    time_embed_dim: Optional[int] = None,
    device: str | torch.device = "cpu",
) -> MotionScoreEmbedding:
    """Load an embedder file, checking it belongs to the base it will run on.

    Pass the loaded ``pipelines.I2VModel`` as ``model`` (family, fingerprint and width are taken
    from it) or give ``family`` / ``base_fingerprint`` / ``time_embed_dim`` directly. A file made
    for another base raises ``MotionEmbedderFileError`` naming the file and both bases.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    meta = read_motion_embedder_metadata(path)
    base_name = "the model"
    if model is not None:
        family = family or _family_name(model)
        if base_fingerprint is None and hasattr(model, "fingerprint"):
            base_fingerprint = model.fingerprint()
        time_embed_dim = time_embed_dim or int(model.time_embed_dim)
        base_name = f"model {getattr(model, 'path', '?')!r}"
    check_base(meta, family=family, fingerprint=base_fingerprint, path=path, base_name=base_name)
    cfg = meta["config"]
    if time_embed_dim is not None and int(cfg["time_embed_dim"]) != int(time_embed_dim):
        raise MotionEmbedderFileError(
            f"motion embedder {path!r} has width {cfg['time_embed_dim']}, but {base_name} has time_embed_dim {time_embed_dim}"
        )
    mg = meta.get("motion_guidance") or {}
    emb = MotionScoreEmbedding(
        int(cfg["time_embed_dim"]),
        num_freqs=int(cfg["num_freqs"]),
        hidden=int(cfg["hidden"]),
        decoupled=bool(cfg["decoupled"]),
        uncond_scores=mg.get("uncond_scores"),
        motion_guidance_scale=float(mg.get("scale", 1.0)),
        family=meta.get("family"),
        base_fingerprint=meta.get("base_fingerprint"),
    )
    state = load_file(path)
    missing, unexpected = emb.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MotionEmbedderFileError(
            f"motion embedder {path!r}: tensors do not match its config (missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    return emb.to(device)


def load_trained_motion(path: str | os.PathLike, model: Any, *, lazy: bool = False) -> tuple[MotionScoreEmbedding, Any]:
    """Everything ``training.train_motion`` produced, ready for ``pipelines.sample``.

    Args:
        path: the embedder file, or the training output folder holding
            ``motion_embedder.safetensors``.
        model: the loaded base ``pipelines.I2VModel`` (both files are checked against it).
        lazy: read the delta's tensors on access (large full fine-tunes).
    Returns:
        ``(embedder, weight_schedule)``: ``weight_schedule`` is ``None`` when only the embedder
        was trained, else ``merging.patcher.ScheduledWeights({"motion": delta},
        Constant({"motion": 1.0}))`` for the delta named in the embedder's metadata (a file
        beside it). Pass both to ``pipelines.sample``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "motion_embedder.safetensors")
    emb = load_motion_embedder(path, model)
    delta_name = (read_motion_embedder_metadata(path).get("extra") or {}).get("delta")
    if not delta_name:
        return emb, None
    from merging.deltas import load_delta
    from merging.patcher import ScheduledWeights
    from merging.schedule import Constant

    delta_path = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(str(delta_name)))
    if not os.path.exists(delta_path):
        raise MotionEmbedderFileError(
            f"motion embedder {path!r} was trained together with the transformer delta {delta_name!r}, "
            f"which is missing (expected {delta_path!r}); without it the embedder does not match the model"
        )
    delta = load_delta(delta_path, model.fingerprint(), lazy=lazy)
    return emb, ScheduledWeights({"motion": delta}, Constant({"motion": 1.0}))


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NEUTRAL_SCORE",
    "MotionEmbedderFileError",
    "MotionScoreEmbedding",
    "SinusoidalScoreFeatures",
    "build_for_model",
    "check_base",
    "load_motion_embedder",
    "load_trained_motion",
    "read_motion_embedder_metadata",
    "save_motion_embedder",
    "split_width",
    "validate_scores",
]
