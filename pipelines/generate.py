"""The main job: one image -> one ``.mp4``.

    python -m pipelines.generate [--model DIR] [--image PATH] [--prompt TEXT] [--object N --camera N
                                  --embedder FILE] [--text-adapter FILE [--text-encoder DIR]]
                                  [--frames N] [--steps N] [--cfg X] [--seed N] [--out PATH] ...

Without ``--model`` it builds a tiny, *untrained* model on the fly (random weights, a few
hundredths of a second) and says so: the video shows the pipeline working end to end, not
MotionDial's methods. Without ``--image`` it uses the bundled ``assets/sample_image.png``.
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

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(PACK_DIR, "assets", "sample_image.png")
# The embedded default: a tiny CogVideoX-1.5-style model (any resolution), built per run.
DEFAULT_TINY_FAMILY = "cogvideox1.5-i2v"
DEFAULT_TINY = {"frames": 17, "steps": 10}
FAMILY_DEFAULTS = {  # steps / cfg of the reference samplers
    "cogvideox-i2v": {"steps": 50, "cfg": 6.0},
    "cogvideox1.5-i2v": {"steps": 50, "cfg": 6.0},
    "svd": {"steps": 25, "cfg": 3.0},
}
DEFAULT_PROMPT = "a sailboat drifts on the sea at sunset, gentle waves"
UNTRAINED_NOTE = (
    "NOTE: no --model given, so this video comes from a tiny UNTRAINED model with random weights, "
    "built on the fly. It shows the pipeline running end to end; it is noise-like and says nothing "
    "about motion quality. Pass --model DIR (a diffusers CogVideoX-I2V or SVD folder) for real output."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description="MotionDial main job: animate one image into an .mp4 with an image-to-video model.",
    )
    p.add_argument("--model", help="local diffusers model folder (CogVideoX-I2V 1.0/1.5, SVD/SVD-XT); "
                   "default: a tiny untrained model built on the fly")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="input image (default: the bundled sample image)")
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
                   help="object-motion score 1..10 (needs --embedder)")
    p.add_argument("--camera", type=float, default=None, dest="camera_intensity",
                   help="camera-motion score 1..10 (needs --embedder)")
    p.add_argument("--embedder", default=None,
                   help="motion-score embedder trained for this model: the file (motion_embedder.safetensors) or "
                   "training.train_motion's output folder; a LoRA/full run's transformer delta beside it is "
                   "applied too")
    p.add_argument("--frames", type=int, default=None, help="number of frames (default: the family's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: CogVideoX 50, SVD 25)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: CogVideoX 6, SVD 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="output height in pixels")
    p.add_argument("--width", type=int, default=None, help="output width in pixels")
    p.add_argument("--fps", type=float, default=None, help="frame rate (default: the family's)")
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


def run(args: argparse.Namespace) -> str:
    """Run the main job for parsed ``args``; returns the path of the written video."""
    from tqdm.auto import tqdm

    from motion.clips import write_video

    from .loading import load_model
    from .sampling import sample
    from .tiny import build_tiny_model

    out = os.path.abspath(args.out or _default_out())
    if not out.lower().endswith((".mp4", ".m4v", ".mov")):
        raise ValueError(f"--out {args.out}: expected a path ending in .mp4")
    if args.embedder is None and (args.object_intensity is not None or args.camera_intensity is not None):
        raise ValueError("--object/--camera need --embedder FILE (a motion-score embedder trained for this "
                         "model); without one the scores could have no effect")
    if not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    if args.text_encoder is not None and args.text_adapter is None:
        raise ValueError("--text-encoder is the text encoder of a --text-adapter; pass --text-adapter FILE too")
    if args.embedder is not None and not os.path.exists(args.embedder):
        raise ValueError(f"--embedder {args.embedder}: no such file or folder")
    if args.text_adapter is not None and not os.path.isfile(args.text_adapter):
        raise ValueError(f"--text-adapter {args.text_adapter}: no such file")
    untrained = args.model is None
    with tempfile.TemporaryDirectory(prefix="motiondial-tiny-") as tmp:
        if untrained:
            print(UNTRAINED_NOTE, flush=True)
            model_dir = build_tiny_model(os.path.join(tmp, "tiny"), DEFAULT_TINY_FAMILY, seed=0)
        else:
            model_dir = args.model
        model = load_model(model_dir, dtype=args.dtype, device=args.device, offload=args.offload,
                           vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing)
        fam = model.family.name
        frames = args.frames if args.frames is not None else (
            DEFAULT_TINY["frames"] if untrained else model.family.default_frames)
        steps = args.steps if args.steps is not None else (
            DEFAULT_TINY["steps"] if untrained else FAMILY_DEFAULTS[fam]["steps"])
        cfg = args.cfg if args.cfg is not None else FAMILY_DEFAULTS[fam]["cfg"]

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
        if args.embedder:
            from motion.embedding import load_trained_motion

            # the embedder plus, for LoRA/full runs, the transformer delta it was trained with
            embedder, weight_schedule = load_trained_motion(args.embedder, model)
            embedder = embedder.to(model.device)

        bar = None if args.no_progress else tqdm(total=steps, desc="sampling", unit="step")

        def progress(step: int, total: int) -> None:
            if bar is not None:
                bar.update(step - bar.n)

        try:
            video = sample(model, args.image, prompt, negative_prompt=args.negative_prompt, frames=frames,
                           steps=steps, cfg=cfg, seed=args.seed, height=args.height, width=args.width, fps=args.fps,
                           object_intensity=args.object_intensity, camera_intensity=args.camera_intensity,
                           weight_schedule=weight_schedule, motion_embedder=embedder, text_control=text_control,
                           progress=progress)
        finally:
            if bar is not None:
                bar.close()
        path = write_video(out, video.frames.numpy(), video.fps)

    settings = dict(video.settings)
    if untrained:
        settings["model"] = f"(embedded tiny untrained {DEFAULT_TINY_FAMILY} model, seed 0)"
    settings.update(image=os.path.abspath(args.image), embedder=args.embedder,
                    motion_delta=weight_schedule is not None, text_encoder=args.text_encoder, out=path,
                    untrained_model=untrained, offload=args.offload, vae_tiling=args.vae_tiling,
                    vae_slicing=args.vae_slicing)
    print("settings used:")
    for k, v in settings.items():
        print(f"  {k}: {json.dumps(v)}")
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
