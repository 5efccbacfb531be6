"""Train the learned (TAdaConv) motion estimator: ``python -m training.train_estimator``.

    python -m training.train_estimator --clips DIR --pairs DIR/pairs.csv --out OUT \
        [--steps 2000 --batch 8 --lr 2e-3 --lambda-reg 1 --margin 0 --eval-every 100 \
         --checkpoint-every 100 --resume|--fresh --seed 0 --threads 1 --model-config JSON]

Data: the clips in ``--clips``, annotated pairs (``--pairs``, see ``training.estimator_data``) and
pseudo-labels from the weight-free flow estimator (computed once, cached). Clips are split by
clip into training and held-out sets (``--val-fraction``); pairs that straddle the split are
dropped. Loss per step, over a batch of training pairs (see docs/training.md):

    L = hinge(object) + hinge(camera) + lambda_reg * MSE(scores, pseudo-labels)

with ``hinge = mean over non-"same" pairs of max(0, margin + s_weaker - s_stronger)`` per head
and, if ``--same-weight`` > 0, ``same_weight * max(0, |s_a - s_b| - margin)`` for "same" pairs.
Evaluation: pair-ordering accuracy per head on the held-out pairs (the SSIM baseline and the
flow labeller are scored on the same pairs once, for comparison). The loop is
``training.runner`` (accelerate, checkpoints, resume, Ctrl-C, report).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from training.estimator_data import (
    EstimatorDataError,
    Pair,
    load_model_frames,
    pair_accuracy,
    pseudo_labels,
    read_pairs_csv,
    split_clips,
    split_pairs,
)

LAMBDA_REG_DEFAULT = 1.0  # chosen by the sweep in docs/training.md (flat optimum over 1..10)
MARGIN_DEFAULT = 0.0  # MotionStone uses no margin


@dataclass
class EstimatorData:
    """Everything the estimator task needs, in memory."""

    clips: list[str]  # absolute paths, index = row of ``frames``
    frames: torch.Tensor  # [N, 2*pairs, S, S, 3] uint8 (see estimator_data.load_model_frames)
    labels: torch.Tensor  # [N, 2] float32 pseudo-labels (object, camera) on 1..10
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    val_clips: list[str]
    baselines: dict[str, Any]
    dropped_pairs: int


def _pair_tensor(pairs: Sequence[Pair], index: dict[str, int]) -> torch.Tensor:
    """``[P, 4]`` long: index a, index b, object label, camera label (1 = a, -1 = b, 0 = same)."""
    code = {"a": 1, "b": -1, "same": 0}
    return torch.tensor([[index[p.clip_a], index[p.clip_b], code[p.object], code[p.camera]] for p in pairs],
                        dtype=torch.long).reshape(-1, 4)


def prepare_data(
    clips_dir: str,
    pairs_csv: str,
    *,
    model_config,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache: str | None = None,
    progress: bool = True,
    scorer=None,
    val_clips_dir: str | None = None,
    val_pairs_csv: str | None = None,
) -> EstimatorData:
    """Read pairs, compute/cached pseudo-labels, split by clip, load clips as uint8 tensors.

    With ``val_pairs_csv`` (clips in ``val_clips_dir``, default ``clips_dir``) the held-out set is
    that file and every pair of ``pairs_csv`` trains; otherwise ``val_fraction`` of the clips of
    ``pairs_csv`` are held out (pairs that straddle the split are dropped).
    """
    from tqdm.auto import tqdm

    for d in (clips_dir, val_clips_dir):
        if d is not None and not os.path.isdir(d):
            raise EstimatorDataError(f"clips folder {d!r} does not exist")
    pairs = read_pairs_csv(pairs_csv, clips_dir)
    if val_pairs_csv:
        val_pairs = read_pairs_csv(val_pairs_csv, val_clips_dir or clips_dir)
        train_pairs, dropped = pairs, 0
        val = {p.clip_a for p in val_pairs} | {p.clip_b for p in val_pairs}
        overlap = val & ({p.clip_a for p in pairs} | {p.clip_b for p in pairs})
        if overlap:
            raise EstimatorDataError(f"{val_pairs_csv}: {len(overlap)} held-out clips also appear in {pairs_csv} "
                                     f"(e.g. {sorted(overlap)[0]}); held-out clips must be unseen")
    clips = sorted({p.clip_a for p in pairs} | {p.clip_b for p in pairs} | (val if val_pairs_csv else set()))
    cache = cache or os.path.join(clips_dir, "pseudo_labels.jsonl")
    kw = {"scorer": scorer} if scorer is not None else {}
    labels = pseudo_labels(clips, cache, progress=progress, **kw)
    if not val_pairs_csv:
        _, val = split_clips(clips, val_fraction, seed)
        train_pairs, val_pairs, dropped = split_pairs(pairs, val)
    if not train_pairs:
        raise EstimatorDataError(f"{pairs_csv}: no training pairs left after holding out {val_fraction:.0%} of the "
                                 "clips; add pairs or lower --val-fraction")
    s = model_config.size
    arr = np.empty((len(clips), model_config.input_frames, s, s, 3), dtype=np.uint8)
    for i, c in enumerate(tqdm(clips, desc="load clips", unit="clip", disable=not progress)):
        try:
            arr[i] = load_model_frames(c, model_config)
        except Exception as e:
            raise EstimatorDataError(f"clip {c}: cannot read ({e})") from e
    lab = torch.tensor([[labels[c]["object"], labels[c]["camera"]] for c in clips], dtype=torch.float32)
    val_clips = sorted(val)
    baselines: dict[str, Any] = {}
    for name, key in (("ssim", "ssim"), ("flow", None)):
        for head in ("object", "camera"):
            sc = {c: labels[c][key or head] for c in clips}
            acc, n = pair_accuracy(sc, val_pairs, head)
            baselines[f"{name}_{head}_acc"] = acc
            baselines[f"val_pairs_{head}"] = n
    return EstimatorData(clips=clips, frames=torch.from_numpy(arr), labels=lab, train_pairs=train_pairs,
                         val_pairs=val_pairs, val_clips=val_clips, baselines=baselines, dropped_pairs=dropped)


def ranking_losses(s_a: torch.Tensor, s_b: torch.Tensor, label: torch.Tensor, margin: float,
                   same_weight: float) -> torch.Tensor:
    """Hinge ranking loss for one head. ``label`` 1 (a stronger), -1 (b stronger), 0 (same).

    ``mean over ordered pairs of max(0, margin - label * (s_a - s_b))`` plus
    ``same_weight * mean over same pairs of max(0, |s_a - s_b| - margin)``.
    """
    d = s_a - s_b
    ordered = label != 0
    loss = d.new_zeros(())
    if ordered.any():
        loss = loss + torch.relu(margin - label[ordered].to(d.dtype) * d[ordered]).mean()
    if same_weight > 0 and (~ordered).any():
        loss = loss + same_weight * torch.relu(d[~ordered].abs() - margin).mean()
    return loss


def estimator_scores(model: nn.Module, frames_u8: torch.Tensor) -> torch.Tensor:
    """Scores ``[B, 2]`` (object, camera) of ``[B, 2*pairs, S, S, 3] uint8`` (``select_frames`` output)."""
    obj, cam = model(model.prepare(frames_u8))
    return torch.stack([obj, cam], -1).float()


def _augment(frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips and time reversal of ``[B, 2*pairs, S, S, 3]`` (drawn per clip): none changes a speed.

    Reversing the frame axis (a0 b0 a1 b1 ... -> ... b1 a1 b0 a0) is exactly the reversed clip.
    """
    out = frames.clone()
    for i in range(out.shape[0]):
        if rng.random() < 0.5:
            out[i] = out[i].flip(2)  # horizontal
        if rng.random() < 0.5:
            out[i] = out[i].flip(1)  # vertical
        if rng.random() < 0.5:
            out[i] = out[i].flip(0)  # time
    return out


