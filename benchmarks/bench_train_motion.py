"""Benchmark of ``training.train_motion``: step time and peak memory of the training loop, and
the motion embedder's cost per sampling step.

    python benchmarks/bench_train_motion.py [--cases tiny,5b] [--trainable embedder,lora]
                                            [--steps 4] [--threads 1] [--json OUT]

Models (random weights, built here from configs, never downloaded):

* ``tiny``: ``pipelines.tiny`` CogVideoX-I2V (2 layers, inner 32), 9 frames at 32x32;
* ``5b``: a 2-layer CogVideoXTransformer3DModel with CogVideoX-5B-I2V's layer shapes (inner
  3072 = 48 heads x 64, time_embed_dim 512, text dim 4096, 226 text tokens, 16+16 latent
  channels, patch 2), 9 frames at 96x96 (3 x 12 x 12 latents = 108 video tokens) so it fits a CPU.

Each (case, trainable set, gradient checkpointing) runs in its own subprocess through the real
trainer and the shared runner, so the peak RSS (``ru_maxrss``) belongs to that configuration
alone. "step" = one optimiser step of batch 1 (frozen encoders, denoiser forward + backward,
AdamW), median over the steps after the first. "loaded" = RSS after the model and data were
loaded, before training: ``peak - loaded`` is what training itself adds. On CUDA the peak
allocated GPU memory is reported as well.

Embedder cost: ``MotionScoreEmbedding`` forward for a CFG pair (batch 2) vs one denoiser
forward of the CFG batch on the ``5b``-shaped model. This is an upper bound twice over: the
sampler computes the embedding once per video (not per step) and only adds a ``[2, 512]``
tensor per step, and the real 42-layer model at 49 x 480 x 720 costs ~10^4 times more per step
than this 2-layer, 108-token one. Timings on a shared CPU are noisy: run it twice.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FIVE_B = dict(heads=48, head_dim=64, time_embed_dim=512, text_dim=4096, layers=2, latent=12, text_len=226)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _tokenizer():
    from transformers import T5Tokenizer

    words = "a the cat dog car moves runs drives camera pans zooms slowly quickly left right".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(c, -5.0 - 0.01 * i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_5b_shaped(folder: str) -> str:
    """Save a 2-layer CogVideoX-I2V with the 5B model's layer shapes as a diffusers folder."""
    import torch
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    s = FIVE_B
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], in_channels=32, out_channels=16,
        time_embed_dim=s["time_embed_dim"], text_embed_dim=s["text_dim"], num_layers=s["layers"],
        sample_width=s["latent"], sample_height=s["latent"], sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=s["text_len"], use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=16,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    tok = _tokenizer()
    # A 1-layer T5 whose output width is the real text width (4096); its cost is not measured.
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=s["text_dim"], d_kv=16, d_ff=64, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    sched = CogVideoXDDIMScheduler(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                   prediction_type="v_prediction", beta_schedule="scaled_linear")
    pipe = CogVideoXImageToVideoPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                         scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_data(folder: str, size: int, n: int = 2) -> str:
    from training.synth_motion import make_clip, write_clip

    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        fr, _ = make_clip(i, frames=9, height=size, width=size, fps=8.0)
        write_clip(os.path.join(folder, f"c{i}"), fr, 8.0)
        rows.append(json.dumps({"clip": f"c{i}", "caption": "a cat moves left"}))
    path = os.path.join(folder, "metadata.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def worker_train(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from accelerate import Accelerator

    from training.runner import run
    from training.train_motion import MotionTrainConfig, build_task

    out = tempfile.mkdtemp(prefix="bench-out-")
    try:
        cfg = MotionTrainConfig(model=a.model, data=a.data, out=out, trainable=a.trainable, frames=9, steps=a.steps,
                                batch=1, lr=1e-4, checkpoint_every=0, gradient_checkpointing=a.gc,
                                mixed_precision=a.mixed_precision, lora_rank=16, progress=False,
                                score_cache=os.path.join(os.path.dirname(a.data), "scores.safetensors"))
        acc = Accelerator(mixed_precision=a.mixed_precision)
        task, rcfg, info = build_task(cfg, accelerator=acc)
        loaded = _rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stamps = [time.perf_counter()]
        run(task, rcfg, accelerator=acc, callback=lambda s, t, logs: stamps.append(time.perf_counter()), log=lambda s: None)
        steps = [b - a_ for a_, b in zip(stamps, stamps[1:])]
        res = {
            "step_s": statistics.median(steps[1:] if len(steps) > 1 else steps),
            "first_step_s": steps[0],
            "loaded_rss_mb": loaded,
            "peak_rss_mb": _rss_mb(),
            "trainable_params": sum(p.numel() for p in info["module"].parameters() if p.requires_grad),
            "denoiser_params": sum(p.numel() for p in info["model"].denoiser.parameters()),
        }
        if torch.cuda.is_available():
            res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def worker_embedder(a: argparse.Namespace) -> dict:
    """Embedder forward (CFG pair) vs one denoiser forward of a CFG batch, same process."""
    import torch

    torch.set_num_threads(a.threads)
    from motion.embedding import MotionScoreEmbedding
    from pipelines import load_model

    model = load_model(a.model)
    den = model.denoiser
    cfg = den.config
    emb = MotionScoreEmbedding(model.time_embed_dim)
    torch.nn.init.normal_(emb.object_mlp[2].weight, std=0.02)
    nf, lat = 3, int(cfg.sample_height)
    x = torch.randn(2, nf, int(cfg.in_channels), lat, lat)
    text = torch.randn(2, int(cfg.max_text_seq_length), int(cfg.text_embed_dim))
    rot = model.pipeline._prepare_rotary_positional_embeddings(lat * 8, lat * 8, nf, "cpu")
    t = torch.tensor([500, 500])
    o, c = torch.tensor([3.0, 3.0]), torch.tensor([7.0, 7.0])

    def timeit(fn, reps):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    with torch.no_grad():
        t_emb = timeit(lambda: emb.cfg_embedding(o, c, 6.0), 50)
        t_den = timeit(lambda: den(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot,
                                   return_dict=False), 5)
        extra = torch.randn(2, model.time_embed_dim)
        h = model.time_embedding.register_forward_hook(lambda m, i, out: out + extra)
        t_hooked = timeit(lambda: den(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot,
                                      return_dict=False), 5)
        h.remove()
    return {"embedder_cfg_pair_s": t_emb, "denoiser_step_s": t_den, "denoiser_step_with_hook_s": t_hooked,
            "fraction": t_emb / t_den, "embedder_params": sum(p.numel() for p in emb.parameters()),
            "video_tokens": nf * (lat // 2) ** 2, "text_tokens": int(cfg.max_text_seq_length)}


def _spawn(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="tiny,5b")
    ap.add_argument("--trainable", default="embedder,lora")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=("train", "embedder"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.trainable = a.trainable.split(",")[0]
        res = worker_train(a) if a.worker == "train" else worker_embedder(a)
        print("RESULT " + json.dumps(res))
        return

    from pipelines.tiny import build_tiny_model

    tmp = tempfile.mkdtemp(prefix="bench-train-motion-")
    results: dict = {"threads": a.threads, "steps": a.steps, "mixed_precision": a.mixed_precision, "runs": []}
    try:
        for case in a.cases.split(","):
            t0 = time.perf_counter()
            if case == "tiny":
                model = build_tiny_model(os.path.join(tmp, "tiny"), "cogvideox-i2v")
                size = 32
            elif case == "5b":
                model = build_5b_shaped(os.path.join(tmp, "5b"))
                size = FIVE_B["latent"] * 8
            else:
                raise SystemExit(f"unknown case {case!r} (tiny, 5b)")
            data = make_data(os.path.join(tmp, f"data-{case}"), size)
            print(f"[{case}] model + data built in {time.perf_counter() - t0:.1f} s", flush=True)
            for trainable in a.trainable.split(","):
                for gc in (False, True):
                    args = ["--worker", "train", "--model", model, "--data", data, "--trainable", trainable,
                            "--steps", str(a.steps), "--threads", str(a.threads), "--mixed-precision", a.mixed_precision]
                    r = _spawn(args + (["--gc"] if gc else []))
                    r.update(case=case, trainable=trainable, gradient_checkpointing=gc)
                    results["runs"].append(r)
                    print(f"[{case}] trainable={trainable:8s} gc={'on ' if gc else 'off'} step {r['step_s']*1000:8.1f} ms  "
                          f"peak RSS {r['peak_rss_mb']:7.0f} MB (loaded {r['loaded_rss_mb']:6.0f} MB, "
                          f"+{r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} MB training)  "
                          f"trainable {r['trainable_params']:,} of {r['denoiser_params']:,}"
                          + (f"  cuda peak {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""), flush=True)
            if case == "5b":
                e = _spawn(["--worker", "embedder", "--model", model, "--threads", str(a.threads)])
                results["embedder_cost"] = e
                print(f"[5b] embedder (CFG pair) {e['embedder_cfg_pair_s']*1e6:.0f} us vs denoiser step "
                      f"{e['denoiser_step_s']*1000:.1f} ms ({e['video_tokens']} video + {e['text_tokens']} text tokens, "
                      f"2 layers): {100 * e['fraction']:.3f} % (target <= 1 %); step with the motion hook "
                      f"{e['denoiser_step_with_hook_s']*1000:.1f} ms", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
