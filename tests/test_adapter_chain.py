"""The whole ED chain on a tiny SVD: train_adapter -> merging.build -> sample with the schedule and a prompt."""

import numpy as np
import pytest
import torch

from textadapter import load_text_control
from textadapter.tiny import build_tiny_clip_text


@pytest.mark.slow
def test_ed_chain_train_build_sample(tmp_path, tiny_model_dir):
    from merging.build import main as build_main
    from merging.deltas import load_deltas
    from merging.patcher import ScheduledWeights
    from merging.schedule import Schedule
    from pipelines import load_model, sample
    from training.train_adapter import ADAPTER_FILE, DELTA_FILE, main as train_main

    from training.adapter_data import write_pan_dataset

    svd = tiny_model_dir("svd")
    data = write_pan_dataset(str(tmp_path / "clips"))
    clip_dir = build_tiny_clip_text(tmp_path / "clip", 32)
    stage1 = tmp_path / "stage1"

    # Stage 1: adapter + temporal layers, a few steps with a large learning rate so that the
    # fine-tune is visibly different from the base. No full model copy: the delta is enough.
    assert train_main([
        "--model", svd, "--data", data, "--out", str(stage1), "--text-encoder", clip_dir, "--frames", "4",
        "--num-queries", "4", "--steps", "4", "--lr", "1e-2", "--warmup-steps", "0", "--no-progress", "--preload",
    ]) == 0
    assert not (stage1 / "finetuned").exists()

    # Stages 2-3: ED deltas from (base, stage-1 delta): ft = base + delta.
    ed = tmp_path / "ed"
    threads = torch.get_num_threads()
    assert build_main(["--base", svd, "--finetuned", str(stage1 / DELTA_FILE), "--out", str(ed), "--quiet"]) == 0
    assert torch.get_num_threads() == threads  # the CLI's thread setting does not leak

    model = load_model(svd)
    fp = model.fingerprint()
    deltas = load_deltas(ed, fp)
    assert set(deltas) == {"dynamics", "control"}
    assert any(bool(t.any()) for t in deltas["control"].values())
    weights = ScheduledWeights(deltas, Schedule.load(ed / "schedule.json"))
    # The adapter file remembers its text encoder's folder; the base check refuses other UNets.
    control = load_text_control(stage1 / ADAPTER_FILE, base_fingerprint=fp)

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    kw = dict(frames=4, steps=2, cfg=2.0, seed=0)
    plain = sample(model, image, **kw)
    left = sample(model, image, "camera pans left", weight_schedule=weights, text_control=control, **kw)
    right = sample(model, image, "camera pans right", weight_schedule=weights, text_control=control, **kw)
    six = sample(model, image, "camera pans right", weight_schedule=weights, text_control=control,
                 **{**kw, "frames": 6})  # queries interpolated
    assert left.settings["text_control"] == control.path and not left.settings["prompt_ignored"]
    assert left.frames.shape == (4, 32, 32, 3) and six.frames.shape[0] == 6
    assert np.isfinite(left.frames).all()
    assert np.abs(left.frames - right.frames).max() > 0  # the prompt reaches the video
    assert np.abs(left.frames - plain.frames).max() > 0
    # The context-manager form (attach around any sampler call) is the same computation.
    with control.prompted(model.denoiser, "camera pans left"):
        outer = sample(model, image, weight_schedule=weights, **kw)
    assert torch.equal(outer.frames, left.frames)
    # Without the text control the prompt cannot act: ignored, and said so.
    ignored = sample(model, image, "camera pans left", **kw)
    assert ignored.settings["prompt_ignored"] and torch.equal(ignored.frames, plain.frames)
    # Weights and hooks are gone afterwards: the base model samples exactly as before.
    after = model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(sample(model, image, **kw).frames, plain.frames)