def build_task(data: EstimatorData, model: nn.Module, *, batch: int, margin: float, lambda_reg: float,
               same_weight: float = 0.0, augment: bool = True, eval_batch: int = 16, save_fn=None,
               config: dict | None = None):
    """The runner task: batches of training pairs, ranking + regression loss, held-out accuracy."""
    from training.runner import StepContext, TrainTask

    index = {c: i for i, c in enumerate(data.clips)}
    train = _pair_tensor(data.train_pairs, index)
    val_rows = torch.tensor([index[c] for c in data.val_clips], dtype=torch.long)

    def batch_fn(ctx: StepContext) -> dict:
        rows = train[torch.from_numpy(ctx.rng.integers(0, len(train), size=batch))]
        # The two clips of a pair go through the model in one batch: [a_0..a_B, b_0..b_B].
        clip_idx = torch.cat([rows[:, 0], rows[:, 1]])
        frames = data.frames[clip_idx]
        if augment:
            frames = _augment(frames, ctx.rng)
        return {"frames": frames, "pseudo": data.labels[clip_idx], "obj": rows[:, 2], "cam": rows[:, 3]}

    def loss_fn(m: nn.Module, b: dict):
        s = estimator_scores(m, b["frames"])
        n = b["obj"].shape[0]
        sa, sb = s[:n], s[n:]
        l_obj = ranking_losses(sa[:, 0], sb[:, 0], b["obj"], margin, same_weight)
        l_cam = ranking_losses(sa[:, 1], sb[:, 1], b["cam"], margin, same_weight)
        l_reg = torch.mean((s - b["pseudo"]) ** 2)
        loss = l_obj + l_cam + lambda_reg * l_reg
        return loss, {"rank_object": float(l_obj.detach()), "rank_camera": float(l_cam.detach()),
                      "reg_mse": float(l_reg.detach())}

    def eval_fn(m: nn.Module, step: int) -> dict:
        if not len(val_rows):
            return {}
        device = next(m.parameters()).device
        outs = []
        for i in range(0, len(val_rows), eval_batch):
            outs.append(estimator_scores(m, data.frames[val_rows[i:i + eval_batch]].to(device)).cpu())
        s = torch.cat(outs)
        res: dict[str, float] = {}
        for h, head in enumerate(("object", "camera")):
            sc = {c: float(s[i, h]) for i, c in enumerate(data.val_clips)}
            res[f"{head}_acc"], _ = pair_accuracy(sc, data.val_pairs, head)
        res["mean_acc"] = 0.5 * (res["object_acc"] + res["camera_acc"])
        res["val_mse"] = float(torch.mean((s - data.labels[val_rows]) ** 2))
        return res

    cfg = {"batch": batch, "margin": margin, "lambda_reg": lambda_reg, "same_weight": same_weight,
           "augment": augment, "clips": len(data.clips), "train_pairs": len(data.train_pairs),
           "val_pairs": len(data.val_pairs), **(config or {})}
    return TrainTask(name="estimator", model=model, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                     save_fn=save_fn, config=cfg)


