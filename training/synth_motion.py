"""Synthetic motion clips with known object and camera speeds.

A clip is rendered by moving a virtual camera over a large textured "world" canvas (pan, tilt,
zoom and roll: a similarity transform per frame) and compositing textured shapes that move in
world coordinates on their own. Because every transform is known, the ground truth is exact:

* **camera speed**: mean magnitude, over a grid of frame pixels and over consecutive frame pairs,
  of the displacement the camera transform alone causes;
* **object speed**: mean magnitude of the displacement of the objects *after removing* the camera
  displacement (what a global camera model leaves as residual), weighted by each object's visible
  area per frame.

Both are in **percent of the frame diagonal per second** (``pct_diag_per_s``), the physical unit
of ``motion``'s weight-free estimator, so they compare directly with its raw quantities.

Use ``make_clip(rng)`` in memory, or ``python -m training.synth_motion --out DIR --count N --seed S``
to write clips, ``meta.jsonl`` (one JSON object per clip) and ``pairs.csv`` (training pairs).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import cv2
import numpy as np

from training.textures import TEXTURE_KINDS, load_photo_backgrounds, make_texture, photo_texture

UNIT = "pct_diag_per_s"
CLIP_KINDS = ("static", "camera", "object", "both")
CAMERA_MODES = ("pan", "zoom", "roll", "pan+zoom", "pan+roll", "pan+zoom+roll")
SHAPES = ("circle", "ellipse", "rect", "triangle", "star")
PAIR_LABELS = ("a", "b", "same")
# Two speeds are "the same" when they differ by at most this fraction of the larger one. 20 % sits
# in the middle of the 10-25 % band where people stop agreeing on which clip moves more; the
# quality benchmark only scores pairs that differ by >= 25 %, so no scored pair is ever "same".
SAME_TOLERANCE = 0.2
# Below this speed (pct diag/s, ~0.1 px/frame at 128x128, 8 fps) motion is invisible: both "same".
SAME_FLOOR = 0.5


@dataclass
class ObjectSpec:
    """One moving shape. Velocity in pct diag/s of *world* motion (= screen motion at zoom 1)."""

    shape: str
    texture: str
    size: float  # side of the sprite as a fraction of min(H, W)
    offset: tuple[float, float]  # (x, y) world position at mid-clip, fraction of (W, H) from centre
    velocity: tuple[float, float]  # (vx, vy), pct diag/s
    seed: int


@dataclass
class ClipSpec:
    """Everything that determines a clip; ``render_clip(spec)`` is a pure function of it."""

    kind: str
    frames: int = 16
    height: int = 128
    width: int = 128
    fps: float = 8.0
    background: str = "noise"  # a texture kind, or "photo:<path>"
    pan: tuple[float, float] = (0.0, 0.0)  # camera velocity (vx, vy), pct diag/s
    zoom: float = 0.0  # d log(magnification)/dt in 1/s; > 0 zooms in
    roll: float = 0.0  # camera rotation, degrees/s
    objects: list[ObjectSpec] = field(default_factory=list)
    noise: float = 1.0  # sensor noise sigma, grey levels (0..255)
    seed: int = 0


def _diag(h: int, w: int) -> float:
    return math.hypot(h, w)


def _mean_radius(h: int, w: int) -> float:
    """Mean distance of the frame's pixels from its centre (px): zoom/roll flow per unit rate."""
    yy, xx = np.mgrid[0:h:2, 0:w:2].astype(np.float64)
    return float(np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2).mean())


