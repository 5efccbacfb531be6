"""Family facts: detection from model_index.json, temporal keys, noise-level mapping."""
import json
import math

import pytest

from families import (ModelFolderError, UnsupportedFamilyError, detect_family, get_family,
                      noise_level_from_timestep)


def _folder(tmp_path, cls, components, denoiser_cfg):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls, **{c: ["diffusers", "X"] for c in components}}))
    for c in components:
        (tmp_path / c).mkdir()
    den = "unet" if "unet" in components else "transformer"
    (tmp_path / den / "config.json").write_text(json.dumps(denoiser_cfg))
    return tmp_path


COG = ["transformer", "vae", "scheduler", "text_encoder", "tokenizer"]
SVD = ["unet", "vae", "scheduler", "image_encoder", "feature_extractor"]


@pytest.mark.parametrize("cfg,expected", [({}, "cogvideox-i2v"), ({"patch_size_t": 2, "ofs_embed_dim": 512}, "cogvideox1.5-i2v")])
def test_detects_cogvideox_versions(tmp_path, cfg, expected):
    m = detect_family(_folder(tmp_path, "CogVideoXImageToVideoPipeline", COG, cfg))
    assert m.family.name == expected and m.family.denoiser == "transformer"


@pytest.mark.parametrize("frames,variant", [(14, "svd"), (25, "svd-xt")])
def test_detects_svd_variants(tmp_path, frames, variant):
    m = detect_family(_folder(tmp_path, "StableVideoDiffusionPipeline", SVD, {"num_frames": frames}))
    assert m.family.name == "svd" and m.variant == variant


def test_bad_folders_name_the_path(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        detect_family(tmp_path / "nope")
    with pytest.raises(ModelFolderError, match="no model_index.json"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        detect_family(tmp_path)


def test_unsupported_and_incomplete(tmp_path):
    a = tmp_path / "a"; a.mkdir()
    with pytest.raises(UnsupportedFamilyError, match="StableDiffusionPipeline"):
        detect_family(_folder(a, "StableDiffusionPipeline", ["unet"], {}))
    b = tmp_path / "b"; b.mkdir()
    _folder(b, "CogVideoXImageToVideoPipeline", COG, {})
    (b / "vae").rmdir()
    with pytest.raises(ModelFolderError, match="'vae' is missing"):
        detect_family(b)
    with pytest.raises(UnsupportedFamilyError, match="known families"):
        get_family("sora")


def test_svd_temporal_pattern_is_exact():
    svd = get_family("svd")
    temporal = ["down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.0.resnets.0.temporal_res_block.conv1.weight",
                "down_blocks.0.resnets.0.time_mixer.mix_factor",
                "down_blocks.0.attentions.0.time_pos_embed.linear_1.weight"]
    not_temporal = ["time_embedding.linear_1.weight", "add_embedding.linear_1.weight",
                    "down_blocks.0.resnets.0.spatial_res_block.time_emb_proj.weight",
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert svd.temporal_keys(temporal + not_temporal) == temporal


def test_cogvideox_temporal_pattern_selects_attention_only():
    cog = get_family("cogvideox-i2v")
    assert cog.is_temporal("transformer_blocks.12.attn1.to_out.0.weight")
    assert not cog.is_temporal("transformer_blocks.12.ff.net.0.proj.weight")
    assert not cog.is_temporal("time_embedding.linear_1.weight")


def test_noise_levels():
    cog, svd = get_family("cogvideox-i2v"), get_family("svd")
    assert noise_level_from_timestep(cog, 500, {"num_train_timesteps": 1000}) == 0.5
    assert noise_level_from_timestep(cog, 999, {"num_train_timesteps": 1000}) == pytest.approx(0.999)
    cfg = {"sigma_min": 0.002, "sigma_max": 700.0}
    assert noise_level_from_timestep(svd, 0.25 * math.log(700.0), cfg) == pytest.approx(1.0)
    assert noise_level_from_timestep(svd, 0.25 * math.log(0.002), cfg) == pytest.approx(0.0)
    mid = 0.25 * math.log(math.sqrt(0.002 * 700.0))
    assert noise_level_from_timestep(svd, mid, cfg) == pytest.approx(0.5)
    levels = [noise_level_from_timestep(svd, 0.25 * math.log(s), cfg) for s in (0.01, 0.1, 1, 10, 100)]
    assert levels == sorted(levels)
