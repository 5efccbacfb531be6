"""MotionScoreEmbedding: shapes, zero init, decoupling, score validation, motion guidance, files."""
import pytest
import torch
from safetensors.torch import save_file

from motion.embedding import (
    MotionEmbedderFileError,
    MotionScoreEmbedding,
    load_motion_embedder,
    read_motion_embedder_metadata,
    save_motion_embedder,
    split_width,
)

from merging.fingerprint import fingerprint_state

FP_A = fingerprint_state({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)})
FP_B = fingerprint_state({"w": torch.arange(6.0).reshape(2, 3) + 1, "b": torch.ones(3)})


def _randomise(emb: MotionScoreEmbedding, seed: int = 0) -> MotionScoreEmbedding:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return emb


@pytest.mark.parametrize("dim", [2, 7, 16, 512])
@pytest.mark.parametrize("decoupled", [True, False])
def test_fresh_embedder_outputs_exact_zeros(dim, decoupled):
    emb = MotionScoreEmbedding(dim, decoupled=decoupled)
    out = emb(torch.tensor([1.0, 5.5, 10.0]), torch.tensor([10.0, 2.0, 1.0]))
    assert out.shape == (3, dim) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))
    x = torch.randn(3, dim)
    assert torch.equal(x + out, x)  # adding it is bit-identical


def test_odd_width_split_gives_object_the_extra_channel():
    assert split_width(7) == (4, 3) and split_width(512) == (256, 256)
    emb = MotionScoreEmbedding(7)
    assert emb.object_mlp[2].out_features == 4 and emb.camera_mlp[2].out_features == 3


def test_decoupled_object_and_camera_drive_separate_channels():
    emb = _randomise(MotionScoreEmbedding(8))
    a = emb(torch.tensor([2.0]), torch.tensor([3.0]))
    b = emb(torch.tensor([9.0]), torch.tensor([3.0]))  # object changed only
    c = emb(torch.tensor([2.0]), torch.tensor([8.0]))  # camera changed only
    assert torch.equal(a[:, 4:], b[:, 4:]) and not torch.allclose(a[:, :4], b[:, :4])
    assert torch.equal(a[:, :4], c[:, :4]) and not torch.allclose(a[:, 4:], c[:, 4:])


def test_joint_variant_mixes_scores():
    emb = _randomise(MotionScoreEmbedding(8, decoupled=False))
    a = emb(torch.tensor([2.0]), torch.tensor([3.0]))
    b = emb(torch.tensor([9.0]), torch.tensor([3.0]))
    assert not torch.allclose(a[:, 4:], b[:, 4:])  # object reaches "camera" channels too


@pytest.mark.parametrize(
    "obj,cam,match",
    [
        (torch.tensor([0.0]), torch.tensor([5.0]), "object scores must lie in 1..10"),
        (torch.tensor([5.0]), torch.tensor([11.0]), "camera scores must lie in 1..10"),
        (torch.tensor([float("nan")]), torch.tensor([5.0]), "object scores must be finite"),
        (torch.ones(2, 2), torch.ones(2, 2), r"1-D tensor \[B\]"),
        (torch.ones(2), torch.ones(3), "same shape"),
    ],
)
def test_bad_scores_are_refused(obj, cam, match):
    with pytest.raises(ValueError, match=match):
        MotionScoreEmbedding(4)(obj, cam)


def test_motion_guidance_embeddings():
    emb = _randomise(MotionScoreEmbedding(6))
    o, c = torch.tensor([8.0, 2.0]), torch.tensor([3.0, 9.0])
    u, k = emb.cfg_embedding(o, c, cfg_scale=6.0)
    assert torch.equal(u, k)  # default: same scores on both halves
    emb.set_motion_guidance((5.5, 5.5), scale=6.0)
    u, k = emb.cfg_embedding(o, c, cfg_scale=6.0)
    neutral = emb(torch.full((2,), 5.5), torch.full((2,), 5.5))
    torch.testing.assert_close(u, neutral)  # scale == cfg: plain neutral scores
    emb.set_motion_guidance((5.5, 5.5), scale=3.0)
    u, k = emb.cfg_embedding(o, c, cfg_scale=6.0)
    torch.testing.assert_close(u, k - 0.5 * (k - neutral))
    with pytest.raises(ValueError, match="uncond"):
        emb.set_motion_guidance((0.0, 5.0))


def test_save_load_roundtrip_and_base_check(tmp_path):
    emb = _randomise(MotionScoreEmbedding(10, num_freqs=4, hidden=24, family="svd", base_fingerprint=FP_A))
    emb.set_motion_guidance((5.5, 5.5), 2.0)
    path = save_motion_embedder(emb, tmp_path / "e.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]  # no temp file left
    meta = read_motion_embedder_metadata(path)
    assert meta["config"] == {"time_embed_dim": 10, "num_freqs": 4, "hidden": 24, "decoupled": True}
    assert meta["family"] == "svd" and meta["base_fingerprint"] == FP_A
    back = load_motion_embedder(path, family="svd", base_fingerprint=FP_A, time_embed_dim=10)
    o, c = torch.tensor([3.0, 7.5]), torch.tensor([1.0, 10.0])
    assert torch.equal(back(o, c), emb(o, c))
    assert back.uncond_scores == (5.5, 5.5) and back.motion_guidance_scale == 2.0

    with pytest.raises(MotionEmbedderFileError, match=FP_B["values"][:12]) as ei:
        load_motion_embedder(path, family="svd", base_fingerprint=FP_B)
    assert FP_A["values"][:12] in str(ei.value) and "e.safetensors" in str(ei.value)
    with pytest.raises(MotionEmbedderFileError, match="family 'svd'.*'cogvideox-i2v'"):
        load_motion_embedder(path, family="cogvideox-i2v", base_fingerprint=FP_A)
    with pytest.raises(MotionEmbedderFileError, match="width 10.*time_embed_dim 12"):
        load_motion_embedder(path, family="svd", base_fingerprint=FP_A, time_embed_dim=12)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(MotionEmbedderFileError, match="does not exist"):
        load_motion_embedder(tmp_path / "nope.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something.else"})
    with pytest.raises(MotionEmbedderFileError, match="not a MotionDial motion embedder"):
        load_motion_embedder(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(MotionEmbedderFileError, match="not a readable safetensors"):
        load_motion_embedder(junk)
