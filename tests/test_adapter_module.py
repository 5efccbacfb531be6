"""The SVD text adapter: identity at start, hooks, frame counts, text widths, files."""
import os

import pytest
import torch

from textadapter import (
    AdapterError,
    TemporalTextAdapter,
    TextEncoderError,
    attach,
    check_text_width,
    load_adapter,
    load_clip_text,
    prompted,
    save_adapter,
    temporal_blocks,
)

FRAMES = 4


def _unet(seed=0):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=2, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32, num_frames=FRAMES,
    ).eval()


def _inputs(batch=1, frames=FRAMES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, frames, 8, 8, 8, generator=g),
        timestep=torch.tensor(0.5),
        encoder_hidden_states=torch.randn(batch, 1, 32, generator=g),
        added_time_ids=torch.randn(batch, 3, generator=g),
    )


def _run(unet, **kw):
    with torch.no_grad():
        return unet(**kw, return_dict=False)[0]


def _perturb(adapter, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", width=32)


def make_tiny_clip(folder, width=32, layout="flat"):
    from textadapter.tiny import build_tiny_clip_text

    return build_tiny_clip_text(folder, width, layout=layout)


def test_finds_every_temporal_block(unet):
    names = [n for n, _, _ in temporal_blocks(unet)]
    assert len(names) == 4 and all("temporal_transformer_blocks.0" in n for n in names)
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    assert adapter.config.block_dims == [d for _, _, d in temporal_blocks(unet)]
    assert adapter.fuse[0].weight.shape == (32, 32 + 32)


def test_fresh_adapter_is_bit_identical(unet):
    x = _inputs(batch=2)
    base = _run(unet, **x)
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    text = torch.randn(2, 7, 32)
    with attach(unet, adapter, text):
        out = _run(unet, **x)
    assert torch.equal(out, base)
    # ...and a trained (perturbed) one changes the output; detaching restores it exactly.
    _perturb(adapter)
    with attach(unet, adapter, text):
        changed = _run(unet, **x)
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(_run(unet, **x), base)


def test_fresh_adapter_is_bit_identical_under_bf16_autocast(unet):
    x = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = _run(unet, **x)
        with attach(unet, TemporalTextAdapter.for_unet(unet, 32), torch.randn(1, 7, 32)):
            out = _run(unet, **x)
    assert torch.equal(out, base)


def test_fuse_is_the_linear_on_the_concatenation(unet):
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    _perturb(adapter)
    hidden, vectors = torch.randn(2 * 3, 5, 32), torch.randn(2, 3, 32)
    lin = adapter.fuse[0]
    cat = torch.cat([hidden, vectors.reshape(6, 1, 32).expand(-1, 5, -1)], dim=-1)
    torch.testing.assert_close(adapter.fuse_block(0, hidden, vectors), lin(cat), atol=1e-5, rtol=1e-5)


def test_text_reaches_every_frame_and_block(unet):
    x = _inputs()
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    _perturb(adapter)
    a, b = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    with attach(unet, adapter, a) as binding:
        out_a = _run(unet, **x)
        binding.set_text(b)
        out_b = _run(unet, **x)
    per_frame = (out_a - out_b).abs().flatten(2).amax(-1)[0]
    assert (per_frame > 1e-4).all()


def test_cfg_batch_reads_negative_on_uncond_half(unet):
    """[uncond, cond] batch: the uncond half reads the negative prompt, the cond half the prompt."""
    x1 = _inputs(batch=1)
    x2 = {k: torch.cat([v, v]) if v.ndim else v for k, v in x1.items()}
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    _perturb(adapter)
    pos, neg = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    with attach(unet, adapter, pos, neg):
        both = _run(unet, **x2)
    with attach(unet, adapter, pos):
        only_pos = _run(unet, **x1)
    with attach(unet, adapter, neg):
        only_neg = _run(unet, **x1)
    torch.testing.assert_close(both[1:], only_pos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:1], only_neg, atol=1e-5, rtol=1e-5)


def test_frame_count_interpolates_queries(unet):
    adapter = TemporalTextAdapter.for_unet(unet, 32, num_queries=16)
    q = adapter.frame_queries(31)
    assert q.shape == (31, 32)
    # align_corners: the ends are the end queries, and every other frame lies between two queries.
    torch.testing.assert_close(q[0], adapter.queries[0])
    torch.testing.assert_close(q[-1], adapter.queries[-1])
    torch.testing.assert_close(q[2], adapter.queries[1])
    torch.testing.assert_close(q[1], (adapter.queries[0] + adapter.queries[1]) / 2)
    assert adapter.frame_queries(16) is adapter.queries
    _perturb(adapter)
    with attach(unet, adapter, torch.randn(1, 5, 32)):
        out = _run(unet, **_inputs(frames=FRAMES))  # 4 frames from 16 queries
    assert torch.isfinite(out).all()


