"""Procedural RGB textures for synthetic motion clips.

Every generator takes a ``numpy.random.Generator`` and a size and returns ``[H,W,3] uint8``.
Textures must carry detail at several scales so that optical flow (and a learned model) can see
motion everywhere: a flat area moving is invisible to any estimator and would make the ground
truth unobservable.

Real photos: no installed package of this project ships sample photographs (checked: scikit-image,
scipy.datasets, imageio and matplotlib are not installed; OpenCV's wheel ships only Haar cascades;
PIL has no sample images). ``load_photo_backgrounds(folder)`` reads user-supplied photos instead
(``python -m training.synth_motion --photos DIR``).
"""
from __future__ import annotations

import os
from typing import Callable

import cv2
import numpy as np

TEXTURE_KINDS = ("noise", "stripes", "checker", "blobs")
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _palette(rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """``n`` random RGB colours in 0..1, spread apart so textures have contrast."""
    base = rng.uniform(0.0, 1.0, size=(n, 3))
    base[0] *= 0.35  # one dark colour
    base[-1] = 0.65 + 0.35 * base[-1]  # one light colour
    return base


def _colourise(field: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a scalar field in 0..1 ``[H,W]`` through a piecewise-linear palette → ``[H,W,3]`` 0..1."""
    stops = np.linspace(0.0, 1.0, len(palette))
    out = np.empty(field.shape + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(field, stops, palette[:, c])
    return out


def _normalise(field: np.ndarray) -> np.ndarray:
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _octave_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 5, base_cells: int = 4) -> np.ndarray:
    """Sum of bicubically upsampled white noise at doubling frequencies, ``[H,W]`` in 0..1."""
    field = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = base_cells * (2**o)
        gh, gw = max(2, min(h, cells * h // max(h, w) + 2)), max(2, min(w, cells * w // max(h, w) + 2))
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        field += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.6  # keep fine octaves visible: flow needs high-frequency detail
    return _normalise(field / total)


def noise_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    field = _octave_noise(rng, h, w, octaves=int(rng.integers(4, 7)), base_cells=int(rng.integers(3, 8)))
    return _to_uint8(_colourise(field, _palette(rng, 5)))


def _warp_field(rng: np.random.Generator, h: int, w: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement (pixels) used to bend stripes and checkers."""
    dx = (_octave_noise(rng, h, w, octaves=3, base_cells=3) - 0.5) * 2 * strength
    dy = (_octave_noise(rng, h, w, octaves=3, base_cells=3) - 0.5) * 2 * strength
    return dx, dy


def stripes_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    period = float(rng.uniform(6.0, 18.0))
    angle = float(rng.uniform(0, np.pi))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = _warp_field(rng, h, w, strength=float(rng.uniform(2.0, 8.0)))
    u = (xx + dx) * np.cos(angle) + (yy + dy) * np.sin(angle)
    field = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    # Noise on top: pure stripes suffer from the aperture problem (motion along them is invisible).
    field = 0.75 * field + 0.25 * _octave_noise(rng, h, w, octaves=5, base_cells=6)
    return _to_uint8(_colourise(field, _palette(rng, 3)))


def checker_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cell = float(rng.uniform(6.0, 20.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = _warp_field(rng, h, w, strength=float(rng.uniform(1.0, 6.0)))
    board = ((np.floor((xx + dx) / cell) + np.floor((yy + dy) / cell)) % 2).astype(np.float32)
    board = cv2.GaussianBlur(board, (0, 0), 0.7)  # anti-alias the edges
    field = 0.7 * board + 0.3 * _octave_noise(rng, h, w, octaves=5, base_cells=6)
    return _to_uint8(_colourise(field, _palette(rng, 3)))


def blobs_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _colourise(_octave_noise(rng, h, w, octaves=4, base_cells=4), _palette(rng, 3))
    n = int(rng.integers(40, 90) * (h * w) / (256 * 256)) + 20
    for _ in range(n):
        colour = tuple(float(c) for c in rng.uniform(0, 1, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(2, max(3, min(h, w) // 10))), int(rng.integers(2, max(3, min(h, w) // 10))))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA)
    grain = (_octave_noise(rng, h, w, octaves=6, base_cells=16)[..., None] - 0.5) * 0.15
    return _to_uint8(img + grain)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


_GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "noise": noise_texture,
    "stripes": stripes_texture,
    "checker": checker_texture,
    "blobs": blobs_texture,
}


def make_texture(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A procedural texture ``[height,width,3] uint8`` of the given kind (see ``TEXTURE_KINDS``)."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown texture kind {kind!r}; expected one of {TEXTURE_KINDS}")
    return _GENERATORS[kind](rng, int(height), int(width))


def load_photo_backgrounds(folder: str) -> list[str]:
    """Sorted paths of the photos in ``folder`` (used as backgrounds); raises if there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"photo folder {folder!r} does not exist")
    paths = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(PHOTO_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"photo folder {folder!r} holds no images ({', '.join(PHOTO_EXTENSIONS)})")
    return paths


def photo_texture(path: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of the photo at ``path``, rescaled to cover ``[height,width]``, RGB uint8."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read photo {path!r} (not an image OpenCV can decode)")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    ih, iw = img.shape[:2]
    scale = max(height / ih, width / iw) * float(rng.uniform(1.0, 1.3))
    img = cv2.resize(img, (max(width, int(np.ceil(iw * scale))), max(height, int(np.ceil(ih * scale)))),
                     interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    y0 = int(rng.integers(0, img.shape[0] - height + 1))
    x0 = int(rng.integers(0, img.shape[1] - width + 1))
    return np.ascontiguousarray(img[y0:y0 + height, x0:x0 + width])
