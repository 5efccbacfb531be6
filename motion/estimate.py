"""One API and one CLI for all motion estimators.

    from motion import estimate_motion
    scores = estimate_motion(frames, fps=8, estimator="flow")   # or "ssim", a .safetensors path,
                                                                # or an Estimator object

    python -m motion.estimate CLIP [CLIP ...] [--estimator flow|ssim|PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import numpy as np

from motion.scores import MotionScores

ProgressFn = Callable[[int, int], None]


@runtime_checkable
class Estimator(Protocol):
    """Anything with a ``name`` and ``score(frames [T,H,W,3] uint8, fps, progress=None) -> MotionScores``."""

    name: str

    def score(self, frames: np.ndarray, fps: float, progress: Optional[ProgressFn] = None) -> MotionScores: ...


@dataclass
class FlowEstimator:
    """The weight-free optical-flow estimator (:mod:`motion.flow`)."""

    config: Optional[Any] = None  # a motion.flow.FlowConfig; None = defaults
    name: str = field(default="flow")

    def score(self, frames, fps, progress: Optional[ProgressFn] = None) -> MotionScores:
        from motion.flow import flow_motion

        return flow_motion(frames, fps, config=self.config, progress=progress)


@dataclass
class SSIMEstimator:
    """The SSIM baseline (:mod:`motion.ssim`): one score for both heads."""

    name: str = field(default="ssim-baseline")

    def score(self, frames, fps, progress: Optional[ProgressFn] = None) -> MotionScores:
        from motion.ssim import ssim_motion

        return ssim_motion(frames, fps, progress=progress)


_LEARNED_CACHE: dict = {}


def resolve_estimator(estimator: Union[str, "os.PathLike[str]", Estimator]) -> Estimator:
    """``"flow"`` / ``"ssim"`` / a learned-estimator ``.safetensors`` path / an :class:`Estimator`."""
    if isinstance(estimator, Estimator) and not isinstance(estimator, (str, os.PathLike)):
        return estimator
    if isinstance(estimator, (str, os.PathLike)):
        key = os.fspath(estimator)
        if key == "flow":
            return FlowEstimator()
        if key in ("ssim", "ssim-baseline"):
            return SSIMEstimator()
        if not os.path.exists(key):
            raise FileNotFoundError(
                f"estimator {key!r}: expected 'flow', 'ssim' or the path of a learned estimator (.safetensors); "
                f"no such file"
            )
        from motion.learned import LearnedEstimator

        # Re-use a loaded file while it is unchanged: estimate_motion is called per clip in loops.
        stamp = (os.path.abspath(key), os.path.getmtime(key), os.path.getsize(key))
        if stamp not in _LEARNED_CACHE:
            _LEARNED_CACHE.clear()
            _LEARNED_CACHE[stamp] = LearnedEstimator.from_file(key)
        return _LEARNED_CACHE[stamp]
    raise TypeError(
        f"estimator must be 'flow', 'ssim', a file path or an object with .score(frames, fps), "
        f"got {type(estimator).__name__}"
    )


def estimate_motion(
    frames,
    fps: float,
    estimator: Union[str, "os.PathLike[str]", Estimator] = "flow",
    progress: Optional[ProgressFn] = None,
) -> MotionScores:
    """Object and camera motion intensities of a clip.

    Args:
        frames: ``[T,H,W,3]`` uint8 RGB (float 0..1 accepted), ``T >= 2``; any resolution
            (each estimator downscales to its working size first).
        fps: frame rate of ``frames`` (speeds are per second).
        estimator: ``"flow"`` (weight-free, default), ``"ssim"`` (baseline, same number for
            both), a learned estimator file, or an :class:`Estimator`.
        progress: ``progress(done, total)`` during scoring; raising from it cancels.

    Returns:
        :class:`MotionScores` (``object``, ``camera`` on 1..10, ``raw``, ``curves``).

    Raises:
        ValueError: fewer than 2 frames, bad shape/dtype, fps not positive.
    """
    from motion.flow import _check_clip

    arr = _check_clip(frames, fps)
    return resolve_estimator(estimator).score(arr, float(fps), progress=progress)


# ------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m motion.estimate",
        description="Score object and camera motion (1..10) of video files or folders of frames.",
    )
    p.add_argument("clips", nargs="+", metavar="CLIP", help="video file (mp4/avi/webm/gif...) or folder of frames")
    p.add_argument("--estimator", default="flow", help="flow (default), ssim (baseline) or a learned .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON object per clip (path, object, camera, raw...)")
    p.add_argument("--curves", action="store_true", help="with --json: include per-frame curves")
    p.add_argument("--fps", type=float, default=None, help="override the clips' frame rate (folders default to 8)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="downscale frames while reading so the longer side is at most this (default 1024; "
                        "estimators work at <= 320 px anyway, this bounds memory for huge videos)")
    p.add_argument("--max-frames", type=int, default=None, help="score only the first N frames")
    a = p.parse_args(argv)

    from tqdm.auto import tqdm

    from motion.clips import read_clip

    try:
        est = resolve_estimator(a.estimator)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failures = 0
    bar = tqdm(a.clips, desc=f"motion ({est.name})", unit="clip", disable=len(a.clips) < 2, file=sys.stderr)
    try:
        for path in bar:
            try:
                clip = read_clip(path, max_side=a.max_side, max_frames=a.max_frames, fps=a.fps)
                s = estimate_motion(clip.frames, clip.fps, estimator=est)
            except (OSError, ValueError) as e:
                failures += 1
                if a.json:
                    print(json.dumps({"path": str(path), "error": str(e)}), flush=True)
                else:
                    tqdm.write(f"{path}: error: {e}", file=sys.stderr)
                continue
            if a.json:
                d = {"path": str(path), **s.to_dict(), "frames": clip.num_frames}
                if not a.curves:
                    d.pop("curves")
                print(json.dumps(d), flush=True)
            else:
                extra = ""
                if "object_speed" in s.raw:
                    extra = f"  (object {s.raw['object_speed']:.2f}, camera {s.raw['camera_speed']:.2f} %diag/s)"
                tqdm.write(f"{path}: object {s.object:.2f}  camera {s.camera:.2f}  [{s.estimator}]{extra}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
