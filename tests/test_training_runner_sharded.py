"""The runner under FSDP2, really sharded: 2 CPU processes (gloo) launched by ``accelerate launch``
with an FSDP config, against one process; SIGKILL mid-run and resume; what stays refused.

accelerate itself only enables FSDP on GPUs; the runner switches a CPU launch with an FSDP config
to FSDP (``training.sharded.enable_fsdp_on_cpu``), so these runs go through accelerate's own FSDP2
preparation (``fully_shard`` per block, optimizer re-pointed at the DTensor shards), its
``no_sync`` / ``clip_grad_norm_`` for FSDP2, and the runner's collective gather / broadcast of state.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from training_procs import wait_for_checkpoint
from torch import nn

from training.runner import RunnerConfig, TrainTask, check_supported_distribution, run
from training.sharded import ShardedState, meta_skeleton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

SCRIPT = r'''
import os, sys, time
import numpy as np, torch
from torch import nn
torch.set_num_threads(1)
from training.runner import RunnerConfig, TrainTask, exit_cli, run
from training.checkpoint import atomic_save_safetensors
out, steps, delay, accum = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
    def forward(self, x):
        return self.norm(x + torch.tanh(self.lin(x)))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)  # frozen: sharded too, but not trained nor checkpointed
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 1)
        self.register_buffer("scale", torch.tensor([0.5]))
    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h) * self.scale

torch.manual_seed(0)
model = Net()
model.inp.requires_grad_(False)

def batch_fn(ctx):
    # Slow enough for the parent to kill it mid-run; 10x slower from step 4 on (where the parent
    # strikes), so a parent starved of CPU on a loaded machine still finds the run unfinished.
    time.sleep(delay if ctx.step < 4 else 10 * delay)
    # The same samples whether they are split over processes or over micro-batches of one process.
    g = ctx.micro * ctx.num_processes + ctx.process_index
    r = np.random.default_rng([5, ctx.step, g])
    x = torch.from_numpy(r.standard_normal((8, 4))).float()
    return x, torch.sin(x.sum(1, keepdim=True))

xe = torch.linspace(-1, 1, 24).reshape(6, 4)
def eval_fn(m, step):
    return {"mse": float(((m(xe) - torch.cos(xe.sum(1, keepdim=True))) ** 2).mean())}

def save_fn(m, d):
    p = os.path.join(d, "final.safetensors"); atomic_save_safetensors(p, m.state_dict()); return {"model": p}

class Stop(Exception):
    pass

stop_at = int(os.environ.get("STOP_AT", "0"))
def callback(step, total, logs):  # called on the main process only, like a UI's progress hook
    if step == stop_at:
        raise KeyboardInterrupt if os.environ.get("STOP_KIND") == "interrupt" else Stop

task = TrainTask(name="fsdp", model=model, batch_fn=batch_fn, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                 eval_fn=eval_fn, save_fn=save_fn)
r = run(task, RunnerConfig(out_dir=out, steps=steps, lr=0.02, grad_accum=accum, checkpoint_every=2, eval_every=3,
                           weight_decay=0.01, warmup_steps=2, lr_schedule="cosine", clip_grad_norm=0.5,
                           progress=False, seed=5), callback=callback if stop_at else None)
print("STATUS", r.status, r.step, flush=True)
exit_cli(0)  # tears the gloo group down; a live one can abort the process at exit
'''

FSDP2_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Block
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_activation_checkpointing: false
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _single(script, out, steps, accum):
    return subprocess.Popen([sys.executable, str(script), str(out), str(steps), "0", str(accum)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _fsdp(config, script, out, steps, delay, accum, env=None):
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(script), str(out), str(steps), str(delay), str(accum)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_all(proc) -> None:
    """SIGKILL the launcher and its workers at once, as a crash of the machine would (torch's
    launcher starts every worker in a session of its own, so killing its group is not enough)."""
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:
        w.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


def _finish(p, timeout=180) -> str:
    text, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, text
    return text


def _close(a: dict, b: dict, what: str, atol=2e-5) -> None:
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume_after_sigkill(tmp_path):
    """FSDP2 over 2 CPU processes (2 micro-batches each) = 1 process with 4 micro-batches: final
    weights, checkpoints (model + optimizer state, full tensors) and evaluations. A sharded run
    SIGKILLed mid-run and launched again resumes and ends bit-identical to the uninterrupted one."""
    script, config = tmp_path / "train.py", tmp_path / "fsdp2_cpu.yaml"
    script.write_text(SCRIPT)
    config.write_text(FSDP2_CPU_CONFIG)
    steps = 8
    one = _single(script, tmp_path / "one", steps, 4)
    ref = _fsdp(config, script, tmp_path / "fsdp", steps, 0.0, 2)
    killed = _fsdp(config, script, tmp_path / "killed", steps, 0.15, 2)
    wait_for_checkpoint(tmp_path / "killed", 4, killed, timeout=120)
    time.sleep(0.1)  # somewhere inside a step (or a checkpoint write)
    _kill_all(killed)
    assert not (tmp_path / "killed" / "report.json").exists()
    resumed = _fsdp(config, script, tmp_path / "killed", steps, 0.0, 2)
    _finish(one)
    _finish(ref)
    text = _finish(resumed)
    assert "resuming from" in text

    # Sharded = one process: final weights (frozen layer included, untouched), checkpoints, evals.
    final_one = load_file(str(tmp_path / "one" / "final.safetensors"))
    final_fsdp = load_file(str(tmp_path / "fsdp" / "final.safetensors"))
    _close(final_one, final_fsdp, "final")
    torch.manual_seed(0)
    init_inp = nn.Linear(4, 8)  # the script's first layer, built first from seed 0
    assert torch.equal(final_fsdp["inp.weight"], init_inp.weight.detach())  # frozen: untouched
    assert final_fsdp["blocks.0.lin.weight"].shape == (8, 8)  # full tensors, not shards
    for name in ("model", "optimizer"):
        a = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        a = {k: v for k, v in a.items() if not k.startswith("rng.")}  # per-process RNG differs
        b = {k: v for k, v in b.items() if not k.startswith("rng.")}
        _close(a, b, name)
    assert "inp.weight" not in b and any(k.endswith(".exp_avg_sq") for k in b)
    sa = json.load(open(tmp_path / "one" / "checkpoints" / "step_00000006" / "state.json"))
    sb = json.load(open(tmp_path / "fsdp" / "checkpoints" / "step_00000006" / "state.json"))
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert sa["scheduler"] == sb["scheduler"]
    ra = json.load(open(tmp_path / "one" / "report.json"))
    rb = json.load(open(tmp_path / "fsdp" / "report.json"))
    assert rb["config"]["num_processes"] == 2 and rb["status"] == "completed" and rb["distributed_type"] == "FSDP"
    assert ra["distributed_type"] == "NO"
    assert [e["step"] for e in rb["eval_history"]] == [3, 6, 8]
    for ea, eb in zip(ra["eval_history"], rb["eval_history"]):
        assert eb["mse"] == pytest.approx(ea["mse"], rel=1e-4)
    for la, lb in zip(ra["losses"], rb["losses"]):
        assert lb["loss"] == pytest.approx(la["loss"], rel=1e-4)
        assert lb["grad_norm"] == pytest.approx(la["grad_norm"], rel=1e-4)
    assert max(e["grad_norm"] for e in rb["losses"]) > 0.5  # clipping was active

    # SIGKILL + resume = uninterrupted, bit for bit (same world size, same machine).
    final_res = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert final_res.keys() == final_fsdp.keys()
    for k in final_res:
        assert torch.equal(final_res[k], final_fsdp[k]), k
    rep = json.load(open(tmp_path / "killed" / "report.json"))
    assert rep["status"] == "completed" and rep["steps_done"] == steps
    assert rep["sessions"][0]["started_at_step"] >= 4 and rep["sessions"][0]["resumed_from"]


@pytest.mark.slow
def test_fsdp2_callback_stop_on_the_main_process_stops_every_process(tmp_path):
    """A callback (called on the main process only) that raises stops every process after a common
    checkpoint: an exception propagates everywhere; a KeyboardInterrupt (a UI's stop button) ends
    every process "interrupted". Neither hangs."""
    script, config = tmp_path / "train.py", tmp_path / "fsdp2_cpu.yaml"
    script.write_text(SCRIPT)
    config.write_text(FSDP2_CPU_CONFIG)
    stopped = _fsdp(config, script, tmp_path / "stopped", 8, 0.0, 2, env={"STOP_AT": "3"})
    interrupted = _fsdp(config, script, tmp_path / "interrupted", 8, 0.0, 2, env={"STOP_AT": "3", "STOP_KIND": "interrupt"})
    # An exception: every process saved step 3 with it, then stopped.
    text, _ = stopped.communicate(timeout=180)
    assert stopped.returncode != 0 and "Stop" in text and "the main process's callback raised" in text, text
    st = json.load(open(tmp_path / "stopped" / "checkpoints" / "step_00000003" / "state.json"))
    assert st["history"]["sessions"][-1]["status"] == "stopped by callback (Stop)"
    assert not (tmp_path / "stopped" / "report.json").exists()
    # A KeyboardInterrupt from it (a UI's stop button): every process ends "interrupted", no hang.
    text = _finish(interrupted)
    assert text.count("STATUS interrupted 3") == 2, text
    rep = json.load(open(tmp_path / "interrupted" / "report.json"))
    assert rep["status"] == "interrupted" and rep["checkpoint"].endswith("step_00000003")


def test_meta_skeleton_copies_structure_not_memory() -> None:
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.register_buffer("keep", torch.ones(2))
            self.register_buffer("tmp", torch.arange(2.0), persistent=False)

    m = Tied()
    m.a.bias.requires_grad_(False)
    sk = meta_skeleton(m)
    assert sk is not m and sk.a is not m.a
    assert all(p.is_meta for p in sk.parameters()) and sk.b.weight is sk.a.weight
    assert sk.keep.is_meta and sk.tmp is m.tmp  # non-persistent buffers are shared, not in state dicts
    assert not sk.a.bias.requires_grad and sk.a.weight.requires_grad
    assert all(not p.is_meta for p in m.parameters())  # the original is untouched
    m.a.register_forward_hook(lambda *a: None)  # e.g. sharding, after the copy was made
    assert len(m.a._forward_hooks) == 1 and len(sk.a._forward_hooks) == 0
    full = {k: torch.full_like(v, 2.0) for k, v in m.state_dict().items()}
    st = ShardedState(m, torch.optim.AdamW([m.a.weight]), {"a.weight": m.a.weight})
    got = st.full_model(full)
    assert torch.equal(got.a.weight, torch.full((3, 3), 2.0)) and torch.equal(got.b.weight, got.a.weight)
    assert torch.equal(got.keep, torch.full((2,), 2.0)) and torch.equal(m.a.weight, m.b.weight)
    # What a one-process checkpoint holds: trainable parameters and persistent buffers (and, as
    # there, the second name of a tied parameter).
    assert st.shapes == {"a.weight": (3, 3), "b.weight": (3, 3), "keep": (2,)}


def test_sharded_state_check_names_what_does_not_fit() -> None:
    m = nn.Linear(2, 2)
    st = ShardedState(m, torch.optim.AdamW(m.parameters()), dict(m.named_parameters()))
    good = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    groups = [{"params": [0, 1], "lr": 1e-3}]
    assert st.check(good, {"state": {}, "param_groups": groups}, "ck") is None
    assert "missing ['bias']" in st.check({"weight": torch.zeros(2, 2)}, {"param_groups": groups}, "ck")
    assert "has shape (3, 2)" in st.check({**good, "weight": torch.zeros(3, 2)}, {"param_groups": groups}, "ck")
    assert "1 parameters in its groups" in st.check(good, {"state": {}, "param_groups": [{"params": [0]}]}, "ck")
    assert "beyond 2" in st.check(good, {"state": {5: {}}, "param_groups": groups}, "ck")


@pytest.mark.parametrize("kind", [DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, "DEEPSPEED", "deepspeed"])
def test_deepspeed_and_megatron_are_refused(kind) -> None:
    with pytest.raises(NotImplementedError, match="owns the optimizer"):
        check_supported_distribution(kind)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                  DistributedType.FSDP, "FSDP", "NO"])
def test_replicated_and_fsdp_types_pass(kind) -> None:
    check_supported_distribution(kind)


class _FakeDeepSpeedAccelerator:
    """Looks like an accelerate Accelerator launched with a DeepSpeed config (rank 1 of 2)."""

    distributed_type = DistributedType.DEEPSPEED
    is_main_process = False
    num_processes = 2
    process_index = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):  # any other use (prepare, barrier...) is recorded
        def record(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"runner used accelerator.{name} before refusing DeepSpeed")
        return record


def test_run_refuses_deepspeed_before_touching_anything(tmp_path) -> None:
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches: list[int] = []
    task = TrainTask(name="t", model=model, batch_fn=lambda ctx: batches.append(ctx.step),
                     loss_fn=lambda m, b: m(torch.ones(1, 2)).sum())
    acc = _FakeDeepSpeedAccelerator()
    out = tmp_path / "run"
    with pytest.raises(NotImplementedError, match="DEEPSPEED"):
        run(task, RunnerConfig(out_dir=str(out), steps=2, progress=False), accelerator=acc)
    assert acc.calls == [] and batches == [] and not os.path.exists(out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fsdp1_is_refused_before_touching_anything(tmp_path) -> None:
    class _Plugin:
        fsdp_version = 1

    acc = _FakeDeepSpeedAccelerator()
    acc.distributed_type = DistributedType.FSDP
    acc.state = type("S", (), {"fsdp_plugin": _Plugin()})()
    model = nn.Linear(2, 2)
    task = TrainTask(name="t", model=model, batch_fn=lambda ctx: None, loss_fn=lambda m, b: m(torch.ones(1, 2)).sum())
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        run(task, RunnerConfig(out_dir=str(tmp_path / "run"), steps=2, progress=False), accelerator=acc)
    assert acc.calls == [] and not os.path.exists(tmp_path / "run")
    check_supported_distribution(DistributedType.FSDP, 2)


@pytest.mark.parametrize("version,refused", [("1", True), (None, True), ("2", False)])
def test_train_motion_checks_the_fsdp_version_before_loading(tmp_path, monkeypatch, capsys, version, refused) -> None:
    from training.train_motion import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if version is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)  # accelerate's default: FSDP1
    else:
        monkeypatch.setenv("FSDP_VERSION", version)
    out = tmp_path / "o"
    rc = main(["--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
               "--trainable", "full", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    if refused:  # before the (missing) model is read
        assert "fsdp_version: 2" in err and "docs/training.md" in err and not os.path.exists(out)
    else:
        assert "fsdp_version" not in err and "no_model" in err  # FSDP2 passes; the model folder is what is missing
