"""Per-pixel diffusion-loss weights on the demo's object: masks from the renderer, the data set's
``loss_weight``, and the SVD objective that uses them (CogVideoX refuses them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.demo_data import DemoClipDataset, DemoDataConfig, demo_clip
from training.diffusion_loss import _latent_weight, objective_for
from training.motion_data import collate


def test_object_masks_follow_the_object_and_leave_the_frames_unchanged():
    cfg = DemoDataConfig()
    plain, _ = demo_clip(3, 7, cfg, object_score=6.0, camera_score=4.0)
    frames, meta = demo_clip(3, 7, cfg, object_score=6.0, camera_score=4.0, masks=True)
    np.testing.assert_array_equal(plain, frames)
    m = meta["object_masks"]
    assert m.shape == frames.shape[:3] and m.dtype == np.float32
    assert 0.0 <= m.min() and m.max() <= 1.0
    area = m.reshape(len(m), -1).sum(1)
    assert (area > 0.03 * 32 * 32).all()  # the object (30-45 % of the side) is on screen
    # The object moves down: its coverage's centre of mass moves down from frame to frame.
    ys = (m.sum(2) * np.arange(32)).sum(1) / area
    assert (np.diff(ys) > 0).all()
    # Supersampled clips shrink the masks with the frames.
    _, meta2 = demo_clip(3, 7, DemoDataConfig(supersample=2), object_score=6.0, camera_score=4.0, masks=True)
    assert meta2["object_masks"].shape == m.shape


def test_dataset_loss_weight_only_when_asked_and_same_clips():
    plain = DemoClipDataset(3, seed=1, cfg=DemoDataConfig())
    weighted = DemoClipDataset(3, seed=1, cfg=DemoDataConfig(object_weight=4.0))
    np.testing.assert_array_equal(plain.frames, weighted.frames)
    assert "loss_weight" not in plain[0] and "loss_weight" not in collate([plain[0], plain[1]])
    w = weighted[2]["loss_weight"]
    assert w.shape == (8, 1, 32, 32)
    assert float(w.min()) == 1.0 and 4.9 < float(w.max()) <= 5.0
    assert collate([weighted[0], weighted[1]])["loss_weight"].shape == (2, 8, 1, 32, 32)


def test_latent_weight_is_mean_one_per_clip_and_checks_its_input():
    w = torch.ones(2, 3, 1, 8, 8)
    w[0, :, :, :4] = 9.0
    small = _latent_weight(w, torch.Size([2, 3, 4, 4, 4]), "cpu")
    assert small.shape == (2, 3, 1, 4, 4)
    torch.testing.assert_close(small.mean(dim=(1, 2, 3, 4)), torch.ones(2))
    torch.testing.assert_close(small[1], torch.ones(3, 1, 4, 4))
    assert float(small[0, 0, 0, 0, 0]) == pytest.approx(9.0 / 5.0)  # top half 9, bottom 1: mean 5
    with pytest.raises(ValueError, match=r"loss_weight.*\[B=2, T=3, 1, H, W\].*\(2, 3, 8, 8\)"):
        _latent_weight(torch.ones(2, 3, 8, 8), torch.Size([2, 3, 4, 4, 4]), "cpu")
    with pytest.raises(ValueError, match="non-negative"):
        _latent_weight(-w, torch.Size([2, 3, 4, 4, 4]), "cpu")


def _svd_batch(frames: int = 8, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"video": torch.rand(2, frames, 3, size, size, generator=g) * 2 - 1, "caption": ["", ""],
            "object": torch.tensor([3.0, 7.0]), "camera": torch.tensor([5.0, 1.0]), "index": torch.tensor([0, 1])}


def _loss(objective, model, batch) -> float:
    with torch.no_grad():
        enc = objective.encode(batch, torch.Generator().manual_seed(1))
        return float(objective.loss(enc, model.denoiser, None, torch.Generator().manual_seed(2)))


def test_svd_loss_uniform_weight_is_the_plain_loss_and_a_mask_moves_it(tiny_svd):
    objective = objective_for(tiny_svd)
    batch = _svd_batch()
    plain = _loss(objective, tiny_svd, batch)
    uniform = _loss(objective, tiny_svd, {**batch, "loss_weight": torch.full((2, 8, 1, 32, 32), 3.0)})
    assert uniform == pytest.approx(plain, rel=1e-6)
    w = torch.ones(2, 8, 1, 32, 32)
    w[..., :16, :] = 20.0  # the top half dominates
    top = _loss(objective, tiny_svd, {**batch, "loss_weight": w})
    assert top != pytest.approx(plain, rel=1e-3)


def test_cogvideox_refuses_pixel_weights(tiny_cog):
    objective = objective_for(tiny_cog)
    batch = {**_svd_batch(frames=9), "loss_weight": torch.ones(2, 9, 1, 32, 32)}
    with pytest.raises(ValueError, match="SVD only"):
        objective.encode(batch, torch.Generator().manual_seed(0))


def test_train_demo_cli_refuses_a_negative_object_weight(tmp_path, capsys):
    from training.train_demo import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--object-weight", "-1", "--no-progress"]) == 2
    assert "--object-weight -1.0" in capsys.readouterr().err
    assert not out.exists()


def test_camera_score_range_is_a_stage2_setting():
    """--max-camera-score widens the camera scores drawn; the clips' looks and object scores stay,
    and the autoencoder trains on the unchanged clips (its config ignores stage-2 fields)."""
    from training.train_demo import DemoTrainConfig

    wide = DemoDataConfig(max_camera_score=10.0, object_weight=2.0)
    a, b = DemoClipDataset(40, seed=2, cfg=DemoDataConfig()), DemoClipDataset(40, seed=2, cfg=wide)
    np.testing.assert_array_equal(a.scores[:, 0], b.scores[:, 0])
    moving = a.scores[:, 1] > 1
    assert (b.scores[moving, 1] > a.scores[moving, 1]).all() and b.scores[:, 1].max() <= 10.0
    np.testing.assert_array_equal(a.scores[~moving, 1], b.scores[~moving, 1])
    assert wide.for_autoencoder() == DemoDataConfig()
    old, new = DemoTrainConfig(out="x"), DemoTrainConfig(out="x", data=wide)
    assert old.stage_config("vae") == new.stage_config("vae")
    assert old.stage_config("motion") != new.stage_config("motion")


def test_train_demo_cli_refuses_a_camera_score_range_off_the_scale(tmp_path, capsys):
    from training.train_demo import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--max-camera-score", "12", "--no-progress"]) == 2
    assert "--max-camera-score 12.0" in capsys.readouterr().err
    assert not out.exists()
