"""Data for ``train_motion``: a clip index with captions, motion scores from a frozen estimator
(cached on disk), and a dataset of fixed-size training windows.

Index formats (``--data``):

* a ``.jsonl`` file: one object per line with the clip path (key ``clip``, ``path``, ``video``
  or ``file``) and its caption (``caption``, ``prompt`` or ``text``);
* a ``.csv`` file with a header naming the same columns;
* a folder holding ``metadata.jsonl`` / ``metadata.csv`` / ``captions.jsonl`` / ``captions.csv``,
  or else clips (video files or folders of frames) each with a ``<name>.txt`` caption beside it.

Relative clip paths are relative to the index file's folder. A clip without a caption is an
error (naming the clip): the text condition is part of what the model learns with the scores.

The score cache is a small safetensors file (``scores [N, 2]`` = object, camera on 1..10) whose
metadata lists the clips it was built for (path, size, modification time), the estimator and
the frame window. A cache built for other clips, another estimator or another window is
refused with a clear error instead of silently training on wrong scores.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from motion.clips import FRAME_EXTENSIONS, VIDEO_EXTENSIONS, read_clip

PATH_KEYS = ("clip", "path", "video", "file")
CAPTION_KEYS = ("caption", "prompt", "text")
INDEX_NAMES = ("metadata.jsonl", "metadata.csv", "captions.jsonl", "captions.csv")
SCORE_CACHE_FORMAT = "motiondial.score_cache"
SCORE_CACHE_VERSION = 1


class MotionDataError(ValueError):
    """Training data is missing or malformed; the message names the file and what was expected."""


@dataclass(frozen=True)
class ClipRecord:
    """One training clip: its path (absolute) and caption."""

    path: str
    caption: str


def _pick(row: dict, keys: Sequence[str]) -> Optional[str]:
    for k in keys:
        v = row.get(k)
        if v is not None and str(v).strip() != "":
            return str(v)
    return None


def _records_from_rows(rows: list[tuple[int, dict]], base: str, where: str) -> list[ClipRecord]:
    out = []
    for line, row in rows:
        path = _pick(row, PATH_KEYS)
        if path is None:
            raise MotionDataError(f"{where}, entry {line}: no clip path (expected one of the keys {list(PATH_KEYS)})")
        caption = _pick(row, CAPTION_KEYS)
        if caption is None:
            raise MotionDataError(
                f"{where}, entry {line}: clip {path!r} has no caption (expected a non-empty {'/'.join(CAPTION_KEYS)})"
            )
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if not os.path.exists(full):
            raise MotionDataError(f"{where}, entry {line}: clip {full!r} does not exist")
        out.append(ClipRecord(os.path.abspath(full), caption.strip()))
    if not out:
        raise MotionDataError(f"{where}: no clips listed")
    return out


def _read_jsonl(path: str) -> list[ClipRecord]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MotionDataError(f"{path}, line {i}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise MotionDataError(f"{path}, line {i}: expected a JSON object with clip and caption")
            rows.append((i, row))
    return _records_from_rows(rows, os.path.dirname(os.path.abspath(path)), path)


def _read_csv(path: str) -> list[ClipRecord]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not any(k in reader.fieldnames for k in PATH_KEYS):
            raise MotionDataError(
                f"{path}: the CSV header must name a clip column ({'/'.join(PATH_KEYS)}) and a caption column "
                f"({'/'.join(CAPTION_KEYS)}); got {reader.fieldnames}"
            )
        rows = [(i + 2, dict(r)) for i, r in enumerate(reader)]  # line 1 is the header
    return _records_from_rows(rows, os.path.dirname(os.path.abspath(path)), path)


def _is_clip(path: str) -> bool:
    if os.path.isdir(path):
        return any(n.lower().endswith(FRAME_EXTENSIONS) for n in os.listdir(path))
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _read_folder(folder: str) -> list[ClipRecord]:
    for name in INDEX_NAMES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return read_index(p)
    out = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.startswith(".") or not _is_clip(full):
            continue
        stem = os.path.splitext(name)[0] if os.path.isfile(full) else name
        txt = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(txt):
            raise MotionDataError(
                f"clip {full!r} has no caption: expected {txt!r} (or an index file {' / '.join(INDEX_NAMES)} in {folder!r})"
            )
        with open(txt, encoding="utf-8") as f:
            caption = f.read().strip()
        if not caption:
            raise MotionDataError(f"caption file {txt!r} for clip {full!r} is empty")
        out.append(ClipRecord(os.path.abspath(full), caption))
    if not out:
        raise MotionDataError(f"{folder!r} holds no clips (video files or folders of frames) and no index file")
    return out


def read_index(data: str | os.PathLike) -> list[ClipRecord]:
    """Read the clip/caption index at ``data`` (JSONL, CSV or folder; see the module docs)."""
    data = os.fspath(data)
    if os.path.isdir(data):
        return _read_folder(data)
    if not os.path.isfile(data):
        raise MotionDataError(f"training data {data!r} does not exist (expected a folder, a .csv or a .jsonl file)")
    low = data.lower()
    if low.endswith(".jsonl") or low.endswith(".json"):
        return _read_jsonl(data)
    if low.endswith(".csv"):
        return _read_csv(data)
    raise MotionDataError(f"training data {data!r}: unknown index format (expected .csv or .jsonl, or a folder)")


# -- frames ------------------------------------------------------------------------------
def load_window(path: str, frames: int) -> tuple[np.ndarray, float]:
    """The first ``frames`` frames of a clip, ``[frames, H, W, 3]`` uint8, and its fps.

    Raises ``MotionDataError`` naming the clip when it is shorter than ``frames``.
    """
    clip = read_clip(path, max_frames=frames)
    if clip.num_frames < frames:
        raise MotionDataError(
            f"clip {path!r} has {clip.num_frames} frames, fewer than the {frames} frames a training sample needs "
            "(use a smaller --frames or drop the clip)"
        )
    return clip.frames, clip.fps


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``[T,H,W,3]`` uint8 to cover ``height x width`` then centre-crop (aspect kept)."""
    import cv2

    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    y0, x0 = (nh - height) // 2, (nw - width) // 2
    out = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        out[i] = cv2.resize(frames[i], (nw, nh), interpolation=interp)[y0 : y0 + height, x0 : x0 + width]
    return out


