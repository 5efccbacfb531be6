"""Fine-tune an I2V model to follow object / camera motion scores (MotionStone's generator side).

    python -m training.train_motion --model DIR --data DATA --out OUT [options]
    accelerate launch --multi_gpu -m training.train_motion ...   (DDP: --trainable embedder / lora)
    accelerate launch --config_file configs/accelerate_fsdp_cogvideox5b.yaml -m training.train_motion \
        --trainable full ...                                        (FSDP2: full fine-tune of CogVideoX-5B)

Scores of every clip come from a frozen estimator (``--estimator flow`` or a learned estimator
file) and are cached in ``OUT/score_cache.safetensors``. The loss is the family's own diffusion
loss (``training.diffusion_loss``); the motion embedder (``motion.embedding``) is added to the
timestep embedding exactly where the sampler adds it. The loop is ``training.runner`` (progress,
checkpoints every ``--checkpoint-every`` steps, resume after a kill, ``report.json``).

Outputs in ``OUT``:

* ``motion_embedder.safetensors`` - always; loads with ``motion.embedding.load_motion_embedder``;
* ``<denoiser>_delta.safetensors`` - when the transformer / UNet trained too (``--trainable lora``
  or ``full``): ``W_finetuned - W_base`` in the ``merging.deltas`` format, for
  ``pipelines.sample(weight_schedule=ScheduledWeights({"motion": delta}, Constant({"motion": 1})))``.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

TRAINABLE_SETS = ("embedder", "lora", "full")
EMBEDDER_FILE = "motion_embedder.safetensors"
SCORE_CACHE_FILE = "score_cache.safetensors"

# Attention projections get the low-rank adapters (the usual LoRA targets). CogVideoX: the joint
# 3-D attention of every block; SVD: spatial and temporal attention of every transformer block.
LORA_TARGETS = {
    "cogvideox": r"^transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$",
    "svd": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
}


@dataclass
class MotionTrainConfig:
    """Settings of ``train_motion`` (the CLI flags; see ``--help`` for meanings and defaults)."""

    model: str
    data: str
    out: str
    trainable: str = "embedder"
    estimator: str = "flow"
    score_cache: Optional[str] = None
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 1000
    batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    embedder_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    mixed_precision: str = "no"
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    lora_rank: int = 16
    lora_alpha: Optional[float] = None
    num_freqs: int = 6
    hidden: Optional[int] = None
    decoupled: bool = True
    preload: Optional[bool] = None
    delta_dtype: str = "fp32"
    resume: str = "auto"
    progress: bool = True


class MotionTrainModule(nn.Module):
    """The module the runner trains: the denoiser (frozen unless ``full``), the motion embedder
    and, for ``lora``, the low-rank factors. ``forward(enc, seed) -> loss`` routes the denoiser
    call through this module so that accelerate's DDP/FSDP wrapper sees it."""

    def __init__(self, objective: Any, denoiser: nn.Module, embedder: nn.Module, lora: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.embedder = embedder
        self.lora = lora
        self._objective = [objective]  # a list: not a submodule, not in the state dict

    def forward(self, enc: dict, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return self._objective[0].loss(enc, self.denoiser, self.embedder, g)


def default_size(model: Any) -> tuple[int, int]:
    """The training resolution the model was built for (pixels)."""
    locked = model.resolution_locked
    if locked is not None:
        return locked
    cfg = model.denoiser.config
    if model.family.name == "svd":
        s = int(cfg.sample_size) * int(model.pipeline.vae_scale_factor)
        return s, s
    f = int(model.pipeline.vae_scale_factor_spatial)
    return int(cfg.sample_height) * f, int(cfg.sample_width) * f


def default_frames(model: Any) -> int:
    cfg = model.denoiser.config
    if model.family.name == "svd":
        return int(cfg.get("num_frames") or model.family.default_frames)
    return int(cfg.get("sample_frames") or model.family.default_frames)


def lora_targets(model: Any) -> list[str]:
    """Names of the linear layers that get low-rank adapters for this family."""
    import re

    from training.adapter_lora import linear_modules

    pattern = re.compile(LORA_TARGETS["svd" if model.family.name == "svd" else "cogvideox"])
    return linear_modules(model.denoiser, lambda key: pattern.search(key[: -len(".weight")]) is not None)


class _FullDelta(Mapping[str, torch.Tensor]):
    """``W_trained - W_base`` per key, computed on access from the live parameters and the base
    checkpoint on disk (one tensor at a time: no second copy of a 5B model in memory)."""

    def __init__(self, denoiser: nn.Module, base_folder: str) -> None:
        from merging.checkpoint import open_checkpoint

        self._params = dict(denoiser.named_parameters())
        self._base = open_checkpoint(base_folder)
        self._keys = [k for k in self._base.keys() if k in self._params]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._params[key].detach().float().cpu() - self._base.read(key).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _batch_indices(n: int, batch: int, seed: int, ctx: Any, grad_accum: int) -> list[int]:
    """Epoch-wise shuffled indices: sample ``j`` of micro-batch (step, micro, process) is item
    ``perm_e[g % n]`` of the global sample counter ``g``; a pure function of the seed and step."""
    out = []
    for j in range(batch):
        g = ((ctx.step * grad_accum + ctx.micro) * ctx.num_processes + ctx.process_index) * batch + j
        epoch, pos = divmod(g, n)
        out.append(int(np.random.default_rng([seed, 7, epoch]).permutation(n)[pos]))
    return out


def build_task(cfg: MotionTrainConfig, *, accelerator: Any = None, log=print) -> tuple[Any, Any, dict]:
    """Load the model and data and build the runner's ``TrainTask``. Returns ``(task, runner_cfg, info)``.

    ``accelerator``: anything with ``device``, ``is_main_process`` and ``wait_for_everyone()``
    (an ``accelerate.PartialState`` or ``Accelerator``); ``None`` = CPU, single process."""
    from motion.embedding import MotionScoreEmbedding
    from pipelines import load_model
    from training.diffusion_loss import check_frames, objective_for
    from training.motion_data import MotionClipDataset, collate, compute_scores, estimator_id, read_index
    from training.runner import RunnerConfig, TrainTask

    if cfg.trainable not in TRAINABLE_SETS:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE_SETS)}, got {cfg.trainable!r}")
    if cfg.trainable == "full" and cfg.dtype != "fp32":
        raise ValueError("--trainable full keeps fp32 weights for the optimiser: use --dtype fp32 "
                         "(--mixed-precision bf16 still computes in bf16)")
    if cfg.delta_dtype not in ("fp32", "bf16"):
        raise ValueError(f"--delta-dtype must be fp32 or bf16, got {cfg.delta_dtype!r}")
    if cfg.batch < 1 or cfg.grad_accum < 1:
        raise ValueError(f"--batch and --grad-accum must be >= 1, got {cfg.batch} and {cfg.grad_accum}")
    device = accelerator.device if accelerator is not None else "cpu"
    model = load_model(cfg.model, dtype=cfg.dtype, device=device)
    family = model.family.name
    frames = int(cfg.frames or default_frames(model))
    check_frames(family, frames)
    h0, w0 = default_size(model)
    height, width = int(cfg.height or h0), int(cfg.width or w0)
    if model.resolution_locked is not None and (height, width) != model.resolution_locked:
        raise ValueError(f"{cfg.model}: this model only takes {model.resolution_locked[0]}x{model.resolution_locked[1]} "
                         f"(learned positional embeddings); got --height {height} --width {width}")

    records = read_index(cfg.data)
    cache = cfg.score_cache or os.path.join(cfg.out, SCORE_CACHE_FILE)
    main = accelerator is None or accelerator.is_main_process
    if main:
        scores = compute_scores(records, frames=frames, estimator=cfg.estimator, cache_path=cache, progress=cfg.progress)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        scores = compute_scores(records, frames=frames, estimator=cfg.estimator, cache_path=cache, progress=False)
    # Keep decoded windows (uint8) and the frozen encoders' outputs in memory when the data set
    # is small: <= 512 MiB of frames (e.g. 64 clips of 9 x 256 x 256, 7 clips of 49 x 480 x 720).
    preload = cfg.preload if cfg.preload is not None else len(records) * frames * height * width * 3 <= 512 * 2**20
    dataset = MotionClipDataset(records, scores, frames=frames, height=height, width=width, preload=preload)

    base_fp = model.fingerprint()
    denoiser = model.denoiser
    denoiser.requires_grad_(cfg.trainable == "full")
    for comp in (model.vae, model.text_encoder, model.image_encoder):
        if comp is not None:
            comp.requires_grad_(False).eval()
    lora = None
    # New parameters are initialised from the seed (not the global RNG): two runs with the same
    # seed start from the same weights, which the resume guarantee builds on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        embedder = MotionScoreEmbedding(model.time_embed_dim, num_freqs=cfg.num_freqs, hidden=cfg.hidden,
                                        decoupled=cfg.decoupled, family=family, base_fingerprint=base_fp).to(model.device)
        if cfg.trainable == "lora":
            from training.adapter_lora import LowRankSet

            lora = LowRankSet(denoiser, lora_targets(model), rank=cfg.lora_rank, alpha=cfg.lora_alpha).attach()
    if cfg.gradient_checkpointing:
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{cfg.model}: the {type(denoiser).__name__} does not support gradient checkpointing")
        denoiser.enable_gradient_checkpointing()
    objective = objective_for(model, cache_encodings=preload)
    module = MotionTrainModule(objective, denoiser, embedder, lora)

    prefixes = {"embedder": ("embedder.",), "lora": ("embedder.", "lora."), "full": ("embedder.", "denoiser.")}[cfg.trainable]

    def trainable(name: str, p: nn.Parameter) -> bool:
        return name.startswith(prefixes)

    def param_groups(named: dict[str, nn.Parameter]) -> list[dict]:
        emb = [p for n, p in named.items() if n.startswith("embedder.")]
        rest = [p for n, p in named.items() if not n.startswith("embedder.")]
        groups = [{"params": emb, "lr": cfg.embedder_lr or cfg.lr}]
        if rest:
            groups.append({"params": rest, "lr": cfg.lr})
        return groups

    def batch_fn(ctx: Any) -> dict:
        items = [dataset[i] for i in _batch_indices(len(dataset), cfg.batch, cfg.seed, ctx, cfg.grad_accum)]
        batch = collate(items)
        batch["seed"] = int(ctx.rng.integers(0, 2**62))
        return batch

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch["seed"])
        enc = objective.encode(batch, g)  # frozen encoders, no graph
        return m(enc, int(torch.randint(0, 2**62, (1,), generator=g)))

    def save_fn(m: nn.Module, out_dir: str) -> dict[str, str]:
        from merging.deltas import save_delta
        from motion.embedding import save_motion_embedder

        files: dict[str, str] = {}
        delta_name = None
        if cfg.trainable != "embedder":
            delta_name = f"{model.family.denoiser}_delta.safetensors"
            tensors = m.lora.weight_deltas() if cfg.trainable == "lora" else _FullDelta(m.denoiser, cfg.model)
            files["delta"] = save_delta(
                os.path.join(out_dir, delta_name), tensors, name="motion", base_fingerprint=base_fp,
                recipe=f"train_motion:{cfg.trainable}", params=_task_config(cfg, frames, height, width, estimator_id(cfg.estimator)),
                seed=cfg.seed, scope="lora" if cfg.trainable == "lora" else "all", family=family,
                dtype=torch.bfloat16 if cfg.delta_dtype == "bf16" else torch.float32, overwrite=True,
            )
        files["embedder"] = save_motion_embedder(
            m.embedder, os.path.join(out_dir, EMBEDDER_FILE),
            extra={"trained_by": "training.train_motion", "trainable": cfg.trainable, "delta": delta_name,
                   "frames": frames, "height": height, "width": width, "estimator": estimator_id(cfg.estimator)},
        )
        return files

    task = TrainTask(
        name="motion", model=module, batch_fn=batch_fn, loss_fn=loss_fn, trainable=trainable, save_fn=save_fn,
        config=_task_config(cfg, frames, height, width, estimator_id(cfg.estimator)), param_groups=param_groups,
    )
    rcfg = RunnerConfig(
        out_dir=cfg.out, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        grad_accum=cfg.grad_accum, mixed_precision=cfg.mixed_precision, seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints, resume=cfg.resume,
        progress=cfg.progress,
    )
    info = {"model": model, "dataset": dataset, "frames": frames, "height": height, "width": width,
            "base_fingerprint": base_fp, "embedder": embedder, "module": module}
    return task, rcfg, info


