"""Benchmark: the SVD text adapter's size at real scale and its run-time overhead.

1. Size: builds SVD's real UNet (diffusers' default ``UNetSpatioTemporalConditionModel`` config
   = SVD/SVD-XT) on the meta device and a text adapter for it with a 1024-wide text encoder
   (OpenCLIP ViT-H, the tower matching SVD's image encoder) and 16 queries; prints the number of
   temporal blocks it feeds, its parameters and its fp32 file size, next to the UNet's.
2. Overhead: times one UNet forward (and forward+backward) of a small SVD UNet with and without
   the adapter attached (``--frames`` frames at ``--size`` latent pixels, one thread), median of
   ``--repeats``. The adapter adds one linear map per temporal block (the identity-initialised
   projection) and one cross-attention per call.

    python benchmarks/bench_text_adapter.py [--frames 14] [--size 16] [--repeats 5]

The machine is shared: timings are noisy; compare the ratio from the same run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def real_scale() -> None:
    from accelerate import init_empty_weights
    from diffusers import UNetSpatioTemporalConditionModel

    from textadapter import TemporalTextAdapter

    with init_empty_weights():
        unet = UNetSpatioTemporalConditionModel()
    adapter = TemporalTextAdapter.for_unet(unet, 1024, num_queries=16, num_heads=8)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_adapter = sum(p.numel() for p in adapter.parameters())
    print(f"real SVD UNet: {n_unet / 1e9:.3f} B parameters")
    print(f"text adapter (text width 1024, 16 queries): {len(adapter.config.block_names)} temporal blocks, "
          f"{n_adapter / 1e6:.2f} M parameters, {n_adapter * 4 / 1e6:.1f} MB fp32 "
          f"({100 * n_adapter / n_unet:.2f}% of the UNet)")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def overhead(frames: int, size: int, repeats: int) -> None:
    from diffusers import UNetSpatioTemporalConditionModel

    from textadapter import TemporalTextAdapter, attach

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=size, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=64, num_attention_heads=4, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32, num_frames=frames,
    )
    adapter = TemporalTextAdapter.for_unet(unet, 256)
    x = dict(sample=torch.randn(1, frames, 8, size, size), timestep=torch.tensor(0.5),
             encoder_hidden_states=torch.randn(1, 1, 64), added_time_ids=torch.randn(1, 3))
    text = torch.randn(1, 77, 256)

    def fwd():
        with torch.no_grad():
            unet(**x, return_dict=False)

    def fwd_bwd():
        unet.zero_grad(set_to_none=True)
        adapter.zero_grad(set_to_none=True)
        unet(**x, return_dict=False)[0].square().mean().backward()

    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        # Interleave base and adapter runs so that load changes on a shared machine hit both.
        fn()
        base, with_adapter = [], []
        for _ in range(repeats):
            base.append(_median_time(fn, 1))
            with attach(unet, adapter, text):
                with_adapter.append(_median_time(fn, 1))
        b, a = statistics.median(base), statistics.median(with_adapter)
        print(f"{name} ({frames} frames, {size}x{size} latents): base {b * 1e3:.1f} ms, with adapter "
              f"{a * 1e3:.1f} ms (x{a / b:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    real_scale()
    overhead(args.frames, args.size, args.repeats)


if __name__ == "__main__":
    main()
