"""Monotonic maps from physical motion quantities to the 1..10 score scale.

One family of curves serves every estimator: a log-shaped map with a dead zone,

    score(v) = 1 + 9 * clamp( log(1 + max(0, v - dead) / knee) / log(1 + (full - dead) / knee), 0, 1 )

``dead`` absorbs the estimator's noise floor (a still clip scores exactly 1), ``knee`` sets where
the curve turns from linear to logarithmic (perceived speed grows roughly with the log of
physical speed), ``full`` is the quantity that reaches 10. The map is continuous, strictly
increasing between ``dead`` and ``full``, and never NaN (NaN/negative inputs map to 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Union

import numpy as np

from motion.scores import SCORE_MAX, SCORE_MIN


@dataclass(frozen=True)
class LogCalibration:
    """``score = 1 + 9 * log1p((v - dead)/knee) / log1p((full - dead)/knee)``, clamped to 1..10."""

    dead: float
    knee: float
    full: float
    unit: str

    def __post_init__(self) -> None:
        if not (self.dead >= 0 and self.knee > 0 and self.full > self.dead):
            raise ValueError(f"invalid calibration {self}")

    def __call__(self, v: Union[float, np.ndarray]) -> Union[float, np.ndarray]:
        x = np.asarray(v, dtype=np.float64)
        x = np.where(np.isfinite(x), x, 0.0)
        t = np.log1p(np.maximum(x - self.dead, 0.0) / self.knee) / math.log1p((self.full - self.dead) / self.knee)
        s = SCORE_MIN + (SCORE_MAX - SCORE_MIN) * np.clip(t, 0.0, 1.0)
        return float(s) if np.ndim(s) == 0 else s

    def inverse(self, score: float) -> float:
        """Physical quantity at which ``score`` (1..10) is reached (1 → ``dead``)."""
        t = (min(max(float(score), SCORE_MIN), SCORE_MAX) - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
        return self.dead + self.knee * math.expm1(t * math.log1p((self.full - self.dead) / self.knee))

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def table(self, scores=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)) -> Dict[int, float]:
        """Anchor table score → quantity, as printed in docs/motion.md."""
        return {int(s): round(self.inverse(s), 4) for s in scores}


#: Flow estimator, both heads: percent of the frame diagonal per second. The dead zone (0.15 %/s,
#: about 0.16 px/frame on a 720x480 clip at 8 fps) sits above the flow noise of a still clip; the
#: knee 1 %/s is a slow drift; 60 %/s (the view crosses more than half its diagonal each second)
#: is as fast as generated clips get and scores 10.
FLOW_CALIBRATION = LogCalibration(dead=0.15, knee=1.0, full=60.0, unit="%diag/s")

#: SSIM baseline: 1 - mean SSIM of consecutive frames (no unit, 0 = identical frames).
SSIM_CALIBRATION = LogCalibration(dead=0.002, knee=0.02, full=1.0, unit="1-SSIM")
