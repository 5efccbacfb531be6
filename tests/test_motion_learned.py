"""TAdaConv and the learned estimator: init identity, size, input contract, safetensors files."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from motion import estimate_motion
from motion.learned import (
    EstimatorConfig,
    EstimatorFileError,
    LearnedEstimator,
    MotionEstimatorNet,
    build_estimator_model,
    load_estimator,
    pair_indices,
    prepare_clip,
    save_estimator,
    select_frames,
)
from motion.tadaconv import TAdaConv2d

TINY = EstimatorConfig(pairs=3, size=32, widths=[8, 12, 16], head_hidden=8)


def _per_frame_conv(m: TAdaConv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([F.conv2d(x[:, :, t], m.weight, m.bias, m.stride, m.padding) for t in range(x.shape[2])], 2)


@pytest.mark.parametrize("impl", ["grouped", "scaled_input"])
def test_tadaconv_starts_as_plain_conv(impl):
    torch.manual_seed(0)
    m = TAdaConv2d(5, 7, 3, stride=2, padding=1, bias=True, impl=impl).eval()
    x = torch.randn(2, 5, 4, 9, 11)
    assert torch.equal(m.route(x), torch.ones(2, 5, 4))  # alpha == 1 exactly
    torch.testing.assert_close(m(x), _per_frame_conv(m, x))


def test_tadaconv_calibrates_per_frame_and_both_impls_agree():
    torch.manual_seed(0)
    m = TAdaConv2d(6, 4, 3, padding=1).eval()
    torch.nn.init.normal_(m.route.conv_b.weight, std=0.5)
    x = torch.randn(2, 6, 5, 8, 8)
    y = m(x)
    assert not torch.allclose(y, _per_frame_conv(m, x), atol=1e-3)  # alpha now varies
    m.impl = "scaled_input"
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)


def test_route_function_receives_gradient():
    m = TAdaConv2d(4, 4, 3, padding=1)
    m(torch.randn(2, 4, 3, 6, 6)).square().mean().backward()
    # conv_b starts at zero but its gradient does not vanish, so alpha can learn.
    assert m.route.conv_b.weight.grad.abs().sum() > 0


def test_default_network_is_small_and_scores_on_the_scale():
    net = build_estimator_model()
    assert net.num_parameters() <= 10_000_000
    net = MotionEstimatorNet(TINY).eval()
    obj, cam = net(torch.randn(3, 6, TINY.pairs, TINY.size, TINY.size))
    assert obj.shape == cam.shape == (3,)
    assert ((obj >= 1) & (obj <= 10) & (cam >= 1) & (cam <= 10)).all()


def test_pairs_span_a_fixed_time_whatever_the_fps():
    cfg = EstimatorConfig(pairs=4, base_fps=8.0)
    assert pair_indices(49, 8.0, cfg)[1] == 1
    starts, gap = pair_indices(49, 24.0, cfg)
    assert gap == 3 and starts[0] == 0 and starts[-1] + gap == 48
    assert pair_indices(2, 30.0, cfg)[1] == 1  # never past the clip
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (9, 20, 30, 3), dtype=np.uint8)
    sel = select_frames(frames, 8.0, TINY)
    assert sel.shape == (2 * TINY.pairs, TINY.size, TINY.size, 3) and sel.dtype == np.uint8
    x = prepare_clip(frames, 8.0, TINY)
    assert x.shape == (6, TINY.pairs, TINY.size, TINY.size)
    # channels 3..5 are the (scaled) difference of the pair's frames
    a, b = sel[0].astype(np.float32) / 255, sel[1].astype(np.float32) / 255
    np.testing.assert_allclose(x[3:, 0].numpy(), ((b - a) * TINY.diff_gain).transpose(2, 0, 1), atol=1e-6)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    net = MotionEstimatorNet(TINY)
    net.train()(torch.randn(4, 6, TINY.pairs, TINY.size, TINY.size))  # move BN running stats
    path = save_estimator(net.eval(), net.config, tmp_path / "est.safetensors", metadata={"steps": 3})
    assert sorted(os.listdir(tmp_path)) == ["est.json", "est.safetensors"]  # no temp files left
    side = json.loads((tmp_path / "est.json").read_text())
    assert side["format"] == "motiondial.motion_estimator" and side["num_parameters"] == net.num_parameters()
    back = load_estimator(path)
    x = torch.randn(2, 6, TINY.pairs, TINY.size, TINY.size)
    for a, b in zip(net(x), back(x)):
        torch.testing.assert_close(a, b)
    frames = np.random.default_rng(0).integers(0, 255, (7, 24, 40, 3), dtype=np.uint8)
    s = estimate_motion(frames, 8.0, estimator=str(path))
    assert s.estimator == "learned:est.safetensors"
    assert s.object == pytest.approx(LearnedEstimator(net).score(frames, 8.0).object, abs=1e-5)


def test_constant_clip_scores_one(tmp_path):
    est = LearnedEstimator(MotionEstimatorNet(TINY))
    still = np.full((5, 20, 20, 3), 77, dtype=np.uint8)
    s = est.score(still, 8.0)
    assert s.object == 1.0 and s.camera == 1.0


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_estimator(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(EstimatorFileError, match="junk.safetensors"):
        load_estimator(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something.else"})
    with pytest.raises(EstimatorFileError, match="not a MotionDial motion estimator"):
        load_estimator(other)
    # the right format name but weights of another architecture
    net = MotionEstimatorNet(TINY)
    path = save_estimator(net, None, tmp_path / "ok.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({**TINY.to_dict(), "widths": [8, 12, 24]})
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(EstimatorFileError, match="mismatch.safetensors"):
        load_estimator(tmp_path / "mismatch.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        save_estimator(net, None, tmp_path / "est.pt")
