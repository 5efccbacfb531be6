"""SSIM baseline (for comparison only): ``1 - mean SSIM`` of consecutive frames.

It cannot tell object from camera motion, so both scores are the same number; it also reacts to
texture and lighting, not only to motion. MotionStone reports it as the baseline its learned
estimator beats (44.56 % vs 72.80 % pair accuracy on human-annotated pairs).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from motion.calibration import SSIM_CALIBRATION, LogCalibration
from motion.scores import MotionScores

#: SSIM is computed on grey frames whose longer side is at most this (speed; SSIM is local).
SSIM_WORK_SIDE = 256
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two grey ``[H,W]`` images (Gaussian window, sigma 1.5, as Wang et al. 2004)."""
    import cv2

    a = a.astype(np.float32)
    b = b.astype(np.float32)

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a * mu_a + mu_b * mu_b + _C1) * (var_a + var_b + _C2)
    return float((num / den).mean())


def ssim_motion(
    frames,
    fps: float,
    calibration: LogCalibration = SSIM_CALIBRATION,
    progress: Optional[Callable[[int, int], None]] = None,
) -> MotionScores:
    """Baseline scores: ``object == camera == calibration(1 - mean SSIM(frame_t, frame_t+1))``.

    ``frames`` ``[T,H,W,3]`` uint8 RGB, ``T >= 2``. ``raw["dissimilarity"]`` is ``1 - mean SSIM``
    (per frame, not per second: SSIM has no notion of speed); curve ``dissimilarity`` per pair.
    """
    from motion.flow import _check_clip, working_frames

    arr = _check_clip(frames, fps)
    grey = working_frames(arr, SSIM_WORK_SIDE)
    d = np.zeros(len(grey) - 1)
    for i in range(len(grey) - 1):
        d[i] = 0.0 if np.array_equal(grey[i], grey[i + 1]) else max(0.0, 1.0 - ssim(grey[i], grey[i + 1]))
        if progress is not None:
            progress(i + 1, len(grey) - 1)
    score = calibration(float(d.mean()))
    return MotionScores(
        object=score,
        camera=score,
        estimator="ssim-baseline",
        fps=float(fps),
        raw={"dissimilarity": float(d.mean())},
        curves={"dissimilarity": d},
    )
