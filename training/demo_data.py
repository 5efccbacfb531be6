"""Synthetic clips for the demo model: speed is the only free variable of each motion axis.

A probe of the first recipe (docs/demo_model.md) found that a small model cannot learn to obey
speed scores when directions are random and not given to it: every request then has many valid
answers and the model averages them into a still background. Here the directions are **fixed**
and **different** for the two axes, so the two scores determine the motion completely:

* the camera always pans to the right (the background slides left on screen, ``CAMERA_DIRECTION``);
* the one object always moves down in the world (``OBJECT_DIRECTION``), so on screen its motion
  is "down" plus whatever the camera adds, and the flow estimator's residual (object) motion is
  exactly the object's own speed.

Each axis gets a score in 1..10 drawn at random (with a share of exact 1 = still); the speed is
the score's physical quantity under the flow estimator's calibration
(``motion.calibration.FLOW_CALIBRATION.inverse``), so a requested score means the speed the
estimator would report as that score. Clips are rendered by ``training.synth_motion.render_clip``
(exact ground truth in ``meta``). Pure functions of ``(seed, index)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import numpy as np
import torch

from motion.calibration import FLOW_CALIBRATION
from training.synth_motion import SHAPES, ClipSpec, ObjectSpec, render_clip
from training.textures import TEXTURE_KINDS

#: Unit vectors (x, y) in the image plane, y down. The camera pans right; the object moves down.
CAMERA_DIRECTION = (1.0, 0.0)
OBJECT_DIRECTION = (0.0, 1.0)


@dataclass(frozen=True)
class DemoDataConfig:
    """What the demo clips look like (all sizes in pixels, speeds via scores 1..10)."""

    frames: int = 8
    height: int = 32
    width: int = 32
    fps: float = 7.0  # SVD's default conditioning fps, so sampling and training agree
    #: object scores are drawn uniformly in [1, max_score]; the top of the scale moves a 32-px
    #: object out of the frame within a few frames, so it is left out of training.
    max_score: float = 9.0
    #: camera scores are drawn uniformly in [1, max_camera_score] (None: ``max_score``). A pan
    #: never leaves the (endless) background, and a request at the very edge of what training
    #: saw is undershot.
    max_camera_score: Optional[float] = None
    #: probability that an axis is exactly still (score 1)
    still_prob: float = 0.2
    #: object side as a fraction of min(height, width)
    object_size: tuple[float, float] = (0.3, 0.45)
    noise: float = 0.0  # sensor noise (grey levels); 0: the demo model need not learn noise
    #: render at ``supersample`` x the size and shrink (area average): removes the pixel-level
    #: aliasing of the textures, which a small autoencoder cannot reproduce, while keeping the
    #: speeds (% of the diagonal per second does not depend on the resolution).
    supersample: int = 1
    #: extra diffusion-loss weight on the object's pixels: a pixel weighs ``1 + object_weight *
    #: coverage`` (normalised to mean 1 per clip). The object covers 10-20 % of a frame and the
    #: panning background the rest, so without it the loss barely sees the object's own motion.
    object_weight: float = 0.0

    #: fields that only shape stage 2 (the UNet's data), not what the autoencoder sees
    STAGE2_FIELDS = ("object_weight", "max_camera_score")

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["object_size"] = list(self.object_size)
        return d

    def for_autoencoder(self) -> "DemoDataConfig":
        """These settings with the stage-2 ones at their defaults: the clips the autoencoder trains on."""
        defaults = {f.name: f.default for f in fields(self) if f.name in self.STAGE2_FIELDS}
        return replace(self, **defaults)


def speed_for_score(score: float) -> float:
    """Speed (% of the frame diagonal per second) that the flow estimator scores as ``score``;
    0 for score 1 (still)."""
    return 0.0 if score <= 1.0 else float(FLOW_CALIBRATION.inverse(score))


def demo_spec(rng: np.random.Generator, cfg: DemoDataConfig, object_score: float, camera_score: float) -> ClipSpec:
    """The clip for the given scores; background, object look and placement come from ``rng``."""
    cam = speed_for_score(camera_score)
    k = max(1, int(cfg.supersample))
    obj = speed_for_score(object_score)
    size = float(rng.uniform(*cfg.object_size))
    # The object's world position at mid-clip is near the centre (the camera sees the world
    # centre at mid-clip), so its path is centred on screen whatever the speed.
    offset = (float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.08, 0.08)))
    objects = [ObjectSpec(shape=str(rng.choice(SHAPES)), texture=str(rng.choice(TEXTURE_KINDS)), size=size,
                          offset=offset, velocity=(obj * OBJECT_DIRECTION[0], obj * OBJECT_DIRECTION[1]),
                          seed=int(rng.integers(0, 2**31 - 1)))]
    kind = {(False, False): "static", (True, False): "object", (False, True): "camera", (True, True): "both"}[(obj > 0, cam > 0)]
    return ClipSpec(kind=kind, frames=cfg.frames, height=cfg.height * k, width=cfg.width * k, fps=cfg.fps,
                    background=str(rng.choice(TEXTURE_KINDS)), pan=(cam * CAMERA_DIRECTION[0], cam * CAMERA_DIRECTION[1]),
                    objects=objects, noise=cfg.noise, seed=int(rng.integers(0, 2**31 - 1)))


def draw_score(rng: np.random.Generator, cfg: DemoDataConfig, top: Optional[float] = None) -> float:
    """A training score: exactly 1 (still) with ``cfg.still_prob``, else uniform in [1, top]
    (default ``cfg.max_score``); ``top`` changes the value drawn, never the draws made."""
    if rng.uniform() < cfg.still_prob:
        return 1.0
    return float(rng.uniform(1.0, cfg.max_score if top is None else top))


def demo_clip(seed: int, index: int, cfg: DemoDataConfig = DemoDataConfig(),
              object_score: Optional[float] = None, camera_score: Optional[float] = None,
              masks: bool = False) -> tuple[np.ndarray, dict]:
    """Clip ``index`` of the data set ``seed``: ``(frames [T,H,W,3] uint8, meta)``.

    ``meta`` is ``render_clip``'s (exact ``object_speed`` / ``camera_speed`` in % diag/s) plus the
    requested ``object_score`` / ``camera_score``. Scores given here override the drawn ones (the
    look of the clip is still that of ``(seed, index)``). ``masks``: also ``meta["object_masks"]``
    (``[T,H,W] float32`` object coverage, see ``render_clip``).
    """
    rng = np.random.default_rng([int(seed), 0xD3, int(index)])
    o, c = draw_score(rng, cfg), draw_score(rng, cfg, cfg.max_camera_score)
    o = o if object_score is None else float(object_score)
    c = c if camera_score is None else float(camera_score)
    frames, meta = render_clip(demo_spec(rng, cfg, o, c), masks=masks)
    if cfg.supersample > 1:
        import cv2

        shrink = lambda f: cv2.resize(f, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA)  # noqa: E731
        frames = np.stack([shrink(f) for f in frames])
        if masks:
            meta["object_masks"] = np.stack([shrink(m) for m in meta["object_masks"]])
        meta.update(height=cfg.height, width=cfg.width)
    meta["object_score"], meta["camera_score"] = o, c
    return frames, meta


class DemoClipDataset(torch.utils.data.Dataset):
    """``count`` demo clips rendered once into memory (uint8). Item ``i`` is the dict the
    diffusion objectives take: ``video [T,3,H,W]`` float32 in -1..1, ``caption`` (""),
    ``object`` / ``camera`` (requested scores, float32 scalars), ``index``; with
    ``cfg.object_weight > 0`` also ``loss_weight [T,1,H,W]`` float32 (``1 + object_weight *
    coverage``; the objective normalises it)."""

    def __init__(self, count: int, seed: int = 0, cfg: DemoDataConfig = DemoDataConfig(), progress: bool = False) -> None:
        from tqdm.auto import tqdm

        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.cfg = cfg
        self.seed = int(seed)
        self.frames = np.empty((count, cfg.frames, cfg.height, cfg.width, 3), dtype=np.uint8)
        self.scores = np.empty((count, 2), dtype=np.float32)
        weighted = cfg.object_weight > 0
        # Coverage in 1/255 steps: 2 MB instead of 8 MB for 2,048 clips, far finer than needed.
        self.masks = np.empty((count, cfg.frames, cfg.height, cfg.width), dtype=np.uint8) if weighted else None
        for i in tqdm(range(count), desc="rendering demo clips", unit="clip", disable=not progress):
            self.frames[i], meta = demo_clip(self.seed, i, cfg, masks=weighted)
            self.scores[i] = (meta["object_score"], meta["camera_score"])
            if weighted:
                self.masks[i] = np.round(np.clip(meta["object_masks"], 0, 1) * 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v = torch.from_numpy(self.frames[i]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        item = {"video": v, "caption": "", "object": torch.tensor(float(self.scores[i, 0])),
                "camera": torch.tensor(float(self.scores[i, 1])), "index": int(i)}
        if self.masks is not None:
            cover = torch.from_numpy(self.masks[i]).float().unsqueeze(1) / 255.0
            item["loss_weight"] = 1.0 + self.cfg.object_weight * cover
        return item


def pixels_per_frame(speed_pct: float, cfg: DemoDataConfig = DemoDataConfig()) -> float:
    """% diag/s -> pixels per frame at the demo size (for docs and sanity checks)."""
    return speed_pct / 100.0 * math.hypot(cfg.height, cfg.width) / cfg.fps
