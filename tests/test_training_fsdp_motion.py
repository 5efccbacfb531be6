"""train_motion --trainable full under configs/accelerate_fsdp_cogvideox5b.yaml (FSDP2, bf16,
the family's gradient checkpointing), on a tiny CogVideoX and 2 CPU processes (gloo), launched
by ``accelerate launch`` exactly as documented; then resumed after its last checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "accelerate_fsdp_cogvideox5b.yaml")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_data(folder) -> str:
    from training.synth_motion import make_clip, write_clip

    rows = []
    for i in range(4):
        frames, _ = make_clip(i, frames=9, height=32, width=32, fps=8.0, max_object_speed=30.0, max_camera_speed=30.0)
        write_clip(os.path.join(folder, f"clip{i}"), frames, 8.0)
        rows.append(json.dumps({"clip": f"clip{i}", "caption": ["a cat moves", "a car drives"][i % 2]}) + "\n")
    path = os.path.join(folder, "metadata.jsonl")
    with open(path, "w") as f:
        f.writelines(rows)
    return path


def _launch(model, data, out, steps):
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file", CONFIG,
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "training.train_motion",
           "--model", model, "--data", data, "--out", str(out), "--trainable", "full", "--mixed-precision", "bf16",
           "--gradient-checkpointing", "--frames", "9", "--steps", str(steps), "--batch", "1", "--lr", "1e-3",
           "--embedder-lr", "1e-2", "--checkpoint-every", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-6000:]
    return p.stdout


@pytest.mark.slow
def test_train_motion_full_under_the_fsdp_config_trains_saves_and_resumes(tiny_model_dir, tmp_path):
    from merging.checkpoint import open_checkpoint
    from safetensors import safe_open

    model = tiny_model_dir("cogvideox-i2v")
    data = _make_data(str(tmp_path / "data"))
    out = tmp_path / "out"
    _launch(model, data, out, 2)
    text = _launch(model, data, out, 3)
    assert "resuming from" in text and "completed at step 3" in text

    report = json.load(open(out / "report.json"))
    assert report["distributed_type"] == "FSDP" and report["config"]["num_processes"] == 2
    assert report["config"]["task"]["trainable"] == "full" and report["mixed_precision"] == "bf16"
    assert [(s["started_at_step"], s["ended_at_step"]) for s in report["sessions"]] == [(0, 2), (2, 3)]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in report["losses"])

    # The final delta (written from the unsharded copy) is exactly the gathered checkpoint minus the
    # base, for every transformer weight (all of them trained: --trainable full).
    delta = load_file(str(out / "transformer_delta.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors"))
    base = open_checkpoint(model)
    assert set(delta) == set(base.keys()) - {"patch_embed.pos_embedding"}  # every parameter (that one is a buffer)
    for k, d in delta.items():
        torch.testing.assert_close(base.read(k).float() + d, ckpt["denoiser." + k].float(), rtol=0, atol=1e-6)
        assert d.abs().sum() > 0, k
    emb = load_file(str(out / "motion_embedder.safetensors"))
    for k, v in emb.items():
        assert torch.equal(v, ckpt["embedder." + k].to(v.dtype)), k
    with safe_open(str(out / "transformer_delta.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["params"])["trainable"] == "full"
    # Full AdamW state of every trained parameter, in the one-process checkpoint format.
    opt = load_file(str(out / "checkpoints" / "step_00000003" / "optimizer.safetensors"))
    state = json.load(open(out / "checkpoints" / "step_00000003" / "state.json"))
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(delta) + len(emb)
    assert len([k for k in opt if k.endswith(".exp_avg_sq")]) == len(delta) + len(emb)
