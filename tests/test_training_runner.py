"""The shared training runner: determinism, kill/resume, Ctrl-C, atomic checkpoints, report."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from training import checkpoint as ckpt_mod
from training.checkpoint import list_checkpoints, load_checkpoint
from training.runner import RunnerConfig, StepContext, TrainTask, run, step_seed


class _Crash(RuntimeError):
    """Stands in for SIGKILL: the loop dies without any chance to save."""


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
        self.frozen = nn.Linear(2, 2)

    def forward(self, x):
        return self.frozen(self.body(x))


def _task(die_at: int | None = None, interrupt_at: int | None = None, evals: list | None = None) -> TrainTask:
    torch.manual_seed(0)
    model = TinyNet()
    target = torch.tensor([[1.0, -1.0]])

    def batch_fn(ctx: StepContext):
        if die_at is not None and ctx.step == die_at:
            raise _Crash(f"killed before step {ctx.step}")
        if interrupt_at is not None and ctx.step == interrupt_at and ctx.micro == 1:
            raise KeyboardInterrupt
        x = torch.from_numpy(ctx.rng.standard_normal((6, 4))).float()
        return {"x": x, "y": x[:, :2] * target}

    def loss_fn(m, batch):
        loss = ((m(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"mse": loss.item()}

    def eval_fn(m, step):
        if evals is not None:
            evals.append(step)
        x = torch.ones(3, 4)
        return {"out": float(m(x).sum())}

    def save_fn(m, out):
        path = os.path.join(out, "final.safetensors")
        ckpt_mod.atomic_save_safetensors(path, m.state_dict())
        return {"model": path}

    return TrainTask(name="tiny", model=model, batch_fn=batch_fn, loss_fn=loss_fn,
                     trainable=lambda n, p: n.startswith("body."), eval_fn=eval_fn, save_fn=save_fn,
                     config={"kind": "tiny"})


def _cfg(out, **kw) -> RunnerConfig:
    base = dict(out_dir=str(out), steps=7, lr=0.05, grad_accum=2, checkpoint_every=3, eval_every=4,
                lr_schedule="cosine", warmup_steps=2, progress=False, seed=123)
    base.update(kw)
    return RunnerConfig(**base)


def _weights(task: TrainTask) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def _quiet(*a, **k):
    pass


def test_step_seed_is_pure_and_distinct():
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3)
    assert len({step_seed(1, s, m) for s in range(20) for m in range(3)}) == 60
    assert step_seed(1, 2) != step_seed(2, 2)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    full = _task()
    r = run(full, _cfg(tmp_path / "a"), log=_quiet)
    assert r.status == "completed" and r.step == 7

    with pytest.raises(_Crash):
        run(_task(die_at=5), _cfg(tmp_path / "b"), log=_quiet)
    # The crash at step 5 leaves the periodic checkpoint of step 3 (checkpoint_every=3).
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [3]
    resumed = _task()
    r2 = run(resumed, _cfg(tmp_path / "b"), log=_quiet)
    assert r2.status == "completed" and r2.step == 7
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical, batch-norm statistics included
    # The frozen layer is not checkpointed (it never changes).
    state = load_checkpoint(r2.checkpoint)
    assert not any(k.startswith("frozen.") for k in state.model)
    assert "body.1.running_mean" in state.model

    rep = json.load(open(tmp_path / "b" / "report.json"))
    assert rep["status"] == "completed" and rep["steps_done"] == 7
    # outputs get the permissions of a plain open()/mkdir (temporary files start 0600/0700)
    assert os.stat(tmp_path / "b" / "report.json").st_mode & 0o777 == ckpt_mod._umask_mode()
    assert os.stat(r2.checkpoint).st_mode & 0o444 == ckpt_mod._umask_mode() & 0o444
    assert [e["step"] for e in rep["losses"]] == list(range(1, 8))
    assert [e["loss"] for e in rep["losses"]] == [e["loss"] for e in r.report["losses"]]
    assert [e["step"] for e in rep["eval_history"]] == [4, 7]
    assert rep["files"]["model"].endswith("final.safetensors") and os.path.isfile(rep["files"]["model"])
    assert [s["started_at_step"] for s in rep["sessions"]] == [3]  # the crashed session left no record


def test_frozen_parameters_do_not_change(tmp_path):
    t = _task()
    before = t.model.frozen.weight.detach().clone()
    run(t, _cfg(tmp_path, steps=3, checkpoint_every=0, eval_every=0), log=_quiet)
    assert torch.equal(before, t.model.frozen.weight)
    assert not t.model.frozen.weight.requires_grad


def test_keyboard_interrupt_saves_and_resume_matches(tmp_path):
    evals: list[int] = []
    r = run(_task(interrupt_at=5, evals=evals), _cfg(tmp_path / "i"), log=_quiet)
    assert r.status == "interrupted" and r.step == 5
    assert r.checkpoint.endswith("step_00000005") and os.path.isdir(r.checkpoint)
    rep = json.load(open(tmp_path / "i" / "report.json"))
    assert rep["status"] == "interrupted" and rep["files"] == {}
    assert not os.path.exists(tmp_path / "i" / "final.safetensors")
    resumed = _task()
    assert run(resumed, _cfg(tmp_path / "i"), log=_quiet).status == "completed"
    full = _task()
    run(full, _cfg(tmp_path / "f"), log=_quiet)
    for k, v in _weights(full).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def flaky_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # 2 files per checkpoint: die inside the second checkpoint's first file
            with open(path, "wb") as f:
                f.write(b"\x00" * 10)
            raise _Crash("disk died")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky_save)
    with pytest.raises(_Crash):
        run(_task(), _cfg(out, checkpoint_every=2, keep_checkpoints=1), log=_quiet)
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["step_00000002"], names  # the half-written one was removed, not renamed in
    ck = load_checkpoint(str(out / "checkpoints" / "step_00000002"))
    assert ck.step == 2
    resumed = _task()
    assert run(resumed, _cfg(out, checkpoint_every=2, keep_checkpoints=1), log=_quiet).step == 7
    full = _task()
    run(full, _cfg(tmp_path / "full", checkpoint_every=2, keep_checkpoints=1), log=_quiet)
    for k, v in _weights(full).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    out = tmp_path / "d"
    with pytest.raises(_Crash):
        run(_task(die_at=5), _cfg(out, checkpoint_every=2, keep_checkpoints=3), log=_quiet)
    with open(out / "checkpoints" / "step_00000004" / "model.safetensors", "wb") as f:
        f.write(b"garbage")
    msgs: list[str] = []
    r = run(_task(), _cfg(out, checkpoint_every=2, keep_checkpoints=3), log=msgs.append)
    assert r.step == 7
    assert any("skipping unreadable checkpoint" in m and "step_00000004" in m for m in msgs)
    assert any("resuming from" in m and "step_00000002" in m for m in msgs)


def test_resume_with_different_settings_is_refused(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(_Crash):
        run(_task(die_at=4), _cfg(out), log=_quiet)
    with pytest.raises(ckpt_mod.CheckpointError, match="lr"):
        run(_task(), _cfg(out, lr=0.01), log=_quiet)
    # more steps is fine; --fresh starts over
    assert run(_task(), _cfg(out, steps=8), log=_quiet).step == 8
    r8 = json.load(open(out / "report.json"))
    assert [(s["started_at_step"], s["ended_at_step"]) for s in r8["sessions"]] == [(3, 8)]
    r9 = run(_task(), _cfg(out, steps=9), log=_quiet)  # a finished run extended: both sessions kept
    assert [(s["started_at_step"], s["ended_at_step"]) for s in r9.report["sessions"]] == [(3, 8), (8, 9)]
    r = run(_task(), _cfg(out, lr=0.01, resume="fresh", steps=2), log=_quiet)
    assert r.step == 2 and r.report["sessions"][0]["started_at_step"] == 0


def test_optimizer_state_round_trips_without_pickle():
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    tensors, rest = ckpt_mod.optimizer_to_tensors(opt.state_dict())
    json.dumps(rest)
    opt2 = torch.optim.AdamW([nn.Parameter(p.detach().clone())], lr=0.5)
    opt2.load_state_dict(ckpt_mod.optimizer_from_tensors(tensors, rest))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and opt2.param_groups[0]["lr"] == 0.1
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])


def test_bf16_and_back_in_one_process(tmp_path):
    r = run(_task(), _cfg(tmp_path / "bf", steps=2, mixed_precision="bf16", checkpoint_every=0), log=_quiet)
    assert r.status == "completed" and r.report["mixed_precision"] == "bf16"
    assert all(np.isfinite(e["loss"]) for e in r.report["losses"])
    r = run(_task(), _cfg(tmp_path / "fp", steps=2, checkpoint_every=0), log=_quiet)
    assert r.status == "completed" and r.report["mixed_precision"] == "no"


def test_callback_error_saves_checkpoint(tmp_path):
    def cb(step, total, logs):
        assert total == 7 and "loss" in logs
        if step == 2:
            raise RuntimeError("cancelled by the user")

    with pytest.raises(RuntimeError, match="cancelled"):
        run(_task(), _cfg(tmp_path, checkpoint_every=0), callback=cb, log=_quiet)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    state = load_checkpoint(str(tmp_path / "checkpoints" / "step_00000002")).state
    assert state["history"]["sessions"][-1]["status"] == "stopped by callback (RuntimeError)"
    r = run(_task(), _cfg(tmp_path, checkpoint_every=0), log=_quiet)  # resumes and records both sessions
    assert [s["started_at_step"] for s in r.report["sessions"]] == [0, 2]
