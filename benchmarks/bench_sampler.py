"""Benchmark: the cost of the sampler's extension points (issue 2, item 7).

Part A, tiny models (``pipelines.tiny``; CogVideoX 1.0 and SVD): time per denoising step of

  * plain sampling,
  * a hard-switch weight schedule over *all* denoiser state-dict keys (two random deltas,
    ``HardSwitch(switch=0.5)``: the weights are written before step 0 and at the switch),
  * a motion embedder (``motion.embedding.MotionScoreEmbedding`` with random, non-zero weights).

The per-step time covers the denoising loop only (first denoiser call to the last step's end,
so the step-0 weight write is included; text/image encoding and VAE decode are not). Variants
are interleaved over ``--repeats`` runs; mean and median per-step times are reported with their
ratios to plain, and the time spent inside ``WeightPatcher.apply`` per step (the schedule's
direct cost, immune to the machine's noise). Target: schedule and embedder each within 5% of
plain (ratio <= 1.05).

Part B, real CogVideoX-5B-I2V layer shapes (inner 3072, 48 heads, text 4096, time_embed_dim
512, learned positional embeddings for 480x720x49; ``--layers`` blocks, random bf16 weights):

  * the cost of one schedule switch (all state-dict keys, two bf16 deltas; fp32 arithmetic from
    the kept base, cast to bf16),
  * one denoiser forward at 1 and 2 latent frames of 60x90 (1576 / 2926 tokens, batch 1),
    and a linear-in-tokens extrapolation to a real step (CFG batch 2 x 17776 tokens: 49 frames
    at 480x720). Attention is quadratic in tokens, so the real step is longer than the
    extrapolation and the extrapolated fraction is an upper bound.

Prints the switch as a fraction of one denoiser step (measured and extrapolated) and the average
overhead per step of a 50-step hard-switch run (2 switches).

    python benchmarks/bench_sampler.py [--repeats 5] [--steps 20] [--layers 2] [--skip-5b]

One torch thread (shared machine): timings are noisy; compare ratios from the same run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REAL_TOKENS = 13 * 30 * 45 + 226  # 49 frames at 480x720 -> 13 latent frames of 30x45 patches, + text


def _image(h=32, w=32):
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def _random_deltas(module, names=("dynamics", "control"), scale=1e-3, dtype=None):
    g = torch.Generator().manual_seed(0)
    sd = module.state_dict()
    return {n: {k: (torch.randn(v.shape, generator=g) * scale).to(dtype or v.dtype) for k, v in sd.items()}
            for n in names}


class _ApplyTimer:
    """Accumulates the wall time spent inside ``WeightPatcher.apply`` (the schedule's direct cost)."""

    def __init__(self):
        from merging.patcher import WeightPatcher

        self.cls, self.orig, self.total = WeightPatcher, WeightPatcher.apply, 0.0

    def __enter__(self):
        orig = self.orig

        def timed(patcher, level):
            t = time.perf_counter()
            try:
                return orig(patcher, level)
            finally:
                self.total += time.perf_counter() - t

        self.cls.apply = timed
        return self

    def __exit__(self, *exc):
        self.cls.apply = self.orig


def _timed_sample(model, run, **kw):
    from pipelines import sample

    marks = {}

    def first_call(module, args, kwargs):
        marks.setdefault("t0", time.perf_counter())

    def progress(step, total):
        marks["t1"] = time.perf_counter()

    h = model.denoiser.register_forward_pre_hook(first_call, with_kwargs=True)  # before the sampler's hook
    try:
        sample(model, _image(), "a boat on the sea", progress=progress, **run, **kw)
    finally:
        h.remove()
    return (marks["t1"] - marks["t0"]) / run["steps"]


def bench_tiny(repeats: int, steps: int) -> None:
    from merging.patcher import ScheduledWeights
    from merging.schedule import HardSwitch
    from motion.embedding import MotionScoreEmbedding
    from pipelines import load_model
    from pipelines.tiny import build_tiny_model

    print(f"== Part A: tiny models, {steps} steps, {repeats} interleaved repeats, time per denoising step")
    with tempfile.TemporaryDirectory() as tmp:
        for family, run in (("cogvideox-i2v", dict(frames=9, cfg=6.0)), ("svd", dict(frames=4, cfg=2.5))):
            model = load_model(build_tiny_model(os.path.join(tmp, family), family))
            run = dict(run, steps=steps, seed=0)
            sched = ScheduledWeights(_random_deltas(model.denoiser), HardSwitch(switch=0.5))
            emb = MotionScoreEmbedding(model.time_embed_dim)
            with torch.no_grad():
                for p in emb.parameters():
                    p.normal_(0, 0.2)
            variants = {
                "plain": {},
                "hard switch (all keys)": {"weight_schedule": sched},
                "motion embedder": {"motion_embedder": emb, "object_intensity": 7.0, "camera_intensity": 3.0},
            }
            for kw in variants.values():  # warm-up
                _timed_sample(model, dict(run, steps=2), **kw)
            times = {name: [] for name in variants}
            with _ApplyTimer() as timer:
                for _ in range(repeats):
                    for name, kw in variants.items():
                        times[name].append(_timed_sample(model, run, **kw))
            apply_per_step = timer.total / (repeats * steps)
            n_keys = len(model.denoiser.state_dict())
            n_params = sum(v.numel() for v in model.denoiser.state_dict().values())
            print(f"-- {family}: denoiser {n_params / 1e6:.2f} M values in {n_keys} keys")
            plain, plain_med = statistics.mean(times["plain"]), statistics.median(times["plain"])
            for name, ts in times.items():
                mean, med = statistics.mean(ts), statistics.median(ts)
                print(f"   {name:24s} mean {mean * 1e3:8.2f} ms/step  median {med * 1e3:8.2f}  "
                      f"ratio to plain: mean {mean / plain:5.3f}, median {med / plain_med:5.3f}")
            print(f"   time inside WeightPatcher.apply (2 writes per run + a check per step): "
                  f"{apply_per_step * 1e3:.3f} ms/step = {apply_per_step / plain_med:.4f} of a plain step")


def bench_5b(layers: int) -> None:
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    from merging.patcher import ScheduledWeights, WeightPatcher
    from merging.schedule import HardSwitch

    print(f"== Part B: CogVideoX-5B-I2V layer shapes, {layers} block(s), random bf16 weights")
    t = time.perf_counter()
    torch.manual_seed(0)
    den = CogVideoXTransformer3DModel(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=layers, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ).eval()
    den = den.to(torch.bfloat16)
    sd = den.state_dict()
    n_values = sum(v.numel() for v in sd.values())
    print(f"   built in {time.perf_counter() - t:.1f} s: {n_values / 1e6:.1f} M values in {len(sd)} keys "
          f"({n_values * 2 / 2**30:.2f} GiB bf16)")

    deltas = _random_deltas(den, dtype=torch.bfloat16)
    sched = ScheduledWeights(deltas, HardSwitch(switch=0.5))
    switch = []
    with WeightPatcher(den, sched) as p:
        p.apply(0.9)  # warm-up
        for i in range(6):
            t = time.perf_counter()
            p.apply(0.1 if i % 2 == 0 else 0.9)
            switch.append(time.perf_counter() - t)
    t_switch = statistics.median(switch)
    print(f"   one schedule switch (all keys, bf16, fp32 math): median {t_switch:.3f} s "
          f"(min {min(switch):.3f}, max {max(switch):.3f}); base copy kept: {n_values * 2 / 2**30:.2f} GiB")

    ns = types.SimpleNamespace(transformer=den, vae_scale_factor_spatial=8)
    steps = {}
    with torch.no_grad():
        for f in (1, 2):
            rot = CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(ns, 480, 720, f, torch.device("cpu"))
            x = torch.randn(1, f, 32, 60, 90, dtype=torch.bfloat16)
            enc = torch.randn(1, 226, 4096, dtype=torch.bfloat16)
            ts = []
            for _ in range(2):
                t = time.perf_counter()
                den(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([500]), image_rotary_emb=rot,
                    return_dict=False)
                ts.append(time.perf_counter() - t)
            tokens = f * 30 * 45 + 226
            steps[tokens] = min(ts)
            print(f"   denoiser forward, batch 1, {tokens} tokens: {min(ts):.2f} s  -> switch / forward = "
                  f"{t_switch / min(ts):.3f}")
    (n1, s1), (n2, s2) = sorted(steps.items())
    per_token = (s2 - s1) / (n2 - n1)
    fixed = s1 - per_token * n1
    real_step = 2 * (fixed + per_token * REAL_TOKENS)  # CFG batch of 2
    print(f"   extrapolated real step (CFG batch 2 x {REAL_TOKENS} tokens, linear part only): {real_step:.1f} s")
    print(f"   switch as a fraction of one denoiser step: {t_switch / real_step:.4f} (upper bound; "
          f"{t_switch / steps[n2]:.3f} of the measured {n2}-token forward)")
    print(f"   50-step hard-switch run (2 switches): average overhead per step {2 * t_switch / (50 * real_step):.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-5b", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s)")
    if not args.skip_tiny:
        bench_tiny(args.repeats, args.steps)
    if not args.skip_5b:
        bench_5b(args.layers)


if __name__ == "__main__":
    main()
