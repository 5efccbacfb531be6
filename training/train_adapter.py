"""ED stage 1: teach an I2V model to follow motion described in text (``python -m training.train_adapter``).

* **SVD** (no text path): a ``textadapter.TemporalTextAdapter`` reads the caption through a local
  CLIP text encoder (``--text-encoder``) and feeds it to every temporal transformer block. By
  default the adapter and the UNet's temporal layers train together (``adapter+temporal``).
* **CogVideoX** (its blocks already see the T5 prompt): a fine-tune of a chosen scope (the
  family's temporal pattern by default), full (``temporal``) or low-rank (``lora``).

The loss is the family's own diffusion objective (``training.diffusion_loss``) and the loop is
the shared runner (``training.runner``: accelerate, mixed precision, checkpoints and resume,
progress, Ctrl-C, ``report.json``). Outputs in ``--out``:

* ``finetune_delta.safetensors``: ``ft - pre`` for every trained denoiser key, in
  ``merging.deltas`` format with the base fingerprint (LoRA is folded into weight deltas);
* ``text_adapter.safetensors`` (SVD with an adapter): the adapter, same base fingerprint;
* ``report.json`` and ``checkpoints/``;
* with ``--write-merged`` only, ``finetuned/merged/``: a full copy of the fine-tuned model. Not
  needed by MotionDial: ``merging.build --finetuned`` takes the delta file itself.

See docs/ed_stage1.md for the data format, defaults and how the outputs feed ``merging.build``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

TRAINABLE_CHOICES = ("auto", "adapter+temporal", "adapter", "temporal", "lora", "full")
DELTA_FILE = "finetune_delta.safetensors"
ADAPTER_FILE = "text_adapter.safetensors"


class Stage1Error(ValueError):
    """Settings that do not fit the model or each other; the message says which and why."""


@dataclass
class Stage1Config:
    """The trainer's own settings (recorded in checkpoints; a resume must use the same ones).

    Attributes:
        model: diffusers model folder (the base ``pre``).
        data: clip/caption index (JSONL, CSV or folder; see ``training.motion_data``).
        text_encoder: local CLIP text-encoder folder (SVD with an adapter).
        trainable: ``auto`` (SVD: ``adapter+temporal``; CogVideoX: ``temporal``), ``adapter+temporal``,
            ``adapter``, ``temporal``, ``lora`` (low-rank on the scope's linear layers; plus the
            adapter on SVD) or ``full`` (every denoiser weight; plus the adapter on SVD).
        scope: regex over denoiser keys for ``temporal``/``lora`` (default: the family's temporal pattern).
        rank / lora_alpha: low-rank settings (update scaled by ``alpha / rank``; alpha defaults to rank).
        num_queries / num_heads: adapter shape (reference: 16 queries, 8 heads).
        frame_mismatch: what the adapter does with a frame count other than ``num_queries``:
            ``interpolate`` the queries linearly over time (default) or ``error``.
        frames / height / width: training window (default: the family's frame count and the model's size).
        batch_size: clips per micro-batch.
        caption_dropout: probability of training on the empty prompt instead of the caption, so
            classifier-free guidance on the text works at sampling time.
        fps: SVD's fps conditioning during training.
        new_lr: learning rate of the parameters that start from scratch (adapter, low-rank
            factors); ``None`` = the runner's ``lr``. The pretrained weights keep the runner's ``lr``.
        write_model: also write the fine-tuned model as a complete diffusers folder
            (``finetuned/merged``: base + delta, in the base's dtype), for tools that need a full
            model. Off by default: ``merging.build --finetuned`` takes the (exact, fp32) delta file.
    """

    model: str
    data: str
    text_encoder: str | None = None
    trainable: str = "auto"
    scope: str | None = None
    rank: int = 16
    lora_alpha: float | None = None
    num_queries: int = 16
    num_heads: int = 8
    frame_mismatch: str = "interpolate"
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    caption_dropout: float = 0.1
    fps: int = 7
    new_lr: float | None = None
    write_model: bool = False


class Stage1Module(nn.Module):
    """What the runner trains: the denoiser, the adapter and low-rank factors as submodules.

    ``forward(batch)`` returns the family's diffusion loss with the adapter attached, so the whole
    step runs through this module (and through DDP's forward under ``accelerate launch``).
    """

    def __init__(self, model: Any, objective: Any, adapter: nn.Module | None, lora: nn.Module | None,
                 text_fn: Callable[[list[str]], torch.Tensor] | None) -> None:
        super().__init__()
        self.denoiser = model.denoiser
        self.adapter = adapter
        self.lora = lora
        # Not submodules: frozen helpers that must not enter the state dict or the optimizer.
        self.__dict__["_objective"] = objective
        self.__dict__["_text_fn"] = text_fn

    def forward(self, batch: dict) -> torch.Tensor:
        from textadapter import attach

        generator = torch.Generator().manual_seed(int(batch["seed"]))
        enc = self._objective.encode(batch, generator)
        if self.adapter is None:
            return self._objective.loss(enc, self.denoiser, None, generator)
        text = self._text_fn(list(batch["caption"]))
        with attach(self.denoiser, self.adapter, text):
            return self._objective.loss(enc, self.denoiser, None, generator)


class _TextCache:
    """CLIP embeddings per caption, computed once (fp32, CPU), bounded LRU."""

    def __init__(self, clip: Any, device: torch.device, size: int = 4096) -> None:
        self.clip, self.device, self.size = clip, device, size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            with torch.autocast(self.device.type, enabled=False):
                emb = self.clip.encode(missing).float().cpu()
            for c, e in zip(missing, emb):
                self._cache[c] = e
        for c in captions:
            self._cache.move_to_end(c)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[c] for c in captions]).to(self.device)


def resolve_trainable(family_name: str, trainable: str) -> str:
    """``auto`` -> the family's default; refuse modes that need an adapter on CogVideoX."""
    if trainable not in TRAINABLE_CHOICES:
        raise Stage1Error(f"--trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {trainable!r}")
    svd = family_name == "svd"
    if trainable == "auto":
        return "adapter+temporal" if svd else "temporal"
    if not svd and trainable in ("adapter", "adapter+temporal"):
        raise Stage1Error(
            f"--trainable {trainable}: the text adapter is for SVD; {family_name} already sees the prompt "
            "in every block: use temporal, lora or full"
        )
    return trainable


def uses_adapter(family_name: str, trainable: str) -> bool:
    return family_name == "svd" and trainable != "temporal"


def _scope_filter(family: Any, scope: str | None) -> Callable[[str], bool]:
    if scope is None:
        return family.is_temporal
    try:
        rx = re.compile(scope)
    except re.error as e:
        raise Stage1Error(f"--scope {scope!r} is not a valid regular expression ({e})") from None
    return lambda key: rx.search(key) is not None


def _trainable_predicate(mode: str, in_scope: Callable[[str], bool]) -> Callable[[str, nn.Parameter], bool]:
    def pred(name: str, _p: nn.Parameter) -> bool:
        if name.startswith("adapter."):
            return mode != "temporal"
        if name.startswith("lora."):
            return mode == "lora"
        if name.startswith("denoiser."):
            key = name[len("denoiser."):]
            if mode == "full":
                return True
            if mode in ("temporal", "adapter+temporal"):
                return in_scope(key)
        return False

    return pred


def build(cfg: Stage1Config, *, device: str | torch.device = "cpu", preload: bool = False):
    """Load everything and return ``(task, info)`` for ``training.runner.run``.

    ``info`` holds the loaded ``model``, the resolved ``trainable`` mode, the ``dataset`` and the
    base ``fingerprint``. Raises ``Stage1Error`` / ``MotionDataError`` / ``ModelFolderError`` /
    ``TextEncoderError`` with clear messages before anything is written.
    """
    from textadapter import TemporalTextAdapter, check_text_width, load_clip_text, save_adapter
    from pipelines import load_model
    from training.adapter_data import CaptionedClips, collate_captioned, read_index
    from training.adapter_lora import LowRankSet, linear_modules
    from training.diffusion_loss import check_frames, objective_for
    from training.runner import TrainTask

    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise Stage1Error(f"--caption-dropout must be in [0, 1), got {cfg.caption_dropout}")
    if cfg.batch_size < 1:
        raise Stage1Error(f"--batch-size must be >= 1, got {cfg.batch_size}")
    # Data first: a bad index is the commonest mistake and the cheapest to report.
    records = read_index(cfg.data)
    model = load_model(cfg.model, dtype="fp32", device=device)
    fam = model.family
    mode = resolve_trainable(fam.name, cfg.trainable)
    with_adapter = uses_adapter(fam.name, mode)
    if fam.name != "svd" and cfg.text_encoder:
        raise Stage1Error(f"--text-encoder is for SVD; {fam.name} uses its own text encoder from {cfg.model}")
    if with_adapter and not cfg.text_encoder:
        raise Stage1Error(
            "SVD has no text encoder: pass --text-encoder DIR (a local CLIP text model folder, e.g. the "
            "text_encoder/ + tokenizer/ of a Stable Diffusion 2.x model), or --trainable temporal to fine-tune "
            "without text"
        )
    frames = cfg.frames or fam.default_frames
    check_frames(fam.name, frames)
    height, width = cfg.height, cfg.width
    locked = model.resolution_locked
    if height is None or width is None:
        if locked is not None:
            height, width = locked
        else:
            height, width = height or _default_size(model)[0], width or _default_size(model)[1]
    if locked is not None and (height, width) != tuple(locked):
        raise Stage1Error(f"{cfg.model}: this model only takes {locked[0]}x{locked[1]} pixels, got {height}x{width}")

    base_fp = model.fingerprint()  # before any training touches the weights
    objective = objective_for(model, fps=cfg.fps) if fam.name == "svd" else objective_for(model)
    in_scope = _scope_filter(fam, cfg.scope)
    denoiser_keys = list(model.denoiser.state_dict().keys())
    scoped = [k for k in denoiser_keys if in_scope(k)]
    if mode in ("temporal", "adapter+temporal", "lora") and not scoped:
        raise Stage1Error(f"the scope {cfg.scope or fam.temporal_pattern!r} selects no weights of {cfg.model}")

    adapter = None
    text_fn = None
    clip = None
    if with_adapter:
        clip = load_clip_text(cfg.text_encoder, device=model.device)
        # The seed fixes the adapter's random queries, so a resumed run rebuilds the same start.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            adapter = TemporalTextAdapter.for_unet(
                model.denoiser, clip.width, num_queries=cfg.num_queries, num_heads=cfg.num_heads,
                frame_mismatch=cfg.frame_mismatch,
            ).to(model.device)
        check_text_width(adapter, clip)
        text_fn = _TextCache(clip, torch.device(model.device))

    lora = None
    if mode == "lora":
        names = linear_modules(model.denoiser, in_scope)
        if not names:
            raise Stage1Error(f"--trainable lora: the scope selects no linear layers of {cfg.model}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            lora = LowRankSet(model.denoiser, names, rank=cfg.rank, alpha=cfg.lora_alpha).attach()

    dataset = CaptionedClips(records, frames=frames, height=height, width=width, preload=preload)
    module = Stage1Module(model, objective, adapter, lora, text_fn)
    pred = _trainable_predicate(mode, in_scope)
    trained_keys = [k for k in denoiser_keys if pred("denoiser." + k, None)]

    def batch_fn(ctx) -> dict:
        idx = ctx.rng.integers(0, len(dataset), size=cfg.batch_size)
        batch = collate_captioned([dataset[int(i)] for i in idx])
        drop = ctx.rng.random(cfg.batch_size) < cfg.caption_dropout
        batch["caption"] = ["" if d else c for c, d in zip(batch["caption"], drop)]
        b = cfg.batch_size
        # The shared objective also carries motion scores; stage 1 has none (no embedder).
        batch["object"] = torch.zeros(b)
        batch["camera"] = torch.zeros(b)
        batch["seed"] = int(ctx.rng.integers(0, 2**62))
        return batch

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        return m(batch)

    def save_fn(m: nn.Module, out_dir: str) -> dict[str, str]:
        files = {}
        files["delta"] = _save_finetune_delta(
            os.path.join(out_dir, DELTA_FILE), model, m, trained_keys, base_fp, mode, cfg
        )
        if m.adapter is not None:
            files["adapter"] = save_adapter(
                os.path.join(out_dir, ADAPTER_FILE), m.adapter, base_fingerprint=base_fp,
                text_encoder={**clip.info(), "path": os.path.abspath(cfg.text_encoder)},
            )
        if cfg.write_model:
            files["finetuned_model"] = _write_finetuned_model(cfg.model, files["delta"], out_dir)
        return files

    # write_model only decides what save_fn writes: a resume may change it.
    config = {**{k: v for k, v in asdict(cfg).items() if k != "write_model"}, "trainable": mode, "frames": frames, "height": height, "width": width,
              "model": os.path.abspath(cfg.model), "data": os.path.abspath(cfg.data),
              "text_encoder": os.path.abspath(cfg.text_encoder) if cfg.text_encoder else None}
    param_groups = None
    if cfg.new_lr is not None:
        def param_groups(named: dict[str, nn.Parameter]) -> list[dict]:
            new = [p for n, p in named.items() if not n.startswith("denoiser.")]
            old = [p for n, p in named.items() if n.startswith("denoiser.")]
            return [g for g in ({"params": new, "lr": cfg.new_lr}, {"params": old}) if g["params"]]

    task = TrainTask(name="adapter", model=module, batch_fn=batch_fn, loss_fn=loss_fn, trainable=pred,
                     save_fn=save_fn, config=config, param_groups=param_groups)
    info = {"model": model, "trainable": mode, "dataset": dataset, "fingerprint": base_fp,
            "trained_keys": trained_keys}
    return task, info


def _default_size(model: Any) -> tuple[int, int]:
    """The size the model's config was made for, in pixels (what its pipeline defaults to)."""
    cfg = model.denoiser.config
    if model.family.name == "svd":
        s = int(model.pipeline.vae_scale_factor)
        return int(cfg.sample_size) * s, int(cfg.sample_size) * s
    s = int(model.pipeline.vae_scale_factor_spatial)
    return int(cfg.sample_height) * s, int(cfg.sample_width) * s


@torch.no_grad()
def _save_finetune_delta(path: str, model: Any, module: Stage1Module, trained_keys: list[str],
                         base_fp: dict, mode: str, cfg: Stage1Config) -> str:
    """``tau = ft - pre`` of the trained denoiser keys, fp32, against the base read from disk."""
    from merging.checkpoint import open_checkpoint
    from merging.deltas import save_delta

    tensors: dict[str, torch.Tensor] = {}
    if module.lora is not None:
        tensors.update(module.lora.weight_deltas())
    if trained_keys:
        base = open_checkpoint(cfg.model)  # the base weights on disk, key by key
        current = module.denoiser.state_dict()
        for key, pre in base.iter_tensors(trained_keys):
            tensors[key] = current[key].detach().float().cpu() - pre.float()
    scope = "lora" if mode == "lora" else ("all" if mode == "full" else (cfg.scope or "temporal"))
    if not tensors:
        # adapter-only training leaves the UNet as it was: record an exact zero task vector on the
        # scope so that merging still receives a well-formed (if trivial) fine-tune.
        pre_sd = module.denoiser.state_dict()
        key = next(k for k in pre_sd if model.family.is_temporal(k))
        tensors[key] = torch.zeros_like(pre_sd[key], dtype=torch.float32, device="cpu")
    return save_delta(path, tensors, name="finetune", base_fingerprint=base_fp, recipe="stage1",
                      params={"trainable": mode, "rank": cfg.rank if mode == "lora" else None},
                      scope=scope, family=model.family.name, dtype=torch.float32, overwrite=True)


def _write_finetuned_model(base: str, delta: str, out_dir: str) -> str:
    """``base + delta`` as a complete model folder, streamed key by key (``merging.recipes.merge_deltas``)."""
    from merging.recipes import merge_deltas

    res = merge_deltas(base, {delta: 1.0}, os.path.join(out_dir, "finetuned"), overwrite=True)
    return res.files["merged"]


def train_adapter(cfg: Stage1Config, runner: Any, *, device: str | torch.device | None = None,
                  preload: bool = False, callback=None, log=print):
    """Build and run stage 1; returns ``training.runner.TrainResult``."""
    from accelerate import Accelerator
    from training.runner import run

    accelerator = Accelerator(mixed_precision=runner.mixed_precision)
    task, _ = build(cfg, device=device or accelerator.device, preload=preload)
    return run(task, runner, accelerator=accelerator, callback=callback, log=log)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train_adapter",
        description="ED stage 1: fine-tune an I2V model (and, for SVD, a text adapter) on clips with motion captions.",
    )
    p.add_argument("--model", required=True, help="diffusers model folder (the base model)")
    p.add_argument("--data", required=True, help="clip/caption index: .jsonl, .csv or a folder of clips + .txt captions")
    p.add_argument("--out", required=True, help="output folder (delta, adapter, checkpoints, report.json)")
    p.add_argument("--text-encoder", help="SVD: local CLIP text encoder folder (text_encoder/+tokenizer/ or flat)")
    p.add_argument("--trainable", default="auto", choices=TRAINABLE_CHOICES,
                   help="what trains (default auto: SVD adapter+temporal, CogVideoX temporal)")
    p.add_argument("--scope", help="regex over denoiser keys for temporal/lora (default: the family's temporal layers)")
    p.add_argument("--rank", type=int, default=16, help="low-rank updates: rank (default 16)")
    p.add_argument("--lora-alpha", type=float, help="low-rank updates: scale alpha/rank (default alpha = rank)")
    p.add_argument("--num-queries", type=int, default=16, help="adapter: per-frame queries (default 16)")
    p.add_argument("--num-heads", type=int, default=8, help="adapter: cross-attention heads (default 8)")
    p.add_argument("--frame-mismatch", default="interpolate", choices=("interpolate", "error"),
                   help="adapter: other frame counts than --num-queries interpolate the queries, or are refused")
    p.add_argument("--frames", type=int, help="frames per training clip (default: the family's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--caption-dropout", type=float, default=0.1, help="train on the empty prompt this often (default 0.1)")
    p.add_argument("--fps", type=int, default=7, help="SVD fps conditioning (default 7)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    p.add_argument("--new-lr", type=float,
                   help="learning rate of the adapter / low-rank factors, which start from scratch (default: --lr)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine", "linear"))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out and start over")
    p.add_argument("--resume", help="resume from this checkpoint folder (default: the newest in --out)")
    p.add_argument("--preload", action="store_true", help="decode every clip once up front (small data sets)")
    p.add_argument("--write-merged", action=argparse.BooleanOptionalAction, default=False,
                   help="also write the fine-tuned model as a full folder (finetuned/merged, base + delta in the base's "
                   "dtype). Off by default: merging.build --finetuned takes finetune_delta.safetensors directly")
    p.add_argument("--no-model", action="store_false", dest="write_merged",
                   help=argparse.SUPPRESS)  # the former opt-out, now the default
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from training.runner import RunnerConfig

    args = _parser().parse_args(argv)
    cfg = Stage1Config(
        model=args.model, data=args.data, text_encoder=args.text_encoder, trainable=args.trainable,
        scope=args.scope, rank=args.rank, lora_alpha=args.lora_alpha, num_queries=args.num_queries,
        num_heads=args.num_heads, frame_mismatch=args.frame_mismatch, frames=args.frames, height=args.height, width=args.width,
        batch_size=args.batch_size, caption_dropout=args.caption_dropout, fps=args.fps,
        new_lr=args.new_lr, write_model=args.write_merged,
    )
    runner = RunnerConfig(
        out_dir=args.out, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, grad_accum=args.grad_accum, mixed_precision=args.mixed_precision,
        seed=args.seed, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        resume="fresh" if args.fresh else (args.resume or "auto"), progress=not args.no_progress,
    )
    try:
        result = train_adapter(cfg, runner, preload=args.preload)
    except (ValueError, OSError) as e:  # our errors are ValueError subclasses with clear messages
        print(f"train_adapter: error: {e}", file=sys.stderr)
        return 2
    if result.report_path:  # the main process (accelerate launch runs several)
        print(f"{result.status} at step {result.step}; report: {result.report_path}")
        for name, path in (result.report.get("files") or {}).items():
            print(f"  {name}: {path}")
    return 0 if result.status == "completed" else 130


if __name__ == "__main__":
    from training.runner import exit_cli

    exit_cli(main())  # several processes: tear the group down, or the launcher may report a crash
