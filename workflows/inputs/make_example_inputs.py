"""Regenerate the example inputs the shipped workflows name (drawn procedurally, no downloads).

    python workflows/inputs/make_example_inputs.py

* ``motiondial_example.png``: a 360x240 (3:2) landscape: sky, sun, hills, a lake, a sail boat.
* ``motiondial_reference.mp4``: 24 frames at 8 fps, 192x128: a striped background panning left
  (camera motion) while a red disc crosses it to the right (object motion).
"""
import os

import cv2
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def example_image(w: int = 360, h: int = 240) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    sky = y / (0.55 * h)
    img[...] = np.stack([0.45 + 0.35 * sky, 0.65 + 0.2 * sky, 0.95 - 0.1 * sky], -1)
    sun = (x - 0.75 * w) ** 2 + (y - 0.22 * h) ** 2 < (0.08 * h) ** 2
    img[sun] = (1.0, 0.9, 0.55)
    hills = y > 0.55 * h - 0.12 * h * np.sin(x / w * 5.0) - 0.05 * h * np.sin(x / w * 13.0)
    img[hills] = np.stack([0.25 + 0.1 * np.sin(x / 9.0), 0.5 + 0.1 * np.cos(y / 7.0), 0.25 + 0 * x], -1)[hills]
    lake = y > 0.78 * h
    img[lake] = np.stack([0.2 + 0 * x, 0.4 + 0.05 * np.sin(x / 5.0 + y), 0.7 + 0 * x], -1)[lake]
    hull = (np.abs(x - 0.35 * w) < 0.07 * w - (y - 0.8 * h) * 0.4) & (y > 0.80 * h) & (y < 0.84 * h)
    sail = (x > 0.33 * w) & (x < 0.33 * w + (0.80 * h - y) * 0.5) & (y < 0.80 * h) & (y > 0.62 * h)
    img[hull] = (0.45, 0.25, 0.1)
    img[sail] = (0.97, 0.97, 0.93)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def reference_clip(n: int = 24, w: int = 192, h: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(n):
        xs = x + 3.0 * t  # the camera pans: the background slides left by 3 px per frame
        bg = 0.5 + 0.25 * np.sin(xs / 6.0) * np.cos(y / 9.0) + 0.15 * np.sin(xs / 17.0 + y / 23.0)
        img = np.stack([bg * 0.8, bg, bg * 0.9], -1)
        disc = (x - (20 + 6.0 * t)) ** 2 + (y - 0.5 * h) ** 2 < 14.0 ** 2  # the object moves right, 6 px/frame
        img[disc] = (0.9, 0.15, 0.1)
        frames.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.stack(frames)


def main() -> None:
    cv2.imwrite(os.path.join(HERE, "motiondial_example.png"), example_image()[..., ::-1])
    clip = reference_clip()
    path = os.path.join(HERE, "motiondial_reference.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (clip.shape[2], clip.shape[1]))
    for f in clip:
        writer.write(f[..., ::-1].copy())
    writer.release()


if __name__ == "__main__":
    main()
