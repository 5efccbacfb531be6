"""sample(..., text_control=): ED stage 1's text adapter steering SVD's temporal layers; the main job's
--text-adapter; what happens to a prompt SVD cannot read."""
import logging

import numpy as np
import pytest
import torch

from pipelines import generate, load_model, sample
from textadapter import TemporalTextAdapter, TextControl, load_text_control, save_adapter, temporal_blocks
from textadapter.tiny import build_tiny_clip_text

RUN = dict(frames=3, steps=1, cfg=2.0, seed=0)


@pytest.fixture(scope="module")
def svd(tiny_model_dir):
    return load_model(tiny_model_dir("svd"))


@pytest.fixture(scope="module")
def adapter_file(svd, tmp_path_factory):
    """A text adapter whose text channels are not zero (a fresh one would be a no-op)."""
    root = tmp_path_factory.mktemp("text")
    clip = build_tiny_clip_text(root / "clip", 32)
    adapter = TemporalTextAdapter.for_unet(svd.denoiser, 32, num_queries=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin, inner in zip(adapter.fuse, adapter.config.block_dims):
            lin.weight[:, inner:].copy_(torch.randn(lin.weight[:, inner:].shape, generator=g))
    return save_adapter(root / "text_adapter.safetensors", adapter, base_fingerprint=svd.fingerprint(),
                        text_encoder={"width": 32, "path": str(clip)})


def _image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _hooks_left(model):
    return sum(len(m._forward_pre_hooks) for _, m, _ in temporal_blocks(model.denoiser)) + len(
        model.denoiser._forward_pre_hooks)


def test_text_control_steers_svd_and_is_removed_after(svd, adapter_file):
    control = load_text_control(adapter_file, base_fingerprint=svd.fingerprint())
    plain = sample(svd, _image(), **RUN)
    left = sample(svd, _image(), "camera pans left", text_control=control, **RUN)
    right = sample(svd, _image(), "camera pans right", text_control=control, **RUN)
    assert not torch.equal(left.frames, right.frames) and not torch.equal(left.frames, plain.frames)
    assert left.settings["text_control"] == control.path and left.settings["prompt_ignored"] is False
    assert _hooks_left(svd) == 0
    # Cancelled mid-run: the adapter's hooks go too.
    def cancel(step, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(svd, _image(), "camera pans left", text_control=control, progress=cancel, **RUN)
    assert _hooks_left(svd) == 0
    assert torch.equal(sample(svd, _image(), **RUN).frames, plain.frames)
    # A fresh adapter (identity start) leaves the frames bit-identical.
    fresh = TextControl(TemporalTextAdapter.for_unet(svd.denoiser, 32, num_queries=4), control.text, "fresh")
    assert torch.equal(sample(svd, _image(), "camera pans left", text_control=fresh, **RUN).frames, plain.frames)


def test_text_control_is_refused_where_it_cannot_apply(svd, adapter_file, tiny_model_dir):
    control = load_text_control(adapter_file)
    cog = load_model(tiny_model_dir("cogvideox-i2v"))
    with pytest.raises(ValueError, match="cogvideox-i2v already reads the prompt in every transformer block"):
        sample(cog, _image(), "a boat", text_control=control, frames=9, steps=1, cfg=6.0, seed=0)
    with pytest.raises(ValueError, match="text_control must be a textadapter.TextControl"):
        sample(svd, _image(), "a boat", text_control=object(), **RUN)


def _ours(caplog):
    return [r for r in caplog.records if r.name == "pipelines.sampling"]


def test_svd_prompt_without_text_control_is_ignored_and_said(svd, caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.sampling"):
        quiet = sample(svd, _image(), **RUN)
        assert not _ours(caplog) and quiet.settings["prompt_ignored"] is False
        said = sample(svd, _image(), "camera pans left", **RUN)
    assert said.settings["prompt_ignored"] is True and said.settings["text_control"] is None
    assert any("prompt is ignored" in r.getMessage() for r in _ours(caplog))
    assert torch.equal(said.frames, quiet.frames)


def test_generate_text_adapter(svd, adapter_file, tiny_model_dir, tmp_path, capsys):
    folder = tiny_model_dir("svd")
    out = tmp_path / "v.mp4"
    assert generate.main(["--model", folder, "--text-adapter", str(adapter_file), "--prompt", "camera pans left",
                          "--frames", "3", "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f'text_control: "{adapter_file}"' in text and "prompt_ignored: false" in text and out.is_file()
    # Errors: one line each, nothing written.
    bad = tmp_path / "bad.mp4"
    assert generate.main(["--model", folder, "--text-encoder", str(tmp_path), "--out", str(bad)]) == 2
    assert "pass --text-adapter FILE too" in capsys.readouterr().err
    assert generate.main(["--model", tiny_model_dir("cogvideox-i2v"), "--text-adapter", str(adapter_file),
                          "--out", str(bad), "--no-progress"]) == 2
    assert "text adapters are for SVD" in capsys.readouterr().err
    assert generate.main(["--model", folder, "--text-adapter", str(tmp_path / "none.safetensors"), "--out", str(bad)]) == 2
    assert "none.safetensors: no such file" in capsys.readouterr().err
    assert not bad.exists()
