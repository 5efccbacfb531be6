"""Train the demo model from scratch: ``python -m training.train_demo --out DIR --seed 0``.

Up to three stages on the shared runner (``training.runner``: progress, checkpoints, resume after
a kill by running the same command again, ``report.json`` per stage):

1. ``vae``: the demo VAE (``training.demo_model``) as a plain autoencoder on demo frames
   (MSE of the decoded posterior mean), then its ``scaling_factor`` = 1 / std of the latents.
   Writes ``DIR/vae/model`` (the whole SVD folder with a random UNet): the base of stage 2.
2. ``motion``: the UNet (all of it) and a decoupled ``motion.embedding.MotionScoreEmbedding``
   together, with SVD's own EDM loss (``training.diffusion_loss.SVDObjective``) on demo clips
   (``training.demo_data``: fixed directions, requested scores). Optional periodic
   controllability checks (``training.demo_control``) go into the report's evals.
3. ``refine`` (``refine_steps > 0``): stage 2's exported weights (``DIR/motion/result``)
   trained on with a fresh warm-up and cosine schedule, a share of every batch drawn from
   fast-pan clips (camera score >= ``FAST_CAMERA``), which stage 2's uniform draw leaves rare.

Outputs: ``DIR/model`` (diffusers folder, loads with ``pipelines.load_model``) and
``DIR/motion_embedder.safetensors`` (fingerprinted for ``DIR/model``), plus ``DIR/summary.json``.
Everything is a pure function of ``--seed`` and the settings (same machine and thread count:
bit-identical). ``--minutes M`` stops training (stage 2 or 3) after M minutes of this session and
exports what was trained so far (re-run without it, or with more, to continue from the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from training.demo_data import DemoClipDataset, DemoDataConfig
from training.demo_model import (DemoModelConfig, build_demo_pipeline, fix_posterior_std, save_pipeline_atomic,
                                 temporal_decoder_parameters)

EMBEDDER_FILE = "motion_embedder.safetensors"
#: Camera score from which a clip counts as a fast pan for ``refine_fast_share`` (score 7 is
#: ~1 px/frame at 32 px, the fastest pan the stage-2 model renders at its requested speed).
FAST_CAMERA = 7.0


@dataclass
class DemoTrainConfig:
    """Settings of ``train_demo`` (defaults: the recipe of docs/demo_model.md)."""

    out: str
    seed: int = 0
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    clips: int = 2048
    vae_steps: int = 1500
    vae_batch: int = 2
    vae_lr: float = 2e-3
    #: after the autoencoder stage, measure control of ground-truth clips *through* the VAE on
    #: a 5 x 5 grid x this many clips (the ceiling any UNet on these latents can reach); 0: skip
    vae_check_seeds: int = 1
    steps: int = 4000
    batch: int = 8
    lr: float = 1e-3
    embedder_lr: float = 2e-3
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_images: int = 2
    eval_steps: int = 10
    #: stage 3 (``refine``, off at 0): continue the stage-2 weights for this many steps with a
    #: fresh optimiser (warm-up, cosine from ``refine_lr``), a share of every batch drawn from
    #: fast-pan clips (camera score >= ``FAST_CAMERA``). Without it the model renders camera 9
    #: like camera 7 and loses the object dial there (session 4 in docs/demo_model.md).
    refine_steps: int = 2500
    refine_lr: float = 3e-4
    refine_embedder_lr: float = 6e-4
    refine_fast_share: float = 0.75
    #: stage 3: a further share of every batch from clips where the object is fast too (both
    #: scores >= ``FAST_CAMERA``): the fastest on-screen motion, ~4 % of uniform draws
    refine_both_fast_share: float = 0.0
    minutes: Optional[float] = None
    threads: Optional[int] = None
    progress: bool = True

    def stage_config(self, stage: str) -> dict[str, Any]:
        """What shapes a stage's trajectory (a resume with other values is refused)."""
        common = {"seed": self.seed, "model": self.model.to_json(), "data": self.data.to_json(), "clips": self.clips}
        if stage == "vae":
            data = {k: v for k, v in common["data"].items() if k not in DemoDataConfig.STAGE2_FIELDS}
            return {**common, "data": data, "vae_batch": self.vae_batch, "vae_loss": "mse_of_mean"}
        if stage == "refine":
            return {**common, "batch": self.batch, "embedder_lr": self.refine_embedder_lr,
                    "fast_share": self.refine_fast_share, "both_fast_share": self.refine_both_fast_share,
                    "fast_camera": FAST_CAMERA, "after_steps": self.steps}
        return {**common, "batch": self.batch, "embedder_lr": self.embedder_lr}


