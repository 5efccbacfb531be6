"""Motion intensity estimation (MotionStone-style object/camera scores on 1..10).

Importing this package is cheap: OpenCV and torch load only when an estimator runs.

    from motion import estimate_motion, read_clip
    scores = estimate_motion(read_clip("clip.mp4").frames, fps=8, estimator="flow")
"""

from motion.clips import Clip, ClipError, read_clip, write_video
from motion.scores import MotionScores

__all__ = ["Clip", "ClipError", "MotionScores", "estimate_motion", "read_clip", "write_video"]


def estimate_motion(frames, fps, estimator="flow", **kwargs):
    """See :func:`motion.estimate.estimate_motion` (imported lazily: it pulls in OpenCV/torch)."""
    from motion.estimate import estimate_motion as _estimate_motion

    return _estimate_motion(frames, fps, estimator=estimator, **kwargs)
