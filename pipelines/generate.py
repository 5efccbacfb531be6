"""The main job: one image -> one ``.mp4``, with its measured motion.

    python -m pipelines.generate [--model DIR] [--image PATH] [--object N --camera N [--embedder FILE]]
                                  [--prompt TEXT] [--text-adapter FILE [--text-encoder DIR]]
                                  [--frames N] [--steps N] [--cfg X] [--seed N] [--upscale N] [--out PATH] ...

Without ``--model`` it runs the bundled demo model (``pipelines.demo``: a 32-px Stable Video
Diffusion trained here on synthetic clips, with its motion-score embedder), so the object and
camera dials work on a fresh checkout; its sampling defaults are the ones it was trained for.
Should the bundled folder be missing (a partial checkout), it falls back to a tiny *untrained*
model built on the fly and says so. Without ``--image`` it uses ``assets/sample_image.png``.

After writing the video it measures the result with the weight-free flow estimator
(``motion.estimate_motion``) and prints requested vs measured object/camera scores (1..10).
Prints the path written and every setting used. Ctrl-C stops cleanly: nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from .demo import (DEMO_DEFAULTS, DEMO_EMBEDDER, DEMO_MODEL, DEMO_TRAIN_COMMAND, DEMO_TRAINED_MAX_SCORE,
                   demo_available)

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(PACK_DIR, "assets", "sample_image.png")
# Fallback when the bundled demo model is missing: a tiny CogVideoX-1.5-style model (any
# resolution), built per run with random weights.
DEFAULT_TINY_FAMILY = "cogvideox1.5-i2v"
DEFAULT_TINY = {"frames": 17, "steps": 10}
FAMILY_DEFAULTS = {  # steps / cfg of the reference samplers
    "cogvideox-i2v": {"steps": 50, "cfg": 6.0},
    "cogvideox1.5-i2v": {"steps": 50, "cfg": 6.0},
    "svd": {"steps": 25, "cfg": 3.0},
}
# The demo's frames are 32 px: the written file is enlarged this much (nearest neighbour) so it
# can be watched; the measurement always reads the native frames.
DEMO_UPSCALE = 8
MAX_UPSCALE = 16
DEFAULT_PROMPT = "a sailboat drifts on the sea at sunset, gentle waves"
UNTRAINED_NOTE = (
    f"NOTE: no --model given and the bundled demo model is missing ({DEMO_MODEL}), so this video comes "
    "from a tiny UNTRAINED model with random weights, built on the fly. It shows the pipeline running end "
    "to end; it is noise-like and says nothing about motion quality. Pass --model DIR (a diffusers "
    "CogVideoX-I2V or SVD folder) for real output."
)
DEMO_NOTE = (
    "Using the bundled demo model (assets/demo_model): a 32x32-pixel, 8-frame toy Stable Video Diffusion "
    "trained from scratch on synthetic clips (the camera pans right, one object moves down; speeds set by the "
    f"object/camera scores) by `{DEMO_TRAIN_COMMAND}`. It shows the motion dials at work, not video "
    "quality. Pass --model DIR for a real model."
)


def is_demo_model(path: Optional[str]) -> bool:
    """Whether ``path`` is the bundled demo model folder (so its sampling defaults apply)."""
    return path is not None and os.path.realpath(path) == os.path.realpath(DEMO_MODEL)


def upscale_nearest(frames: np.ndarray, factor: int) -> np.ndarray:
    """``[T,H,W,C]`` -> ``[T,H*factor,W*factor,C]`` by pixel repetition (crisp, adds nothing)."""
    if factor == 1:
        return frames
    return np.repeat(np.repeat(frames, factor, axis=1), factor, axis=2)


def build_parser() -> argparse.ArgumentParser:
    d = DEMO_DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description="MotionDial main job: animate one image into an .mp4 with an image-to-video model, then "
                    "measure its object and camera motion.",
    )
    p.add_argument("--model", help="local diffusers model folder (CogVideoX-I2V 1.0/1.5, SVD/SVD-XT); default: the "
                   "bundled demo model (assets/demo_model/model, a 32-px toy SVD trained on synthetic clips)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="input image (default: the bundled sample image); the demo "
                   "model centre-crops it to a square")
    p.add_argument("--prompt", default=None,
                   help=f"text prompt (default for CogVideoX and with --text-adapter: {DEFAULT_PROMPT!r}); SVD reads "
                   "it only through --text-adapter and otherwise ignores it (with a warning)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (CogVideoX; SVD with --text-adapter)")
    p.add_argument("--text-adapter", default=None,
                   help="SVD: text adapter file from training.train_adapter (text_adapter.safetensors); the prompt "
                   "then steers the temporal layers")
    p.add_argument("--text-encoder", default=None,
                   help="CLIP text-encoder folder for --text-adapter (default: the folder recorded in the adapter file)")
    p.add_argument("--object", type=float, default=None, dest="object_intensity",
                   help=f"object-motion score 1..10 (needs an embedder; demo model default {d['object']:g}, trained "
                   f"on 1..{DEMO_TRAINED_MAX_SCORE:g})")
    p.add_argument("--camera", type=float, default=None, dest="camera_intensity",
                   help=f"camera-motion score 1..10 (needs an embedder; demo model default {d['camera']:g}, trained "
                   f"on 1..{DEMO_TRAINED_MAX_SCORE:g})")
    p.add_argument("--embedder", default=None,
                   help="motion-score embedder trained for this model: the file (motion_embedder.safetensors) or "
                   "training.train_motion's output folder; a LoRA/full run's transformer delta beside it is "
                   "applied too (default with the demo model: its bundled embedder)")
    p.add_argument("--frames", type=int, default=None,
                   help=f"number of frames (default: the family's; demo model {d['frames']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default: CogVideoX 50, SVD 25, demo model {d['steps']})")
    p.add_argument("--cfg", type=float, default=None,
                   help=f"guidance scale (default: CogVideoX 6, SVD 3, demo model {d['cfg']:g}: it was trained without "
                   "condition dropout, so its unconditional branch is meaningless and cfg > 1 only adds noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None,
                   help=f"output height in pixels (demo model: {d['height']}; one of --height/--width sets both)")
    p.add_argument("--width", type=int, default=None, help=f"output width in pixels (demo model: {d['width']})")
    p.add_argument("--fps", type=float, default=None,
                   help=f"frame rate (default: the family's; demo model {d['fps']:g}, what it was trained at)")
    p.add_argument("--upscale", type=int, default=None,
                   help=f"enlarge the written video N times (nearest neighbour) so a tiny one can be watched; the "
                   f"measured motion reads the native frames (default: demo model {DEMO_UPSCALE}, else 1; "
                   f"1..{MAX_UPSCALE})")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--offload", default="none", choices=("none", "model", "sequential"))
    p.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles (less memory)")
    p.add_argument("--vae-slicing", action="store_true", help="decode a few frames at a time (less memory)")
    p.add_argument("--out", default=None, help="output .mp4 (default: outputs/motiondial_<time>.mp4 "
                   "under the current directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _default_out() -> str:
    return os.path.join(os.getcwd(), "outputs", time.strftime("motiondial_%Y%m%d_%H%M%S.mp4"))


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> str:
    """Run the main job for parsed ``args``; returns the path of the written video."""
    from tqdm.auto import tqdm

    from motion import estimate_motion
    from motion.clips import write_video

    from .loading import load_model
    from .sampling import sample
    from .tiny import build_tiny_model

    out = os.path.abspath(args.out or _default_out())
    if not out.lower().endswith((".mp4", ".m4v", ".mov")):
        raise ValueError(f"--out {args.out}: expected a path ending in .mp4")
    untrained = args.model is None and not demo_available()
    demo = is_demo_model(args.model) or (args.model is None and not untrained)
    embedder_path = args.embedder
    if demo and embedder_path is None:
        embedder_path = DEMO_EMBEDDER
    if embedder_path is None and (args.object_intensity is not None or args.camera_intensity is not None):
        raise ValueError("--object/--camera need --embedder FILE (a motion-score embedder trained for this "
                         "model); without one the scores could have no effect")
    if not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    if args.text_encoder is not None and args.text_adapter is None:
        raise ValueError("--text-encoder is the text encoder of a --text-adapter; pass --text-adapter FILE too")
    if embedder_path is not None and not os.path.exists(embedder_path):
        raise ValueError(f"--embedder {embedder_path}: no such file or folder")
    if args.text_adapter is not None and not os.path.isfile(args.text_adapter):
        raise ValueError(f"--text-adapter {args.text_adapter}: no such file")
    upscale = args.upscale if args.upscale is not None else (DEMO_UPSCALE if demo else 1)
    if not 1 <= upscale <= MAX_UPSCALE:
        raise ValueError(f"--upscale {upscale}: expected an integer in [1, {MAX_UPSCALE}]")

    object_intensity, camera_intensity = args.object_intensity, args.camera_intensity
    height, width, fps = args.height, args.width, args.fps
    if demo:
        d = DEMO_DEFAULTS
        if object_intensity is None:
            object_intensity = d["object"]
        if camera_intensity is None:
            camera_intensity = d["camera"]
        for name, v in (("--object", object_intensity), ("--camera", camera_intensity)):
            if v > DEMO_TRAINED_MAX_SCORE:
                _warn(f"{name} {v:g}: the demo model was trained on scores 1..{DEMO_TRAINED_MAX_SCORE:g} (10 moves "
                      "its 32-px content out of the frame); expect it to ignore or undershoot this request")
        if args.cfg is not None and args.cfg > 1.0:
            _warn(f"--cfg {args.cfg:g}: the demo model was trained without condition dropout, so guidance above 1 "
                  "has no meaningful unconditional branch to push away from")
        # square by default (the image is centre-cropped); one given side sets both
        height = height if height is not None else (width if width is not None else d["height"])
        width = width if width is not None else height
        fps = fps if fps is not None else d["fps"]
        print(DEMO_NOTE, flush=True)

    with tempfile.TemporaryDirectory(prefix="motiondial-tiny-") as tmp:
        if untrained:
            print(UNTRAINED_NOTE, flush=True)
            model_dir = build_tiny_model(os.path.join(tmp, "tiny"), DEFAULT_TINY_FAMILY, seed=0)
        else:
            model_dir = args.model if args.model is not None else DEMO_MODEL
        model = load_model(model_dir, dtype=args.dtype, device=args.device, offload=args.offload,
                           vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing)
        fam = model.family.name
        if demo:
            frames_d, steps_d, cfg_d = DEMO_DEFAULTS["frames"], DEMO_DEFAULTS["steps"], DEMO_DEFAULTS["cfg"]
        elif untrained:
            frames_d, steps_d, cfg_d = DEFAULT_TINY["frames"], DEFAULT_TINY["steps"], FAMILY_DEFAULTS[fam]["cfg"]
        else:
            frames_d, steps_d, cfg_d = model.family.default_frames, FAMILY_DEFAULTS[fam]["steps"], \
                FAMILY_DEFAULTS[fam]["cfg"]
        frames = args.frames if args.frames is not None else frames_d
        steps = args.steps if args.steps is not None else steps_d
        cfg = args.cfg if args.cfg is not None else cfg_d

        text_control = None
        if args.text_adapter:
            if model.family.text_conditioned:
                raise ValueError(f"--text-adapter: {fam} already reads the prompt in every block; text adapters are "
                                 "for SVD (drop --text-adapter)")
            from textadapter import load_text_control

            text_control = load_text_control(args.text_adapter, args.text_encoder, base_fingerprint=model.fingerprint(),
                                             device=model.device)
        prompt = args.prompt
        if prompt is None:  # SVD without an adapter has no text input: no default prompt to ignore
            prompt = DEFAULT_PROMPT if model.family.text_conditioned or text_control is not None else ""

        embedder = weight_schedule = None
        if embedder_path:
            from motion.embedding import load_trained_motion

            # the embedder plus, for LoRA/full runs, the transformer delta it was trained with
            embedder, weight_schedule = load_trained_motion(embedder_path, model)
            embedder = embedder.to(model.device)

        bar = None if args.no_progress else tqdm(total=steps, desc="sampling", unit="step")

        def progress(step: int, total: int) -> None:
            if bar is not None:
                bar.update(step - bar.n)

        try:
            video = sample(model, args.image, prompt, negative_prompt=args.negative_prompt, frames=frames,
                           steps=steps, cfg=cfg, seed=args.seed, height=height, width=width, fps=fps,
                           object_intensity=object_intensity, camera_intensity=camera_intensity,
                           weight_schedule=weight_schedule, motion_embedder=embedder, text_control=text_control,
                           progress=progress)
        finally:
            if bar is not None:
                bar.close()
        native = video.uint8()
        path = write_video(out, upscale_nearest(native, upscale), video.fps)

    settings = dict(video.settings)
    if untrained:
        settings["model"] = f"(embedded tiny untrained {DEFAULT_TINY_FAMILY} model, seed 0)"
    settings.update(image=os.path.abspath(args.image), embedder=embedder_path,
                    motion_delta=weight_schedule is not None, text_encoder=args.text_encoder, out=path,
                    demo_model=demo, untrained_model=untrained, upscale=upscale,
                    written_size=[native.shape[1] * upscale, native.shape[2] * upscale], offload=args.offload,
                    vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing)
    print("settings used:")
    for k, v in settings.items():
        print(f"  {k}: {json.dumps(v)}")
    # the weight-free estimator on the native frames: what the dials actually produced
    measured = estimate_motion(native, video.fps, "flow")
    if object_intensity is not None or camera_intensity is not None:
        req = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
        print(f"motion (flow estimator, scores 1..10): requested object {req(object_intensity)} / camera "
              f"{req(camera_intensity)} -> measured object {measured.object:.1f} / camera {measured.camera:.1f}")
    else:
        print(f"motion (flow estimator, scores 1..10): measured object {measured.object:.1f} / camera "
              f"{measured.camera:.1f} (no scores requested)")
    if untrained:
        print("(result from an UNTRAINED model: noise-like by design)")
    print(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # our errors name the input; no traceback for bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