# -- stage 1: the autoencoder ------------------------------------------------------------------
def _vae_task(cfg: DemoTrainConfig, pipe: Any, data: DemoClipDataset):
    from training.checkpoint import atomic_write_json
    from training.runner import RunnerConfig, TrainTask

    vae = pipe.vae
    t = cfg.data.frames

    def batch_fn(ctx: Any) -> dict:
        idx = ctx.rng.integers(0, len(data), size=cfg.vae_batch)
        # The deterministic loss no longer uses "seed"; it is still drawn so the batch stream (and
        # with it the shipped, seeded weights) stays what it was.
        return {"video": torch.stack([data[int(i)]["video"] for i in idx]), "seed": int(ctx.rng.integers(0, 2**62))}

    def loss_fn(m: nn.Module, batch: dict):
        x = batch["video"].flatten(0, 1)  # [B*T, 3, H, W] in -1..1
        # A deterministic autoencoder: decode the posterior mean. Sampling the posterior with a
        # tiny KL weight (the first recipe) let the encoder grow its log-variance and hide
        # information in the *noise level* (measured: posterior std 6.7 against latents of std
        # 3.9, training MSE 0.065 but 0.18 when decoding the mean); the log-variance half of
        # ``quant_conv`` gets no gradient; ``fix_posterior_std`` pins the std to e^-5 at export.
        z = m.encode(x).latent_dist.mean
        rec = m.decode(z, num_frames=t).sample
        mse = torch.mean((rec - x) ** 2)
        return mse, {"mse": float(mse.detach()), "latent_abs": float(z.detach().abs().mean())}

    def save_fn(m: nn.Module, out_dir: str) -> dict[str, str]:
        m.eval()
        with torch.no_grad():
            vids = torch.stack([data[i]["video"] for i in range(min(64, len(data)))]).flatten(0, 1)
            lat = torch.cat([m.encode(v).latent_dist.mean for v in vids.split(64)])
            rec = m.decode(lat[: 8 * t], num_frames=t).sample
            psnr = float(10 * torch.log10(4.0 / torch.mean((rec - vids[: 8 * t]) ** 2)))
        # SVD scales latents by scaling_factor for the UNet; unit variance suits its EDM sigmas.
        m.register_to_config(scaling_factor=float(1.0 / lat.std()))
        fix_posterior_std(m)
        folder = save_pipeline_atomic(pipe, os.path.join(out_dir, "model"))
        quality = {"psnr_db": psnr, "latent_std": float(lat.std()), "scaling_factor": float(1.0 / lat.std())}
        if cfg.vae_check_seeds:
            quality["motion_ceiling"] = vae_motion_ceiling(m, cfg.data, cfg.seed + 1000, cfg.vae_check_seeds)
        atomic_write_json(os.path.join(out_dir, "vae_quality.json"), quality)
        return {"model": folder}

    frozen = set(temporal_decoder_parameters(vae)) if cfg.model.frame_wise_decoder else set()
    task = TrainTask(name="demo_vae", model=vae, batch_fn=batch_fn, loss_fn=loss_fn, save_fn=save_fn,
                     trainable=lambda n, p: n not in frozen, config=cfg.stage_config("vae"))
    rcfg = RunnerConfig(out_dir=os.path.join(cfg.out, "vae"), steps=cfg.vae_steps, lr=cfg.vae_lr, seed=cfg.seed,
                        checkpoint_every=cfg.checkpoint_every, progress=cfg.progress, lr_schedule="cosine", warmup_steps=20)
    return task, rcfg


