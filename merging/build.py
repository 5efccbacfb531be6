"""``python -m merging.build``: build ED (or plain task-vector / TIES) deltas from two checkpoints.

Examples::

    python -m merging.build --base models/CogVideoX-5b-I2V --finetuned models/my-ft --out deltas/ed
    python -m merging.build --base pre.safetensors --finetuned ft.safetensors --out out \\
        --family cogvideox-i2v --scope temporal --dtype bf16 --dry-run

Inputs are diffusers model folders (the denoiser is used), component folders, single
``.safetensors`` files or sharded ``*.safetensors.index.json``; ``--finetuned`` may also be a
``motiondial.delta`` of ``--base`` (``ft = base + delta``, its base fingerprint checked). The output folder is written
atomically: on an error or Ctrl-C nothing is left behind.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

from .ed_params import ED_DEFAULTS

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m merging.build",
        description="Build task-vector deltas key by key (bounded memory, fp32 arithmetic). Default recipe: ED "
        "(dynamics delta b_dyn*DARE_p(a_dyn*(pre-ft)) and control delta (a_con*ft + b_con*DARE_p(ft-pre)) - pre).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base (pre-trained) model: diffusers folder, .safetensors or index.json")
    p.add_argument("--finetuned", required=True, action="append",
                   help="fine-tuned model of the same architecture, or a motiondial.delta file of --base "
                   "(ft = base + delta, e.g. train_adapter's finetune_delta.safetensors); repeat for --recipe ties")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--recipe", default="ed", choices=("ed", "task-vector", "ties"))
    p.add_argument("--scope", default="all",
                   help="keys to change: 'all', 'temporal' (the family's temporal layers) or a regex (re.search on keys)")
    p.add_argument("--family", default=None,
                   help="model family for --scope temporal when the inputs are bare files (cogvideox-i2v, cogvideox1.5-i2v, svd)")
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE masks (same seed, same deltas)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="storage dtype of the outputs (auto = the base's)")
    ed = p.add_argument_group("ED recipe")
    ed.add_argument("--a-dyn", type=float, default=ED_DEFAULTS["a_dyn"], help="extrapolation strength (stage 2)")
    ed.add_argument("--b-dyn", type=float, default=ED_DEFAULTS["b_dyn"], help="scale of the DARE'd dynamics vector")
    ed.add_argument("--a-con", type=float, default=ED_DEFAULTS["a_con"], help="weight of the fine-tuned model in control")
    ed.add_argument("--b-con", type=float, default=ED_DEFAULTS["b_con"], help="scale of the DARE'd task vector in control")
    ed.add_argument("--p", type=float, default=ED_DEFAULTS["p"], help="DARE drop rate")
    tv = p.add_argument_group("task-vector / ties recipes")
    tv.add_argument("--scale", type=float, default=1.0, help="multiplier of the delta (negative: move away)")
    tv.add_argument("--dare-p", type=float, default=None, help="DARE drop rate (task-vector)")
    tv.add_argument("--density", type=float, default=None, help="keep this fraction per tensor by magnitude (top-k; ties default 0.2)")
    tv.add_argument("--name", default="delta", help="name of the delta (task-vector / ties)")
    p.add_argument("--merged", action="store_true", help="also write the merged model(s) (complete diffusers folders for a folder base)")
    p.add_argument("--dry-run", action="store_true", help="print keys, bytes and memory needed; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.add_argument("--allow-dtype-mismatch", action="store_true", help="accept base and fine-tune stored in different dtypes")
    p.add_argument("--shard-size", type=float, default=500, help="maximum size of one output file, MB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _interrupt_on_signals():
    """Ctrl-C and SIGTERM (a job scheduler stopping us) both unwind as KeyboardInterrupt, so the
    engine removes its temporary output. (A background job started by a shell may have SIGINT
    ignored; we restore it.) The previous handlers are put back afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signums = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)


@contextlib.contextmanager
def _cli_threads():
    """The CLI's torch thread count (up to 4: the arithmetic is memory-bound beyond that), for
    this run only: ``main()`` may be called in-process (tests, nodes), where a changed global
    thread count would leak into the caller. Results do not depend on it (elementwise fp32
    arithmetic is the same on any number of threads; tested)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build(args: argparse.Namespace, common: dict):
    from .recipes import build_ed, build_task_vector, build_ties

    if args.recipe == "ed":
        return build_ed(args.base, args.finetuned[0], args.out, a_dyn=args.a_dyn, b_dyn=args.b_dyn, a_con=args.a_con,
                        b_con=args.b_con, p=args.p, seed=args.seed, **common)
    if args.recipe == "task-vector":
        return build_task_vector(args.base, args.finetuned[0], args.out, scale=args.scale, dare_p=args.dare_p,
                                 density=args.density, seed=args.seed, name=args.name, **common)
    return build_ties(args.base, args.finetuned, args.out, density=args.density or 0.2, scale=args.scale,
                      name=args.name, **common)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import MergeError

    if args.recipe != "ties" and len(args.finetuned) != 1:
        print(f"error: --recipe {args.recipe} takes one --finetuned (ties takes several)", file=sys.stderr)
        return EXIT_ERROR
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="reading", file=sys.stderr)
        bar.update(done - bar.n)

    common = dict(scope=args.scope, family=args.family, dtype=args.dtype, merged=args.merged, dry_run=args.dry_run,
                  overwrite=args.overwrite, allow_dtype_mismatch=args.allow_dtype_mismatch,
                  max_shard_bytes=int(args.shard_size * 1e6), progress=progress)
    try:
        with _interrupt_on_signals(), _cli_threads():
            res = _build(args, common)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MergeError, ValueError) as e:
        if bar is not None:
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if bar is not None:
        bar.close()
    p = res.plan
    if args.dry_run:
        print(f"dry run: recipe {args.recipe}, scope {args.scope!r}; nothing written")
        base = None
        from .checkpoint import open_checkpoint

        base = open_checkpoint(args.base)
        print(f"keys in scope ({len(p.scope_keys)} of {len(p.keys)}):")
        for k in p.scope_keys:
            info = base.tensors[k]
            print(f"  {k}  {list(info.shape)}  {str(info.dtype).replace('torch.', '')}  {info.nbytes / 1e6:.2f} MB")
        print("\n".join(l for l in res.summary().splitlines() if not l.startswith("memory")))
        print(f"peak memory needed: about {(p.peak_memory_bytes + _rss_bytes()) / 1e9:.2f} GB "
              f"(arithmetic {p.peak_memory_bytes / 1e6:.0f} MB + this process {_rss_bytes() / 1e6:.0f} MB)")
        print(f"disk needed: {p.total_write_bytes / 1e9:.3f} GB")
        return 0
    print(res.summary())
    for name, path in res.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
