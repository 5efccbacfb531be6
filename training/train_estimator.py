"""Train the learned (TAdaConv) motion estimator: ``python -m training.train_estimator``.

    python -m training.train_estimator --clips DIR --pairs DIR/pairs.csv --out OUT \
        [--steps 2000 --batch 8 --lr 1e-3 --lambda-reg 0.1 --margin 0 --eval-every 200 \
         --checkpoint-every 200 --resume|--fresh --seed 0 --threads 1]

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
    load_clip_array,
    pair_accuracy,
    pseudo_labels,
    read_pairs_csv,
    split_clips,
    split_pairs,
)

LAMBDA_REG_DEFAULT = 0.1  # chosen by the sweep in docs/training.md


@dataclass
class EstimatorData:
    """Everything the estimator task needs, in memory."""

    clips: list[str]  # absolute paths, index = row of ``frames``
    frames: torch.Tensor  # [N, T, H, W, 3] uint8
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
    frames: int,
    height: int,
    width: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache: str | None = None,
    progress: bool = True,
    scorer=None,
) -> EstimatorData:
    """Read pairs, compute/cached pseudo-labels, split by clip, load clips as uint8 tensors."""
    from tqdm.auto import tqdm

    if not os.path.isdir(clips_dir):
        raise EstimatorDataError(f"clips folder {clips_dir!r} does not exist")
    pairs = read_pairs_csv(pairs_csv, clips_dir)
    clips = sorted({p.clip_a for p in pairs} | {p.clip_b for p in pairs})
    cache = cache or os.path.join(clips_dir, "pseudo_labels.jsonl")
    kw = {"scorer": scorer} if scorer is not None else {}
    labels = pseudo_labels(clips, cache, progress=progress, **kw)
    _, val = split_clips(clips, val_fraction, seed)
    train_pairs, val_pairs, dropped = split_pairs(pairs, val)
    if not train_pairs:
        raise EstimatorDataError(f"{pairs_csv}: no training pairs left after holding out {val_fraction:.0%} of the "
                                 "clips; add pairs or lower --val-fraction")
    arr = np.empty((len(clips), frames, height, width, 3), dtype=np.uint8)
    for i, c in enumerate(tqdm(clips, desc="load clips", unit="clip", disable=not progress)):
        try:
            arr[i] = load_clip_array(c, frames, height, width)
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
    """Run the estimator on ``[B,T,H,W,3] uint8`` → ``[B, 2]`` scores (object, camera)."""
    out = model(model.prepare(frames_u8)) if hasattr(model, "prepare") else model(frames_u8)
    if isinstance(out, (tuple, list)):
        out = torch.stack([out[0], out[1]], -1)
    elif isinstance(out, dict):
        out = torch.stack([out["object"], out["camera"]], -1)
    return out.float()


def _augment(frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips and time reversal: they change neither speed (per clip, drawn from ``rng``)."""
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
