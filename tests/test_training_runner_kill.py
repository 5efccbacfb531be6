"""The runner under real signals, in a child process: SIGKILL mid-run, then resume; Ctrl-C (SIGINT)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from training_procs import wait_for_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import os, sys, time, torch
from torch import nn
from training.runner import RunnerConfig, TrainTask, run
from training.checkpoint import atomic_save_safetensors
torch.set_num_threads(1)
out, delay = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 1))

def batch_fn(ctx):
    # Slow enough for the parent to hit it mid-run; 20x slower from step 6 on (where the parent
    # strikes), so a parent starved of CPU on a loaded machine still finds the run unfinished.
    time.sleep(delay if ctx.step < 6 else 20 * delay)
    x = torch.from_numpy(ctx.rng.standard_normal((8, 4))).float()
    return x, x.sum(1, keepdim=True)

def save_fn(m, d):
    p = os.path.join(d, "final.safetensors"); atomic_save_safetensors(p, m.state_dict()); return {"model": p}

task = TrainTask(name="kill", model=model, batch_fn=batch_fn, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                 save_fn=save_fn)
r = run(task, RunnerConfig(out_dir=out, steps=24, lr=0.01, checkpoint_every=3, progress=False, seed=5))
print("STATUS", r.status, r.step, flush=True)
sys.exit(130 if r.status == "interrupted" else 0)
'''


def _start(tmp_path, out, delay):
    script = tmp_path / "train_kill.py"
    # Written once: rewriting it for every child truncated the file while an earlier child was
    # still reading it, which then ran an empty script and "succeeded" without training (the
    # reference run's missing folder, seen in full-suite runs).
    if not script.exists():
        tmp = tmp_path / "train_kill.py.tmp"
        tmp.write_text(SCRIPT)
        os.replace(tmp, script)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(delay)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_and_sigint_saves(tmp_path):
    # Three children at once (start-up dominates): a reference run, one to SIGKILL, one to Ctrl-C.
    ref = _start(tmp_path, tmp_path / "ref", 0.0)
    killed_out, int_out = tmp_path / "killed", tmp_path / "sigint"
    p = _start(tmp_path, killed_out, 0.05)
    pi = _start(tmp_path, int_out, 0.05)
    wait_for_checkpoint(killed_out, 6, p)
    time.sleep(0.07)  # somewhere inside a step (or a checkpoint write)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed_out / "report.json").exists()
    resumed = _start(tmp_path, killed_out, 0.0)

    # Ctrl-C: the child finishes its step, saves, reports "interrupted" and exits 130.
    wait_for_checkpoint(int_out, 3, pi)
    pi.send_signal(signal.SIGINT)
    text, _ = pi.communicate(timeout=120)
    assert pi.returncode == 130, text
    rep = json.load(open(int_out / "report.json"))
    assert rep["status"] == "interrupted" and rep["steps_done"] < 24
    assert os.path.isdir(int_out / "checkpoints" / f"step_{rep['steps_done']:08d}")

    out_r, _ = resumed.communicate(timeout=120)
    out_ref, _ = ref.communicate(timeout=120)
    assert resumed.returncode == 0, out_r
    assert ref.returncode == 0, out_ref
    assert "resuming from" in out_r
    assert "STATUS completed 24" in out_ref, out_ref  # it really trained (see _start)
    assert (tmp_path / "ref" / "final.safetensors").is_file(), out_ref
    a = load_file(str(tmp_path / "ref" / "final.safetensors"))
    b = load_file(str(killed_out / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rep = json.load(open(killed_out / "report.json"))
    assert rep["status"] == "completed" and rep["steps_done"] == 24 and rep["sessions"][0]["started_at_step"] >= 6


DDP_SCRIPT = r'''
import os, sys, torch
from torch import nn
from training.runner import RunnerConfig, TrainTask, exit_cli, run
from training.checkpoint import atomic_save_safetensors
torch.set_num_threads(1)
out, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

def batch_fn(ctx):
    x = torch.from_numpy(ctx.rng.standard_normal((8, 4))).float()
    return x, x.sum(1, keepdim=True)

def save_fn(m, d):
    p = os.path.join(d, "final.safetensors"); atomic_save_safetensors(p, m.state_dict()); return {"model": p}

task = TrainTask(name="ddp", model=model, batch_fn=batch_fn, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                 save_fn=save_fn, eval_fn=lambda m, s: {"w": float(m[0].weight.sum())})
run(task, RunnerConfig(out_dir=out, steps=steps, lr=0.01, grad_accum=2, checkpoint_every=3, eval_every=4,
                       progress=False, seed=5))
exit_cli(0)  # tears the gloo group down; a live one can abort the process at exit
'''


def _free_port() -> int:
    """A port nothing listens on now (fixed ports collide with a parallel run of the suite)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_cpu_resume_equals_uninterrupted(tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): a run stopped at step 3 and resumed ends like one in one go."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")

    def launch(out, steps, port):
        return subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script), str(out),
                                 str(steps)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    ref, part = launch(tmp_path / "ref", 6, _free_port()), launch(tmp_path / "res", 3, _free_port())
    for p in (ref, part):
        text, _ = p.communicate(timeout=180)
        assert p.returncode == 0, text
    p = launch(tmp_path / "res", 6, _free_port())
    text, _ = p.communicate(timeout=180)
    assert p.returncode == 0, text
    a = load_file(str(tmp_path / "ref" / "final.safetensors"))
    b = load_file(str(tmp_path / "res" / "final.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rep = json.load(open(tmp_path / "res" / "report.json"))
    assert rep["config"]["num_processes"] == 2
    assert [(s["started_at_step"], s["ended_at_step"]) for s in rep["sessions"]] == [(0, 3), (3, 6)]
