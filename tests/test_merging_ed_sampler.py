"""ED deltas applied per step by the sampler's schedule == the statically merged dyn/con models."""
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.deltas import load_deltas
from merging.fingerprint import fingerprint_checkpoint
from merging.patcher import ScheduledWeights
from merging.recipes import build_ed
from merging.schedule import Constant, HardSwitch, PredictionBlend
from pipelines import load_model, sample

RUN = dict(frames=9, steps=4, cfg=6.0, seed=3)  # 4 steps: 2 above and 2 below the switch


def _image():
    return (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ed(tiny_model_dir, tmp_path_factory):
    pre = tiny_model_dir("cogvideox-i2v")
    root = tmp_path_factory.mktemp("ed")
    ft = str(root / "ft")
    shutil.copytree(pre, ft)
    wfile = os.path.join(ft, "transformer", "diffusion_pytorch_model.safetensors")
    sd = load_file(wfile)
    g = torch.Generator().manual_seed(1)
    # a fine-tune-sized change of every floating tensor (frozen buffers too: tau may be anything)
    ft_sd = {k: (v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
             for k, v in sd.items()}
    os.remove(wfile)
    save_file(ft_sd, wfile, metadata={"format": "pt"})
    out = str(root / "out")
    res = build_ed(pre, ft, out, merged=True, seed=0)
    return pre, ft, res


@pytest.fixture(scope="module")
def models(ed):
    pre, _, res = ed
    return {"pre": load_model(pre), "dynamics": load_model(res.files["dynamics_model"]),
            "control": load_model(res.files["control_model"])}


def test_fingerprints_and_wrong_base(ed, models):
    pre, ft, res = ed
    model = models["pre"]
    fp = model.fingerprint()
    assert fp == fingerprint_checkpoint(pre)
    deltas = load_deltas(res.out_dir, fp)
    assert set(deltas) == {"dynamics", "control"}
    from merging.errors import FingerprintMismatchError
    with pytest.raises(FingerprintMismatchError, match="was built for base"):
        load_deltas(res.out_dir, fingerprint_checkpoint(ft))


@pytest.mark.slow
def test_constant_schedule_equals_static_merge(ed, models):
    _, _, res = ed
    model = models["pre"]
    deltas = load_deltas(res.out_dir, model.fingerprint())
    run = dict(RUN, steps=2)
    frames = {}
    for name in ("dynamics", "control"):
        scheduled = sample(model, _image(), "a boat", weight_schedule=ScheduledWeights(deltas, Constant({name: 1.0})), **run)
        static = sample(models[name], _image(), "a boat", **run)
        assert torch.equal(scheduled.frames, static.frames), name
        frames[name] = static.frames
    # the two deltas do lead to different videos (the comparison above is not vacuous)
    assert not torch.equal(frames["dynamics"], frames["control"])


@pytest.mark.slow
def test_hard_switch_equals_swapping_static_models(ed, models):
    _, _, res = ed
    model = models["pre"]
    deltas = load_deltas(res.out_dir, model.fingerprint())
    scheduled = sample(model, _image(), "a boat", weight_schedule=ScheduledWeights(deltas, HardSwitch()), **RUN)
    used = [s.weights for s in scheduled.trace]
    assert {"dynamics": 1.0, "control": 0.0} in used and {"dynamics": 0.0, "control": 1.0} in used

    # Reference: the statically merged dynamics model, swapped for the merged control model
    # (whole state dict) on the first call at noise level <= 0.5.
    ref = models["dynamics"]  # (its weights are changed below: this test uses it last)
    con_sd = models["control"].denoiser.state_dict()
    swapped = []

    def swap(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        if ref.noise_level(t) <= 0.5 and not swapped:
            module.load_state_dict(con_sd)
            swapped.append(True)

    h = ref.denoiser.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        static = sample(ref, _image(), "a boat", **RUN)
    finally:
        h.remove()
    assert swapped and torch.equal(scheduled.frames, static.frames)


def test_prediction_blend_is_refused_by_weight_patching(ed):
    _, _, res = ed
    from merging.patcher import PatchError
    with pytest.raises(PatchError, match="mixes predictions"):
        ScheduledWeights(load_deltas(res.out_dir), PredictionBlend())