def _task_config(cfg: MotionTrainConfig, frames: int, height: int, width: int, est: str) -> dict[str, Any]:
    # What shapes the trajectory: a resume with other values is refused by the runner.
    return {
        "model": os.path.abspath(cfg.model), "data": os.path.abspath(cfg.data), "trainable": cfg.trainable,
        "estimator": est, "frames": frames, "height": height, "width": width, "batch": cfg.batch,
        "embedder_lr": cfg.embedder_lr, "dtype": cfg.dtype, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
        "num_freqs": cfg.num_freqs, "hidden": cfg.hidden, "decoupled": cfg.decoupled,
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }


def train_motion(cfg: MotionTrainConfig, *, callback=None, log=print) -> Any:
    """Run the whole training (see the module docs). Returns ``training.runner.TrainResult``."""
    from accelerate import PartialState

    from training.runner import check_supported_distribution, multi_process_cpu, run
    from training.sharded import requested_fsdp_version

    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"--mixed-precision must be 'no' or 'bf16', got {cfg.mixed_precision!r}")
    # The process state (device, rank) is enough to load the model and data; the runner makes
    # the Accelerator itself (it knows how to replace one of another precision in a process that
    # trains several times, e.g. ComfyUI or the tests).
    state = PartialState(cpu=multi_process_cpu())
    # Refuse DeepSpeed / FSDP1 before loading a 5B model onto every GPU (the runner would refuse later).
    # PartialState does not know about FSDP (the Accelerator decides): ask the launch environment.
    requested = requested_fsdp_version()
    check_supported_distribution("FSDP" if requested else state.distributed_type, requested)
    if state.is_main_process:
        os.makedirs(cfg.out, exist_ok=True)
    task, rcfg, _ = build_task(cfg, accelerator=state, log=log)
    return run(task, rcfg, callback=callback, log=log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train_motion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers model folder (CogVideoX-I2V 1.0/1.5 or SVD)")
    p.add_argument("--data", required=True, help="clips with captions: a folder, a .csv or a .jsonl (see docs/motion_conditioning.md)")
    p.add_argument("--out", required=True, help="output folder (embedder, delta, checkpoints, report.json)")
    p.add_argument("--trainable", choices=TRAINABLE_SETS, default="embedder",
                   help="embedder only; embedder + low-rank adapters on the attention projections; or everything")
    p.add_argument("--estimator", default="flow", help="'flow' (weight-free) or a learned estimator .safetensors")
    p.add_argument("--score-cache", default=None, help="score cache file (default OUT/score_cache.safetensors)")
    p.add_argument("--frames", type=int, default=None, help="frames per sample (default: the model's; CogVideoX 4k+1)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's training size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's training size)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps")
    p.add_argument("--batch", type=int, default=1, help="clips per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimisation step")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    p.add_argument("--embedder-lr", type=float, default=None, help="learning rate of the embedder (default --lr)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="bf16 autocast for the forward pass")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="storage of the frozen model (bf16 halves memory for --trainable embedder/lora)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha/rank (default alpha = rank)")
    p.add_argument("--num-freqs", type=int, default=6, help="sinusoidal frequencies per score")
    p.add_argument("--hidden", type=int, default=None, help="embedder MLP width (default clamp(D/2, 32, 512))")
    p.add_argument("--joint", action="store_true", help="non-decoupled embedder: one MLP on both scores (ablation)")
    p.add_argument("--delta-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="storage of the transformer delta (bf16 halves the file; the sampler adds it in fp32)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in OUT and start over")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = MotionTrainConfig(
        model=a.model, data=a.data, out=a.out, trainable=a.trainable, estimator=a.estimator, score_cache=a.score_cache,
        frames=a.frames, height=a.height, width=a.width, steps=a.steps, batch=a.batch, grad_accum=a.grad_accum,
        lr=a.lr, embedder_lr=a.embedder_lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        mixed_precision=a.mixed_precision, dtype=a.dtype, gradient_checkpointing=a.gradient_checkpointing,
        checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints, seed=a.seed,
        lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, num_freqs=a.num_freqs, hidden=a.hidden,
        decoupled=not a.joint, resume="fresh" if a.fresh else "auto", progress=not a.no_progress,
        delta_dtype=a.delta_dtype,
    )
    try:
        result = train_motion(cfg)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Before training started (loading, estimating scores): nothing was written half-way
        # (the score cache is written atomically once complete).
        print("interrupted before training started; nothing to resume yet", file=sys.stderr)
        return 130
    print(f"{result.status} at step {result.step}; report: {result.report_path}")
    for k, v in (result.report.get("files") or {}).items():
        print(f"  {k}: {v}")
    return 0 if result.status == "completed" else 130


if __name__ == "__main__":
    from training.runner import exit_cli

    exit_cli(main())  # several processes: tear the group down, or the launcher may report a crash
