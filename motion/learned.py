"""Learned MotionStone estimator: a small TAdaConv video network with two MLP heads.

Input (``select_frames`` then ``MotionEstimatorNet.prepare``): ``pairs`` frame pairs taken uniformly over the clip, each pair
``(frame_s, frame_s+gap)`` with ``gap = max(1, round(fps / base_fps))`` so that the pair always
spans about ``1/base_fps`` seconds (8 fps: consecutive frames; 24 fps: every 3rd frame) and the
network sees displacement *per unit time*, as the scores are defined. Frames are resized (whole
field of view, aspect not kept) to ``size x size``. Per pair the network gets 6 channels:
the first frame (RGB, centred) and the **difference** of the two frames (RGB, times
``diff_gain``). Speed ranking is hard to learn from appearance alone for a small network; the
difference makes local displacement directly visible (``diff ≈ -grad I · displacement``), and the
raw frame lets it normalise that by the local contrast. Object vs camera is then a question of
*where* the differences are (everywhere, in a consistent pattern → camera; in a region → object),
which convolutions with global pooling can learn.

Network: per-pair stem ``Conv2d(6, w0, 3, stride 2)`` → stages of TAdaConv residual blocks (each
halves the size) → global average pooling over space and time → two separate MLP heads
(``Linear(C, hidden) → ReLU → Linear(hidden, 1)``) → score ``1 + 9 * sigmoid(z)`` on 1..10
(bounded by construction: no clamping needed, and the regression target range is exactly the
output range).

File format: one ``.safetensors`` file whose metadata holds ``format`` =
``motiondial.motion_estimator``, ``format_version`` = ``1`` and ``config`` (JSON of
:class:`EstimatorConfig`); a human-readable side-car ``<name>.json`` with the same config and the
parameter count is written next to it (informational; the safetensors metadata is authoritative).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from motion.scores import SCORE_MAX, SCORE_MIN, MotionScores
from motion.tadaconv import TAdaConv2d

FORMAT = "motiondial.motion_estimator"
FORMAT_VERSION = 1


class EstimatorFileError(ValueError):
    """A learned-estimator file is missing, corrupt or of another format; names the file."""


@dataclass
class EstimatorConfig:
    """Architecture and input settings of :class:`MotionEstimatorNet` (saved with the weights)."""

    #: frame pairs per clip (time steps of the network).
    pairs: int = 8
    #: input frames are resized to ``size x size``.
    size: int = 112
    #: a pair spans ``round(fps / base_fps)`` frames, i.e. about 1/base_fps seconds.
    base_fps: float = 8.0
    #: the frame difference is multiplied by this (differences of slow motion are small).
    diff_gain: float = 4.0
    #: channel widths: stem output, then one TAdaConv stage per further entry (each stride 2).
    widths: Sequence[int] = field(default_factory=lambda: [16, 32, 64, 128])
    #: channel reduction of the TAdaConv route functions.
    route_ratio: int = 4
    #: hidden width of each MLP head.
    head_hidden: int = 64
    #: how TAdaConv computes (same function, see motion.tadaconv): "grouped" | "scaled_input".
    tada_impl: str = "grouped"

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        if self.pairs < 1 or self.size < 16 or len(self.widths) < 2 or self.base_fps <= 0:
            raise ValueError(f"invalid EstimatorConfig {self}")
        if self.tada_impl not in ("grouped", "scaled_input"):
            raise ValueError(f"EstimatorConfig.tada_impl must be 'grouped' or 'scaled_input', got {self.tada_impl!r}")

    @property
    def input_frames(self) -> int:
        """Frames per clip the network takes (:func:`select_frames`): two per pair."""
        return 2 * self.pairs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EstimatorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown estimator config keys {sorted(unknown)}")
        return cls(**d)


class _TAdaBlock(nn.Module):
    """Residual block: TAdaConv(3x3, stride) → BN → ReLU → TAdaConv(3x3) → BN, + shortcut → ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, route_ratio: int, impl: str = "grouped"):
        super().__init__()
        self.conv1 = TAdaConv2d(c_in, c_out, 3, stride, 1, route_ratio=route_ratio, impl=impl)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = TAdaConv2d(c_out, c_out, 3, 1, 1, route_ratio=route_ratio, impl=impl)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.shortcut = nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride=(1, stride, stride), bias=False), nn.BatchNorm3d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class MotionEstimatorNet(nn.Module):
    """``[B, 6, T, S, S]`` (from :func:`prepare_clip`) → ``(object [B], camera [B])`` scores on 1..10."""

    in_channels = 6

    def __init__(self, config: Optional[EstimatorConfig] = None):
        super().__init__()
        self.config = cfg = config or EstimatorConfig()
        w = cfg.widths
        self.stem = nn.Sequential(
            nn.Conv3d(self.in_channels, w[0], (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(w[0]),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList(_TAdaBlock(w[i], w[i + 1], 2, cfg.route_ratio, cfg.tada_impl) for i in range(len(w) - 1))
        self.object_head = nn.Sequential(nn.Linear(w[-1], cfg.head_hidden), nn.ReLU(), nn.Linear(cfg.head_hidden, 1))
        self.camera_head = nn.Sequential(nn.Linear(w[-1], cfg.head_hidden), nn.ReLU(), nn.Linear(cfg.head_hidden, 1))

    def prepare(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """``[B, 2*pairs, S, S, 3]`` uint8 (see :func:`select_frames`) → input ``[B, 6, pairs, S, S]``."""
        return prepare_input(frames_u8, self.config)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, widths[-1]]`` (global average over space and time)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, T, H, W], got {tuple(x.shape)}")
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
        return y.mean(dim=(2, 3, 4))

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.object_head(f).squeeze(-1), self.camera_head(f).squeeze(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zo, zc = self.logits(x)
        span = SCORE_MAX - SCORE_MIN
        return SCORE_MIN + span * torch.sigmoid(zo), SCORE_MIN + span * torch.sigmoid(zc)

    def set_tada_impl(self, impl: str) -> "MotionEstimatorNet":
        """Switch every TAdaConv between "grouped" and "scaled_input" (same function; the latter
        trains 2-3x faster on CPU). Recorded in ``config.tada_impl``."""
        for m in self.modules():
            if isinstance(m, TAdaConv2d):
                if impl not in ("grouped", "scaled_input"):
                    raise ValueError(f"tada impl must be 'grouped' or 'scaled_input', got {impl!r}")
                m.impl = impl
        self.config.tada_impl = impl
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------- input


def pair_indices(num_frames: int, fps: float, config: EstimatorConfig) -> tuple[np.ndarray, int]:
    """First-frame indices ``[pairs]`` of the frame pairs and the gap between a pair's frames."""
    if num_frames < 2:
        raise ValueError(f"frames: motion needs at least 2 frames, got {num_frames}")
    gap = max(1, int(round(float(fps) / config.base_fps)))
    gap = min(gap, num_frames - 1)
    starts = np.linspace(0, num_frames - 1 - gap, config.pairs).round().astype(np.int64)
    return starts, gap


def select_frames(frames: np.ndarray, fps: float, config: EstimatorConfig) -> np.ndarray:
    """The network's view of a clip: ``[2*pairs, size, size, 3]`` uint8, frames ``a0, b0, a1, b1...``.

    ``frames`` is ``[T,H,W,3]`` uint8 RGB (``T >= 2``) at ``fps``; pairs are spread uniformly over
    the clip and each spans ``gap = max(1, round(fps / base_fps))`` frames (see the module doc).
    Training must feed the network through this same function (then :meth:`MotionEstimatorNet.prepare`).
    """
    import cv2

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected [T,H,W,3] uint8, got {frames.dtype} {tuple(frames.shape)}")
    starts, gap = pair_indices(frames.shape[0], fps, config)
    s = config.size
    out = np.empty((2 * len(starts), s, s, 3), dtype=np.uint8)
    cache: dict[int, np.ndarray] = {}
    for k, i in enumerate(starts):
        for j, idx in enumerate((int(i), int(i) + gap)):
            if idx not in cache:
                f = frames[idx]
                interp = cv2.INTER_AREA if f.shape[0] >= s and f.shape[1] >= s else cv2.INTER_LINEAR
                cache[idx] = cv2.resize(f, (s, s), interpolation=interp)
            out[2 * k + j] = cache[idx]
    return out


def prepare_input(frames_u8: torch.Tensor, config: EstimatorConfig) -> torch.Tensor:
    """``[B, 2*pairs, S, S, 3]`` uint8 (from :func:`select_frames`) → network input ``[B, 6, pairs, S, S]``.

    Channels: first frame of the pair (RGB in -0.5..0.5) and ``diff_gain * (second - first)``.
    """
    if frames_u8.ndim != 5 or frames_u8.shape[-1] != 3 or frames_u8.shape[1] % 2:
        raise ValueError(f"expected [B, 2*pairs, H, W, 3] frames, got {tuple(frames_u8.shape)}")
    x = frames_u8.float().div(255.0).permute(0, 4, 1, 2, 3)  # [B, 3, 2P, S, S]
    a, b = x[:, :, 0::2], x[:, :, 1::2]
    return torch.cat([a - 0.5, (b - a) * config.diff_gain], dim=1)


def prepare_clip(frames: np.ndarray, fps: float, config: EstimatorConfig) -> torch.Tensor:
    """``[T,H,W,3]`` uint8 RGB → network input ``[6, pairs, size, size]`` float32."""
    return prepare_input(torch.from_numpy(select_frames(frames, fps, config))[None], config)[0]


# ------------------------------------------------------------------------------------ files


def save_estimator(
    net: MotionEstimatorNet,
    config: Optional[EstimatorConfig],
    path: str | os.PathLike,
    metadata: Optional[dict] = None,
) -> str:
    """Save ``net`` as ``path`` (.safetensors) + side-car ``.json``, atomically; returns the path.

    ``config`` must be ``net.config`` (or None); ``metadata``: extra JSON-able facts (training
    report...) stored under ``extra``.
    """
    if config is not None and config.to_dict() != net.config.to_dict():
        raise ValueError("save_estimator: config differs from the network's own config")
    extra = metadata
    from merging.fileformat import atomic_path, save_safetensors_atomic

    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: a learned estimator is saved as a .safetensors file")
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(net.config.to_dict()),
        "num_parameters": str(net.num_parameters()),
    }
    if extra:
        meta["extra"] = json.dumps(extra)
    save_safetensors_atomic(state, p, meta)
    side = p.with_suffix(".json")
    side_doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": net.config.to_dict(),
                "num_parameters": net.num_parameters(), "weights": p.name, **({"extra": extra} if extra else {})}
    with atomic_path(side) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(side_doc, f, indent=2)
    return str(p)


def load_estimator(path: str | os.PathLike) -> MotionEstimatorNet:
    """Load a file written by :func:`save_estimator` (safetensors only; never pickle). Eval mode."""
    from safetensors.torch import load_file

    from merging.fileformat import read_metadata

    p = Path(path)
    if not p.is_file():
        # FileNotFoundError, not EstimatorFileError: estimator="path" callers treat both apart.
        raise FileNotFoundError(f"learned estimator not found: {p}")
    meta = read_metadata(p, format=FORMAT, version=FORMAT_VERSION, what="motion estimator", error=EstimatorFileError)
    try:
        state = load_file(str(p))
    except Exception as e:  # a header that parses can still describe missing tensor data
        raise EstimatorFileError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        config = EstimatorConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise EstimatorFileError(f"{p}: bad estimator config in metadata ({e})") from None
    net = MotionEstimatorNet(config)
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise EstimatorFileError(
            f"{p}: weights do not match the config (shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
            f"the config builds {tuple(own[wrong[0]].shape)}; {len(wrong)} tensors differ)"
        )
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EstimatorFileError(
            f"{p}: weights do not match the config (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return net.eval()


#: Names used by ``training.train_estimator``.
LearnedEstimatorConfig = EstimatorConfig


def build_estimator_model(config: Optional[EstimatorConfig] = None) -> MotionEstimatorNet:
    """A freshly initialised :class:`MotionEstimatorNet` (seed torch before for reproducibility)."""
    return MotionEstimatorNet(config)


class LearnedEstimator:
    """:class:`motion.estimate.Estimator` wrapping a :class:`MotionEstimatorNet` (CPU by default)."""

    def __init__(self, net: MotionEstimatorNet, name: str = "learned", device: str | torch.device = "cpu"):
        self.net = net.eval().to(device)
        self.name = name
        self.device = torch.device(device)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "LearnedEstimator":
        return cls(load_estimator(path), name=f"learned:{Path(path).name}", device=device)

    @property
    def config(self) -> EstimatorConfig:
        return self.net.config

    @torch.no_grad()
    def score(self, frames, fps: float, progress=None) -> MotionScores:
        """Scores of one clip ``[T,H,W,3]`` uint8 RGB (``T >= 2``)."""
        from motion.flow import _check_clip

        arr = _check_clip(frames, fps)
        if (arr == arr[:1]).all():
            # Defined result for a constant clip (nothing changes, so nothing moves): exactly 1,
            # whatever the network would say about a still image.
            return MotionScores(object=SCORE_MIN, camera=SCORE_MIN, estimator=self.name, fps=float(fps),
                                raw={"constant_clip": 1.0})
        x = prepare_clip(arr, fps, self.config)[None].to(self.device)
        obj, cam = self.net(x)
        if progress is not None:
            progress(1, 1)
        o, c = float(obj[0]), float(cam[0])
        if not (math.isfinite(o) and math.isfinite(c)):
            raise FloatingPointError(f"{self.name}: the network produced a non-finite score")
        return MotionScores(object=o, camera=c, estimator=self.name, fps=float(fps),
                            raw={"pairs": self.config.pairs, "size": self.config.size})
