"""Data for ``train_adapter``: clips with captions that describe their motion.

The index (``--data``: JSONL, CSV or a folder of clips with ``.txt`` captions) is read by
``training.motion_data.read_index`` — the same format as ``train_motion`` — so a clip without
a caption is an error naming it. No motion scores are needed here: the caption is the condition.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from training.motion_data import ClipRecord, ClipWindows, MotionDataError, read_index

__all__ = ["CaptionedClips", "MotionDataError", "collate_captioned", "read_index", "write_pan_dataset"]


class CaptionedClips(ClipWindows):
    """Item ``i`` -> ``{"video": [T,3,H,W] float32 in -1..1, "caption": str, "index": int}``.

    The first ``frames`` frames of each clip, scaled to cover ``height x width`` and centre-cropped.
    ``preload=True`` decodes every window once, kept as uint8 (small data sets: tests, demos).
    """

    def __init__(
        self, records: Sequence[ClipRecord], *, frames: int, height: int, width: int, preload: bool = False
    ) -> None:
        if not records:
            raise MotionDataError("train_adapter: the data index lists no clips")
        super().__init__(records, frames=frames, height=height, width=width, preload=preload)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"video": self.video(i), "caption": self.records[i].caption, "index": i}


def collate_captioned(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack videos to ``[B,T,3,H,W]``; captions stay a list of str."""
    return {
        "video": torch.stack([x["video"] for x in items]),
        "caption": [x["caption"] for x in items],
        "index": torch.tensor([x["index"] for x in items]),
    }


def write_pan_dataset(
    folder: str | os.PathLike,
    *,
    size: int = 32,
    frames: int = 4,
    speed: int = 2,
    captions: Sequence[str] = ("camera pans left", "camera pans right"),
    seed: int = 0,
) -> str:
    """A tiny captioned data set for tests and demos: one random texture panning left and right.

    Writes ``clip0/``, ``clip1/`` (PNG frame folders, ``[frames, size, size, 3]``, ``speed`` px per
    frame in opposite directions) and ``data.jsonl`` into ``folder``; returns the index path.
    """
    from motion.clips import write_frames

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (size, 2 * size, 3), dtype=np.uint8)
    rows = []
    for i, (caption, dx) in enumerate(zip(captions, (-speed, speed))):
        clip = np.stack([np.roll(texture, dx * t, axis=1)[:, size // 2: size // 2 + size] for t in range(frames)])
        write_frames(os.path.join(folder, f"clip{i}"), clip)
        rows.append({"clip": f"clip{i}", "caption": caption})
    path = os.path.join(folder, "data.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    os.replace(tmp, path)
    return path
