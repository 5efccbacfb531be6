"""The runner refuses sharded data parallelism (FSDP, DeepSpeed) instead of saving wrong checkpoints.

FSDP itself cannot run on this CPU-only machine; these tests check that the refusal happens
before anything is loaded, trained or written, and that one process / DDP still pass the check.
"""
from __future__ import annotations

import os

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from training.runner import RunnerConfig, TrainTask, check_supported_distribution, run


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, "FSDP", "fsdp"])
def test_sharded_types_are_refused(kind) -> None:
    with pytest.raises(NotImplementedError, match="sharded across processes"):
        check_supported_distribution(kind)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, "NO"])
def test_replicated_types_pass(kind) -> None:
    check_supported_distribution(kind)  # no error: every process holds full replicas


class _FakeFSDPAccelerator:
    """Looks like an accelerate Accelerator launched with an FSDP config (rank 1 of 2)."""

    distributed_type = DistributedType.FSDP
    is_main_process = False
    num_processes = 2
    process_index = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):  # any other use (prepare, get_state_dict, barrier...) is recorded
        def record(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"runner used accelerator.{name} before refusing FSDP")
        return record


@pytest.mark.parametrize("main", [True, False])
def test_run_refuses_fsdp_before_touching_anything(tmp_path, main: bool) -> None:
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches: list[int] = []
    task = TrainTask(name="t", model=model, batch_fn=lambda ctx: batches.append(ctx.step),
                     loss_fn=lambda m, b: m(torch.ones(1, 2)).sum())
    acc = _FakeFSDPAccelerator()
    acc.is_main_process = main
    out = tmp_path / "run"
    with pytest.raises(NotImplementedError, match="FSDP"):
        run(task, RunnerConfig(out_dir=str(out), steps=2, progress=False), accelerator=acc)
    # Refused on every rank before any collective call, any batch, any file and any weight change.
    assert acc.calls == [] and batches == []
    assert not os.path.exists(out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_train_motion_refuses_fsdp_before_loading(tmp_path, monkeypatch) -> None:
    import accelerate

    from training.train_motion import MotionTrainConfig, train_motion

    class _FSDPState:
        distributed_type = DistributedType.FSDP
        is_main_process = True

    monkeypatch.setattr(accelerate, "PartialState", _FSDPState)
    out = tmp_path / "out"
    # The model and data paths do not exist: the refusal must come before they are read.
    cfg = MotionTrainConfig(model=str(tmp_path / "no_model"), data=str(tmp_path / "no_data.jsonl"), out=str(out),
                            trainable="full")
    with pytest.raises(NotImplementedError, match="FSDP"):
        train_motion(cfg, log=lambda s: None)
    assert not os.path.exists(out)


def test_train_motion_cli_reports_fsdp_refusal(tmp_path, monkeypatch, capsys) -> None:
    import accelerate

    from training.train_motion import main

    class _FSDPState:
        distributed_type = DistributedType.FSDP
        is_main_process = True

    monkeypatch.setattr(accelerate, "PartialState", _FSDPState)
    rc = main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"),
               "--trainable", "full", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "FSDP" in err and "docs/training.md" in err
