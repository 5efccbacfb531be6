"""Clip I/O: read a video file or a folder of frames, write an mp4 or a folder of PNGs.

Frames are always ``[T, H, W, 3]`` uint8 RGB in memory. Reading uses OpenCV (FFmpeg backend),
which decodes mp4/avi/mov/mkv/webm and animated GIFs; for animated images the FFmpeg backend
cannot open, ``cv2.imreadanimation`` is tried as a fallback.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: Frame rate assumed for a folder of frames or a file that does not state one (CogVideoX's rate).
DEFAULT_FPS = 8.0
#: File name endings read as single frames when CLIP is a folder.
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: File name endings read as videos.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v", ".mpg", ".mpeg")
#: Endings written with a video codec by :func:`write_video` (fourcc per container).
_ANIMATION_EXTENSIONS = (".gif", ".webp", ".png", ".apng", ".avif")
_WRITE_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG"}


class ClipError(ValueError):
    """A clip could not be read or written; the message names the path and what was expected."""


@dataclass
class Clip:
    """A decoded clip.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        fps: frames per second (``DEFAULT_FPS`` when the source does not state one).
        path: the file or folder it was read from.
    """

    frames: np.ndarray
    fps: float
    path: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def _cv2():
    # Imported lazily so that `import motion` stays cheap.
    import cv2

    return cv2


def _fit_side(h: int, w: int, max_side: Optional[int]) -> tuple[int, int]:
    """Size ``(h, w)`` scaled down so that its longer side is at most ``max_side`` (never up)."""
    if max_side is None or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _resize_rgb(frame: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    h, w = frame.shape[:2]
    nh, nw = _fit_side(h, w, max_side)
    if (nh, nw) == (h, w):
        return frame
    # INTER_AREA averages the source pixels: the right filter for downscaling (no aliasing).
    return _cv2().resize(frame, (nw, nh), interpolation=_cv2().INTER_AREA)


def _to_rgb3(img: np.ndarray) -> np.ndarray:
    """BGR / BGRA / grey uint8 image from OpenCV → RGB uint8 ``[H, W, 3]``."""
    cv2 = _cv2()
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _image_to_uint8(img: np.ndarray) -> np.ndarray:
    """16-bit (or float 0..1) PNG/TIFF pixels → uint8 0..255."""
    if np.issubdtype(img.dtype, np.integer):
        return (img.astype(np.float32) * (255.0 / np.iinfo(img.dtype).max)).round().astype(np.uint8)
    return (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _natural_key(name: str) -> list:
    # "frame_2.png" sorts before "frame_10.png".
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _valid_fps(fps: float) -> bool:
    return fps is not None and math.isfinite(fps) and 0.0 < fps < 1000.0


def read_clip(
    path: PathLike,
    *,
    max_frames: Optional[int] = None,
    max_side: Optional[int] = None,
    fps: Optional[float] = None,
) -> Clip:
    """Read a video file or a folder of frames.

    Args:
        path: a video file (mp4/avi/mov/mkv/webm/gif...) or a folder of images
            (png/jpg/bmp/webp/tif, sorted by name with numbers compared as numbers).
        max_frames: keep only the first ``max_frames`` frames.
        max_side: downscale each frame while reading so its longer side is at most this many
            pixels (keeps memory bounded for very large videos); never upscales.
        fps: override the frame rate (a folder has none; ``DEFAULT_FPS`` is used otherwise).

    Returns:
        :class:`Clip` with frames ``[T, H, W, 3]`` uint8 RGB.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ClipError: unreadable/corrupt file, no frames, frames of different sizes in a folder.
    """
    p = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if max_side is not None and max_side < 8:
        raise ValueError(f"max_side must be >= 8 pixels, got {max_side}")
    if fps is not None and not _valid_fps(fps):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if not p.exists():
        raise FileNotFoundError(f"clip not found: {p}")
    if p.is_dir():
        frames, src_fps = _read_folder(p, max_frames, max_side), None
    else:
        frames, src_fps = _read_video(p, max_frames, max_side)
    rate = fps if fps is not None else (src_fps if _valid_fps(src_fps) else DEFAULT_FPS)
    return Clip(frames=frames, fps=float(rate), path=str(p))


def _read_folder(folder: Path, max_frames: Optional[int], max_side: Optional[int]) -> np.ndarray:
    cv2 = _cv2()
    names = sorted(
        (f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FRAME_EXTENSIONS),
        key=_natural_key,
    )
    if not names:
        raise ClipError(
            f"{folder}: folder holds no frames (expected image files ending in "
            f"{', '.join(FRAME_EXTENSIONS)})"
        )
    if max_frames is not None:
        names = names[:max_frames]
    frames: list[np.ndarray] = []
    first_size = None
    for name in names:
        f = folder / name
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ClipError(f"{f}: cannot decode this image (corrupt or unsupported format)")
        if img.dtype != np.uint8:
            img = _image_to_uint8(img)
        size = img.shape[:2]
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise ClipError(
                f"{folder}: frames have different sizes: {names[0]} is {first_size[1]}x{first_size[0]} "
                f"but {name} is {size[1]}x{size[0]} (all frames of a clip must share one size)"
            )
        frames.append(_resize_rgb(_to_rgb3(img), max_side))
    return np.stack(frames)


def _read_video(path: Path, max_frames: Optional[int], max_side: Optional[int]):
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    fps = None
    try:
        if cap.isOpened():
            fps = cap.get(cv2.CAP_PROP_FPS)
            src_size = None
            while max_frames is None or len(frames) < max_frames:
                ok, img = cap.read()
                if not ok or img is None:
                    break
                if src_size is not None and img.shape[:2] != src_size:
                    raise ClipError(f"{path}: frame {len(frames)} changes size mid-stream")
                src_size = img.shape[:2]
                frames.append(_resize_rgb(_to_rgb3(img), max_side))
    finally:
        cap.release()
    if not frames and path.suffix.lower() in _ANIMATION_EXTENSIONS:
        frames, fps = _read_animation(path, max_frames, max_side)
    if not frames:
        if path.stat().st_size == 0:
            raise ClipError(f"{path}: file is empty")
        raise ClipError(
            f"{path}: cannot decode any frame (corrupt file or unsupported format; expected a "
            f"video OpenCV/FFmpeg can read: {', '.join(VIDEO_EXTENSIONS)})"
        )
    return np.stack(frames), fps


def _read_animation(path: Path, max_frames: Optional[int], max_side: Optional[int]):
    """Fallback for animated images (gif/apng/webp) the FFmpeg backend cannot open."""
    cv2 = _cv2()
    if not hasattr(cv2, "imreadanimation"):
        return [], None
    try:
        ok, anim = cv2.imreadanimation(str(path), 0, max_frames or 32767)
    except cv2.error:
        return [], None
    if not ok or not anim.frames:
        return [], None
    frames = [_resize_rgb(_to_rgb3(f), max_side) for f in anim.frames]
    if len({f.shape for f in frames}) != 1:
        raise ClipError(f"{path}: animation frames have different sizes")
    durations = [d for d in anim.durations if d > 0]
    fps = 1000.0 / float(np.mean(durations)) if durations else None
    return frames, fps


# --------------------------------------------------------------------------------------- writing


def as_uint8_frames(frames, name: str = "frames") -> np.ndarray:
    """Validate and convert frames to ``[T, H, W, 3]`` uint8 RGB.

    Accepts uint8 ``[T,H,W,3]`` (or ``[T,H,W]``/``[T,H,W,1]`` grey) or floats in 0..1
    (values outside are clipped); numpy arrays or CPU tensors.
    """
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected [T,H,W,3] RGB frames, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name}: empty clip (shape {tuple(arr.shape)})")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: float frames contain NaN or inf")
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    raise ValueError(f"{name}: expected uint8 0..255 or float 0..1 frames, got dtype {arr.dtype}")


def write_video(path: PathLike, frames, fps: float) -> str:
    """Write frames to ``path`` atomically and return the path written.

    ``path`` ending in .mp4/.m4v/.mov (codec mp4v) or .avi (MJPG) writes a video; a path with no
    suffix (or an existing folder) writes a folder of ``frame_00000.png``... Frames are ``[T,H,W,3]``
    uint8 RGB or float 0..1. The data goes to a temporary name in the same folder first and is
    moved into place with ``os.replace``, so an interrupted write leaves nothing half-written.
    """
    p = Path(path)
    arr = as_uint8_frames(frames)
    if not _valid_fps(float(fps)):
        raise ValueError(f"{p}: fps must be a positive number, got {fps}")
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == "":
        return write_frames(p, arr)
    if suffix not in _WRITE_CODECS:
        raise ValueError(
            f"{p}: cannot write '{suffix}' files; use one of {', '.join(_WRITE_CODECS)} "
            f"or a folder path (PNG frames)"
        )
    cv2 = _cv2()
    p.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = arr.shape
    # mp4v/MJPG store even sizes only (OpenCV would crop the last row/column): pad by edge
    # replication instead, so an odd-sized clip reads back one pixel larger, never smaller.
    ph, pw = h + (h % 2), w + (w % 2)
    from merging.fileformat import atomic_path

    with atomic_path(p, suffix=p.suffix) as tmp:
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*_WRITE_CODECS[suffix]), float(fps), (pw, ph))
        if not writer.isOpened():
            raise ClipError(f"{p}: OpenCV could not open a '{_WRITE_CODECS[suffix]}' video writer")
        try:
            for frame in arr:
                if (ph, pw) != (h, w):
                    frame = np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            raise ClipError(f"{p}: the video writer produced an empty file")
    return str(p)


def write_frames(folder: PathLike, frames, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Write frames as ``folder/frame_00000.png``... atomically (temp folder, then rename).

    An existing folder at ``folder`` is replaced only after the new one is complete.
    """
    cv2 = _cv2()
    dst = Path(folder)
    arr = as_uint8_frames(frames)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=str(dst.parent)))
    try:
        for i, frame in enumerate(arr):
            out = tmp / f"frame_{i:05d}.png"
            if not cv2.imwrite(str(out), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                raise ClipError(f"{dst}: could not write {out.name}")
            if progress is not None:
                progress(i + 1, len(arr))
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=str(dst.parent)))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dst)
