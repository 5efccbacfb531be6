"""`MotionScores`: what every estimator returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np

#: The score scale shared by the estimators and the generator's conditioning.
SCORE_MIN = 1.0
SCORE_MAX = 10.0


@dataclass
class MotionScores:
    """Per-clip motion intensities.

    Attributes:
        object: object-motion intensity on 1..10 (motion of things relative to the camera).
        camera: camera-motion intensity on 1..10 (pan, tilt, zoom, roll).
        estimator: which estimator produced it (``"flow"``, ``"ssim"`` (a baseline: both scores
            are the same number), ``"learned:<file>"``...).
        fps: frame rate the physical quantities refer to.
        raw: physical quantities behind the scores, e.g. ``object_speed`` and ``camera_speed``
            in percent of the frame diagonal per second (see docs/motion.md); floats.
        curves: per-frame-pair curves (length ``T-1``), e.g. ``object_speed``, ``camera_speed``.
    """

    object: float
    camera: float
    estimator: str
    fps: float
    raw: Dict[str, float] = field(default_factory=dict)
    curves: Dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("object", "camera"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or not SCORE_MIN <= v <= SCORE_MAX:
                raise ValueError(f"MotionScores.{name} must be a finite score in 1..10, got {v}")
            setattr(self, name, v)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (floats and lists only)."""
        return {
            "object": round(self.object, 4),
            "camera": round(self.camera, 4),
            "estimator": self.estimator,
            "fps": float(self.fps),
            "raw": {k: _json_float(v) for k, v in self.raw.items()},
            "curves": {k: [_json_float(x) for x in np.asarray(v).ravel()] for k, v in self.curves.items()},
        }


def _json_float(v: Any) -> Any:
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return round(v, 6) if math.isfinite(v) else None
    return v
