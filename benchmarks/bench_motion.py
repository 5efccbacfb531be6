"""Quality and speed of the motion estimators on synthetic clips with exact ground truth.

    python benchmarks/bench_motion.py [--count 160] [--seed 1234] [--size 128x128] [--frames 16]
                                      [--learned PATH] [--json OUT.json]

Prints, for every estimator (flow, the SSIM baseline, and a learned file when given):

* pair-ordering accuracy per head on pairs of clips whose ground-truth speeds differ by >= 25 %
  (a tie counts as wrong; target >= 95 % for flow);
* cross-talk: |Spearman| between the camera score and the object speed on clips where only
  objects move, and between the object score and the camera speed where only the camera moves
  (target <= 0.2; a score that does not vary at all counts as 0);
* clips/s on the benchmark clips;
* seconds to score one 49-frame 480x720 clip (target <= 1.0 s for flow).

Clips come from ``training.synth_motion`` with this script's own seed (default 1234, distinct
from training seeds). Timings are wall-clock on a shared machine: expect noise of +-20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from motion.estimate import estimate_motion, resolve_estimator  # noqa: E402
from training.synth_motion import clip_rng, make_clip  # noqa: E402

MIN_DIFF = 0.25  # pairs whose ground truth differs by at least this fraction of the larger


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for u in np.unique(v):  # average ranks of ties
            m = v == u
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def pair_accuracy(scores: Sequence[float], truth: Sequence[float], min_diff: float = MIN_DIFF) -> tuple[float, int]:
    """Fraction of pairs (truth differing by >= ``min_diff`` of the larger) ordered like the truth."""
    s, g = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    i, j = np.triu_indices(len(g), 1)
    hi = np.maximum(g[i], g[j])
    keep = (hi > 0) & (np.abs(g[i] - g[j]) >= min_diff * hi)
    if not keep.any():
        return float("nan"), 0
    i, j = i[keep], j[keep]
    correct = np.sign(s[i] - s[j]) == np.sign(g[i] - g[j])  # a tie in the scores is wrong
    return float(correct.mean()), int(keep.sum())


def make_set(seed: int, count: int, kinds: Sequence[str], **kw) -> List[tuple]:
    return [make_clip(clip_rng(seed, i), kinds=kinds, **kw) for i in range(count)]


def score_set(est, clips) -> tuple[np.ndarray, np.ndarray, float]:
    obj, cam = [], []
    t0 = time.perf_counter()
    for frames, meta in clips:
        s = estimate_motion(frames, meta["fps"], estimator=est)
        obj.append(s.object)
        cam.append(s.camera)
    dt = time.perf_counter() - t0
    return np.array(obj), np.array(cam), len(clips) / max(dt, 1e-9)


def evaluate(name: str, est, mixed, obj_only, cam_only) -> Dict[str, float]:
    obj, cam, cps = score_set(est, mixed)
    g_obj = [m["object_speed"] for _, m in mixed]
    g_cam = [m["camera_speed"] for _, m in mixed]
    acc_o, n_o = pair_accuracy(obj, g_obj)
    acc_c, n_c = pair_accuracy(cam, g_cam)
    _, cam_on_obj, _ = score_set(est, obj_only)
    obj_on_cam, _, _ = score_set(est, cam_only)
    xt_cam = abs(spearman(cam_on_obj, [m["object_speed"] for _, m in obj_only]))
    xt_obj = abs(spearman(obj_on_cam, [m["camera_speed"] for _, m in cam_only]))
    return {
        "estimator": name,
        "object_pair_acc": acc_o,
        "object_pairs": n_o,
        "camera_pair_acc": acc_c,
        "camera_pairs": n_c,
        "crosstalk_camera_score_vs_object_speed": xt_cam,
        "crosstalk_object_score_vs_camera_speed": xt_obj,
        "clips_per_s": cps,
    }


def time_large(est, reps: int = 3) -> float:
    """Median seconds to score one 49-frame 480x720 clip (rendering excluded)."""
    frames, meta = make_clip(clip_rng(99, 0), frames=49, height=480, width=720, kinds=("both",))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        estimate_motion(frames, meta["fps"], estimator=est)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=160, help="clips in the mixed set (object/camera-only sets: half)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--size", default="128x128", help="HEIGHTxWIDTH of the benchmark clips")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--learned", action="append", default=[], help="a learned estimator file (repeatable)")
    p.add_argument("--skip-ssim", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    h, w = (int(v) for v in a.size.lower().split("x"))
    kw = dict(frames=a.frames, height=h, width=w, fps=a.fps)
    t0 = time.perf_counter()
    mixed = make_set(a.seed, a.count, ("static", "camera", "object", "both"), **kw)
    obj_only = make_set(a.seed + 1, a.count // 2, ("object",), **kw)
    cam_only = make_set(a.seed + 2, a.count // 2, ("camera",), **kw)
    print(f"rendered {len(mixed) + len(obj_only) + len(cam_only)} clips ({a.frames} frames {h}x{w} @ {a.fps} fps) "
          f"in {time.perf_counter() - t0:.1f} s; seed {a.seed}", flush=True)

    names: List[tuple] = [("flow", "flow")]
    if not a.skip_ssim:
        names.append(("ssim-baseline", "ssim"))
    for path in a.learned:
        names.append((f"learned:{os.path.basename(path)}", resolve_estimator(path)))

    results = []
    for name, est in names:
        r = evaluate(name, est, mixed, obj_only, cam_only)
        if not a.skip_timing:
            r["seconds_49x480x720"] = time_large(est)
        results.append(r)
        print(
            f"{name:>22}: object acc {r['object_pair_acc'] * 100:5.1f}% ({r['object_pairs']} pairs)  "
            f"camera acc {r['camera_pair_acc'] * 100:5.1f}% ({r['camera_pairs']} pairs)  "
            f"cross-talk cam<-obj {r['crosstalk_camera_score_vs_object_speed']:.3f} "
            f"obj<-cam {r['crosstalk_object_score_vs_camera_speed']:.3f}  "
            f"{r['clips_per_s']:.1f} clips/s"
            + (f"  49x480x720: {r['seconds_49x480x720']:.3f} s" if "seconds_49x480x720" in r else ""),
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