# ----------------------------------------------------------------------------------------------
# The real model (motion.learned) and the CLI


def model_config(overrides: str | dict | None):
    """``motion.learned.EstimatorConfig`` with JSON ``overrides`` (e.g. ``{"size": 64}``).

    Training defaults to ``tada_impl="scaled_input"``: the same function as the reference
    "grouped" TAdaConv, 2-3x faster on CPU (see ``motion.tadaconv``); it is saved with the weights.
    """
    from motion.learned import EstimatorConfig

    try:
        d = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
        return EstimatorConfig.from_dict({**EstimatorConfig().to_dict(), "tada_impl": "scaled_input", **d})
    except (TypeError, ValueError) as e:
        raise EstimatorDataError(f"--model-config: {e}") from e


def new_model(cfg, seed: int) -> nn.Module:
    """A freshly initialised ``motion.learned.MotionEstimatorNet`` (initialisation seeded)."""
    from motion.learned import build_estimator_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_estimator_model(cfg)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_estimator",
                                description="Train the learned object/camera motion estimator.")
    p.add_argument("--clips", required=True, help="folder of clips named in --pairs")
    p.add_argument("--pairs", required=True, help="pairs CSV: clip_a,clip_b,object,camera (labels a|b|same)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, estimator.safetensors, report.json)")
    p.add_argument("--val-pairs", default=None, help="held-out pairs CSV (default: hold out --val-fraction of the clips)")
    p.add_argument("--val-clips", default=None, help="folder of the --val-pairs clips (default --clips)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--cache", default=None, help="pseudo-label cache (default CLIPS/pseudo_labels.jsonl)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="pairs per step (2 x clips through the model)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="cosine")
    p.add_argument("--lambda-reg", type=float, default=LAMBDA_REG_DEFAULT, help="weight of the pseudo-label MSE")
    p.add_argument("--margin", type=float, default=MARGIN_DEFAULT, help="hinge margin (score units)")
    p.add_argument("--same-weight", type=float, default=0.0, help="weight of the symmetric term for 'same' pairs")
    p.add_argument("--no-augment", action="store_true", help="no flips / time reversal")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (checkpoint, final files, report) after this much training time")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --out (the default)")
    g.add_argument("--fresh", action="store_true", help="delete old checkpoints in --out and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--model-config", default=None, help="JSON of motion.learned config fields to override")
    p.add_argument("--sweep-lambda", default=None,
                   help="comma list of lambda values: train each into OUT/lambda_<v>/ and write OUT/lambda_sweep.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def train(args: argparse.Namespace, out_dir: str, lambda_reg: float, data: EstimatorData | None = None,
          log=print):
    """One training run into ``out_dir``; returns ``(TrainResult, EstimatorData)``."""
    from training.runner import RunnerConfig, run

    mcfg = model_config(args.model_config)
    model = new_model(mcfg, args.seed)
    if data is None:
        data = prepare_data(args.clips, args.pairs, model_config=mcfg,
                            val_fraction=args.val_fraction, seed=args.seed, cache=args.cache,
                            progress=not args.no_progress, val_clips_dir=args.val_clips, val_pairs_csv=args.val_pairs)
        log(f"data: {len(data.clips)} clips, {len(data.train_pairs)} training pairs, {len(data.val_pairs)} held-out "
            f"pairs ({data.dropped_pairs} straddling the split dropped); baselines on the held-out pairs: "
            + ", ".join(f"{k}={v:.3f}" for k, v in data.baselines.items() if k.endswith("_acc")))

    def save_fn(m: nn.Module, out: str) -> dict[str, str]:
        from motion.learned import save_estimator

        path = os.path.join(out, "estimator.safetensors")
        save_estimator(m, m.config, path, metadata={"trained_by": "training.train_estimator", "lambda_reg": lambda_reg,
                                                    "margin": args.margin, "steps": args.steps,
                                                    "pairs_csv": os.path.abspath(args.pairs)})
        return {"estimator": path, "config": os.path.splitext(path)[0] + ".json"}

    config = {"clips": os.path.abspath(args.clips), "pairs": os.path.abspath(args.pairs),
              "val_pairs": os.path.abspath(args.val_pairs) if args.val_pairs else None,
              "val_fraction": args.val_fraction, "model": mcfg.to_dict()}
    task = build_task(data, model, batch=args.batch, margin=args.margin, lambda_reg=lambda_reg,
                      same_weight=args.same_weight, augment=not args.no_augment, save_fn=save_fn, config=config)
    rcfg = RunnerConfig(out_dir=out_dir, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                        warmup_steps=args.warmup, lr_schedule=args.schedule, grad_accum=args.grad_accum,
                        mixed_precision=args.mixed_precision, seed=args.seed, eval_every=args.eval_every,
                        checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                        resume="fresh" if args.fresh else "auto")
    callback = None
    if args.max_minutes:
        deadline = time.perf_counter() + 60.0 * args.max_minutes

        def callback(step, total, logs):
            if time.perf_counter() > deadline:
                raise _TimeUp
    try:
        result = run(task, rcfg, callback=callback, log=log)
    except _TimeUp:
        # Time budget spent: finish like a completed run of the steps done so far.
        done = _finish_early(task, rcfg, log)
        result = done
    if result.report_path:
        rep = dict(result.report)
        rep["baselines"] = data.baselines
        rep["requested_steps"] = args.steps
        rep["max_minutes"] = args.max_minutes
        rep["data"] = {"clips": len(data.clips), "train_pairs": len(data.train_pairs),
                       "val_pairs": len(data.val_pairs), "dropped_pairs": data.dropped_pairs}
        from training.checkpoint import atomic_write_json

        atomic_write_json(result.report_path, rep)
        result.report = rep
    return result, data


