"""``training.train_adapter`` (ED stage 1) on tiny models: learning, resume, outputs, bad input."""
import json
import os

import numpy as np
import pytest
import torch

from textadapter import AdapterError, TextEncoderError, check_text_width, load_adapter, load_clip_text
from textadapter.tiny import build_tiny_clip_text
from training.adapter_data import write_pan_dataset
from training.train_adapter import ADAPTER_FILE, DELTA_FILE, Stage1Config, Stage1Error, build, main

FRAMES = 4
CAPTIONS = ("camera pans left", "camera pans right")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stage1")
    return {
        "svd": tiny_model_dir("svd"),
        "data": write_pan_dataset(str(root)),
        "clip": build_tiny_clip_text(root / "clip", 32),
    }


def _cfg(s, **kw):
    base = dict(model=s["svd"], data=s["data"], text_encoder=s["clip"], frames=FRAMES, num_queries=4,
                caption_dropout=0.0, write_model=False)
    base.update(kw)
    return Stage1Config(**base)


def _runner(out, steps, **kw):
    from training.runner import RunnerConfig

    base = dict(out_dir=str(out), steps=steps, lr=3e-3, warmup_steps=0, checkpoint_every=0, progress=False)
    base.update(kw)
    return RunnerConfig(**base)


def _fixed_losses(module, batch_fn, n=4, caption=None):
    """Losses of ``n`` fixed batches (same clips, noise and sigmas every call)."""
    from training.runner import StepContext

    out = []
    with torch.no_grad():
        for i in range(n):
            ctx = StepContext(step=10_000 + i, micro=0, process_index=0, num_processes=1, seed=123,
                              rng=np.random.default_rng(i))
            batch = batch_fn(ctx)
            if caption is not None:
                batch["caption"] = [caption] * len(batch["caption"])
            out.append(float(module(batch)))
    return np.array(out)


