"""Benchmark: streaming ED build vs. the I/O floor vs. loading whole checkpoints (issue 3, item 7).

Builds a synthetic base / fine-tuned pair in bf16 with real CogVideoX-5B layer shapes (inner
3072, feed-forward 12288, adaptive-norm linears 512 -> 6*3072; ``--blocks`` transformer blocks,
8 by default = 2.1 GB per checkpoint, stored as two shards with a diffusers index), then times,
each in a fresh subprocess so that its peak RSS (``VmHWM``) is its own:

  (a) floor: read both inputs tensor by tensor and write two outputs of the same size (fsync'd);
  (b) ``merging.recipes.build_ed`` (dynamics + control deltas, bf16 out, fp32 arithmetic);
  (c) naive: ``safetensors.torch.load_file`` both checkpoints whole, compute the same two
      deltas, ``save_file`` them whole.

Prints wall time and peak RSS of each, and the ratios (b)/(a) and (b)/(c). Targets:
(b) <= 1.5 x (a) in wall time, (b) peak RSS <= 1.5 GB. Files go to a temporary folder (``--dir``,
default under /tmp) that is deleted at the end. Every job runs with the same number of torch
threads, by default the count `python -m merging.build` uses (`--threads 1` on a shared machine).

    python benchmarks/bench_merge.py [--blocks 8] [--dir /tmp] [--skip-naive]

The machine is shared: timings are noisy; compare ratios from the same run only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

INNER, FF, TEMB, PATCH_IN = 3072, 12288, 512, 16 * 2 * 2


def layer_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape, the names and sizes of CogVideoXTransformer3DModel (5B) for ``blocks`` blocks."""
    s: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (INNER, 16, 2, 2),
        "patch_embed.proj.bias": (INNER,),
        "patch_embed.text_proj.weight": (INNER, 4096),
        "patch_embed.text_proj.bias": (INNER,),
        "time_embedding.linear_1.weight": (TEMB, INNER),
        "time_embedding.linear_1.bias": (TEMB,),
        "time_embedding.linear_2.weight": (TEMB, TEMB),
        "time_embedding.linear_2.bias": (TEMB,),
    }
    for b in range(blocks):
        p = f"transformer_blocks.{b}."
        for n in ("norm1", "norm2"):
            s[p + f"{n}.linear.weight"] = (6 * INNER, TEMB)
            s[p + f"{n}.linear.bias"] = (6 * INNER,)
            s[p + f"{n}.norm.weight"] = (INNER,)
            s[p + f"{n}.norm.bias"] = (INNER,)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            s[p + f"attn1.{n}.weight"] = (INNER, INNER)
            s[p + f"attn1.{n}.bias"] = (INNER,)
        s[p + "attn1.norm_q.weight"] = (64,)
        s[p + "attn1.norm_k.weight"] = (64,)
        s[p + "ff.net.0.proj.weight"] = (FF, INNER)
        s[p + "ff.net.0.proj.bias"] = (FF,)
        s[p + "ff.net.2.weight"] = (INNER, FF)
        s[p + "ff.net.2.bias"] = (INNER,)
    s["norm_final.weight"] = (INNER,)
    s["norm_final.bias"] = (INNER,)
    s["norm_out.linear.weight"] = (2 * INNER, TEMB)
    s["norm_out.linear.bias"] = (2 * INNER,)
    s["proj_out.weight"] = (64, INNER)
    s["proj_out.bias"] = (64,)
    return s


