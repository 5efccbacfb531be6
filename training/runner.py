"""The one training loop shared by every MotionDial trainer.

A trainer describes *what* to train with a :class:`TrainTask` (model, which parameters train, how
to draw a batch for a step, the loss, evaluation, how to save the result); :func:`run` does the
rest: accelerate (CPU with plain ``python -m``, several GPUs under ``accelerate launch``), mixed
precision, gradient accumulation and clipping, AdamW with warm-up and a decay schedule, a tqdm
bar, periodic evaluation, atomic checkpoints, resume, Ctrl-C, and a JSON report. Under FSDP
(``accelerate launch`` with an FSDP config) the model and optimizer state are sharded across the
processes; checkpoints and final files still hold full tensors (``training.sharded``).

Determinism: the batch of step ``s`` (micro-batch ``m``, process ``r``) is drawn from
``StepContext.rng``, a generator seeded by ``(seed, s, m, r)``, and torch's global RNG is re-seeded
from the same tuple before each micro-batch. Data order is therefore a pure function of
``(seed, step)``, and a run killed at any moment and resumed from its last checkpoint ends with
the *same* weights as an uninterrupted run (bit-identical on the same machine and thread count).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, NoReturn

import numpy as np
import torch
from torch import nn

from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_json,
    capture_rng,
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_rng,
    save_checkpoint,
)
from training.sharded import (
    UNSUPPORTED_TYPES,
    ShardedState,
    distributed_name,
    enable_fsdp_on_cpu,
    fsdp_version,
    is_sharded,
)

REPORT_FORMAT = "motiondial.train_report"
# Settings that may change between a run and its resumption (they do not change the trajectory).
_RESUMABLE_CHANGES = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "progress", "resume", "out_dir",
                      "log_every"}


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, *keys)`` (well mixed by ``SeedSequence``)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) & 0xFFFFFFFF for k in keys)])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64))


@dataclass
class StepContext:
    """What a batch function gets: where in the run we are and a generator to draw with.

    ``rng`` is seeded by ``(seed, step, micro, process_index)``: drawing the batch only from it
    makes data order a pure function of the seed and the step (the resume guarantee).
    """

    step: int  # 0-based index of the optimisation step being computed
    micro: int  # 0-based index of the micro-batch within the step (gradient accumulation)
    process_index: int
    num_processes: int
    seed: int
    rng: np.random.Generator


@dataclass
class TrainTask:
    """What a trainer plugs into :func:`run`.

    Attributes:
        name: short name used in the report (``"estimator"``, ``"motion"``...).
        model: the module to train (already built and initialised by the trainer).
        batch_fn: ``(ctx: StepContext) -> batch``; any nesting of dict/list/tuple of tensors
            (moved to the device by the runner) and other values. Must draw only from ``ctx.rng``.
        loss_fn: ``(model, batch) -> loss`` or ``(loss, logs)``: scalar tensor and a dict of floats
            to log (averaged over micro-batches). Runs under autocast when mixed precision is on.
        trainable: which parameters train: ``None`` = those with ``requires_grad``, a list of
            names, or a predicate ``(name, param) -> bool``; the others get ``requires_grad=False``.
        eval_fn: ``(model, step) -> dict[str, float]``, run on the main process, in ``eval()`` mode
            under ``torch.no_grad()``, every ``eval_every`` steps and at the end. Under FSDP it
            runs on *every* process with the sharded model (its forward passes gather the
            parameters collectively, so every process must make the same calls; parameters read
            directly are local shards); the main process's metrics are recorded.
        save_fn: ``(model, out_dir) -> dict[str, str]`` (name -> file written), called once on the
            main process when training completes; writes the final artefacts (atomically). Under
            FSDP ``model`` is an unsharded copy of the module tree holding the full trained
            tensors on the CPU (for reading weights, not for forward passes).
        config: JSON-able settings of the trainer that shape the trajectory (data, loss weights...):
            recorded in checkpoints and the report; a resume with a different config is refused.
        param_groups: optional ``(named_trainable: dict[str, Parameter]) -> list[dict]`` to give
            groups their own lr/weight decay; default one group.
    """

    name: str
    model: nn.Module
    batch_fn: Callable[[StepContext], Any]
    loss_fn: Callable[[nn.Module, Any], Any]
    trainable: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None
    eval_fn: Callable[[nn.Module, int], Mapping[str, float]] | None = None
    save_fn: Callable[[nn.Module, str], Mapping[str, str]] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    param_groups: Callable[[dict[str, nn.Parameter]], list[dict]] | None = None


@dataclass
class RunnerConfig:
    """Settings of the loop itself (the trainer's own settings live in ``TrainTask.config``)."""

    out_dir: str
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    grad_accum: int = 1
    clip_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 100  # 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (resume if checkpoints exist) | fresh | path to a checkpoint folder
    progress: bool = True
    log_every: int = 1  # record the loss of every n-th step in the report

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.eval_every < 0 or self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError("eval_every and checkpoint_every must be >= 0, log_every >= 1")


@dataclass
class TrainResult:
    """What :func:`run` returns (also written to ``<out_dir>/report.json``)."""

    status: str  # "completed" | "interrupted"
    step: int
    report: dict
    report_path: str | None
    checkpoint: str | None


def _lr_factor(cfg: RunnerConfig) -> Callable[[int], float]:
    warm, total, kind = cfg.warmup_steps, max(cfg.steps, 1), cfg.lr_schedule

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac

    return factor


def _select_trainable(model: nn.Module, trainable) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if trainable is None:
        chosen = {n for n, p in named.items() if p.requires_grad}
    elif callable(trainable):
        chosen = {n for n, p in named.items() if trainable(n, p)}
    else:
        chosen = set(trainable)
        unknown = sorted(chosen - set(named))
        if unknown:
            raise ValueError(f"trainable names not in the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if not chosen:
        raise ValueError("no trainable parameters selected")
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    return {n: named[n] for n in named if n in chosen}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        loss, logs = out
    else:
        loss, logs = out, {}
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("loss_fn must return a scalar tensor (or (scalar tensor, dict of floats))")
    return loss, {k: float(v) for k, v in logs.items()}


def check_supported_distribution(distributed_type: Any, fsdp_version: int | None = None) -> None:
    """Refuse DeepSpeed, Megatron-LM and FSDP1 with a clear error (one process, DDP and FSDP2 are supported).

    DeepSpeed's and Megatron-LM's engines own the optimizer, its state and gradient clipping; the
    runner builds and checkpoints the optimizer itself (AdamW, state as full safetensors) and
    would save wrong state or hang. FSDP1 (flat parameters) is untested: torch's FSDP1 crashes on
    CPU, where the sharded path is tested. ``distributed_type``: ``accelerator.distributed_type``
    (an ``accelerate.DistributedType``, a ``str`` enum) or its name; ``fsdp_version``: the FSDP
    plugin's (``None``: not known yet).
    """
    name = distributed_name(distributed_type)
    if name in UNSUPPORTED_TYPES:
        raise NotImplementedError(
            f"the MotionDial training runner does not support accelerate distributed_type {name}: its engine owns "
            "the optimizer and shards its state, which the runner builds, checkpoints and resumes itself. Use one "
            "process, DDP (accelerate launch --multi_gpu) or FSDP2 (configs/accelerate_fsdp_cogvideox5b.yaml); see "
            "docs/training.md (\"Sharded training (FSDP)\").")
    if name == "FSDP" and fsdp_version is not None and int(fsdp_version) != 2:
        raise NotImplementedError(
            f"the MotionDial training runner supports FSDP2 only (torch fully_shard), not fsdp_version {fsdp_version}: "
            "set `fsdp_version: 2` in the accelerate config (see configs/accelerate_fsdp_cogvideox5b.yaml and "
            "docs/training.md, \"Sharded training (FSDP)\").")


def _state_tensors(model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Trainable parameters plus persistent buffers (e.g. batch-norm statistics)."""
    sd = model.state_dict()
    params = dict(model.named_parameters())
    return {k: v for k, v in sd.items() if k in trainable or k not in params}


class _SigintFlag:
    """Turns the first Ctrl-C into a flag checked between steps (a second one interrupts at once)."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except ValueError:
                self._old = None
        return self

    def _handler(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run(task: TrainTask, cfg: RunnerConfig, *, accelerator=None, callback: Callable[[int, int, dict], None] | None = None,
        log: Callable[[str], None] = print) -> TrainResult:
    """Train ``task`` for ``cfg.steps`` optimisation steps (resuming if checkpoints exist).

    Writes ``<out_dir>/checkpoints/step_*/`` every ``cfg.checkpoint_every`` steps, at the end and on
    Ctrl-C; calls ``task.save_fn`` and writes ``<out_dir>/report.json`` at the end. ``callback(step,
    total, logs)`` is called after every step on the main process; if it raises, a checkpoint is
    saved and the exception propagates. Returns a :class:`TrainResult` (status ``"interrupted"``
    after Ctrl-C / ``KeyboardInterrupt``, with a checkpoint of the last completed step).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    if accelerator is None:
        accelerator = _make_accelerator(Accelerator, cfg.mixed_precision)
    check_supported_distribution(getattr(accelerator, "distributed_type", "NO"), fsdp_version(accelerator))
    sharded = is_sharded(accelerator)
    main = accelerator.is_main_process
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    if main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        clean_partial(ckpt_root)
    torch.manual_seed(step_seed(cfg.seed, 1 << 30))

    model = task.model
    trainable = _select_trainable(model, task.trainable)
    groups = task.param_groups(trainable) if task.param_groups else [{"params": list(trainable.values())}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))
    # Sharding replaces the parameters: record names, order and the module tree first.
    shard_state = ShardedState(model, optimizer, trainable) if sharded else None

    run_config = {"runner": _jsonable_cfg(cfg), "task": {"name": task.name, **dict(task.config)},
                  "num_processes": accelerator.num_processes, "trainable_parameters": sum(p.numel() for p in trainable.values())}
    history: dict[str, Any] = {"losses": [], "evals": [], "sessions": [], "elapsed_s": 0.0}

    # ---- resume -------------------------------------------------------------------------------
    start = 0
    resumed_from = None
    if cfg.resume == "fresh":
        if main and os.path.isdir(ckpt_root):
            import shutil

            shutil.rmtree(ckpt_root)
    else:
        if cfg.resume not in ("auto",) and not os.path.isdir(cfg.resume):
            raise ValueError(f"resume must be 'auto', 'fresh' or a checkpoint folder; {cfg.resume!r} is none of them")
        ckpt = None
        sharded_resume = None
        if sharded:
            ckpt, sharded_resume = _read_checkpoint_sharded(accelerator, cfg.resume, ckpt_root, shard_state, log)
        elif cfg.resume == "auto":
            ckpt = load_latest(ckpt_root, warn=log if main else (lambda s: None))
        else:
            ckpt = load_checkpoint(cfg.resume)
        if ckpt is not None:
            _check_same_run(ckpt.state.get("config", {}), run_config, ckpt.path)
            if not sharded:  # sharded: loaded into the shards after accelerator.prepare
                _load_model_state(model, trainable, ckpt.model, ckpt.path)
                opt_tensors = {k: v for k, v in ckpt.optimizer.items() if k.startswith("state.")}
                try:
                    optimizer.load_state_dict(optimizer_from_tensors(opt_tensors, ckpt.state["optimizer"]))
                    scheduler.load_state_dict(ckpt.state["scheduler"])
                except (KeyError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{ckpt.path}: optimizer state does not fit this model ({e})") from e
            restore_rng(ckpt.optimizer, ckpt.state.get("rng", {}))
            history = ckpt.state.get("history", history)
            start = ckpt.step
            resumed_from = ckpt.path
            if not sharded:  # copied into the model and optimizer: do not hold a second copy while training
                ckpt.model.clear()
                ckpt.optimizer.clear()
            if main:
                log(f"resuming from {ckpt.path} (step {start}/{cfg.steps})")

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch.optim
    if sharded and resumed_from is not None:
        opt_dict, has_opt_state = sharded_resume
        shard_state.load(model, torch_optimizer, ckpt.model if main else None, opt_dict, with_optimizer_state=has_opt_state)
        # The main process's full copy (~3x the trainable weights) is not needed while training.
        ckpt.model.clear()
        ckpt.optimizer.clear()
        opt_dict = sharded_resume = None
        try:
            scheduler.load_state_dict(ckpt.state["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: scheduler state does not fit this run ({e})") from e
    # FSDP clips through the sharded module's own parameters (its norm is a collective over shards);
    # frozen parameters have no gradient and do not count.
    clip_params = list(model.parameters()) if sharded else list(trainable.values())
    session = {"started_at_step": start, "resumed_from": resumed_from, "start_time": time.time()}
    t0 = time.perf_counter()
    elapsed_before = float(history.get("elapsed_s", 0.0))

    def checkpoint(step: int) -> str | None:
        accelerator.wait_for_everyone()
        path = None
        if sharded:  # a collective call: every process takes part, the main one gets full tensors
            model_tensors, opt_state = shard_state.gather(model, torch_optimizer)
        if main:
            if not sharded:
                model_tensors, opt_state = _state_tensors(raw_model, trainable), optimizer.state_dict()
            opt_tensors, opt_rest = optimizer_to_tensors(opt_state)
            rng_tensors, rng_rest = capture_rng()
            history["elapsed_s"] = elapsed_before + time.perf_counter() - t0
            state = {
                "config": run_config,
                "optimizer": opt_rest,
                "scheduler": _jsonable_sched(scheduler.state_dict()),
                "rng": rng_rest,
                "history": history,
            }
            path = save_checkpoint(ckpt_root, step, model_tensors, {**opt_tensors, **rng_tensors}, state,
                                   keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    def evaluate(step: int) -> None:
        if task.eval_fn is None:
            return
        accelerator.wait_for_everyone()
        if main or sharded:  # sharded: forward passes gather parameters, every process must run them
            was_training = raw_model.training
            raw_model.eval()
            with torch.no_grad(), accelerator.autocast():
                metrics = {k: float(_local(v)) for k, v in task.eval_fn(raw_model, step).items()}
            raw_model.train(was_training)
            if main:
                history["evals"].append({"step": step, **metrics})
                log(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()

    status, step, last_ckpt, buffers = "completed", start, None, None
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {task.name}", unit="step", disable=not (main and cfg.progress))
    model.train()
    try:
        with _SigintFlag() as sigint:
            while step < cfg.steps:
                if _any_process(accelerator, sigint.hit):
                    raise KeyboardInterrupt
                # Forward passes may change buffers (batch-norm statistics) before the step completes;
                # an interrupt mid-step restores them so the checkpoint is exactly "after step - 1".
                buffers = {k: b.detach().clone() for k, b in raw_model.named_buffers()}
                logs_sum: dict[str, float] = {}
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    key = (step, micro, accelerator.process_index)
                    torch.manual_seed(step_seed(cfg.seed, *key))
                    ctx = StepContext(step=step, micro=micro, process_index=accelerator.process_index,
                                      num_processes=accelerator.num_processes, seed=cfg.seed,
                                      rng=np.random.default_rng(step_seed(cfg.seed, *key, 1)))
                    batch = _to_device(task.batch_fn(ctx), accelerator.device)
                    sync = micro == cfg.grad_accum - 1
                    with (accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else _nullcontext()):
                        with accelerator.autocast():
                            loss, logs = _split_loss(task.loss_fn(model, batch))
                        accelerator.backward(loss / cfg.grad_accum)
                    loss_sum += float(loss.detach()) / cfg.grad_accum
                    for k, v in logs.items():
                        logs_sum[k] = logs_sum.get(k, 0.0) + v / cfg.grad_accum
                grad_norm = None
                if cfg.clip_grad_norm:
                    grad_norm = float(_local(accelerator.clip_grad_norm_(clip_params, cfg.clip_grad_norm)))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                buffers = None
                if accelerator.num_processes > 1:
                    loss_sum = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(f"loss became {loss_sum} at step {step}; lower the learning rate")
                entry = {"step": step, "loss": loss_sum, "lr": lr, **logs_sum}
                if grad_norm is not None:
                    entry["grad_norm"] = grad_norm
                if step % cfg.log_every == 0 or step == cfg.steps:
                    history["losses"].append(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4g}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    evaluate(step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    last_ckpt = checkpoint(step)
                if callback is not None:
                    stop = None
                    if main:
                        try:
                            callback(step, cfg.steps, entry)
                        except BaseException as e:
                            stop = e
                    # Every process must take part in the checkpoint (a barrier; under FSDP a gather)
                    # and then leave the same way: a KeyboardInterrupt leads to one more (collective)
                    # checkpoint below, so the other processes raise one too.
                    code = 0 if stop is None else 1 if isinstance(stop, KeyboardInterrupt) else 2
                    code = _main_process_code(accelerator, code)
                    if code:
                        name = type(stop).__name__ if stop is not None else "on the main process"
                        history["sessions"].append({**session, "ended_at_step": step, "wall_s": time.perf_counter() - t0,
                                                    "status": f"stopped by callback ({name})"})
                        last_ckpt = checkpoint(step)
                        if stop is not None:
                            raise stop
                        if code == 1:
                            raise KeyboardInterrupt
                        raise RuntimeError(f"stopped at step {step}: the main process's callback raised")
    except KeyboardInterrupt:
        # Parameters are those of the last completed step: any partial micro-batch only touched grads.
        optimizer.zero_grad(set_to_none=True)
        if buffers is not None:
            with torch.no_grad():
                for k, b in raw_model.named_buffers():
                    if k in buffers:
                        b.copy_(buffers[k])
        status = "interrupted"
        if main:
            bar.write(f"interrupted: saving a checkpoint at step {step}")
    finally:
        bar.close()

    if status == "completed":
        if not history["evals"] or history["evals"][-1]["step"] != step:
            evaluate(step)
    # The session is recorded before the final checkpoint so that a later resume keeps it.
    session.update(ended_at_step=step, status=status, wall_s=time.perf_counter() - t0)
    history["sessions"].append(session)
    last_ckpt = checkpoint(step)
    history["elapsed_s"] = elapsed_before + time.perf_counter() - t0

    files: dict[str, str] = {}
    report_path = None
    report: dict[str, Any] = {}
    export_model = raw_model
    if sharded and status == "completed" and task.save_fn is not None:
        full = shard_state.full_model_state(model)  # collective; full tensors on the main process only
        export_model = shard_state.full_model(full) if main else None
    if main:
        if status == "completed" and task.save_fn is not None:
            files = dict(task.save_fn(export_model, cfg.out_dir))
        losses = [e["loss"] for e in history["losses"]]
        report = {
            "format": REPORT_FORMAT,
            "status": status,
            "steps_done": step,
            "steps": cfg.steps,
            "config": run_config,
            "mixed_precision": cfg.mixed_precision,
            "device": str(accelerator.device),
            "distributed_type": distributed_name(getattr(accelerator, "distributed_type", "NO")),
            "wall_time_s": round(history["elapsed_s"], 3),
            "final_loss": losses[-1] if losses else None,
            "final_eval": history["evals"][-1] if history["evals"] else None,
            "eval_history": history["evals"],
            "losses": history["losses"],
            "sessions": history["sessions"],
            "checkpoint": last_ckpt,
            "files": files,
        }
        report_path = os.path.join(cfg.out_dir, "report.json")
        atomic_write_json(report_path, report)
    accelerator.wait_for_everyone()
    return TrainResult(status=status, step=step, report=report, report_path=report_path, checkpoint=last_ckpt)


def multi_process_cpu() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without a GPU: accelerate then
    needs ``cpu=True`` (``Accelerator`` / ``PartialState``) to set up gloo, or each process would
    train alone. Trainers that make a ``PartialState`` before :func:`run` pass it this too."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def shutdown_distributed() -> None:
    """Tear the process group down at the end of a multi-process CLI (no-op otherwise).

    A process that exits with its gloo/NCCL process group still alive may abort in the C++
    destructors ("terminate called without an active exception") after training completed,
    and the launcher then reports the whole run as failed. Every process must call it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_cli(code: int) -> NoReturn:
    """End a trainer's ``__main__`` with exit status ``code`` (0 done, 2 bad input, 130 stopped).

    One process: ``sys.exit(code)``. Several processes (``accelerate launch``, ``torchrun``):
    :func:`shutdown_distributed`, flush, then ``os._exit(code)``. Even after
    ``destroy_process_group`` a process can abort in interpreter teardown ("terminate called
    without an active exception" from gloo's C++ destructors; about 1 FSDP2 run in 15 on 2 busy
    cores here, presumably because objects such as FSDP2's DTensor meshes still reference the
    group) after training completed, and the launcher then reports the run as failed.
    Everything the run writes is written atomically before this point, so skipping the
    interpreter's teardown loses nothing.
    """
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    shutdown_distributed()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe must not turn a finished run into a crash
            pass
    os._exit(code)


def _make_accelerator(cls, mixed_precision: str):
    """An ``Accelerator``; in a single process, a previous one with another precision is replaced.

    accelerate keeps its state in a process-wide singleton that refuses a second precision;
    library callers (ComfyUI, tests) may run several trainings in one process.
    """
    from accelerate.state import AcceleratorState, GradientState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision and \
            state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    multi_cpu = multi_process_cpu()
    accelerator = cls(mixed_precision=mixed_precision, cpu=multi_cpu)
    if multi_cpu:
        # accelerate launch with an FSDP config on CPU: accelerate would fall back to plain data
        # parallelism; torch's FSDP runs on CPU (gloo), so honour the config (what the tests use).
        enable_fsdp_on_cpu(accelerator, mixed_precision)
    return accelerator


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def _main_process_code(accelerator, code: int) -> int:
    """The main process's ``code`` on every process (the others pass 0)."""
    if accelerator.num_processes == 1:
        return code
    t = torch.tensor(float(code if accelerator.is_main_process else 0), device=accelerator.device)
    return int(accelerator.reduce(t, "sum").item())


def _local(x: Any) -> Any:
    """A replicated DTensor (FSDP2's gradient norm, metrics of sharded models) as a plain tensor."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


def _read_checkpoint_sharded(accelerator, resume: str, root: str, shard_state: ShardedState, log) -> tuple[Checkpoint | None, Any]:
    """Under FSDP only the main process reads checkpoint tensors (it broadcasts them later); it
    picks the checkpoint (falling back past damaged ones), checks that it fits, and tells the other
    processes, which read only its JSON state and RNG. Returns ``(checkpoint, (optimizer state
    dict on the main process or None, whether it has optimizer state))``; errors are raised on
    every process alike."""
    import torch.distributed as dist

    main = accelerator.is_main_process
    ckpt, opt_dict, msg = None, None, [None, None, False]  # path, error, has optimizer state
    if main:
        try:
            ckpt = load_latest(root, warn=log) if resume == "auto" else load_checkpoint(resume)
            if ckpt is not None:
                opt_tensors = {k: v for k, v in ckpt.optimizer.items() if k.startswith("state.")}
                opt_dict = optimizer_from_tensors(opt_tensors, ckpt.state["optimizer"])
                msg = [ckpt.path, shard_state.check(ckpt.model, opt_dict, ckpt.path), bool(opt_dict["state"])]
        except Exception as e:  # any error must reach the other processes, or they wait for the broadcast forever
            msg = [None, f"{e}" if isinstance(e, CheckpointError) else f"{resume}: cannot read checkpoint ({e!r})", False]
    if accelerator.num_processes > 1:
        dist.broadcast_object_list(msg, src=0)
    path, error, has_opt_state = msg
    if error:
        raise CheckpointError(error)
    if path is None:
        return None, (None, False)
    if not main:
        ckpt = load_checkpoint(path, tensors=False)
    return ckpt, (opt_dict, has_opt_state)


def _jsonable_cfg(cfg: RunnerConfig) -> dict:
    d = asdict(cfg)
    d["betas"] = list(cfg.betas)
    return d


def _jsonable_sched(sd: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sd.items()}


def _check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    if not saved:
        return
    diffs = []
    for k in sorted(set(saved.get("runner", {})) | set(current["runner"])):
        if k in _RESUMABLE_CHANGES:
            continue
        if saved.get("runner", {}).get(k) != current["runner"].get(k):
            diffs.append(f"{k}: {saved.get('runner', {}).get(k)!r} -> {current['runner'].get(k)!r}")
    for k in sorted(set(saved.get("task", {})) | set(current["task"])):
        if saved.get("task", {}).get(k) != current["task"].get(k):
            diffs.append(f"task.{k}: {saved.get('task', {}).get(k)!r} -> {current['task'].get(k)!r}")
    if saved.get("num_processes") != current.get("num_processes"):
        diffs.append(f"num_processes: {saved.get('num_processes')} -> {current.get('num_processes')}")
    if diffs:
        raise CheckpointError(f"{where} was written by a run with different settings ({'; '.join(diffs)}); "
                              "resume with the same settings, or start over with --fresh / another --out")


def _load_model_state(model: nn.Module, trainable: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor],
                      where: str) -> None:
    missing = sorted(set(trainable) - set(tensors))
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if missing or unknown:
        raise CheckpointError(f"{where}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}")
            own[k].copy_(v)


__all__ = ["RunnerConfig", "StepContext", "TrainResult", "TrainTask", "check_supported_distribution", "multi_process_cpu",
           "run", "shutdown_distributed", "exit_cli", "step_seed", "list_checkpoints"]