@pytest.mark.slow
def test_loss_falls_and_text_matters(stage1, tmp_path):
    from training.runner import run

    task, info = build(_cfg(stage1), preload=True)
    assert info["trainable"] == "adapter+temporal"
    module = task.model
    # Identity start: with a fresh adapter the caption cannot change anything, bit for bit.
    left0 = _fixed_losses(module, task.batch_fn, caption=CAPTIONS[0])
    right0 = _fixed_losses(module, task.batch_fn, caption=CAPTIONS[1])
    assert np.array_equal(left0, right0)
    before = _fixed_losses(module, task.batch_fn)

    result = run(task, _runner(tmp_path / "out", 30), log=lambda s: None)
    assert result.status == "completed"
    after = _fixed_losses(module, task.batch_fn)
    assert after.mean() < 0.8 * before.mean(), (before, after)
    # After training the caption reaches the output.
    left1 = _fixed_losses(module, task.batch_fn, caption=CAPTIONS[0])
    right1 = _fixed_losses(module, task.batch_fn, caption=CAPTIONS[1])
    assert np.abs(left1 - right1).max() > 1e-6

    # Outputs: delta (temporal keys only, against this base) + adapter + report.
    from merging.deltas import load_delta

    files = result.report["files"]
    delta = load_delta(files["delta"], info["fingerprint"])
    assert set(delta) == set(info["trained_keys"]) and all(info["model"].family.is_temporal(k) for k in delta)
    assert max(float(delta[k].abs().max()) for k in delta) > 0
    loaded = load_adapter(files["adapter"], base_fingerprint=info["fingerprint"])
    assert loaded.text_encoder["width"] == 32
    report = json.loads(open(result.report_path).read())
    assert report["status"] == "completed" and report["config"]["task"]["trainable"] == "adapter+temporal"


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_resume_equals_uninterrupted(stage1, tmp_path):
    from training.runner import run

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    task, _ = build(_cfg(stage1, caption_dropout=0.5), preload=True)
    run(task, _runner(full_dir, 6), log=lambda s: None)

    def stop_at_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    task, _ = build(_cfg(stage1, caption_dropout=0.5), preload=True)
    first = run(task, _runner(cut_dir, 6, checkpoint_every=2), callback=stop_at_3, log=lambda s: None)
    assert first.status == "interrupted" and first.step == 3
    assert not os.path.exists(cut_dir / DELTA_FILE)  # nothing final written by an interrupted run
    task, _ = build(_cfg(stage1, caption_dropout=0.5), preload=True)
    second = run(task, _runner(cut_dir, 6, checkpoint_every=2), log=lambda s: None)
    assert second.status == "completed" and second.report["sessions"][-1]["started_at_step"] == 3
    for name in (DELTA_FILE, ADAPTER_FILE):
        a, b = _tensors(full_dir / name), _tensors(cut_dir / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_cli_writes_model_and_adapter_fits_only_its_encoder(stage1, tmp_path):
    out = tmp_path / "out"
    rc = main(["--model", stage1["svd"], "--data", stage1["data"], "--out", str(out), "--text-encoder", stage1["clip"],
               "--frames", "4", "--num-queries", "4", "--steps", "2", "--lr", "1e-3", "--warmup-steps", "0",
               "--no-progress", "--preload", "--write-merged"])
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted(["checkpoints", "finetuned", DELTA_FILE, ADAPTER_FILE, "report.json"])
    from pipelines import load_model

    ft = load_model(out / "finetuned" / "merged")  # a complete model: base + delta
    assert ft.family.name == "svd"
    adapter = load_adapter(out / ADAPTER_FILE).adapter
    check_text_width(adapter, load_clip_text(stage1["clip"]))
    wide = load_clip_text(build_tiny_clip_text(tmp_path / "wide", 48))
    with pytest.raises(TextEncoderError, match="width 48 but the text adapter expects 32"):
        check_text_width(adapter, wide)


def test_cogvideox_lora_and_temporal(tmp_path, tiny_model_dir, stage1):
    from merging.deltas import load_delta
    from training.runner import run

    cog = tiny_model_dir("cogvideox-i2v")
    data = write_pan_dataset(str(tmp_path / "clips"), frames=9)
    for mode in ("lora", "temporal"):
        cfg = Stage1Config(model=cog, data=data, frames=9, trainable=mode if mode == "lora" else "auto",
                           rank=2, write_model=False, new_lr=1e-2 if mode == "lora" else None)
        task, info = build(cfg, preload=True)
        assert info["trainable"] == mode
        if mode == "lora":  # factors start from scratch: their own learning rate
            named = dict(task.model.named_parameters())
            groups = task.param_groups({n: p for n, p in named.items() if n.startswith("lora.") or n.endswith("to_q.weight")})
            assert groups[0]["lr"] == 1e-2 and all(p.dim() == 2 for p in groups[0]["params"])
            assert "lr" not in groups[1]
        assert task.model.adapter is None
        res = run(task, _runner(tmp_path / mode, 2, lr=1e-2), log=lambda s: None)
        assert "adapter" not in res.report["files"]
        delta = load_delta(res.report["files"]["delta"], info["fingerprint"])
        assert all(info["model"].family.is_temporal(k) for k in delta)
        assert max(float(delta[k].abs().max()) for k in delta) > 0
        if mode == "lora":
            lora = task.model.lora
            key = lora.names[0]
            k = lora._key(key)
            expected = lora.scales[k] * lora.up[k].detach() @ lora.down[k].detach()
            torch.testing.assert_close(delta[key + ".weight"], expected)
            assert all(k.endswith(".weight") for k in delta)
        else:
            assert set(delta) == set(info["model"].temporal_parameter_names())


def test_bad_input_is_clear(stage1, tmp_path, tiny_model_dir):
    from training.motion_data import MotionDataError

    no_caption = tmp_path / "bad.jsonl"
    no_caption.write_text(json.dumps({"clip": os.path.join(os.path.dirname(stage1["data"]), "clip0")}) + "\n")
    with pytest.raises(MotionDataError, match="has no caption"):
        build(_cfg(stage1, data=str(no_caption)))
    with pytest.raises(Stage1Error, match="pass --text-encoder"):
        build(_cfg(stage1, text_encoder=None))
    cog = tiny_model_dir("cogvideox-i2v")
    with pytest.raises(Stage1Error, match="the text adapter is for SVD"):
        build(_cfg(stage1, model=cog, text_encoder=None, trainable="adapter", frames=9))
    with pytest.raises(Stage1Error, match="uses its own text encoder"):
        build(_cfg(stage1, model=cog, frames=9))
    with pytest.raises(Stage1Error, match="not a valid regular expression"):
        build(_cfg(stage1, scope="(", trainable="temporal"))
    with pytest.raises(Stage1Error, match="selects no weights"):
        build(_cfg(stage1, scope="no_such_layer", trainable="temporal"))
    with pytest.raises(TextEncoderError, match="no config.json"):
        build(_cfg(stage1, text_encoder=str(tmp_path)))
    rc = main(["--model", stage1["svd"], "--data", str(no_caption), "--out", str(tmp_path / "o")])
    assert rc == 2 and not os.path.exists(tmp_path / "o")


def test_adapter_only_leaves_the_unet_and_frame_policy(stage1, tmp_path):
    from merging.deltas import load_delta
    from training.runner import run

    task, info = build(_cfg(stage1, trainable="adapter", frame_mismatch="error"), preload=True)
    assert task.model.adapter.config.frame_mismatch == "error"
    before = {k: v.clone() for k, v in task.model.adapter.state_dict().items()}
    res = run(task, _runner(tmp_path / "a", 1), log=lambda s: None)
    delta = load_delta(res.report["files"]["delta"], info["fingerprint"])
    assert all(float(delta[k].abs().max()) == 0 for k in delta)  # the UNet did not train
    after = task.model.adapter.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Frames other than the queries are refused by this adapter, naming both counts.
    task, _ = build(_cfg(stage1, trainable="adapter", frame_mismatch="error", num_queries=16), preload=True)
    with pytest.raises(AdapterError, match="16 per-frame queries but the video has 4 frames"):
        run(task, _runner(tmp_path / "b", 1), log=lambda s: None)
