"""Load Text Adapter + the I2V Sampler's text_adapter input: the prompt steers SVD through ED
stage 1's text adapter; CogVideoX is refused with a clear message."""
import os

import pytest
import torch

import nodes_harness as h

SVD, CLIP, ADAPTER = "tiny-svd", "tiny-clip", "svd_text_adapter.safetensors"
RUN = dict(negative_prompt="", frames=3, steps=1, cfg=2.0, seed=0, object_intensity=5.0, camera_intensity=5.0,
           width=0, height=0, fps=0.0)


@pytest.fixture(scope="module")
def svd(nodes_env):
    """A tiny SVD in models/diffusers, a tiny CLIP in models/text_encoders and an adapter for both."""
    from pipelines.tiny import build_tiny_model
    from textadapter import TemporalTextAdapter, save_adapter
    from textadapter.tiny import build_tiny_clip_text

    build_tiny_model(os.path.join(nodes_env.models, "diffusers", SVD), "svd", seed=0)
    model = nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=SVD, dtype="fp32", device="cpu",
                                                        vae_tiling=False)[0]
    clip = build_tiny_clip_text(os.path.join(nodes_env.models, "text_encoders", CLIP), 32)
    adapter = TemporalTextAdapter.for_unet(model.model.denoiser, 32, num_queries=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero text channels: a fresh adapter would be a no-op
        for lin, inner in zip(adapter.fuse, adapter.config.block_dims):
            lin.weight[:, inner:].copy_(torch.randn(lin.weight[:, inner:].shape, generator=g))
    os.makedirs(os.path.join(nodes_env.models, "text_adapters"), exist_ok=True)
    save_adapter(os.path.join(nodes_env.models, "text_adapters", ADAPTER), adapter,
                 base_fingerprint=model.model.fingerprint(), text_encoder={"width": 32, "path": str(clip)})
    return model


def _load_adapter(nodes_env, model, text_encoder=None):
    kw = {} if text_encoder is None else {"text_encoder": text_encoder}
    return nodes_env.by_id["MotionDialLoadTextAdapter"].execute(model=model, adapter_name=ADAPTER, **kw)[0]


def _sample(nodes_env, model, prompt, **kw):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    return nodes_env.by_id["MotionDialI2VSampler"].execute(model=model, image=image, prompt=prompt, **{**RUN, **kw})[0]


def test_combos_list_adapters_and_text_encoder_folders(nodes_env, svd):
    schema = nodes_env.by_id["MotionDialLoadTextAdapter"].define_schema()
    opts = {i.id: i.options for i in schema.inputs if i.io_type == "COMBO"}
    assert ADAPTER in opts["adapter_name"]
    assert opts["text_encoder"][0] == nodes_env.nodes.loaders.RECORDED_ENCODER and CLIP in opts["text_encoder"]
    assert [o.io_type for o in schema.outputs] == ["MD_TEXT_CONTROL"]


def test_prompt_steers_svd_through_the_adapter(nodes_env, svd):
    from pipelines import sample

    recorded = _load_adapter(nodes_env, svd)
    chosen = _load_adapter(nodes_env, svd, CLIP)
    assert recorded.text.path == chosen.text.path or os.path.samefile(recorded.text.path, chosen.text.path)
    left = _sample(nodes_env, svd, "camera pans left", text_adapter=chosen)
    right = _sample(nodes_env, svd, "camera pans right", text_adapter=chosen)
    plain = _sample(nodes_env, svd, "")
    assert not torch.equal(left, right) and not torch.equal(left, plain)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    lib = sample(svd.model, image[0], "camera pans left", frames=3, steps=1, cfg=2.0, seed=0, text_control=recorded)
    assert torch.equal(left, lib.frames)


def test_cogvideox_and_missing_encoder_are_refused(nodes_env, svd):
    cog = nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=h.BASE, dtype="fp32", device="cpu",
                                                      vae_tiling=False)[0]
    with pytest.raises(ValueError, match="already reads the prompt"):
        _load_adapter(nodes_env, cog)
    control = _load_adapter(nodes_env, svd)  # wired past the loader: the library refuses it too
    with pytest.raises(ValueError, match="already reads the prompt"):
        nodes_env.by_id["MotionDialI2VSampler"].execute(model=cog, image=torch.rand(1, 32, 48, 3), prompt="a boat",
                                                  **{**RUN, "frames": 9, "text_adapter": control})
    with pytest.raises(FileNotFoundError, match="'gone-clip' was not found in models/text_encoders"):
        _load_adapter(nodes_env, svd, "gone-clip")