def make_pair(folder: str, blocks: int) -> tuple[str, str, int]:
    """Write base/ and finetuned/ (two shards each + index) in bf16; returns paths and bytes each."""
    import torch

    from merging.safetensors_io import SafetensorsWriter

    shapes = layer_shapes(blocks)
    keys = list(shapes)
    half = len(keys) // 2
    total = 0
    out = []
    for name, noise in (("base", 0.0), ("finetuned", 1e-3)):
        d = os.path.join(folder, name)
        os.makedirs(d)
        wm = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            fn = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
            w = SafetensorsWriter(os.path.join(d, fn), {k: (torch.bfloat16, shapes[k]) for k in part}, {"format": "pt"})
            for k in part:
                g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
                t = torch.randn(shapes[k], generator=g) * 0.02
                if noise:
                    t += noise * torch.randn(shapes[k], generator=g)
                w.write(k, t.to(torch.bfloat16).reshape(-1))
                wm[k] = fn
                del t
            w.close()
        with open(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
        out.append(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"))
    for k, shp in shapes.items():
        n = 1
        for x in shp:
            n *= x
        total += 2 * n
    return out[0], out[1], total


# ---------------------------------------------------------------------------------------------
# the three measured jobs (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def job_floor(base: str, ft: str, out: str) -> None:
    """Read every tensor of both inputs, write them out as two files of the same total size."""
    from merging.checkpoint import open_checkpoint
    from merging.safetensors_io import SafetensorsWriter

    os.makedirs(out)
    for name, path in (("a", base), ("b", ft)):
        ck = open_checkpoint(path)
        w = SafetensorsWriter(os.path.join(out, f"{name}.safetensors"), {k: (i.dtype, i.shape) for k, i in ck.tensors.items()})
        for k, t in ck.iter_tensors():
            w.write(k, t.reshape(-1))
        w.close()


def job_stream(base: str, ft: str, out: str) -> None:
    from merging.recipes import build_ed

    build_ed(base, ft, out, dtype="bf16", seed=0)


def job_naive(base: str, ft: str, out: str) -> None:
    """Load both whole (safetensors), compute the ED deltas per key in fp32, save whole."""
    import torch
    from safetensors.torch import load_file, save_file

    from merging.checkpoint import open_checkpoint
    from merging import ops

    def load_all(path: str) -> dict:
        sd = {}
        for f in open_checkpoint(path).files:
            sd.update(load_file(f))
        return sd

    pre, ftd = load_all(base), load_all(ft)
    dyn, con = {}, {}
    for k in pre:
        x, y = pre[k].float(), ftd[k].float()
        dyn[k] = (0.75 * ops.dare(0.25 * (x - y), 0.7, 0, k, "dynamics")).to(torch.bfloat16)
        con[k] = ((1.0 * y + 0.25 * ops.dare(y - x, 0.7, 0, k, "control")) - x).to(torch.bfloat16)
    os.makedirs(out)
    save_file(dyn, os.path.join(out, "dynamics.safetensors"))
    save_file(con, os.path.join(out, "control.safetensors"))


JOBS = {"floor": job_floor, "stream": job_stream, "naive": job_naive}


def _child(job: str, base: str, ft: str, out: str, threads: str = "1") -> None:
    import torch

    torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    JOBS[job](base, ft, out)
    wall = time.perf_counter() - t0
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    print(json.dumps({"job": job, "wall_s": wall, "peak_rss": hwm}))


def run_job(job: str, base: str, ft: str, out: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", job, base, ft, out, str(threads)],
                       capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        return {"job": job, "error": (r.stderr or "")[-2000:] or f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:7])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=8, help="transformer blocks (8 -> 2.1 GB per checkpoint)")
    ap.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    ap.add_argument("--skip-naive", action="store_true", help="skip (c) (it needs ~10 GB of RAM)")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="torch threads for every job (default: what `python -m merging.build` uses, "
                         "min(4, cores); use 1 on a shared machine)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_merge-", dir=args.dir)
    try:
        t0 = time.perf_counter()
        base, ft, size = make_pair(work, args.blocks)
        print(f"synthetic pair: 2 x {size / 1e9:.2f} GB bf16 ({args.blocks} CogVideoX-5B blocks, 2 shards each), "
              f"made in {time.perf_counter() - t0:.0f} s; {args.threads} torch thread(s) per job")
        results = {}
        for job in ("floor", "stream") + (() if args.skip_naive else ("naive",)):
            results[job] = r = run_job(job, base, ft, os.path.join(work, f"out-{job}"), args.threads)
            if "error" in r:
                print(f"({job}) FAILED: {r['error']}")
            else:
                print(f"({ {'floor': 'a', 'stream': 'b', 'naive': 'c'}[job] }) {job:<7} wall {r['wall_s']:7.1f} s   "
                      f"peak RSS {r['peak_rss'] / 1e9:5.2f} GB")
        a, b, c = results.get("floor", {}), results.get("stream", {}), results.get("naive", {})
        if "wall_s" in a and "wall_s" in b:
            ratio = b["wall_s"] / a["wall_s"]
            print(f"(b)/(a) wall time: {ratio:.2f}  (target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'})")
            print(f"(b) peak RSS: {b['peak_rss'] / 1e9:.2f} GB  (target <= 1.5 GB: {'met' if b['peak_rss'] <= 1.5e9 else 'NOT met'})")
        if "wall_s" in b and "wall_s" in c:
            print(f"(b)/(c) wall time: {b['wall_s'] / c['wall_s']:.2f}   peak RSS (b)/(c): {b['peak_rss'] / c['peak_rss']:.2f}")
        print("note: shared, noisy machine; files served from the page cache after the first pass")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
