"""Controllability metrics and the demo data's fixed-direction ground truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.demo_control import ScaledEmbedding, control_metrics, rankdata, spearman
from training.demo_data import CAMERA_DIRECTION, OBJECT_DIRECTION, DemoDataConfig, demo_clip, speed_for_score


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [1.0, 2.5, 2.5, 0.0]


def test_spearman_known_values():
    x = [1, 2, 3, 4, 5]
    assert spearman(x, [2, 4, 8, 16, 32]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman(x, [7, 7, 7, 7, 7]) == 0.0  # a constant answer carries no control
    # Hand-computed: ranks y = [0, 2, 1, 4, 3]; d = [0, -1, 1, -1, 1]; 1 - 6*4/(5*24) = 0.8.
    assert spearman(x, [1, 3, 2, 5, 4]) == pytest.approx(0.8)
    # Ties: Pearson of average ranks, as scipy.stats.spearmanr computes it.
    rx, ry = np.array([0, 1, 2, 3.0]), np.array([0.5, 0.5, 2, 3])
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        spearman([1], [1])


def test_control_metrics_pass_and_fail():
    obj = np.repeat([1, 5, 9], 3).astype(float)
    cam = np.tile([1, 5, 9], 3).astype(float)
    good = control_metrics(obj, cam, obj * 1.5, np.sqrt(cam))
    assert good["object_spearman"] == pytest.approx(1.0) and good["camera_spearman"] == pytest.approx(1.0)
    assert good["leak_object_to_camera"] == pytest.approx(0.0) and good["passed"] == 1.0
    # Camera requests driving the measured object motion: cross-talk, fails.
    leaky = control_metrics(obj, cam, cam, cam)
    assert leaky["leak_camera_to_object"] == pytest.approx(1.0) and leaky["passed"] == 0.0


def test_scaled_embedding_extrapolates_from_neutral():
    lin = torch.nn.Linear(2, 3)
    inner = type("E", (torch.nn.Module,), {"forward": lambda self, o, c: lin(torch.stack([o, c], -1))})()
    o, c = torch.tensor([9.0]), torch.tensor([2.0])
    e, n = inner(o, c), inner(torch.tensor([5.5]), torch.tensor([5.5]))
    assert torch.allclose(ScaledEmbedding(inner, 1.0)(o, c), e)
    assert torch.allclose(ScaledEmbedding(inner, 2.0)(o, c), n + 2 * (e - n), atol=1e-6)


def test_demo_clips_fix_directions_and_follow_the_scores():
    cfg = DemoDataConfig()
    f, meta = demo_clip(0, 5, cfg, object_score=6.0, camera_score=1.0)
    assert f.shape == (cfg.frames, cfg.height, cfg.width, 3) and f.dtype == np.uint8
    spec = meta["spec"]
    assert spec["pan"] == [0.0, 0.0]
    vel = spec["objects"][0]["velocity"]
    assert vel[0] == pytest.approx(speed_for_score(6.0) * OBJECT_DIRECTION[0])
    assert vel[1] == pytest.approx(speed_for_score(6.0) * OBJECT_DIRECTION[1])
    assert meta["object_speed"] == pytest.approx(speed_for_score(6.0), rel=1e-6)  # exact ground truth
    _, meta = demo_clip(0, 5, cfg, object_score=1.0, camera_score=8.0)
    assert meta["spec"]["pan"] == pytest.approx([speed_for_score(8.0) * d for d in CAMERA_DIRECTION])
    assert meta["object_speed"] == 0.0 and meta["camera_speed"] == pytest.approx(speed_for_score(8.0), rel=1e-3)
    # Pure function of (seed, index): same clip twice, another index differs.
    a, _ = demo_clip(1, 2, cfg)
    b, _ = demo_clip(1, 2, cfg)
    c, _ = demo_clip(1, 3, cfg)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
