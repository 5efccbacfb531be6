"""Controllability of a motion-conditioned model (issue 8's acceptance numbers).

    python benchmarks/bench_control.py --model DIR --embedder FILE [--levels 1,3,5,7,9] [--seeds 3]
           [--steps 25] [--frames 8] [--motion-scale 1,2] [--image PNG] [--threads 1] [--json OUT]

Generates every requested (object, camera) pair of ``--levels`` for ``--seeds`` first frames
(held-out demo frames, or ``--image``; first frame ``i`` samples with seed ``i``), measures each
video with the weight-free flow estimator and prints, per ``--motion-scale`` (see
``training.demo_control.ScaledEmbedding``; 1 = the embedder as trained):

* Spearman(requested, measured) for object and for camera (target >= 0.8 each);
* cross-talk |Spearman(requested object, measured camera)| and the reverse (target <= 0.3);
* the mean measured scores per requested cell.

With ``--ed OUT_DIR`` it also runs ED on the model (``training.demo_ed``: stage-1 fine-tune of the
temporal layers on the slow subset, the ED deltas, the scheduled sampler; resumable, reused when
``OUT_DIR`` already holds the results for this model) and prints the measured motion degree of
base / fine-tuned / extrapolated / ED-scheduled: "extrapolation amplifies motion", checked.

Defaults fit the demo model (``python -m training.train_demo``): 8 frames at 7 fps, cfg 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers folder of a motion-conditioned model (e.g. the demo model)")
    p.add_argument("--embedder", required=True, help="its motion_embedder.safetensors")
    p.add_argument("--levels", default="1,3,5,7,9", help="requested scores per axis (full grid)")
    p.add_argument("--seeds", type=int, default=3, help="first frames / sampling seeds per cell")
    p.add_argument("--data-seed", type=int, default=1000, help="demo data set the first frames come from (held out)")
    p.add_argument("--image", default=None, help="use this image as every first frame instead")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (the demo default; 10 leaks more camera into object)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--fps", type=float, default=7.0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--motion-scale", default="1", help="comma list of embedding extrapolation scales")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write all rows and metrics here")
    p.add_argument("--ed", default=None, metavar="OUT_DIR", help="also run ED on the model (training.demo_ed) into "
                   "OUT_DIR and print the four motion degrees")
    p.add_argument("--ed-steps", type=int, default=200, help="stage-1 fine-tune steps for --ed")
    p.add_argument("--ed-images", type=int, default=8, help="first frames the --ed motion degrees average over")
    p.add_argument("--skip-grid", action="store_true", help="only the --ed part")
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from motion.embedding import load_motion_embedder
    from pipelines import load_model
    from pipelines.sampling import load_image
    from training.demo_control import ScaledEmbedding, demo_first_frames, measure_control
    from training.demo_data import DemoDataConfig

    torch.set_num_threads(a.threads)
    levels = [float(v) for v in a.levels.split(",")]
    model = load_model(a.model)
    embedder = load_motion_embedder(a.embedder, model)
    if a.image:
        img = np.asarray(load_image(a.image).resize((a.size, a.size)))
        images = [img] * a.seeds
    else:
        images = demo_first_frames(a.seeds, a.data_seed, DemoDataConfig(frames=a.frames, height=a.size, width=a.size, fps=a.fps))
    out = {"model": os.path.abspath(a.model), "levels": levels, "seeds": a.seeds, "steps": a.steps, "runs": []}
    if not a.skip_grid:
        print(f"model {a.model}  grid {len(levels)}x{len(levels)} levels {levels} x {a.seeds} seeds, {a.steps} steps, "
              f"{a.frames} frames @ {a.fps:g} fps ({'image ' + a.image if a.image else 'held-out demo first frames'})")
    for scale in ([] if a.skip_grid else (float(s) for s in a.motion_scale.split(","))):
        emb = embedder if scale == 1.0 else ScaledEmbedding(embedder, scale)
        bar = tqdm(total=len(levels) ** 2 * a.seeds, desc=f"motion scale {scale:g}", unit="video", file=sys.stderr)
        t0 = time.perf_counter()
        res = measure_control(model, emb, images, levels=levels, frames=a.frames, steps=a.steps, fps=a.fps,
                              progress=lambda d, t: bar.update(1))
        bar.close()
        m = res.metrics()
        dt = time.perf_counter() - t0
        print(f"\nmotion scale {scale:g}: {len(res.rows)} videos in {dt:.1f} s")
        print("  requested (obj, cam) -> measured (obj, cam), mean over seeds")
        for o, c, mo, mc in res.table():
            print(f"    ({o:4.1f}, {c:4.1f}) -> ({mo:5.2f}, {mc:5.2f})")
        print(f"  Spearman object {m['object_spearman']:+.3f}  camera {m['camera_spearman']:+.3f}  (target >= 0.8)")
        print(f"  cross-talk object->camera {m['leak_object_to_camera']:.3f}  camera->object {m['leak_camera_to_object']:.3f}"
              f"  (target <= 0.3)")
        print(f"  {'PASS' if m['passed'] else 'FAIL'}")
        out["runs"].append({"motion_scale": scale, "metrics": m, "rows": res.rows, "seconds": dt})
    if a.ed:
        out["ed"] = _run_ed(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _run_ed(a) -> dict:
    from training.demo_ed import run_demo_ed

    t0 = time.perf_counter()
    s = run_demo_ed(a.model, a.embedder, a.ed, steps=a.ed_steps, images=a.ed_images, sample_steps=a.steps)
    if s.get("status") != "completed":
        print(f"ED stage 1 {s.get('status')} at step {s.get('step')}: run again to resume")
        return s
    print(f"\nED on the model ({a.ed}; stage 1: {s['stage1_steps']} steps on the {s['subset']} subset; "
          f"{time.perf_counter() - t0:.0f} s): motion degree at object {s['request'][0]:g}, camera {s['request'][1]:g}, "
          f"{s['images']} first frames")
    print("  model          object camera   speed: object camera total (% diag/s)")
    for k, v in s["motion_degree"].items():
        print(f"  {k:13s}  {v['object']:6.2f} {v['camera']:6.2f}          {v['object_speed']:6.2f} {v['camera_speed']:6.2f} "
              f"{v['total']:6.2f}")
    md = s["motion_degree"]
    print(f"  extrapolated / base total speed: {md['extrapolated']['total'] / md['base']['total']:.3f}; "
          f"fine-tuned / base: {md['finetuned']['total'] / md['base']['total']:.3f}; "
          f"ED-scheduled / base: {md['ed_scheduled']['total'] / md['base']['total']:.3f}")
    return s


if __name__ == "__main__":
    sys.exit(main())