def test_frame_count_refused_when_configured(unet):
    adapter = TemporalTextAdapter.for_unet(unet, 32, num_queries=16, frame_mismatch="error")
    with pytest.raises(AdapterError, match="16 per-frame queries but the video has 4 frames"):
        with attach(unet, adapter, torch.randn(1, 5, 32)):
            _run(unet, **_inputs())


def test_prompt_width_mismatch_is_clear(unet):
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    with pytest.raises(AdapterError, match=r"expected \[batch, tokens, 32\]"):
        with attach(unet, adapter, torch.randn(1, 5, 48)):
            pass


def test_adapter_for_another_unet_is_refused(unet):
    from diffusers import UNetSpatioTemporalConditionModel

    other = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=2, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    adapter = TemporalTextAdapter.for_unet(other, 32)
    with pytest.raises(AdapterError, match="another UNet"):
        with attach(unet, adapter, torch.randn(1, 5, 32)):
            pass
    with pytest.raises(AdapterError, match="no temporal transformer blocks"):
        TemporalTextAdapter.for_unet(torch.nn.Linear(2, 2), 32)


def test_config_errors():
    with pytest.raises(AdapterError, match="not divisible by num_heads"):
        TemporalTextAdapter.for_unet(_unet(), 30, num_heads=8)


def test_save_load_round_trip(unet, tmp_path):
    from merging.fingerprint import fingerprint_state
    from merging.errors import FingerprintMismatchError

    adapter = TemporalTextAdapter.for_unet(unet, 32, num_queries=6)
    _perturb(adapter)
    fp = fingerprint_state(unet.state_dict())
    path = save_adapter(tmp_path / "a.safetensors", adapter, base_fingerprint=fp, text_encoder={"width": 32})
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary left behind
    loaded = load_adapter(path, base_fingerprint=fp)
    assert loaded.adapter.config == adapter.config
    assert loaded.text_encoder == {"width": 32}
    for k, v in adapter.state_dict().items():
        assert torch.equal(loaded.adapter.state_dict()[k], v)
    x = _inputs()
    with attach(unet, adapter, torch.ones(1, 3, 32)):
        a = _run(unet, **x)
    with attach(unet, loaded.adapter, torch.ones(1, 3, 32)):
        b = _run(unet, **x)
    assert torch.equal(a, b)
    with pytest.raises(FingerprintMismatchError):
        load_adapter(path, base_fingerprint=fingerprint_state(_unet(seed=5).state_dict()))


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(AdapterError, match="not a MotionDial text adapter"):
        load_adapter(tmp_path / "x.safetensors")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m.safetensors"),
              metadata={"format": "motiondial.temporal_text_adapter", "format_version": "1", "config": "{not json"})
    with pytest.raises(AdapterError, match="malformed adapter metadata"):
        load_adapter(tmp_path / "m.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("layout", ["flat", "subfolders"])
def test_clip_text_folder_layouts(tmp_path, layout):
    folder = make_tiny_clip(tmp_path / layout, width=32, layout=layout)
    clip = load_clip_text(folder)
    assert clip.width == 32 and clip.max_length == 24
    emb = clip.encode(["camera pans left", "the dog runs"])
    assert emb.shape == (2, 24, 32)
    assert not torch.allclose(emb[0], emb[1])


def test_prompted_and_width_mismatch(unet, clip_dir, tmp_path):
    clip = load_clip_text(clip_dir)
    adapter = TemporalTextAdapter.for_unet(unet, 32)
    _perturb(adapter)
    x = _inputs()
    with prompted(unet, adapter, clip, "camera pans left"):
        a = _run(unet, **x)
    with prompted(unet, adapter, clip, "zoom in"):
        b = _run(unet, **x)
    assert (a - b).abs().max() > 1e-5
    wide = load_clip_text(make_tiny_clip(tmp_path / "wide", width=48))
    with pytest.raises(TextEncoderError, match="has width 48 but the text adapter expects 32"):
        check_text_width(adapter, wide)


def test_clip_folder_errors(tmp_path):
    with pytest.raises(TextEncoderError, match="does not exist"):
        load_clip_text(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="no config.json"):
        load_clip_text(tmp_path / "empty")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(TextEncoderError, match="not a CLIP text encoder"):
        load_clip_text(tmp_path / "t5")


def test_load_text_control(unet, clip_dir, tmp_path):
    from textadapter import load_text_control

    adapter = TemporalTextAdapter.for_unet(unet, 32)
    path = save_adapter(tmp_path / "a.safetensors", adapter, text_encoder={"width": 32, "path": clip_dir})
    control = load_text_control(path)  # the recorded encoder
    assert control.text.path == clip_dir
    with control.prompted(unet, "zoom in"):
        pass
    gone = save_adapter(tmp_path / "b.safetensors", adapter, text_encoder={"width": 32, "path": str(tmp_path / "gone")})
    with pytest.raises(TextEncoderError, match="does not exist here"):
        load_text_control(gone)
    wide = make_tiny_clip(tmp_path / "wide", width=48)
    with pytest.raises(TextEncoderError, match="width 48"):
        load_text_control(path, wide)
