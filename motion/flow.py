"""Weight-free object/camera motion estimator (also the pseudo-labeler for training).

Per pair of consecutive frames, at a working resolution (longer side <= 320 px):

1. dense optical flow (OpenCV DIS, preset "fast", finest level at >= 160 px);
2. a global camera model fitted with RANSAC to flow correspondences sampled on a grid
   (a homography: pan, tilt, zoom, roll and perspective all fit; a similarity as fallback);
3. **camera speed** = mean displacement of the camera model's flow field over the whole frame;
4. **moving pixels**: pixels whose camera-mapped position stays inside the frame (border pixels
   have no true correspondence under a pan or zoom), whose flow residual (flow minus camera
   flow) exceeds ``max(abs_thresh, rel_thresh * median residual)``, and whose camera-compensated
   frame difference exceeds ``max(photo_abs, photo_rel * its median)`` plus what a camera
   misregistration of ``misregistration`` source pixels explains at that pixel's gradient (the
   camera model fails to explain their appearance too; flow alone is ambiguous along edges and
   stripes, and a sub-pixel error of the fitted camera lights up every sharp edge);
5. **object speed** = mean residual over the moving pixels × ``min(1, sqrt(area / area_ref))``:
   the speed of what moves, independent of its size once it covers ``area_ref`` (1 %) of the
   frame, so a small object moving fast and a large one moving slowly compare by speed; below
   that it is damped by the square root of the area, so isolated noise specks do not count as
   objects.

Speeds are converted from working-resolution pixels per frame to **percent of the frame diagonal
per second** (resolution independent) and averaged over the frame pairs; the per-clip scores on
1..10 come from :data:`motion.calibration.FLOW_CALIBRATION`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from motion.calibration import FLOW_CALIBRATION, LogCalibration
from motion.clips import as_uint8_frames
from motion.scores import MotionScores

_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}


@dataclass(frozen=True)
class FlowConfig:
    """Settings of the flow estimator (defaults measured in benchmarks/bench_motion.py)."""

    #: longer side of the working resolution in pixels (frames are downscaled with INTER_AREA).
    work_side: int = 320
    #: DIS preset: "ultrafast" | "fast" | "medium".
    preset: str = "fast"
    #: DIS's finest pyramid level is chosen so that flow is computed at (at least) this longer
    #: side: working 320 px → level 1 (160 px), a 128 px clip → level 0. The presets' own
    #: level 2 (a quarter of the size) loses small objects.
    flow_side: int = 160
    #: smaller clips are upscaled so the longer side reaches this (DIS patches are 8 px).
    min_side: int = 128
    #: number of flow correspondences (a regular grid) the camera model is fitted to.
    ransac_points: int = 600
    #: only grid points whose grey-level gradient is at least this (levels/px) take part...
    min_gradient: float = 2.0
    #: ... and with fewer such points there is no camera model (camera motion 0).
    min_points: int = 30
    #: a camera model must explain at least this fraction of the points (else: no camera motion).
    min_inlier_fraction: float = 0.1
    #: camera model: "homography" (8 dof) or "similarity" (4 dof: shift, scale, rotation).
    camera_model: str = "homography"
    #: RANSAC inlier threshold in working pixels.
    ransac_thresh: float = 0.5
    #: pixels this close to the border are ignored for the residual (flow is unreliable there).
    border: int = 4
    #: moving pixel: residual > max(abs_thresh, rel_thresh * median residual), working pixels.
    abs_thresh: float = 0.3
    rel_thresh: float = 3.0
    #: ... and the camera-compensated frame difference (grey levels, 5x5 box-averaged) exceeds
    #: max(photo_abs, photo_rel * its median): a pixel only counts as moving if the camera model
    #: fails to explain its *appearance*, not just its flow (flow alone is ambiguous along
    #: edges and stripes: the aperture problem). photo_abs <= 0 disables this test.
    photo_abs: float = 2.0
    photo_rel: float = 3.0
    #: ... by more than a camera misregistration of this many *source* pixels explains there
    #: (``|gradient| * misregistration``, box-averaged like the difference). Without it, sharp
    #: texture under a pan (resampling, aliasing, a sub-pixel camera fit) reads as object
    #: motion: on 32-px clips with a still object and a fast pan, object scores of about 4.5.
    #: In source pixels because upscaling a small clip adds no precision. 0 disables.
    misregistration: float = 0.5
    #: object area (fraction of the frame) from which object speed no longer depends on size.
    area_ref: float = 0.01

    def __post_init__(self) -> None:
        if self.preset not in _PRESETS:
            raise ValueError(f"FlowConfig.preset must be one of {sorted(_PRESETS)}, got {self.preset!r}")
        if self.camera_model not in ("homography", "similarity"):
            raise ValueError(f"FlowConfig.camera_model must be 'homography' or 'similarity', got {self.camera_model!r}")
        if self.work_side < 32:
            raise ValueError(f"FlowConfig.work_side must be >= 32, got {self.work_side}")
        if not self.misregistration >= 0:
            raise ValueError(f"FlowConfig.misregistration must be >= 0 source pixels, got {self.misregistration}")


def working_frames(frames: np.ndarray, work_side: int, min_side: int = 0) -> np.ndarray:
    """``[T,H,W,3]`` uint8 RGB → ``[T,h,w]`` uint8 grey with ``max(h, w) <= work_side``
    (and ``>= min_side``: small clips are upscaled bicubically)."""
    import cv2

    t, h, w, _ = frames.shape
    s = min(1.0, work_side / max(h, w))
    if max(h, w) < min_side:
        s = min_side / max(h, w)
    nh, nw = max(8, round(h * s)), max(8, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    out = np.empty((t, nh, nw), dtype=np.uint8)
    for i in range(t):
        g = cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY)
        out[i] = g if (nh, nw) == (h, w) else cv2.resize(g, (nw, nh), interpolation=interp)
    return out


class _PairAnalyser:
    """Flow, camera fit and residual statistics of one frame pair (working resolution)."""

    def __init__(self, h: int, w: int, cfg: FlowConfig, upscale: float = 1.0):
        import cv2

        self.cv2 = cv2
        self.cfg = cfg
        self.h, self.w = h, w
        # working pixels per source pixel (> 1 only for clips upscaled to ``min_side``)
        self.misregistration = cfg.misregistration * max(1.0, upscale)
        self.dis = cv2.DISOpticalFlow_create(_PRESETS[cfg.preset])
        level = 0
        while max(h, w) / 2 ** (level + 1) >= cfg.flow_side:
            level += 1
        self.dis.setFinestScale(level)
        self.xs = np.arange(w, dtype=np.float32)[None, :]
        self.ys = np.arange(h, dtype=np.float32)[:, None]
        step = max(1, math.ceil(math.sqrt(h * w / cfg.ransac_points)))
        gy, gx = np.mgrid[step // 2 : h : step, step // 2 : w : step]
        self.grid_y, self.grid_x = gy.ravel(), gx.ravel()
        self.src = np.stack([self.grid_x, self.grid_y], axis=-1).astype(np.float32)
        m = min(cfg.border, h // 8, w // 8)
        self.inner = np.zeros((h, w), dtype=bool)
        self.inner[m : h - m, m : w - m] = True
        self.m = m

    def fit_camera(self, src: np.ndarray, dst: np.ndarray) -> Optional[np.ndarray]:
        """Robust 3x3 camera model mapping ``src`` points to ``dst``, or None.

        A model that explains fewer than ``min_inlier_fraction`` of the points is no camera
        motion but noise (e.g. flicker or dithering) and is rejected.
        """
        cv2, cfg = self.cv2, self.cfg
        need = max(8, int(cfg.min_inlier_fraction * len(src)))
        if cfg.camera_model == "homography" and len(src) >= 8:
            H, inl = cv2.findHomography(src, dst, cv2.RANSAC, cfg.ransac_thresh, maxIters=500, confidence=0.995)
            if H is not None and np.isfinite(H).all() and abs(H[2, 2]) > 1e-8 and int(inl.sum()) >= need:
                return H / H[2, 2]
        if len(src) >= 3:
            A, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_thresh)
            if A is not None and np.isfinite(A).all() and int(inl.sum()) >= need:
                return np.vstack([A, [0.0, 0.0, 1.0]])
        return None

    def camera_map(self, model: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Where the camera model sends every pixel: ``(qx, qy)``, each ``[h,w]`` float32."""
        xs, ys = self.xs, self.ys
        if model is None:
            return np.broadcast_to(xs, (self.h, self.w)).copy(), np.broadcast_to(ys, (self.h, self.w)).copy()
        m = model.astype(np.float32)
        den = m[2, 0] * xs + m[2, 1] * ys + m[2, 2]
        # A homography that sends part of the frame to infinity is not a camera motion.
        if np.any(np.abs(den) < 1e-3):
            return self.camera_map(None)
        qx = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]) / den
        qy = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]) / den
        return qx, qy

    def __call__(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
        """(camera px/frame, object px/frame, moving area fraction) for grey frames ``a → b``."""
        cv2, cfg = self.cv2, self.cfg
        if np.array_equal(a, b):
            return 0.0, 0.0, 0.0  # exact: identical frames have no motion (no flow noise)
        flow = self.dis.calc(a, b, None)
        # Flow is only evidence where there is texture: a flat area "moves" however DIS likes.
        gx = cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=3)
        grad = cv2.magnitude(gx, gy)  # 8 x grey levels per pixel (the 3x3 Sobel's gain)
        textured = grad[self.grid_y, self.grid_x] >= 8.0 * cfg.min_gradient
        model = None
        if np.count_nonzero(textured) >= cfg.min_points:
            src = self.src[textured]
            model = self.fit_camera(src, src + flow[self.grid_y[textured], self.grid_x[textured]])
        qx, qy = self.camera_map(model)
        cx, cy = qx - self.xs, qy - self.ys  # camera flow field
        camera = float(cv2.magnitude(cx, cy).mean())
        # Residual only where the camera keeps the pixel inside the frame (minus a border): pixels
        # entering the view under a pan or zoom have no true correspondence.
        m = self.m
        valid = self.inner & (qx >= m) & (qx <= self.w - 1 - m) & (qy >= m) & (qy <= self.h - 1 - m)
        n_valid = int(np.count_nonzero(valid))
        if n_valid < 16:
            return camera, 0.0, 0.0
        res = cv2.magnitude(flow[..., 0] - cx, flow[..., 1] - cy)[valid]
        moving = res > max(cfg.abs_thresh, cfg.rel_thresh * _median(res))
        if cfg.photo_abs > 0:
            warped = cv2.remap(b, qx, qy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            diff = cv2.boxFilter(cv2.absdiff(a, warped), cv2.CV_32F, (5, 5))
            thresh = max(cfg.photo_abs, cfg.photo_rel * _median(diff[valid]))  # the noise level
            if self.misregistration > 0:
                diff -= cv2.boxFilter(grad, cv2.CV_32F, (5, 5)) * (self.misregistration / 8.0)
            moving &= diff[valid] > thresh
        n_moving = int(np.count_nonzero(moving))
        if n_moving == 0:
            return camera, 0.0, 0.0
        area = n_moving / n_valid
        speed = float(res[moving].mean()) * min(1.0, math.sqrt(area / cfg.area_ref))
        return camera, speed, area


def _median(x: np.ndarray) -> float:
    # A strided sample is plenty for a noise level and 10x cheaper than a full median.
    return float(np.median(x[:: max(1, len(x) // 4096)]))


def flow_motion(
    frames,
    fps: float,
    config: Optional[FlowConfig] = None,
    calibration: LogCalibration = FLOW_CALIBRATION,
    progress: Optional[Callable[[int, int], None]] = None,
) -> MotionScores:
    """Score a clip with the weight-free flow estimator.

    Args:
        frames: ``[T,H,W,3]`` uint8 RGB (or float 0..1), ``T >= 2``. Any resolution: frames are
            downscaled to ``config.work_side`` first.
        fps: the clip's frame rate (speeds are per second).
        progress: ``progress(done_pairs, total_pairs)`` after each pair; raising cancels.

    Returns:
        :class:`MotionScores` with ``raw`` = ``object_speed``, ``camera_speed`` (mean %diag/s),
        ``object_speed_p90``, ``camera_speed_p90``, ``object_area`` (mean moving fraction), and
        per-pair ``curves`` of the same names (length ``T-1``).
    """
    import cv2

    cfg = config or FlowConfig()
    arr = _check_clip(frames, fps)
    # One OpenCV thread per call is as fast here (small images) and leaves the other core free.
    old_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        grey = working_frames(arr, cfg.work_side, cfg.min_side)
        t, h, w = grey.shape
        analyse = _PairAnalyser(h, w, cfg, upscale=h / arr.shape[1])
        cams = np.zeros(t - 1)
        objs = np.zeros(t - 1)
        areas = np.zeros(t - 1)
        for i in range(t - 1):
            cams[i], objs[i], areas[i] = analyse(grey[i], grey[i + 1])
            if progress is not None:
                progress(i + 1, t - 1)
    finally:
        cv2.setNumThreads(old_threads)
    to_pct = 100.0 * float(fps) / math.hypot(h, w)  # working px/frame → % of diagonal per second
    cam_speed, obj_speed = cams * to_pct, objs * to_pct
    raw = {
        "object_speed": float(obj_speed.mean()),
        "camera_speed": float(cam_speed.mean()),
        "object_speed_p90": float(np.percentile(obj_speed, 90)),
        "camera_speed_p90": float(np.percentile(cam_speed, 90)),
        "object_area": float(areas.mean()),
        "work_height": h,
        "work_width": w,
    }
    return MotionScores(
        object=calibration(raw["object_speed"]),
        camera=calibration(raw["camera_speed"]),
        estimator="flow",
        fps=float(fps),
        raw=raw,
        curves={"object_speed": obj_speed, "camera_speed": cam_speed, "object_area": areas},
    )


def _check_clip(frames, fps) -> np.ndarray:
    arr = as_uint8_frames(frames)
    if arr.shape[0] < 2:
        raise ValueError(f"frames: motion needs at least 2 frames, got {arr.shape[0]}")
    try:
        f = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a positive number, got {fps!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return arr


def config_dict(cfg: FlowConfig) -> dict:
    return asdict(cfg)