# -- score cache -------------------------------------------------------------------------
def _clip_stamp(path: str) -> dict[str, Any]:
    """Identity of a clip on disk: size and mtime (a folder: of its frame files)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS))
        st = [os.stat(os.path.join(path, n)) for n in names]
        return {"path": path, "size": int(sum(s.st_size for s in st)), "mtime_ns": int(max((s.st_mtime_ns for s in st), default=0)), "n": len(names)}
    s = os.stat(path)
    return {"path": path, "size": int(s.st_size), "mtime_ns": int(s.st_mtime_ns)}


def estimator_id(estimator: Any) -> str:
    """A string naming the estimator: ``"flow"``, ``"ssim"`` or ``"file:<abs path>:<size>"``."""
    if isinstance(estimator, str):
        if os.path.isfile(estimator):
            return f"file:{os.path.abspath(estimator)}:{os.path.getsize(estimator)}"
        return estimator
    return type(estimator).__name__


def _save_cache(path: str, scores: np.ndarray, meta: dict[str, Any]) -> None:
    from merging.fileformat import save_safetensors_atomic

    save_safetensors_atomic({"scores": torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))}, path,
                            {"format": SCORE_CACHE_FORMAT, "format_version": str(SCORE_CACHE_VERSION),
                             "meta": json.dumps(meta, sort_keys=True)})


def _load_cache(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != SCORE_CACHE_FORMAT or md.get("format_version") != str(SCORE_CACHE_VERSION):
                raise MotionDataError(
                    f"score cache {path!r} is not a MotionDial score cache v{SCORE_CACHE_VERSION} (format {md.get('format')!r})"
                )
            scores = f.get_tensor("scores").numpy()
            meta = json.loads(md["meta"])
    except MotionDataError:
        raise
    except Exception as e:
        raise MotionDataError(f"score cache {path!r} is not readable ({e}); delete it to rebuild") from None
    return scores, meta


def compute_scores(
    records: Sequence[ClipRecord],
    *,
    frames: int,
    estimator: Any = "flow",
    cache_path: Optional[str] = None,
    progress: bool = True,
    check: Optional[Callable[[], None]] = None,
) -> np.ndarray:
    """Object and camera scores ``[N, 2]`` (1..10) of each clip's first ``frames`` frames.

    Scores come from a frozen estimator (``"flow"``, a learned estimator file, ...; see
    ``motion.estimate_motion``) and are cached in ``cache_path`` when given. An existing cache
    must have been built for exactly these clips (same files, sizes, modification times, order),
    the same estimator and the same frame window; otherwise ``MotionDataError`` explains the
    mismatch. Every clip is also checked to be at least ``frames`` long.
    """
    from tqdm.auto import tqdm

    stamps = [_clip_stamp(r.path) for r in records]
    want = {"estimator": estimator_id(estimator), "frames": int(frames), "clips": stamps}
    if cache_path and os.path.exists(cache_path):
        scores, meta = _load_cache(cache_path)
        if meta.get("clips") != stamps:
            have = {c["path"] for c in meta.get("clips", [])}
            now = {c["path"] for c in stamps}
            detail = (
                f"{len(now - have)} clip(s) not in the cache (e.g. {sorted(now - have)[:1]}), "
                f"{len(have - now)} cached clip(s) not in the data (e.g. {sorted(have - now)[:1]})"
                if have != now
                else "the same paths, but files changed on disk since (size/modification time) or are in another order"
            )
            raise MotionDataError(
                f"score cache {cache_path!r} was built for other clips: {detail}. "
                "Delete it (or pass another --score-cache) to re-estimate."
            )
        for k in ("estimator", "frames"):
            if meta.get(k) != want[k]:
                raise MotionDataError(
                    f"score cache {cache_path!r} was built with {k}={meta.get(k)!r}, this run uses {k}={want[k]!r}; "
                    "delete it (or pass another --score-cache) to re-estimate"
                )
        return scores.astype(np.float32)

    from motion import estimate_motion
    from motion.estimate import resolve_estimator

    resolve_estimator(estimator)  # a bad estimator path fails now, before any clip is read
    out = np.zeros((len(records), 2), dtype=np.float32)
    for i, r in enumerate(tqdm(records, desc="motion scores", unit="clip", disable=not progress)):
        window, fps = load_window(r.path, frames)
        s = estimate_motion(window, fps, estimator=estimator)
        out[i] = (s.object, s.camera)
        if check is not None:
            check()
    if cache_path:
        _save_cache(cache_path, out, want)
    return out


# -- dataset -----------------------------------------------------------------------------
class ClipWindows(torch.utils.data.Dataset):
    """The clips' training windows: ``video(i)`` -> ``[T,3,H,W]`` float32 in -1..1, the clip's
    first ``frames`` frames scaled to cover ``height x width`` and centre-cropped.

    ``preload=True`` decodes every window once and keeps it as uint8 (4x smaller than float;
    small data sets: tests, demos). Subclasses add the per-item condition in ``__getitem__``.
    """

    def __init__(self, records: Sequence[ClipRecord], *, frames: int, height: int, width: int,
                 preload: bool = False) -> None:
        self.records = list(records)
        self.frames, self.height, self.width = int(frames), int(height), int(width)
        self._cache: dict[int, torch.Tensor] = {}
        if preload:
            for i in range(len(self.records)):
                self._cache[i] = self._window(i)

    def __len__(self) -> int:
        return len(self.records)

    def _window(self, i: int) -> torch.Tensor:
        """``[T, 3, H, W]`` uint8."""
        window, _ = load_window(self.records[i].path, self.frames)
        window = resize_crop(window, self.height, self.width)
        return torch.from_numpy(np.ascontiguousarray(window)).permute(0, 3, 1, 2).contiguous()

    def video(self, i: int) -> torch.Tensor:
        """Clip ``i``'s window, ``[T, 3, H, W]`` float32 in -1..1."""
        raw = self._cache[i] if i in self._cache else self._window(i)
        return raw.float() / 127.5 - 1.0


