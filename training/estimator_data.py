"""Data for ``train_estimator``: the pairs CSV, pseudo-labels from the weight-free estimator
(cached on disk, resumable), the held-out split and in-memory clip tensors.

Pairs CSV (``--pairs``), UTF-8, header exactly ``clip_a,clip_b,object,camera``; each row names two
clips (relative to ``--clips`` or absolute) and, per head, which clip has more motion: ``a``,
``b`` or ``same``. Example::

    clip_a,clip_b,object,camera
    clip_00003.mp4,clip_00017.mp4,a,same

Pseudo-label cache (``<out>/pseudo_labels.jsonl`` unless ``--cache``): one JSON object per clip,
appended (and flushed) as soon as the clip is scored, so an interrupted labelling run keeps what
it did and the next run only scores the rest. Each line carries its key: a hash of the clip's
absolute path, modification time, size and the labeller's version (estimator settings,
calibration and the source of ``motion/flow.py`` and ``motion/ssim.py``); a changed clip or
labeller makes old lines stale (ignored). A torn last line (killed mid-write) is ignored. When
labelling finishes, a file with torn or superseded lines is rewritten (atomically) without them.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

LABELS = ("a", "b", "same")
PAIRS_HEADER = ["clip_a", "clip_b", "object", "camera"]
CACHE_FORMAT = "motiondial.pseudo_labels"


class EstimatorDataError(ValueError):
    """Training data is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Pair:
    """One annotated pair; ``object`` / ``camera`` are ``"a"``, ``"b"`` or ``"same"``."""

    clip_a: str  # absolute path
    clip_b: str
    object: str
    camera: str
    line: int  # line in the CSV (for messages)


def resolve_clip(name: str, clips_dir: str) -> str:
    return os.path.abspath(name if os.path.isabs(name) else os.path.join(clips_dir, name))


def read_pairs_csv(path: str, clips_dir: str, check_exists: bool = True) -> list[Pair]:
    """Parse and validate a pairs CSV; errors name the file and line."""
    if not os.path.isfile(path):
        raise EstimatorDataError(f"pairs file {path!r} does not exist")
    pairs: list[Pair] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise EstimatorDataError(f"{path}: empty file; expected the header {','.join(PAIRS_HEADER)}") from None
            if [h.strip().lower() for h in header] != PAIRS_HEADER:
                raise EstimatorDataError(f"{path}, line 1: header is {','.join(header)!r}; expected "
                                         f"{','.join(PAIRS_HEADER)!r}")
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != 4:
                    raise EstimatorDataError(f"{path}, line {line}: expected 4 fields "
                                             f"(clip_a,clip_b,object,camera), got {len(row)}: {row!r}")
                a, b, obj, cam = (c.strip() for c in row)
                for head, lab in (("object", obj), ("camera", cam)):
                    if lab.lower() not in LABELS:
                        raise EstimatorDataError(f"{path}, line {line}: {head} label {lab!r} is not one of "
                                                 f"{', '.join(LABELS)}")
                if not a or not b:
                    raise EstimatorDataError(f"{path}, line {line}: empty clip name")
                pa, pb = resolve_clip(a, clips_dir), resolve_clip(b, clips_dir)
                if pa == pb:
                    raise EstimatorDataError(f"{path}, line {line}: a clip is paired with itself ({a!r})")
                if check_exists:
                    for name, full in ((a, pa), (b, pb)):
                        if not os.path.exists(full):
                            raise EstimatorDataError(f"{path}, line {line}: clip {name!r} not found "
                                                     f"(looked for {full})")
                pairs.append(Pair(pa, pb, obj.lower(), cam.lower(), line))
    except csv.Error as e:
        raise EstimatorDataError(f"{path}, line {getattr(e, 'line_num', None) or '?'}: malformed CSV ({e})") from e
    except UnicodeDecodeError as e:
        raise EstimatorDataError(f"{path}: not UTF-8 text ({e})") from e
    if not pairs:
        raise EstimatorDataError(f"{path}: no pairs listed")
    return pairs


