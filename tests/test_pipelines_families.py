"""Tiny models of every family: saved, loaded through the loader, sampled; determinism."""
import os

import numpy as np
import pytest
import torch

from families import get_family
from pipelines import I2VModel, load_model, sample
from pipelines.tiny import TINY_FAMILIES, TINY_TIME_EMBED_DIM, build_tiny_model

# Small, per family: CogVideoX frames are 4k+1; the 1.0 tiny model is locked to 32x32.
RUN = {
    "cogvideox-i2v": dict(frames=9, steps=2, cfg=6.0),
    "cogvideox1.5-i2v": dict(frames=9, steps=2, cfg=6.0, height=32, width=48),
    "svd": dict(frames=3, steps=2, cfg=2.5),
}


def _image(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models(tiny_model):
    return {fam: tiny_model(fam) for fam in TINY_FAMILIES}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_load_exposes_the_model(models, tiny_model_dir, family):
    m = models[family]
    assert isinstance(m, I2VModel)
    assert m.family is get_family(family)
    assert m.path == os.path.abspath(tiny_model_dir(family))
    assert m.denoiser is getattr(m.pipeline, m.family.denoiser)
    assert m.vae is m.pipeline.vae and m.scheduler is m.pipeline.scheduler
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    assert m.time_embedding is m.denoiser.get_submodule("time_embedding")
    if family == "svd":
        assert m.text_encoder is None and m.tokenizer is None and m.image_encoder is not None
        assert m.time_embed_dim == 4 * m.denoiser.config.block_out_channels[0]
    else:
        assert m.text_encoder is not None and m.tokenizer is not None and m.image_encoder is None
        assert m.time_embed_dim == TINY_TIME_EMBED_DIM
    temporal = m.temporal_parameter_names()
    keys = list(m.denoiser.state_dict())
    assert temporal and len(temporal) < len(keys)
    assert all(m.family.is_temporal(k) for k in temporal)
    if family == "svd":
        # the timestep embeddings are not temporal layers (a naive "time" pattern would say so)
        assert not any(k.startswith(("time_embedding.", "add_embedding.")) for k in temporal)
        assert any(k.endswith("spatial_res_block.time_emb_proj.weight") for k in keys)
        assert not any("spatial_res_block" in k for k in temporal)
        assert any("temporal_transformer_blocks" in k for k in temporal)


def test_noise_level_scale(models):
    cog, svd = models["cogvideox-i2v"], models["svd"]
    assert cog.noise_level(torch.tensor([999, 999])) == pytest.approx(0.999)
    assert cog.noise_level(0) == 0.0
    sig_max, sig_min = svd.scheduler.config.sigma_max, svd.scheduler.config.sigma_min
    assert svd.noise_level(0.25 * np.log(sig_max)) == pytest.approx(1.0)
    assert svd.noise_level(0.25 * np.log(sig_min)) == pytest.approx(0.0, abs=1e-9)
    assert svd.noise_level(0.25 * np.log(np.sqrt(sig_max * sig_min))) == pytest.approx(0.5)


def test_resolution_facts(models):
    assert models["cogvideox-i2v"].resolution_locked == (32, 32)
    assert models["cogvideox1.5-i2v"].resolution_locked is None
    assert models["cogvideox1.5-i2v"].max_resolution == (128, 128)
    assert models["svd"].max_resolution is None


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_sample_each_family(models, family):
    m = models[family]
    steps = []
    v = sample(m, _image(), "a boat drifts", seed=3, progress=lambda i, n: steps.append((i, n)), **RUN[family])
    kw = RUN[family]
    h, w = kw.get("height", 32), kw.get("width", 32)
    assert v.frames.shape == (kw["frames"], h, w, 3)
    assert v.frames.dtype == torch.float32
    assert float(v.frames.min()) >= 0.0 and float(v.frames.max()) <= 1.0
    assert v.fps == m.family.default_fps
    assert steps == [(i + 1, kw["steps"]) for i in range(kw["steps"])]
    assert len(v.trace) == kw["steps"]  # one denoiser call per step (CFG is batched)
    levels = [s.noise_level for s in v.trace]
    assert levels == sorted(levels, reverse=True) and 0.0 <= levels[-1] < levels[0] <= 1.0
    assert v.uint8().dtype == np.uint8 and v.uint8().shape == tuple(v.frames.shape)


@pytest.mark.parametrize("family", ["cogvideox-i2v", "svd"])
def test_same_seed_same_frames(models, family):
    m = models[family]
    a = sample(m, _image(), "a cat", seed=11, **RUN[family])
    b = sample(m, _image(), "a cat", seed=11, **RUN[family])
    c = sample(m, _image(), "a cat", seed=12, **RUN[family])
    assert torch.equal(a.frames, b.frames)
    assert not torch.equal(a.frames, c.frames)


def test_sample_restores_rng_independence(models):
    """Sampling uses its own generator: the global torch RNG does not change the result."""
    m = models["cogvideox-i2v"]
    torch.manual_seed(1)
    a = sample(m, _image(), "x", seed=5, **RUN["cogvideox-i2v"])
    torch.manual_seed(2)
    b = sample(m, _image(), "x", seed=5, **RUN["cogvideox-i2v"])
    assert torch.equal(a.frames, b.frames)


def test_image_inputs_are_equivalent(models, tmp_path):
    from PIL import Image

    m = models["cogvideox-i2v"]
    arr = _image(seed=4)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    tensor = torch.from_numpy(arr).float().div(255)[None]  # ComfyUI IMAGE [1,H,W,3]
    outs = [sample(m, x, "x", seed=0, **RUN["cogvideox-i2v"]).frames for x in (arr, str(path), tensor, Image.fromarray(arr))]
    for o in outs[1:]:
        assert torch.equal(outs[0], o)


def test_size_follows_image_aspect(models):
    m = models["cogvideox1.5-i2v"]
    v = sample(m, _image(40, 80), "x", frames=9, steps=1, cfg=1.0, seed=0, height=32)
    assert v.frames.shape[1:3] == (32, 64)
    # default size: the image's aspect within the model's 128 x 128 cap
    from pipelines.sampling import resolve_size

    assert resolve_size(m, (300, 200), None, None) == (80, 128)
    assert resolve_size(m, (200, 300), None, None) == (128, 80)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_load_and_tiling_flags(tiny_model_dir, dtype, torch_dtype):
    m = load_model(tiny_model_dir("cogvideox-i2v"), dtype=dtype, vae_tiling=True, vae_slicing=True)
    assert m.dtype == torch_dtype
    assert next(m.denoiser.parameters()).dtype == torch_dtype
    assert m.vae.use_tiling and m.vae.use_slicing
    v = sample(m, _image(), "x", frames=9, steps=1, cfg=1.0, seed=0)
    assert v.frames.dtype == torch.float32 and torch.isfinite(v.frames).all()


def test_build_tiny_model_is_deterministic_and_replaces_atomically(tmp_path):
    from safetensors.torch import load_file

    a = build_tiny_model(tmp_path / "a", "cogvideox-i2v", seed=0)
    b = build_tiny_model(tmp_path / "b", "cogvideox-i2v", seed=0)
    c = build_tiny_model(tmp_path / "b", "cogvideox-i2v", seed=1)  # replaces b in place
    assert c == b
    fa = load_file(os.path.join(a, "transformer", "diffusion_pytorch_model.safetensors"))
    fc = load_file(os.path.join(c, "transformer", "diffusion_pytorch_model.safetensors"))
    assert fa.keys() == fc.keys() and any(not torch.equal(fa[k], fc[k]) for k in fa)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temporary folders left behind
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model(tmp_path / "x", "sdxl")


def test_fingerprint_matches_merging(models, tiny_model_dir):
    fp_mod = pytest.importorskip("merging.fingerprint")
    m = models["cogvideox-i2v"]
    fp = m.fingerprint()
    assert fp == fp_mod.fingerprint_state(m.denoiser.state_dict())
    path = os.path.join(tiny_model_dir("cogvideox-i2v"), "transformer", "diffusion_pytorch_model.safetensors")
    assert fp_mod.same_weights(fp, fp_mod.fingerprint_checkpoint(path))
    assert not fp_mod.same_weights(fp, models["cogvideox1.5-i2v"].fingerprint())


def test_loading_svd_without_torchvision_prints_no_fallback_warning(tiny_model_dir):
    """transformers warns on every fresh process that CLIPImageProcessor falls back to the PIL
    version; the loader binds that class up front, so a fresh process loads SVD quietly."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; from pipelines import load_model; m = load_model(sys.argv[1]); "
            "print(type(m.pipeline.feature_extractor).__name__)")
    r = subprocess.run([sys.executable, "-c", code, tiny_model_dir("svd")], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "CLIPImageProcessorPil"
    assert "torchvision" not in r.stderr, r.stderr