def _camera(spec: ClipSpec, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Output-pixel → world map at time ``t`` (s) as ``(A [2,2], b [2])``: ``w = A @ p + b``.

    Time is measured from mid-clip, so the world is seen at zoom 1 and without roll half way
    through; that keeps the canvas needed for zoom-outs as small as possible.
    """
    px = _diag(spec.height, spec.width) / 100.0  # pixels per pct-diag
    tm = t - (spec.frames - 1) / (2 * spec.fps)
    s = math.exp(-spec.zoom * tm)  # world pixels per screen pixel
    th = math.radians(spec.roll * tm)
    A = s * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    centre = np.array([spec.pan[0] * px * tm, spec.pan[1] * px * tm])  # world, relative to origin
    o = np.array([(spec.width - 1) / 2, (spec.height - 1) / 2])
    return A, centre - A @ o


def _object_world(spec: ClipSpec, obj: ObjectSpec, t: float) -> np.ndarray:
    px = _diag(spec.height, spec.width) / 100.0
    tm = t - (spec.frames - 1) / (2 * spec.fps)
    return np.array([obj.offset[0] * spec.width + obj.velocity[0] * px * tm,
                     obj.offset[1] * spec.height + obj.velocity[1] * px * tm])


def _shape_mask(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased mask ``[n,n] float32`` in 0..1 of a shape filling most of the square."""
    big = np.zeros((n * 4, n * 4), dtype=np.uint8)
    c, r = n * 2, int(n * 2 * 0.92)
    if shape == "circle":
        cv2.circle(big, (c, c), r, 255, -1, lineType=cv2.LINE_AA)
    elif shape == "ellipse":
        cv2.ellipse(big, (c, c), (r, int(r * rng.uniform(0.45, 0.8))), float(rng.uniform(0, 180)), 0, 360, 255, -1,
                    lineType=cv2.LINE_AA)
    elif shape == "rect":
        a = float(rng.uniform(0.5, 0.9))
        cv2.rectangle(big, (c - r, int(c - r * a)), (c + r, int(c + r * a)), 255, -1)
    elif shape in ("triangle", "star"):
        k = 3 if shape == "triangle" else 10
        ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi)
        rad = np.full(k, r, dtype=np.float64)
        if shape == "star":
            rad[1::2] *= 0.45
        pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(big, [pts], 255, lineType=cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return cv2.resize(big, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _canvas_box(spec: ClipSpec) -> tuple[float, float, float, float]:
    """World bounding box (x0, y0, x1, y1) that every frame of the camera path sees."""
    h, w = spec.height, spec.width
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64)
    pts = []
    for i in range(spec.frames):
        A, b = _camera(spec, i / spec.fps)
        pts.append(corners @ A.T + b)
    pts = np.concatenate(pts)
    return pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()


def _background(spec: ClipSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The world canvas ``[Hc,Wc,3] float32`` 0..1 and the world coordinate of its pixel (0,0)."""
    x0, y0, x1, y1 = _canvas_box(spec)
    margin = 8  # bilinear sampling and rounding never touch the border
    origin = np.array([math.floor(x0) - margin, math.floor(y0) - margin], dtype=np.float64)
    wc = int(math.ceil(x1)) + margin - int(origin[0]) + 1
    hc = int(math.ceil(y1)) + margin - int(origin[1]) + 1
    if spec.background.startswith("photo:"):
        tex = photo_texture(spec.background[len("photo:"):], rng, hc, wc)
    else:
        tex = make_texture(spec.background, rng, hc, wc)
    return tex.astype(np.float32) / 255.0, origin


def render_clip(spec: ClipSpec, masks: bool = False) -> tuple[np.ndarray, dict]:
    """Render ``spec`` → ``(frames [T,H,W,3] uint8 RGB, meta)``; deterministic in ``spec``.

    ``meta`` holds the spec, ``object_speed`` and ``camera_speed`` (pct diag/s, see module doc) and
    their per-frame-pair curves ``object_curve`` / ``camera_curve`` (length T-1). With ``masks``
    it also holds ``object_masks``: ``[T,H,W] float32`` in 0..1, the union of the objects'
    anti-aliased coverage per frame (an array, so such a ``meta`` is not JSON).
    """
    if spec.kind not in CLIP_KINDS:
        raise ValueError(f"unknown clip kind {spec.kind!r}; expected one of {CLIP_KINDS}")
    if spec.frames < 2 or spec.height < 16 or spec.width < 16 or spec.fps <= 0:
        raise ValueError(f"clip needs >= 2 frames, >= 16x16 pixels and fps > 0, got {spec.frames} frames "
                         f"{spec.height}x{spec.width} at {spec.fps} fps")
    rng = np.random.default_rng(spec.seed)
    h, w, T = spec.height, spec.width, spec.frames
    canvas, origin = _background(spec, rng)
    sprites = []
    for obj in spec.objects:
        orng = np.random.default_rng(obj.seed)
        n = max(6, int(round(obj.size * min(h, w))))
        sprites.append((make_texture(obj.texture, orng, n, n).astype(np.float32) / 255.0,
                        _shape_mask(obj.shape, n, orng), n))

    frames = np.empty((T, h, w, 3), dtype=np.uint8)
    areas = np.zeros((T, len(spec.objects)))
    coverage = np.zeros((T, h, w), dtype=np.float32) if masks else None
    for i in range(T):
        A, b = _camera(spec, i / spec.fps)
        # dst (frame) -> src (canvas): canvas pixel = world - origin.
        M = np.concatenate([A, (b - origin)[:, None]], 1)
        img = cv2.warpAffine(canvas, M, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
        Ainv = np.linalg.inv(A)
        for k, (obj, (tex, mask, n)) in enumerate(zip(spec.objects, sprites)):
            cw = _object_world(spec, obj, i / spec.fps)
            sc = np.array([(n - 1) / 2, (n - 1) / 2])
            # sprite pixel q -> world q - sc + cw -> screen Ainv (world - b).
            Mf = np.concatenate([Ainv, (Ainv @ (cw - sc - b))[:, None]], 1)
            m = cv2.warpAffine(mask, Mf, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
            t = cv2.warpAffine(tex, Mf, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            img = img * (1 - m[..., None]) + t * m[..., None]
            areas[i, k] = float(m.sum())
            if coverage is not None:
                coverage[i] = coverage[i] * (1 - m) + m
        # Visible area of earlier objects shrinks where later ones cover them.
        if len(spec.objects) > 1:
            areas[i] = _visible_areas(spec, sprites, i, h, w)
        img = img * 255.0
        if spec.noise > 0:
            img = img + rng.normal(0.0, spec.noise, img.shape).astype(np.float32)
        frames[i] = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    cam_curve, obj_curve = _ground_truth(spec, areas)
    meta = {
        "kind": spec.kind,
        "unit": UNIT,
        "object_speed": float(_weighted_mean(obj_curve, areas)),
        "camera_speed": float(np.mean(cam_curve)),
        "object_curve": [float(v) for v in _per_pair_object(obj_curve, areas)],
        "camera_curve": [float(v) for v in cam_curve],
        "frames": T,
        "height": h,
        "width": w,
        "fps": spec.fps,
        "spec": _spec_json(spec),
    }
    if coverage is not None:
        meta["object_masks"] = coverage
    return frames, meta


def _visible_areas(spec: ClipSpec, sprites, i: int, h: int, w: int) -> np.ndarray:
    """Area each object shows in frame ``i`` after occlusion by objects drawn later."""
    A, b = _camera(spec, i / spec.fps)
    Ainv = np.linalg.inv(A)
    masks = []
    for obj, (_, mask, n) in zip(spec.objects, sprites):
        cw = _object_world(spec, obj, i / spec.fps)
        sc = np.array([(n - 1) / 2, (n - 1) / 2])
        Mf = np.concatenate([Ainv, (Ainv @ (cw - sc - b))[:, None]], 1)
        masks.append(cv2.warpAffine(mask, Mf, (w, h), flags=cv2.INTER_LINEAR, borderValue=0))
    out = np.zeros(len(masks))
    above = np.zeros((h, w), dtype=np.float32)
    for k in range(len(masks) - 1, -1, -1):
        out[k] = float((masks[k] * (1 - above)).sum())
        above = above + masks[k] * (1 - above)
    return out


def _ground_truth(spec: ClipSpec, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame pair: camera speed ``[T-1]`` and per-object residual speed ``[T-1, K]`` (pct diag/s)."""
    h, w, T = spec.height, spec.width, spec.frames
    to_unit = spec.fps * 100.0 / _diag(h, w)  # px/frame -> pct diag/s
    yy, xx = np.mgrid[0:h:4, 0:w:4].astype(np.float64)
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    cam = np.zeros(T - 1)
    obj = np.zeros((T - 1, len(spec.objects)))
    for i in range(T - 1):
        A0, b0 = _camera(spec, i / spec.fps)
        A1, b1 = _camera(spec, (i + 1) / spec.fps)
        world = grid @ A0.T + b0
        moved = (world - b1) @ np.linalg.inv(A1).T
        cam[i] = np.linalg.norm(moved - grid, axis=1).mean() * to_unit
        A1inv = np.linalg.inv(A1)
        for k, o in enumerate(spec.objects):
            dw = _object_world(spec, o, (i + 1) / spec.fps) - _object_world(spec, o, i / spec.fps)
            obj[i, k] = float(np.linalg.norm(A1inv @ dw)) * to_unit
    return cam, obj


def _pair_areas(areas: np.ndarray) -> np.ndarray:
    return 0.5 * (areas[:-1] + areas[1:])


def _weighted_mean(obj_curve: np.ndarray, areas: np.ndarray) -> float:
    if obj_curve.size == 0:
        return 0.0
    wts = _pair_areas(areas)
    return float((obj_curve * wts).sum() / wts.sum()) if wts.sum() > 0 else 0.0


def _per_pair_object(obj_curve: np.ndarray, areas: np.ndarray) -> np.ndarray:
    if obj_curve.size == 0:
        return np.zeros(areas.shape[0] - 1)
    wts = _pair_areas(areas)
    tot = wts.sum(1)
    return np.where(tot > 0, (obj_curve * wts).sum(1) / np.maximum(tot, 1e-9), 0.0)


def _spec_json(spec: ClipSpec) -> dict:
    d = asdict(spec)
    d["pan"] = list(spec.pan)
    d["objects"] = [{**asdict(o), "offset": list(o.offset), "velocity": list(o.velocity)} for o in spec.objects]
    return d


def spec_from_json(d: dict) -> ClipSpec:
    """Inverse of ``meta["spec"]``: rebuild the ``ClipSpec`` a clip was rendered from."""
    d = dict(d)
    d["pan"] = tuple(d["pan"])
    d["objects"] = [ObjectSpec(**{**o, "offset": tuple(o["offset"]), "velocity": tuple(o["velocity"])})
                    for o in d["objects"]]
    return ClipSpec(**d)


def sample_spec(
    rng: np.random.Generator,
    *,
    frames: int = 16,
    height: int = 128,
    width: int = 128,
    fps: float = 8.0,
    kinds: Sequence[str] = CLIP_KINDS,
    max_object_speed: float = 16.0,
    max_camera_speed: float = 16.0,
    min_speed: float = 1.0,
    max_objects: int = 2,
    photos: Sequence[str] = (),
    noise: float = 1.0,
) -> ClipSpec:
    """Draw a random ``ClipSpec``. Speeds are uniform in ``[min_speed, max_*_speed]`` pct diag/s.

    ``kind``: ``static`` (objects present, nothing moves), ``camera`` (objects fixed in the world),
    ``object`` (still camera), ``both``. Camera speed is split at random over pan/zoom/roll.
    """
    for k in kinds:
        if k not in CLIP_KINDS:
            raise ValueError(f"unknown clip kind {k!r}; expected some of {CLIP_KINDS}")
    kind = str(rng.choice(list(kinds)))
    diag = _diag(height, width)
    seed = int(rng.integers(0, 2**31 - 1))
    if photos and rng.uniform() < 0.5:
        background = "photo:" + str(photos[int(rng.integers(0, len(photos)))])
    else:
        background = str(rng.choice(TEXTURE_KINDS))

    pan, zoom, roll = (0.0, 0.0), 0.0, 0.0
    if kind in ("camera", "both"):
        target = float(rng.uniform(min_speed, max_camera_speed))
        mode = str(rng.choice(CAMERA_MODES))
        parts = mode.split("+")
        share = rng.dirichlet(np.ones(len(parts))) if len(parts) > 1 else np.ones(1)
        r_pct = _mean_radius(height, width) / diag * 100.0  # pct diag of flow per unit rate
        for p, f in zip(parts, share):
            s = target * float(f)
            if p == "pan":
                a = rng.uniform(0, 2 * np.pi)
                pan = (s * math.cos(a), s * math.sin(a))
            elif p == "zoom":
                zoom = float(rng.choice([-1.0, 1.0])) * s / r_pct
            else:
                roll = float(rng.choice([-1.0, 1.0])) * math.degrees(s / r_pct)

    objects = []
    duration = (frames - 1) / fps
    for j in range(int(rng.integers(1, max_objects + 1))):
        size = float(rng.uniform(0.15, 0.3))
        speed = float(rng.uniform(min_speed, max_object_speed)) if kind in ("object", "both") else 0.0
        # Choose a direction that keeps the object's screen path inside the frame (as far as
        # possible): relative to a panning camera the object drifts by (v_obj - v_cam) * t.
        best = None
        for _ in range(16):
            a = rng.uniform(0, 2 * np.pi)
            off = rng.uniform(-0.15, 0.15, 2)
            vel = (speed * math.cos(a), speed * math.sin(a))
            rel = np.array([vel[0] - pan[0], vel[1] - pan[1]]) * diag / 100.0 * duration / 2
            reach = np.abs(rel) + np.abs(off) * np.array([width, height])
            excess = float(np.max(reach / (0.5 * np.array([width, height]))))
            if best is None or excess < best[0]:
                best = (excess, vel, off)
            if excess <= 0.9:
                break
        _, vel, off = best
        objects.append(ObjectSpec(shape=str(rng.choice(SHAPES)), texture=str(rng.choice(TEXTURE_KINDS)), size=size,
                                  offset=(float(off[0]), float(off[1])), velocity=(float(vel[0]), float(vel[1])),
                                  seed=int(rng.integers(0, 2**31 - 1))))
    return ClipSpec(kind=kind, frames=frames, height=height, width=width, fps=fps, background=background,
                    pan=(float(pan[0]), float(pan[1])), zoom=float(zoom), roll=float(roll), objects=objects,
                    noise=float(noise), seed=seed)


def make_clip(rng: np.random.Generator | int, **kwargs) -> tuple[np.ndarray, dict]:
    """A random clip: ``(frames [T,H,W,3] uint8 RGB, meta)``. ``kwargs`` go to ``sample_spec``.

    ``rng`` may be a seed. ``meta["object_speed"]`` / ``meta["camera_speed"]`` are the ground truth
    in pct diag/s; ``meta["spec"]`` rebuilds the clip with ``render_clip(spec_from_json(...))``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return render_clip(sample_spec(rng, **kwargs))


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for clip ``index`` of a data set: clip i is the same whatever ``count`` is."""
    return np.random.default_rng([int(seed), int(index)])


def compare_speeds(a: float, b: float, tolerance: float = SAME_TOLERANCE, floor: float = SAME_FLOOR) -> str:
    """Pair label: ``"a"`` if ``a`` is clearly larger, ``"b"`` if ``b`` is, else ``"same"``.

    "same" when both are below ``floor`` (pct diag/s) or they differ by at most ``tolerance`` times
    the larger one.
    """
    hi = max(a, b)
    if hi < floor or abs(a - b) <= tolerance * hi:
        return "same"
    return "a" if a > b else "b"


def make_pairs(
    metas: Sequence[dict],
    rng: np.random.Generator,
    pairs_per_clip: int = 4,
    tolerance: float = SAME_TOLERANCE,
    floor: float = SAME_FLOOR,
) -> list[tuple[str, str, str, str]]:
    """Random distinct pairs ``(clip_a, clip_b, object_label, camera_label)`` over ``metas``.

    Each meta needs ``clip``, ``object_speed`` and ``camera_speed``. About ``pairs_per_clip * N / 2``
    unordered pairs are drawn (each clip takes part in ~``pairs_per_clip`` of them).
    """
    n = len(metas)
    if n < 2:
        return []
    want = min(n * (n - 1) // 2, max(1, pairs_per_clip * n // 2))
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < want:
        i, j = (int(x) for x in rng.choice(n, 2, replace=False))
        if (min(i, j), max(i, j)) in seen:
            continue
        seen.add((min(i, j), max(i, j)))
        a, b = metas[i], metas[j]
        out.append((a["clip"], b["clip"],
                    compare_speeds(a["object_speed"], b["object_speed"], tolerance, floor),
                    compare_speeds(a["camera_speed"], b["camera_speed"], tolerance, floor)))
    return out


# ----------------------------------------------------------------------------------------------
# Writing a data set


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_pairs_csv(path: str, pairs: Iterable[tuple[str, str, str, str]]) -> None:
    """Write a pairs CSV (header ``clip_a,clip_b,object,camera``) atomically."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["clip_a", "clip_b", "object", "camera"])
    for row in pairs:
        wr.writerow(row)
    _atomic_write_text(path, buf.getvalue())


def write_clip(path: str, frames: np.ndarray, fps: float) -> None:
    """Write a clip atomically with ``motion.clips.write_video``: PNG folder if ``path`` has no suffix."""
    from motion.clips import write_video

    write_video(path, frames, fps)


def generate_dataset(
    out: str,
    count: int,
    seed: int,
    *,
    fmt: str = "mp4",
    pairs_per_clip: int = 4,
    tolerance: float = SAME_TOLERANCE,
    progress: bool = True,
    **spec_kwargs,
) -> list[dict]:
    """Write ``count`` clips, ``meta.jsonl`` and ``pairs.csv`` into ``out``; returns the metas.

    Clip ``i`` depends only on ``(seed, i)`` (see ``clip_rng``). Each clip is written atomically;
    ``meta.jsonl`` and ``pairs.csv`` are written last, so an interrupted run leaves no metadata that
    names a missing clip. Existing clips are regenerated (overwritten).
    """
    from tqdm.auto import tqdm

    if fmt not in ("mp4", "png"):
        raise ValueError(f"unknown clip format {fmt!r}; expected 'mp4' or 'png'")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    os.makedirs(out, exist_ok=True)
    metas = []
    width = max(5, len(str(max(count - 1, 0))))
    for i in tqdm(range(count), desc="synth clips", unit="clip", disable=not progress):
        frames, meta = make_clip(clip_rng(seed, i), **spec_kwargs)
        name = f"clip_{i:0{width}d}" + (".mp4" if fmt == "mp4" else "")
        write_clip(os.path.join(out, name), frames, meta["fps"])
        metas.append({"clip": name, "index": i, "seed": seed, **meta})
    _atomic_write_text(os.path.join(out, "meta.jsonl"), "".join(json.dumps(m) + "\n" for m in metas))
    pairs = make_pairs(metas, np.random.default_rng([int(seed), 2**31]), pairs_per_clip, tolerance)
    write_pairs_csv(os.path.join(out, "pairs.csv"), pairs)
    return metas


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects HEIGHTxWIDTH such as 128x128, got {text!r}") from None
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.synth_motion", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (clips, meta.jsonl, pairs.csv)")
    p.add_argument("--count", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=_parse_size, default=(128, 128), help="HEIGHTxWIDTH (default 128x128)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--format", choices=("mp4", "png"), default="mp4", help="mp4 file or folder of PNGs per clip")
    p.add_argument("--kinds", default=",".join(CLIP_KINDS), help=f"comma list of {','.join(CLIP_KINDS)}")
    p.add_argument("--max-object-speed", type=float, default=16.0, help="pct of frame diagonal per second")
    p.add_argument("--max-camera-speed", type=float, default=16.0, help="pct of frame diagonal per second")
    p.add_argument("--min-speed", type=float, default=1.0, help="slowest moving part, pct diag/s")
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--noise", type=float, default=1.0, help="sensor noise sigma in grey levels")
    p.add_argument("--photos", default=None, help="folder of photos to use as backgrounds for half the clips")
    p.add_argument("--pairs-per-clip", type=int, default=4)
    p.add_argument("--same-tolerance", type=float, default=SAME_TOLERANCE,
                   help="relative speed difference under which a pair is labelled 'same'")
    a = p.parse_args(argv)
    photos = load_photo_backgrounds(a.photos) if a.photos else ()
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    try:
        metas = generate_dataset(
            a.out, a.count, a.seed, fmt=a.format, pairs_per_clip=a.pairs_per_clip, tolerance=a.same_tolerance,
            frames=a.frames, height=a.size[0], width=a.size[1], fps=a.fps, kinds=kinds,
            max_object_speed=a.max_object_speed, max_camera_speed=a.max_camera_speed, min_speed=a.min_speed,
            max_objects=a.max_objects, photos=photos, noise=a.noise,
        )
    except KeyboardInterrupt:
        print("interrupted: clips written so far are complete; meta.jsonl/pairs.csv not updated", file=sys.stderr)
        return 130
    print(f"wrote {len(metas)} clips, meta.jsonl and pairs.csv to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