class _TimeUp(Exception):
    """Raised by the time-budget callback (the runner saves a checkpoint first)."""


def _finish_early(task, rcfg, log):
    """After ``--max-minutes``: rerun the runner with ``steps`` = the steps done (a no-op resume
    that evaluates, saves the final files and writes the report)."""
    from training.runner import list_checkpoints, run

    done = list_checkpoints(os.path.join(rcfg.out_dir, "checkpoints"))[-1][0]
    log(f"time budget reached after {done} steps: finishing")
    rcfg2 = type(rcfg)(**{**rcfg.__dict__, "steps": done, "resume": "auto"})
    return run(task, rcfg2, log=log)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.sweep_lambda:
            values = [float(v) for v in args.sweep_lambda.split(",") if v.strip()]
            rows, data = [], None
            for lam in values:
                res, data = train(args, os.path.join(args.out, f"lambda_{lam:g}"), lam, data)
                if res.status != "completed":
                    return 130
                rows.append({"lambda_reg": lam, **(res.report.get("final_eval") or {}),
                             "wall_time_s": res.report["wall_time_s"]})
                print(json.dumps(rows[-1]))
            from training.checkpoint import atomic_write_json

            atomic_write_json(os.path.join(args.out, "lambda_sweep.json"),
                              {"runs": rows, "baselines": data.baselines if data else {}})
            return 0
        res, _ = train(args, args.out, args.lambda_reg)
    except EstimatorDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res.status != "completed":
        print(f"interrupted at step {res.step}; run the same command again to resume", file=sys.stderr)
        return 130
    fe = res.report.get("final_eval") or {}
    print(json.dumps({"out": args.out, "steps": res.step, **fe, **res.report.get("baselines", {}),
                      "files": res.report.get("files", {})}))
    return 0


if __name__ == "__main__":
    from training.runner import exit_cli

    exit_cli(main())  # several processes: tear the group down, or the launcher may report a crash
