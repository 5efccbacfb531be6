"""Bad input: one clear error naming the file or input, and nothing changed on disk."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from families import ModelFolderError, UnsupportedFamilyError
from pipelines import ModelLoadError, load_model, sample

IMG = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def _tree_digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    def make(family="cogvideox-i2v"):
        dst = tmp_path / family
        shutil.copytree(tiny_model_dir(family), dst)
        return str(dst)

    return make


def _load_fails(folder, exc, *patterns):
    before = _tree_digest(folder)
    with pytest.raises(exc) as info:
        load_model(folder)
    for p in patterns:
        assert p in str(info.value), (p, str(info.value))
    assert _tree_digest(folder) == before  # nothing changed on disk
    return str(info.value)


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    _load_fails(str(tmp_path), ModelFolderError, str(tmp_path), "model_index.json")
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unsupported_family(model_copy):
    folder = model_copy()
    idx = os.path.join(folder, "model_index.json")
    with open(idx) as f:
        data = json.load(f)
    data["_class_name"] = "StableDiffusionXLPipeline"
    with open(idx, "w") as f:
        json.dump(data, f)
    _load_fails(folder, UnsupportedFamilyError, "StableDiffusionXLPipeline", "CogVideoXImageToVideoPipeline")


def test_missing_component(model_copy):
    folder = model_copy("svd")
    shutil.rmtree(os.path.join(folder, "vae"))
    _load_fails(folder, ModelFolderError, "'vae'", folder)


def test_missing_weights_file(model_copy):
    folder = model_copy()
    os.remove(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    _load_fails(folder, ModelLoadError, os.path.join(folder, "transformer"), "no weights")


def test_pickle_weights_refused(model_copy):
    folder = model_copy()
    comp = os.path.join(folder, "transformer")
    os.remove(os.path.join(comp, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(comp, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x02}q\x00.")  # a pickle: must never be unpickled
    _load_fails(folder, ModelLoadError, "diffusion_pytorch_model.bin", "safetensors only")


def test_truncated_safetensors(model_copy):
    folder = model_copy()
    path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    msg = _load_fails(folder, ModelLoadError, path, "truncated")
    assert f"{size - 100} of {size} bytes" in msg


@pytest.mark.parametrize("damage", ["header_garbage", "header_length", "tiny_file"])
def test_corrupt_safetensors(model_copy, damage):
    folder = model_copy("svd")
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    if damage == "header_garbage":
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\xff\xfe not json at all")
    elif damage == "header_length":
        with open(path, "r+b") as f:
            f.write((2**40).to_bytes(8, "little"))
    else:
        with open(path, "wb") as f:
            f.write(b"abc")
    _load_fails(folder, ModelLoadError, path)


def test_missing_shard(model_copy):
    folder = model_copy()
    comp = os.path.join(folder, "text_encoder")
    with open(os.path.join(comp, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    _load_fails(folder, ModelLoadError, "model-00001-of-00002.safetensors", "missing")


def test_bad_load_arguments(tiny_model_dir):
    folder = tiny_model_dir("cogvideox-i2v")
    with pytest.raises(ValueError, match="dtype"):
        load_model(folder, dtype="fp8")
    with pytest.raises(ValueError, match="offload"):
        load_model(folder, offload="disk")
    with pytest.raises(ValueError, match="offload='none' on CPU"):
        load_model(folder, offload="model")
    with pytest.raises(ValueError, match="device"):
        load_model(folder, device="gpu-please")
    with pytest.raises(ValueError, match="vae_tiling"):
        load_model(tiny_model_dir("svd"), vae_tiling=True)


# -- sampling inputs ---------------------------------------------------------------------------
OK = dict(frames=9, steps=2, cfg=6.0, seed=0)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"frames": 10}, r"frames=10: .* 8j\+1 frames \(e\.g\. 9 or 17\)"),
        ({"frames": 5}, r"frames=5: expected an integer in \[9, 161\]"),
        ({"frames": 1000}, r"frames=1000"),
        ({"frames": 9.0}, r"frames=9\.0"),
        ({"steps": 0}, r"steps=0: expected an integer in \[1, 500\]"),
        ({"steps": 10_000}, r"steps=10000"),
        ({"cfg": 0.5}, r"cfg=0\.5: expected a number in \[1\.0, 30\.0\]"),
        ({"cfg": float("nan")}, r"cfg=nan"),
        ({"seed": -1}, r"seed=-1"),
        ({"fps": 0}, r"fps=0"),
        ({"height": 48}, r"only takes 32x32"),
        ({"object_intensity": 5.0}, r"need a motion_embedder"),
        ({"camera_intensity": 5.0}, r"need a motion_embedder"),
    ],
)
def test_bad_sampling_arguments(tiny_cog, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        sample(tiny_cog, IMG, "x", **{**OK, **override})


def test_resolution_locked_model_refuses_far_aspect(tiny_cog):
    wide = np.zeros((32, 80, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image: 80x32 \(aspect 2\.50\) cannot be taken by this resolution-locked"):
        sample(tiny_cog, wide, "x", **OK)
    near = np.zeros((30, 34, 3), np.uint8)  # close to square: scaled and centre-cropped
    assert sample(tiny_cog, near, "x", **OK).frames.shape == (9, 32, 32, 3)


def test_size_errors_on_unlocked_model(tiny_cog15):
    with pytest.raises(ValueError, match=r"height=30: must be a positive multiple of 16 up to 128"):
        sample(tiny_cog15, IMG, "x", **OK, height=30, width=32)
    with pytest.raises(ValueError, match=r"width=256: .* up to 128"):
        sample(tiny_cog15, IMG, "x", **OK, height=32, width=256)
    with pytest.raises(ValueError, match="too small"):
        sample(tiny_cog15, np.zeros((4, 4, 3), np.uint8), "x", **OK)


def test_bad_images(tiny_cog, tmp_path):
    with pytest.raises(ValueError, match=r"image: .*missing\.png does not exist"):
        sample(tiny_cog, str(tmp_path / "missing.png"), "x", **OK)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png is not a readable image"):
        sample(tiny_cog, str(bad), "x", **OK)
    with pytest.raises(ValueError, match=r"expected an \[H, W, 3\] image"):
        sample(tiny_cog, np.zeros((2, 32, 32, 3), np.uint8), "x", **OK)
    with pytest.raises(ValueError, match="expected a path"):
        sample(tiny_cog, 42, "x", **OK)


def test_embedder_needs_both_scores_in_range(tiny_cog):
    from torch import nn

    class Zero(nn.Module):
        def forward(self, o, c):
            return torch.zeros(o.shape[0], 16)

    with pytest.raises(ValueError, match="needs both object_intensity and camera_intensity"):
        sample(tiny_cog, IMG, "x", **OK, motion_embedder=Zero(), object_intensity=5)
    with pytest.raises(ValueError, match=r"camera_intensity=11"):
        sample(tiny_cog, IMG, "x", **OK, motion_embedder=Zero(), object_intensity=5, camera_intensity=11)
    with pytest.raises(ValueError, match="weight_schedule must be a merging.patcher.ScheduledWeights"):
        sample(tiny_cog, IMG, "x", **OK, weight_schedule={"dynamics": 1.0})


def test_sampling_with_schedule_leaves_files_untouched(tiny_cog, tiny_model_dir):
    from merging.patcher import ScheduledWeights
    from merging.schedule import Constant

    folder = tiny_model_dir("cogvideox-i2v")
    before = _tree_digest(folder)
    deltas = {"d": {k: torch.ones_like(p) for k, p in tiny_cog.denoiser.named_parameters()}}
    sample(tiny_cog, IMG, "x", **OK, weight_schedule=ScheduledWeights(deltas, Constant({"d": 0.5})))
    assert _tree_digest(folder) == before  # the mmap-backed weights were never written through


def test_corrupt_component_config(model_copy):
    folder = model_copy()
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:
        f.write("{ not json")
    _load_fails(folder, ModelLoadError, folder, "could not load")
