"""Data for ``train_adapter``: clips with captions that describe their motion.

The index (``--data``: JSONL, CSV or a folder of clips with ``.txt`` captions) is read by
``training.motion_data.read_index`` — the same format as ``train_motion`` — so a clip without
a caption is an error naming it. No motion scores are needed here: the caption is the condition.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from training.motion_data import ClipRecord, MotionDataError, load_window, read_index, resize_crop

__all__ = ["CaptionedClips", "MotionDataError", "collate_captioned", "read_index"]


class CaptionedClips(torch.utils.data.Dataset):
    """Item ``i`` -> ``{"video": [T,3,H,W] float32 in -1..1, "caption": str, "index": int}``.

    The first ``frames`` frames of each clip, scaled to cover ``height x width`` and centre-cropped.
    ``preload=True`` decodes every window once (small data sets: tests, demos).
    """

    def __init__(
        self, records: Sequence[ClipRecord], *, frames: int, height: int, width: int, preload: bool = False
    ) -> None:
        if not records:
            raise MotionDataError("train_adapter: the data index lists no clips")
        self.records = list(records)
        self.frames, self.height, self.width = int(frames), int(height), int(width)
        self._cache: dict[int, torch.Tensor] = {}
        if preload:
            for i in range(len(self.records)):
                self._cache[i] = self._video(i)

    def __len__(self) -> int:
        return len(self.records)

    def _video(self, i: int) -> torch.Tensor:
        window, _ = load_window(self.records[i].path, self.frames)
        window = resize_crop(window, self.height, self.width)
        return torch.from_numpy(window).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def __getitem__(self, i: int) -> dict[str, Any]:
        video = self._cache[i] if i in self._cache else self._video(i)
        return {"video": video, "caption": self.records[i].caption, "index": i}


def collate_captioned(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack videos to ``[B,T,3,H,W]``; captions stay a list of str."""
    return {
        "video": torch.stack([x["video"] for x in items]),
        "caption": [x["caption"] for x in items],
        "index": torch.tensor([x["index"] for x in items]),
    }