@torch.no_grad()
def vae_motion_ceiling(vae: nn.Module, data_cfg: DemoDataConfig, seed: int, seeds: int = 1,
                       levels: Sequence[float] = (1, 3, 5, 7, 9)) -> dict[str, float]:
    """Control metrics (``training.demo_control.control_metrics``) of ground-truth demo clips
    after an encode/decode round trip: what the flow estimator can still see through the VAE."""
    from motion import estimate_motion
    from training.demo_control import control_metrics
    from training.demo_data import demo_clip

    rows = []
    for o in levels:
        for c in levels:
            for i in range(seeds):
                f, _ = demo_clip(seed, i, data_cfg, object_score=o, camera_score=c)
                x = torch.from_numpy(f).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                rec = vae.decode(vae.encode(x).latent_dist.mean, num_frames=len(f)).sample
                u = ((rec.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
                s = estimate_motion(u, data_cfg.fps, "flow")
                rows.append((o, c, s.object, s.camera))
    r = np.asarray(rows)
    return control_metrics(r[:, 0], r[:, 1], r[:, 2], r[:, 3])


def _refine_pools(cfg: DemoTrainConfig, data: DemoClipDataset) -> tuple[tuple[int, np.ndarray], tuple[int, np.ndarray]]:
    """Stage 3's extra draws per batch and the clip indices they come from: ``((n, fast-pan
    clips), (n, clips fast on both axes))``. Raises ``ValueError`` for shares that do not fit a
    batch or a pool with no clip (checked before stage 1 too, not an hour into the run)."""
    n_fast = int(round(cfg.refine_fast_share * cfg.batch))
    n_both = int(round(cfg.refine_both_fast_share * cfg.batch))
    if n_fast + n_both > cfg.batch:
        raise ValueError(f"refine_fast_share {cfg.refine_fast_share} + refine_both_fast_share "
                         f"{cfg.refine_both_fast_share}: more than a whole batch ({cfg.batch} clips)")
    fast_pan = data.scores[:, 1] >= FAST_CAMERA
    fast = np.flatnonzero(fast_pan)
    both = np.flatnonzero(fast_pan & (data.scores[:, 0] >= FAST_CAMERA))
    for n, pool, what in ((n_fast, fast, "camera score"), (n_both, both, "object and camera scores")):
        if n and not len(pool):
            raise ValueError(f"refine: no clip of the {len(data)} has {what} >= {FAST_CAMERA:g} to draw from")
    return (n_fast, fast), (n_both, both)


# -- stages 2 and 3: the motion-conditioned UNet ---------------------------------------------
def _motion_task(cfg: DemoTrainConfig, base_folder: str, data: DemoClipDataset, stage: str = "motion",
                 embedder_file: Optional[str] = None, export_dir: Optional[str] = None):
    """The runner task of stage 2 (``stage="motion"``: a fresh embedder on ``base_folder``'s UNet)
    or stage 3 (``"refine"``: ``base_folder`` is stage 2's model and ``embedder_file`` its
    embedder). The trained weights are exported to ``export_dir`` (default ``cfg.out``)."""
    from motion.embedding import MotionScoreEmbedding, load_motion_embedder
    from pipelines import load_model
    from training.diffusion_loss import SVDObjective
    from training.motion_data import collate
    from training.runner import RunnerConfig, TrainTask
    from training.train_motion import MotionTrainModule

    refine = stage == "refine"
    model = load_model(base_folder)
    for comp in (model.vae, model.image_encoder):
        comp.requires_grad_(False).eval()
    if embedder_file is not None:
        embedder = load_motion_embedder(embedder_file, model)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            embedder = MotionScoreEmbedding(model.time_embed_dim, family="svd")
    objective = SVDObjective(model, fps=int(round(cfg.data.fps)), cache_encodings=True)
    module = MotionTrainModule(objective, model.denoiser, embedder)
    eval_images = None
    (n_fast, fast), (n_both, both) = _refine_pools(cfg, data) if refine else ((0, None), (0, None))

    def batch_fn(ctx: Any) -> dict:
        idx = list(ctx.rng.integers(0, len(data), size=cfg.batch - n_fast - n_both))
        if n_fast:
            idx += list(fast[ctx.rng.integers(0, len(fast), size=n_fast)])
        if n_both:
            idx += list(both[ctx.rng.integers(0, len(both), size=n_both)])
        batch = collate([data[int(i)] for i in idx])
        batch["seed"] = int(ctx.rng.integers(0, 2**62))
        return batch

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch["seed"])
        enc = objective.encode(batch, g)
        return m(enc, int(torch.randint(0, 2**62, (1,), generator=g)))

    def eval_fn(m: nn.Module, step: int) -> dict[str, float]:
        nonlocal eval_images
        from training.demo_control import demo_first_frames, measure_control

        if eval_images is None:
            eval_images = demo_first_frames(cfg.eval_images, cfg.seed + 1000, cfg.data)
        with torch.random.fork_rng(devices=[]):
            res = measure_control(model, m.embedder, eval_images, levels=(1, 4, 7, 9), frames=cfg.data.frames,
                                  steps=cfg.eval_steps, fps=cfg.data.fps, full_grid=False)
        return {k: v for k, v in res.metrics().items()}

    def save_fn(m: nn.Module, out_dir: str) -> dict[str, str]:
        return export(cfg, model, m.embedder, export_dir)

    lr, emb_lr = (cfg.refine_lr, cfg.refine_embedder_lr) if refine else (cfg.lr, cfg.embedder_lr)
    task = TrainTask(name=f"demo_{stage}", model=module, batch_fn=batch_fn, loss_fn=loss_fn,
                     trainable=lambda n, p: n.startswith(("embedder.", "denoiser.")),
                     eval_fn=eval_fn if cfg.eval_every else None, save_fn=save_fn,
                     config=cfg.stage_config(stage),
                     param_groups=lambda named: [
                         {"params": [p for n, p in named.items() if n.startswith("embedder.")], "lr": emb_lr},
                         {"params": [p for n, p in named.items() if not n.startswith("embedder.")], "lr": lr}])
    rcfg = RunnerConfig(out_dir=os.path.join(cfg.out, stage), steps=cfg.refine_steps if refine else cfg.steps, lr=lr,
                        seed=cfg.seed + (2 if refine else 0), warmup_steps=cfg.warmup_steps,
                        lr_schedule=cfg.lr_schedule, checkpoint_every=cfg.checkpoint_every,
                        eval_every=cfg.eval_every, progress=cfg.progress)
    return task, rcfg, model, module


def export(cfg: DemoTrainConfig, model: Any, embedder: nn.Module, out: Optional[str] = None) -> dict[str, str]:
    """Write ``out/model`` (the trained diffusers folder) and ``out/motion_embedder.safetensors``
    (its base fingerprint is the trained UNet's); ``out`` defaults to ``cfg.out``."""
    from merging.fingerprint import fingerprint_state
    from motion.embedding import save_motion_embedder

    out = cfg.out if out is None else out
    folder = save_pipeline_atomic(model.pipeline, os.path.join(out, "model"))
    embedder.base_fingerprint = fingerprint_state(model.denoiser.state_dict())
    embedder.family = "svd"
    path = save_motion_embedder(embedder, os.path.join(out, EMBEDDER_FILE),
                                extra={"trained_by": "training.train_demo", "frames": cfg.data.frames,
                                       "height": cfg.data.height, "width": cfg.data.width, "fps": cfg.data.fps})
    return {"model": folder, "embedder": path}


class _Deadline:
    """Runner callback: a KeyboardInterrupt after ``minutes`` (the runner then checkpoints)."""

    def __init__(self, minutes: Optional[float]) -> None:
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.hit = False

    def __call__(self, step: int, total: int, logs: dict) -> None:
        if self.end is not None and time.monotonic() > self.end:
            self.hit = True
            raise KeyboardInterrupt


def train_demo(cfg: DemoTrainConfig, log=print) -> dict[str, Any]:
    """Run the stages (each resumes from its checkpoints; a finished stage 2 is not re-run
    when a stage 3 follows). Returns the summary dict (also
    written to ``out/summary.json``)."""
    from training.checkpoint import atomic_write_json
    from training.runner import run

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    # Stage-2 data settings (score range, loss weights) do not change the autoencoder's clips.
    ae_data = cfg.data.for_autoencoder()
    data = DemoClipDataset(cfg.clips, cfg.seed, cfg.data, progress=cfg.progress)
    if cfg.refine_steps:
        _refine_pools(cfg, data)  # bad stage-3 settings fail now, not after stages 1 and 2
    summary: dict[str, Any] = {"config": {**asdict(cfg), "model": cfg.model.to_json(), "data": cfg.data.to_json()}}

    base = os.path.join(cfg.out, "vae", "model")
    # With a stage 3, stage 2's weights go to DIR/motion/result (stage 3's base) and only the
    # last stage writes DIR/model; a stage that was cut short by --minutes exports to DIR/model.
    stage2_out = os.path.join(cfg.out, "motion", "result") if cfg.refine_steps else cfg.out
    stage2_done = bool(cfg.refine_steps) and _exported(stage2_out)  # a re-run resumes in stage 3
    if stage2_done:
        _check_stage2_settings(cfg)
    if not stage2_done and not os.path.isfile(os.path.join(base, "model_index.json")):
        pipe = build_demo_pipeline(cfg.model, cfg.seed)
        ae_clips = data if ae_data == cfg.data else DemoClipDataset(cfg.clips, cfg.seed, ae_data)
        task, rcfg = _vae_task(cfg, pipe, ae_clips)
        res = run(task, rcfg, log=log)
        summary["vae"] = {"status": res.status, "step": res.step, "final_loss": _last_loss(res.report)}
        if res.status != "completed":
            summary["status"] = "interrupted"
            return summary
    qpath = os.path.join(cfg.out, "vae", "vae_quality.json")
    if os.path.isfile(qpath):
        with open(qpath) as f:
            summary["vae_quality"] = json.load(f)
        ceiling = summary["vae_quality"].get("motion_ceiling")
        if ceiling and not ceiling.get("passed"):
            # Through such a VAE even perfect videos fail the control targets (docs/demo_model.md).
            log(f"warning: motion seen through the VAE fails the control targets ({_fmt(ceiling)}); "
                "train the autoencoder longer (--vae-steps) before trusting stage 2")
    deadline = _Deadline(cfg.minutes)
    if stage2_done:
        res2 = None
    else:
        task, rcfg, model, module = _motion_task(cfg, base, data, export_dir=stage2_out)
        res2 = res = run(task, rcfg, log=log, callback=deadline)
    if cfg.refine_steps and (res2 is None or res2.status == "completed"):
        if res2 is not None:
            summary["motion"] = {"status": res2.status, "step": res2.step, "final_loss": _last_loss(res2.report),
                                 "evals": res2.report.get("eval_history")}
        task, rcfg, model, module = _motion_task(cfg, os.path.join(stage2_out, "model"), data, stage="refine",
                                                 embedder_file=os.path.join(stage2_out, EMBEDDER_FILE))
        res = run(task, rcfg, log=log, callback=deadline)
    files = dict(res.report.get("files") or {})
    if res.status != "completed" and deadline.hit:
        files = export(cfg, model, module.embedder)  # the weights of the last completed step
    summary.update(status=res.status if not deadline.hit else "stopped_by_minutes", step=res.step,
                   steps=rcfg.steps, stage=task.name, files=files, final_loss=_last_loss(res.report),
                   evals=res.report.get("eval_history"), wall_s=time.perf_counter() - t0)
    atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def _check_stage2_settings(cfg: DemoTrainConfig) -> None:
    """A finished stage 2 is reused only if it was trained with these settings."""
    path = os.path.join(cfg.out, "motion", "report.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        done = dict(json.load(f).get("config", {}).get("task", {}))
    done.pop("name", None)
    want = json.loads(json.dumps(cfg.stage_config("motion")))
    if done != want:
        diff = sorted(k for k in set(done) | set(want) if done.get(k) != want.get(k))
        raise ValueError(f"{os.path.join(cfg.out, 'motion', 'result')} was trained with other stage-2 settings "
                         f"({', '.join(diff)} differ); delete {os.path.join(cfg.out, 'motion')} to train stage 2 again")


def _exported(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model", "model_index.json")) and \
        os.path.isfile(os.path.join(folder, EMBEDDER_FILE))


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "passed")


def _last_loss(report: dict, n: int = 50) -> Optional[float]:
    losses = [e["loss"] for e in (report.get("losses") or [])][-n:]
    return float(np.mean(losses)) if losses else None


def build_parser() -> argparse.ArgumentParser:
    d = DemoTrainConfig(out="")
    p = argparse.ArgumentParser(prog="python -m training.train_demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (model/, motion_embedder.safetensors, vae/, motion/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=d.clips, help="synthetic clips rendered into memory")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-check-seeds", type=int, default=d.vae_check_seeds,
                   help="clips per cell of the motion-through-VAE check after stage 1 (0: skip)")
    p.add_argument("--vae-batch", type=int, default=d.vae_batch, help="clips per autoencoder step (all their frames)")
    p.add_argument("--steps", type=int, default=d.steps, help="stage-2 optimisation steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr, help="UNet learning rate (AdamW, cosine after warm-up)")
    p.add_argument("--embedder-lr", type=float, default=d.embedder_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="controllability check every N steps (0: off)")
    p.add_argument("--refine-steps", type=int, default=d.refine_steps,
                   help="stage 3: continue stage 2's weights for this many steps (0: no stage 3)")
    p.add_argument("--refine-lr", type=float, default=d.refine_lr, help="stage 3 UNet learning rate")
    p.add_argument("--refine-embedder-lr", type=float, default=d.refine_embedder_lr)
    p.add_argument("--refine-fast-share", type=float, default=d.refine_fast_share,
                   help=f"stage 3: share of every batch drawn from clips with camera score >= {FAST_CAMERA:g}")
    p.add_argument("--refine-both-fast-share", type=float, default=d.refine_both_fast_share,
                   help=f"stage 3: further share of every batch drawn from clips with both scores >= {FAST_CAMERA:g}")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop training (stage 2 or 3) after this many minutes and export")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--frames", type=int, default=d.data.frames)
    p.add_argument("--size", type=int, default=d.data.height, help="pixel side of the square clips")
    p.add_argument("--max-camera-score", type=float, default=d.data.max_camera_score,
                   help="stage 2: camera scores are drawn in [1, this] (default: the object range's top, 9)")
    p.add_argument("--object-weight", type=float, default=d.data.object_weight,
                   help="stage 2: extra loss weight on the object's pixels (1 + w * coverage, mean-normalised)")
    p.add_argument("--vae-channels", default=",".join(map(str, d.model.vae_channels)),
                   help="VAE channels per level, comma-separated (n levels: 2^(n-1)x downsampling)")
    p.add_argument("--latent-channels", type=int, default=d.model.latent_channels)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if not (a.object_weight >= 0):
        print(f"error: --object-weight {a.object_weight}: expected a number >= 0", file=sys.stderr)
        return 2
    for flag, v in (("--refine-fast-share", a.refine_fast_share), ("--refine-both-fast-share", a.refine_both_fast_share)):
        if not (0.0 <= v <= 1.0):
            print(f"error: {flag} {v}: expected a share in [0, 1]", file=sys.stderr)
            return 2
    if a.refine_fast_share + a.refine_both_fast_share > 1.0:
        print(f"error: --refine-fast-share {a.refine_fast_share} + --refine-both-fast-share "
              f"{a.refine_both_fast_share}: the shares add up to more than a whole batch", file=sys.stderr)
        return 2
    if a.refine_steps < 0:
        print(f"error: --refine-steps {a.refine_steps}: expected a number of steps >= 0", file=sys.stderr)
        return 2
    if a.max_camera_score is not None and not (1.0 < a.max_camera_score <= 10.0):
        print(f"error: --max-camera-score {a.max_camera_score}: expected a score in (1, 10]", file=sys.stderr)
        return 2
    data = DemoDataConfig(frames=a.frames, height=a.size, width=a.size, object_weight=a.object_weight,
                          max_camera_score=a.max_camera_score)
    try:
        vae_channels = tuple(int(c) for c in a.vae_channels.split(","))
    except ValueError:
        print(f"error: --vae-channels {a.vae_channels!r}: expected integers like 64,64", file=sys.stderr)
        return 2
    mcfg = DemoModelConfig(size=a.size, frames=a.frames, vae_channels=vae_channels, latent_channels=a.latent_channels)
    cfg = DemoTrainConfig(out=a.out, seed=a.seed, model=mcfg, data=data, clips=a.clips, vae_steps=a.vae_steps, vae_batch=a.vae_batch, vae_check_seeds=a.vae_check_seeds,
                          steps=a.steps, batch=a.batch, lr=a.lr, embedder_lr=a.embedder_lr, warmup_steps=a.warmup_steps,
                          checkpoint_every=a.checkpoint_every, eval_every=a.eval_every, minutes=a.minutes,
                          refine_steps=a.refine_steps, refine_lr=a.refine_lr, refine_embedder_lr=a.refine_embedder_lr,
                          refine_fast_share=a.refine_fast_share, refine_both_fast_share=a.refine_both_fast_share,
                          threads=a.threads, progress=not a.no_progress)
    try:
        s = train_demo(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s.get('status')} at step {s.get('step')}; files: {s.get('files')}")
    return 0 if s.get("status") in ("completed", "stopped_by_minutes") else 130


if __name__ == "__main__":
    from training.runner import exit_cli

    exit_cli(main())  # several processes: tear the group down, or the launcher may report a crash