def split_clips(clips: Sequence[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Held-out split *by clip*: a clip is in validation iff its seeded hash falls below the fraction.

    Depends only on the clip's file name and the seed, so adding clips never moves old ones.
    """
    train, val = set(), set()
    for c in clips:
        h = int(hashlib.sha1(f"{seed}:{os.path.basename(c)}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < val_fraction else train).add(c)
    return train, val


def split_pairs(pairs: Sequence[Pair], val_clips: set[str]) -> tuple[list[Pair], list[Pair], int]:
    """``(train_pairs, val_pairs, dropped)``: pairs that straddle the split are dropped."""
    tr, va, dropped = [], [], 0
    for p in pairs:
        ina, inb = p.clip_a in val_clips, p.clip_b in val_clips
        if ina and inb:
            va.append(p)
        elif not ina and not inb:
            tr.append(p)
        else:
            dropped += 1
    return tr, va, dropped


# ----------------------------------------------------------------------------------------------
# Pseudo-labels


def labeller_version() -> str:
    """Identifies the weight-free labeller: its settings, calibration and source code."""
    from motion import flow, ssim
    from motion.calibration import FLOW_CALIBRATION, SSIM_CALIBRATION

    h = hashlib.sha1()
    h.update(json.dumps(flow.config_dict(flow.FlowConfig()), sort_keys=True).encode())
    h.update(json.dumps([FLOW_CALIBRATION.to_dict(), SSIM_CALIBRATION.to_dict()], sort_keys=True).encode())
    for mod in (flow, ssim):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def clip_key(path: str, version: str) -> str:
    st = os.stat(path)
    if os.path.isdir(path):  # a folder of frames: its newest file decides
        stamps = [os.stat(os.path.join(path, n)) for n in sorted(os.listdir(path))]
        mtime = max([s.st_mtime_ns for s in stamps] + [st.st_mtime_ns])
        size = sum(s.st_size for s in stamps)
    else:
        mtime, size = st.st_mtime_ns, st.st_size
    return hashlib.sha1(f"{os.path.abspath(path)}|{mtime}|{size}|{version}".encode()).hexdigest()


def score_clip(path: str) -> dict:
    """Pseudo-labels of one clip: flow scores (1..10) and raw speeds, plus the SSIM baseline score."""
    from motion.clips import read_clip
    from motion.flow import flow_motion
    from motion.ssim import ssim_motion

    clip = read_clip(path)
    fl = flow_motion(clip.frames, clip.fps)
    ss = ssim_motion(clip.frames, clip.fps)
    return {
        "object": fl.object,
        "camera": fl.camera,
        "object_speed": fl.raw["object_speed"],
        "camera_speed": fl.raw["camera_speed"],
        "ssim": ss.object,
    }


def _read_cache(path: str) -> tuple[dict[str, dict], int]:
    """Entries by key (a later line wins) and the number of lines read."""
    entries: dict[str, dict] = {}
    lines = 0
    if not os.path.isfile(path):
        return entries, lines
    with open(path, encoding="utf-8") as f:
        for raw in f:
            lines += 1
            try:
                e = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line torn by a kill; that clip is simply scored again
            if isinstance(e, dict) and e.get("format") == CACHE_FORMAT and "key" in e:
                entries[e["key"]] = e
    return entries, lines


def pseudo_labels(
    clips: Sequence[str],
    cache_path: str,
    *,
    progress: bool = True,
    scorer: Callable[[str], dict] = score_clip,
    version: str | None = None,
) -> dict[str, dict]:
    """Pseudo-labels for ``clips`` (absolute paths) → ``{path: {"object", "camera", "ssim", ...}}``.

    Reuses entries of ``cache_path`` whose key matches; scores the rest, appending each to the
    cache at once; finally rewrites the cache atomically without torn or duplicate lines (entries
    of other clips are kept, so one cache can serve several data sets).
    """
    from tqdm.auto import tqdm

    version = version or labeller_version()
    cached, lines = _read_cache(cache_path)
    keys = {c: clip_key(c, version) for c in clips}
    todo = [c for c in clips if keys[c] not in cached]
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        with open(cache_path, "a", encoding="utf-8") as f:
            for c in tqdm(todo, desc="pseudo-labels", unit="clip", disable=not progress):
                try:
                    labels = scorer(c)
                except Exception as e:
                    raise EstimatorDataError(f"clip {c}: cannot compute pseudo-labels ({e})") from e
                entry = {"format": CACHE_FORMAT, "key": keys[c], "clip": c, "version": version, **labels}
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
                cached[keys[c]] = entry
    if lines + len(todo) != len(cached):  # torn or superseded lines: compact
        _rewrite(cache_path, list(cached.values()))
    return {c: cached[keys[c]] for c in clips}


def _rewrite(path: str, entries: Sequence[dict]) -> None:
    from merging.fileformat import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Clip tensors


def load_model_frames(path: str, config) -> np.ndarray:
    """The frames the learned estimator sees of the clip at ``path``: ``[2*pairs, size, size, 3] uint8``.

    Exactly ``motion.learned.select_frames`` at the clip's fps (kept as uint8 so that hundreds of
    clips fit in memory; the network's own ``prepare`` turns a batch into its input).
    """
    from motion.clips import read_clip
    from motion.learned import select_frames

    clip = read_clip(path)
    return select_frames(clip.frames, clip.fps, config)


def pair_accuracy(scores: dict[str, float], pairs: Sequence[Pair], head: str) -> tuple[float, int]:
    """Fraction of the non-``same`` pairs whose order ``scores`` gets right (ties count half)."""
    right, n = 0.0, 0
    for p in pairs:
        lab = getattr(p, head)
        if lab == "same":
            continue
        d = scores[p.clip_a] - scores[p.clip_b]
        n += 1
        right += 0.5 if d == 0 else float((d > 0) == (lab == "a"))
    return (right / n if n else float("nan")), n
