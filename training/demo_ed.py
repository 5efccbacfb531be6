"""ED on the demo model: stage-1 fine-tune on a subset, the ED deltas, the scheduled sampler,
and the measured motion degree of base / fine-tuned / extrapolated / ED-scheduled.

    python -m training.demo_ed --model DIR/model --embedder DIR/motion_embedder.safetensors --out ED_DIR

Stage 1 here fine-tunes the UNet's temporal layers (the family's temporal pattern) for a few
hundred steps on a **subset** of demo clips (default: slow clips, both scores <= 3.5), with the
motion embedder frozen: the kind of fine-tune that ED observes to lose dynamics. Stages 2-3 are
``merging.recipes.build_ed`` (reference parameters, DARE p = 0.7), and sampling uses the
reference hard switch at noise level 0.5 through ``pipelines.sample(weight_schedule=...)``.
The "extrapolated" model is the dynamics model alone (``pre + b_dyn DARE(a_dyn (pre - ft))``) at
every step. Motion degree = mean measured flow speed (object + camera, % diag/s) and scores
over held-out first frames at one request (default object 5, camera 5).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import torch
from torch import nn

SUBSETS = {"slow": lambda o, c: o <= 3.5 and c <= 3.5, "fast": lambda o, c: o >= 6.5 and c >= 6.5}


def run_demo_ed(model_dir: str, embedder_path: str, out: str, *, subset: str = "slow", steps: int = 200,
                batch: int = 4, lr: float = 3e-4, clips: int = 1024, seed: int = 0, images: int = 4,
                object_score: float = 5.0, camera_score: float = 5.0, sample_steps: int = 10,
                progress: bool = True, log=print) -> dict[str, Any]:
    """Run stage 1 (resumable), build the ED deltas and measure the four motion degrees.
    Returns the results (also written to ``out/ed_motion_degree.json``)."""
    from merging.deltas import load_deltas
    from merging.patcher import ScheduledWeights
    from merging.recipes import build_ed
    from merging.schedule import Constant, HardSwitch
    from motion.embedding import load_motion_embedder
    from pipelines import load_model
    from training.checkpoint import atomic_write_json
    from training.demo_control import demo_first_frames, motion_degree
    from training.demo_data import DemoClipDataset, DemoDataConfig
    from training.demo_model import save_pipeline_atomic
    from training.diffusion_loss import SVDObjective
    from training.motion_data import collate
    from training.runner import RunnerConfig, TrainTask, run
    from training.train_motion import MotionTrainModule

    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    os.makedirs(out, exist_ok=True)
    model = load_model(model_dir)
    embedder = load_motion_embedder(embedder_path, model).requires_grad_(False)
    frames = int(model.denoiser.config.num_frames)
    size = int(model.denoiser.config.sample_size) * int(model.pipeline.vae_scale_factor)
    dcfg = DemoDataConfig(frames=frames, height=size, width=size)

    ft_dir = os.path.join(out, "finetuned")
    if not os.path.isfile(os.path.join(ft_dir, "model_index.json")):
        data = DemoClipDataset(clips, seed + 2000, dcfg, progress=progress)
        keep = [i for i, (o, c) in enumerate(data.scores) if SUBSETS[subset](float(o), float(c))]
        if len(keep) < batch:
            raise ValueError(f"subset {subset!r} kept {len(keep)} of {clips} clips; raise clips")
        temporal = set(model.temporal_parameter_names())
        objective = SVDObjective(model, fps=int(round(dcfg.fps)), cache_encodings=True)
        module = MotionTrainModule(objective, model.denoiser, embedder)

        def batch_fn(ctx: Any) -> dict:
            b = collate([data[keep[int(i)]] for i in ctx.rng.integers(0, len(keep), size=batch)])
            b["seed"] = int(ctx.rng.integers(0, 2**62))
            return b

        def loss_fn(m: nn.Module, b: dict) -> torch.Tensor:
            g = torch.Generator().manual_seed(b["seed"])
            return m(objective.encode(b, g), int(torch.randint(0, 2**62, (1,), generator=g)))

        def save_fn(m: nn.Module, out_dir: str) -> dict[str, str]:
            return {"finetuned": save_pipeline_atomic(model.pipeline, ft_dir)}

        task = TrainTask(name="demo_ed_stage1", model=module, batch_fn=batch_fn, loss_fn=loss_fn,
                         trainable=lambda n, p: n.startswith("denoiser.") and n[len("denoiser."):] in temporal,
                         save_fn=save_fn, config={"model": os.path.abspath(model_dir), "subset": subset,
                                                  "clips": clips, "batch": batch, "seed": seed})
        res = run(task, RunnerConfig(out_dir=os.path.join(out, "stage1"), steps=steps, lr=lr, seed=seed,
                                     warmup_steps=10, checkpoint_every=50, progress=progress), log=log)
        if res.status != "completed":
            return {"status": res.status, "step": res.step}

    ed_dir = os.path.join(out, "ed")
    if not os.path.isfile(os.path.join(ed_dir, "recipe.json")):
        build_ed(model_dir, ft_dir, ed_dir, seed=seed, overwrite=True)

    base = load_model(model_dir)
    ft = load_model(ft_dir)
    deltas = load_deltas(ed_dir, base.fingerprint())
    imgs = demo_first_frames(images, seed + 1000, dcfg)
    kw = dict(object_score=object_score, camera_score=camera_score, frames=frames, steps=sample_steps, fps=dcfg.fps)
    results = {
        "base": motion_degree(base, embedder, imgs, **kw),
        "finetuned": motion_degree(ft, embedder, imgs, **kw),
        "extrapolated": motion_degree(base, embedder, imgs, weight_schedule=ScheduledWeights(
            {"dynamics": deltas["dynamics"]}, Constant({"dynamics": 1.0})), **kw),
        "ed_scheduled": motion_degree(base, embedder, imgs, weight_schedule=ScheduledWeights(
            {"dynamics": deltas["dynamics"], "control": deltas["control"]}, HardSwitch()), **kw),
    }
    summary = {"status": "completed", "subset": subset, "stage1_steps": steps, "request": [object_score, camera_score],
               "images": images, "motion_degree": results}
    atomic_write_json(os.path.join(out, "ed_motion_degree.json"), summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo_ed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--embedder", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--subset", default="slow", choices=sorted(SUBSETS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        s = run_demo_ed(a.model, a.embedder, a.out, subset=a.subset, steps=a.steps, lr=a.lr, images=a.images, seed=a.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s.get("status") != "completed":
        print(f"stage 1 {s.get('status')} at step {s.get('step')}")
        return 130
    print(f"motion degree at object {s['request'][0]:g}, camera {s['request'][1]:g} ({s['images']} first frames):")
    for k, v in s["motion_degree"].items():
        print(f"  {k:13s} object {v['object']:5.2f} camera {v['camera']:5.2f}   speed obj {v['object_speed']:6.2f} "
              f"cam {v['camera_speed']:6.2f} total {v['total']:6.2f} %diag/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
