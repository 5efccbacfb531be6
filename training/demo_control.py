"""Controllability of a motion-conditioned model, measured with the weight-free estimator.

Generate over a grid of requested (object, camera) scores at fixed seeds and first frames,
measure every result with ``motion.estimate_motion(..., "flow")`` and report

* ``object_spearman``: Spearman(requested object, measured object) over the whole grid;
* ``camera_spearman``: the same for camera;
* ``leak_object_to_camera`` = |Spearman(requested object, measured camera)| and
  ``leak_camera_to_object`` = |Spearman(requested camera, measured object)| (cross-talk).

Used by ``benchmarks/bench_control.py`` and by ``training.train_demo``'s periodic evaluation.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

#: The acceptance thresholds of issue 8.
MIN_SPEARMAN = 0.8
MAX_LEAK = 0.3


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (as ``scipy.stats.rankdata - 1``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=np.float64)
    for v in np.unique(a):
        m = a == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks); 0.0 when either side is
    constant (no ordering information, so no evidence of control)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    rx, ry = rankdata(x), rankdata(y)
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return 0.0
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


@dataclass
class ControlResult:
    """Per-sample rows ``(object_req, camera_req, seed, object_meas, camera_meas, object_speed,
    camera_speed)`` and the summary metrics."""

    rows: list[tuple[float, float, int, float, float, float, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        r = np.asarray(self.rows, dtype=np.float64)
        return control_metrics(r[:, 0], r[:, 1], r[:, 3], r[:, 4])

    def table(self) -> list[tuple[float, float, float, float]]:
        """Mean measured (object, camera) per requested (object, camera) cell."""
        r = np.asarray(self.rows, dtype=np.float64)
        out = []
        for o, c in sorted({(a, b) for a, b in r[:, :2]}):
            m = (r[:, 0] == o) & (r[:, 1] == c)
            out.append((o, c, float(r[m, 3].mean()), float(r[m, 4].mean())))
        return out


def control_metrics(obj_req, cam_req, obj_meas, cam_meas) -> dict[str, float]:
    """Spearman per axis and the two cross-talk terms (see module docs); ``passed`` is 1.0 when
    both Spearmans are >= 0.8 and both leaks <= 0.3."""
    m = {
        "object_spearman": spearman(obj_req, obj_meas),
        "camera_spearman": spearman(cam_req, cam_meas),
        "leak_object_to_camera": abs(spearman(obj_req, cam_meas)),
        "leak_camera_to_object": abs(spearman(cam_req, obj_meas)),
        "object_measured_mean": float(np.mean(obj_meas)),
        "camera_measured_mean": float(np.mean(cam_meas)),
    }
    ok = (m["object_spearman"] >= MIN_SPEARMAN and m["camera_spearman"] >= MIN_SPEARMAN
          and m["leak_object_to_camera"] <= MAX_LEAK and m["leak_camera_to_object"] <= MAX_LEAK)
    m["passed"] = 1.0 if ok else 0.0
    return m


class ScaledEmbedding(torch.nn.Module):
    """Extrapolate a motion embedder away from the neutral scores' embedding:
    ``e_n + scale * (e(o, c) - e_n)``. A guidance-like push that needs no CFG batch (the demo
    model samples at cfg 1, where the embedder's own motion guidance is inactive)."""

    def __init__(self, embedder: torch.nn.Module, scale: float, neutral: tuple[float, float] = (5.5, 5.5)) -> None:
        super().__init__()
        self.inner = embedder
        self.scale = float(scale)
        self.neutral = neutral

    def forward(self, object: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:  # noqa: A002
        e = self.inner(object, camera)
        if self.scale == 1.0:
            return e
        n = self.inner(torch.full_like(object, self.neutral[0]), torch.full_like(camera, self.neutral[1]))
        return n + self.scale * (e - n)


def demo_first_frames(n: int, seed: int, data_cfg: Any) -> list[np.ndarray]:
    """``n`` first frames ``[H,W,3]`` uint8 of still demo clips from data set ``seed`` (use a seed
    the model was not trained on)."""
    from training.demo_data import demo_clip

    return [demo_clip(seed, i, data_cfg, object_score=1.0, camera_score=1.0)[0][0] for i in range(n)]


def measure_control(
    model: Any,
    embedder: torch.nn.Module,
    images: Sequence[np.ndarray],
    *,
    levels: Sequence[float] = (1, 3, 5, 7, 9),
    frames: int = 8,
    steps: int = 10,
    fps: float = 7.0,
    cfg: float = 1.0,
    weight_schedule: Any = None,
    full_grid: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ControlResult:
    """Sample every requested (object, camera) pair of ``levels`` (the full grid, or with
    ``full_grid=False`` one axis at a time with the other at 1) for every image (image ``i`` uses
    sampling seed ``i``), and measure each video with the flow estimator at ``fps``."""
    from motion import estimate_motion
    from pipelines import sample

    if full_grid:
        pairs = list(itertools.product(levels, levels))
    else:
        pairs = [(float(v), 1.0) for v in levels] + [(1.0, float(v)) for v in levels if v != 1]
    res = ControlResult()
    total = len(pairs) * len(images)
    done = 0
    for seed, img in enumerate(images):
        for o, c in pairs:
            video = sample(model, img, "", frames=frames, steps=steps, cfg=cfg, seed=seed, fps=fps,
                           object_intensity=float(o), camera_intensity=float(c), motion_embedder=embedder,
                           weight_schedule=weight_schedule)
            s = estimate_motion(video.uint8(), fps, "flow")
            res.rows.append((float(o), float(c), seed, float(s.object), float(s.camera),
                             float(s.raw["object_speed"]), float(s.raw["camera_speed"])))
            done += 1
            if progress is not None:
                progress(done, total)
    return res


def motion_degree(model: Any, embedder: Optional[torch.nn.Module], images: Sequence[np.ndarray], *,
                  object_score: float = 5.0, camera_score: float = 5.0, frames: int = 8, steps: int = 10,
                  fps: float = 7.0, weight_schedule: Any = None) -> dict[str, float]:
    """Mean measured motion (flow scores and raw %diag/s) of one request over ``images``: the
    "motion degree" used to compare base / fine-tuned / extrapolated / ED-scheduled models."""
    from motion import estimate_motion
    from pipelines import sample

    rows = []
    for seed, img in enumerate(images):
        kw: dict[str, Any] = {}
        if embedder is not None:
            kw = dict(object_intensity=object_score, camera_intensity=camera_score, motion_embedder=embedder)
        video = sample(model, img, "", frames=frames, steps=steps, cfg=1.0, seed=seed, fps=fps,
                       weight_schedule=weight_schedule, **kw)
        s = estimate_motion(video.uint8(), fps, "flow")
        rows.append((s.object, s.camera, s.raw["object_speed"], s.raw["camera_speed"]))
    r = np.asarray(rows)
    return {"object": float(r[:, 0].mean()), "camera": float(r[:, 1].mean()),
            "object_speed": float(r[:, 2].mean()), "camera_speed": float(r[:, 3].mean()),
            "total": float(math.fsum(r[:, 2]) / len(r) + math.fsum(r[:, 3]) / len(r))}