class MotionClipDataset(ClipWindows):
    """Training windows: item ``i`` -> dict with ``video [T,3,H,W]`` float32 in -1..1 (the
    clip's first ``frames`` frames, scaled and centre-cropped to ``height x width``),
    ``caption`` (str), ``object`` / ``camera`` (float32 scalars, 1..10), ``index``.

    ``preload=True`` decodes all windows once and keeps them as uint8 (small data sets)."""

    def __init__(
        self,
        records: Sequence[ClipRecord],
        scores: np.ndarray,
        *,
        frames: int,
        height: int,
        width: int,
        preload: bool = False,
    ) -> None:
        if len(records) != len(scores):
            raise ValueError(f"{len(records)} clips but {len(scores)} score rows")
        self.scores = np.asarray(scores, dtype=np.float32)
        super().__init__(records, frames=frames, height=height, width=width, preload=preload)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "video": self.video(i),
            "caption": self.records[i].caption,
            "object": torch.tensor(float(self.scores[i, 0])),
            "camera": torch.tensor(float(self.scores[i, 1])),
            "index": i,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack videos to ``[B,T,3,H,W]`` and scores to ``[B]``; captions stay a list. Per-pixel
    ``loss_weight`` ``[T,1,H,W]`` (when every item has one) stacks to ``[B,T,1,H,W]``."""
    batch = {
        "video": torch.stack([x["video"] for x in items]),
        "caption": [x["caption"] for x in items],
        "object": torch.stack([x["object"] for x in items]),
        "camera": torch.stack([x["camera"] for x in items]),
        "index": torch.tensor([x["index"] for x in items]),
    }
    if all("loss_weight" in x for x in items):
        batch["loss_weight"] = torch.stack([x["loss_weight"] for x in items])
    return batch
