"""The sampler's two extension points: per-step weight schedules and the motion embedder."""
import numpy as np
import pytest
import torch
from torch import nn

from merging.patcher import ScheduledPredictions, ScheduledWeights, static_merge
from merging.schedule import Constant, HardSwitch
from pipelines import load_model, sample

RUN = dict(frames=9, steps=4, cfg=6.0, seed=7)  # trailing DDIM: levels 0.999, 0.749, 0.499, 0.249
SVD_RUN = dict(frames=3, steps=3, cfg=2.5, seed=7)
IMG = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bit_identical(module, snap):
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


def _random_deltas(module, names=("dynamics", "control"), scale=0.02, seed=0, every=1):
    g = torch.Generator().manual_seed(seed)
    keys = [k for k, _ in module.named_parameters()][::every]
    params = dict(module.named_parameters())
    return {
        n: {k: torch.randn(params[k].shape, generator=g) * scale for k in keys}
        for n in names
    }


def _no_hooks_left(model):
    assert not model.denoiser._forward_pre_hooks
    assert not model.time_embedding._forward_hooks


# -- weight schedules ----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_cog", "tiny_svd"])
def test_constant_schedule_equals_static_merge(request, which):
    model = request.getfixturevalue(which)
    run = RUN if which == "tiny_cog" else SVD_RUN
    den = model.denoiser
    base = _snapshot(den)
    deltas = _random_deltas(den, every=2)
    weights = {"dynamics": 0.75, "control": -0.3}
    scheduled = sample(model, IMG, "a boat", weight_schedule=ScheduledWeights(deltas, Constant(weights)), **run)
    _assert_bit_identical(den, base)
    assert scheduled.settings["weight_writes"] == 1  # set once before the first step, then unchanged

    with torch.no_grad():  # the statically merged model
        for k, p in den.named_parameters():
            terms = [(deltas[n][k], w) for n, w in weights.items() if k in deltas[n]]
            if terms:
                p.copy_(static_merge(base[k], terms))
    try:
        static = sample(model, IMG, "a boat", **run)
    finally:
        den.load_state_dict(base)
    plain = sample(model, IMG, "a boat", **run)
    assert (scheduled.frames - static.frames).abs().max().item() == 0.0
    assert (scheduled.frames - plain.frames).abs().max().item() > 1e-3  # the deltas do matter
    _no_hooks_left(model)


@pytest.mark.parametrize("switch", [0.5, 0.749])
def test_hard_switch_changes_weights_at_first_step_at_or_below_switch(tiny_cog, switch):
    den = tiny_cog.denoiser
    base = _snapshot(den)
    deltas = _random_deltas(den, every=3)
    key = next(iter(deltas["dynamics"]))
    seen = []
    # Runs inside the denoiser's forward, after the sampler's pre-hook has set the weights.
    h = den.transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(den.get_parameter(key).detach().clone()))
    try:
        v = sample(tiny_cog, IMG, "x", weight_schedule=ScheduledWeights(deltas, HardSwitch(switch=switch)), **RUN)
    finally:
        h.remove()
    levels = [s.noise_level for s in v.trace]
    assert levels == pytest.approx([0.999, 0.749, 0.499, 0.249])
    first_low = next(i for i, lv in enumerate(levels) if lv <= switch)
    assert first_low == (1 if switch == 0.749 else 2)
    high = static_merge(base[key], [(deltas["dynamics"][key], 1.0)])
    low = static_merge(base[key], [(deltas["control"][key], 1.0)])
    assert len(seen) == len(levels)
    for i, w in enumerate(seen):
        assert torch.equal(w, low if i >= first_low else high), i
    assert [s.weights for s in v.trace] == [
        {"dynamics": 0.0, "control": 1.0} if i >= first_low else {"dynamics": 1.0, "control": 0.0} for i in range(4)
    ]
    assert v.settings["weight_writes"] == 2
    _assert_bit_identical(den, base)


def test_svd_schedule_sees_sigma_levels(tiny_svd):
    den = tiny_svd.denoiser
    base = _snapshot(den)
    v = sample(tiny_svd, IMG, "", weight_schedule=ScheduledWeights(_random_deltas(den, every=5), HardSwitch(switch=0.5)),
               **SVD_RUN)
    for s in v.trace:
        assert s.weights == ({"dynamics": 1.0, "control": 0.0} if s.noise_level > 0.5 else {"dynamics": 0.0, "control": 1.0})
    assert v.trace[0].noise_level == pytest.approx(1.0) and v.trace[-1].noise_level < 0.5
    _assert_bit_identical(den, base)


class _FailingSchedule:
    """A schedule that raises at its n-th evaluation (inside the denoiser's pre-hook)."""

    def __init__(self, fail_at, exc=RuntimeError):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc
        self.names = ("dynamics",)

    def weights(self, level):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("boom at step %d" % self.calls)
        return {"dynamics": 1.0 - level}


def test_weights_restored_after_exception_mid_run(tiny_cog):
    den = tiny_cog.denoiser
    base = _snapshot(den)
    sched = _FailingSchedule(fail_at=3)
    with pytest.raises(RuntimeError, match="boom at step 3"):
        sample(tiny_cog, IMG, "x", weight_schedule=ScheduledWeights(_random_deltas(den, ("dynamics",)), sched), **RUN)
    assert sched.calls == 3  # weights had been patched twice before the failure
    _assert_bit_identical(den, base)
    _no_hooks_left(tiny_cog)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_weights_restored_when_progress_callback_raises(tiny_cog, exc):
    den = tiny_cog.denoiser
    base = _snapshot(den)
    calls = []

    def progress(step, total):
        calls.append(step)
        if step == 2:
            raise exc("stop")

    emb = _ConstEmbedder(tiny_cog.time_embed_dim, 0.5)
    with pytest.raises(exc):
        sample(tiny_cog, IMG, "x", weight_schedule=ScheduledWeights(_random_deltas(den), HardSwitch()),
               motion_embedder=emb, object_intensity=3, camera_intensity=4, progress=progress, **RUN)
    assert calls == [1, 2]
    _assert_bit_identical(den, base)
    _no_hooks_left(tiny_cog)
    # and the model still samples exactly as before
    a = sample(tiny_cog, IMG, "x", **RUN)
    b = sample(tiny_cog, IMG, "x", **RUN)
    assert torch.equal(a.frames, b.frames)


def test_bf16_model_patched_from_fp32_base_arithmetic(tiny_model_dir):
    model = load_model(tiny_model_dir("cogvideox-i2v"), dtype="bf16")
    den = model.denoiser
    base = _snapshot(den)
    deltas = {n: {k: v.float() * 1e-3 for k, v in d.items()} for n, d in _random_deltas(den).items()}
    key = next(iter(deltas["dynamics"]))
    seen = []
    h = den.transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(den.get_parameter(key).detach().clone()))
    try:
        sample(model, IMG, "x", weight_schedule=ScheduledWeights(deltas, HardSwitch()), frames=9, steps=4, cfg=1.0, seed=0)
    finally:
        h.remove()
    # each step's weight is one rounding of the fp32 result, not an accumulation of bf16 updates
    assert torch.equal(seen[0], (base[key].float() + deltas["dynamics"][key]).bfloat16())
    assert torch.equal(seen[-1], (base[key].float() + deltas["control"][key]).bfloat16())
    _assert_bit_identical(den, base)


# -- motion embedder --------------------------------------------------------------------------
class _ConstEmbedder(nn.Module):
    def __init__(self, dim, value):
        super().__init__()
        self.dim, self.value = dim, value

    def forward(self, object, camera):  # noqa: A002
        return torch.full((object.shape[0], self.dim), float(self.value))


class _ScoreEmbedder(nn.Module):
    """Row = object * 1 + camera * 100 everywhere; optional neutral scores for the uncond half."""

    def __init__(self, dim, uncond_scores=None):
        super().__init__()
        self.dim, self.uncond_scores = dim, uncond_scores

    def forward(self, object, camera):  # noqa: A002
        return (object + 100 * camera)[:, None].expand(-1, self.dim).float()


def _capture_time_embedding(model, store):
    # Registered before sample() adds its hook, so it sees the plain embedding; a hook on the
    # first consumer sees the embedding with the motion term.
    return model.time_embedding.register_forward_hook(lambda m, a, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("which", ["tiny_cog", "tiny_cog15", "tiny_svd"])
def test_zero_embedder_is_bit_identical(request, which):
    model = request.getfixturevalue(which)
    run = {"tiny_cog": RUN, "tiny_cog15": dict(RUN, height=32, width=32), "tiny_svd": SVD_RUN}[which]
    plain = sample(model, IMG, "x", **run)
    zero = sample(model, IMG, "x", motion_embedder=_ConstEmbedder(model.time_embed_dim, 0.0),
                  object_intensity=9, camera_intensity=2, **run)
    assert torch.equal(plain.frames, zero.frames)
    motion = pytest.importorskip("motion.embedding")
    fresh = motion.MotionScoreEmbedding(model.time_embed_dim)  # zero-initialised last layers
    f = sample(model, IMG, "x", motion_embedder=fresh, object_intensity=9, camera_intensity=2, **run)
    assert torch.equal(plain.frames, f.frames)
    nonzero = sample(model, IMG, "x", motion_embedder=_ConstEmbedder(model.time_embed_dim, 0.5),
                     object_intensity=9, camera_intensity=2, **run)
    assert not torch.equal(plain.frames, nonzero.frames)
    _no_hooks_left(model)


@pytest.mark.parametrize("which", ["tiny_cog", "tiny_svd"])
def test_embedder_added_to_both_cfg_halves(request, which):
    model = request.getfixturevalue(which)
    run = dict(RUN if which == "tiny_cog" else SVD_RUN, steps=1)
    dim = model.time_embed_dim
    plain, aug, got = [], [], []
    hooks = [_capture_time_embedding(model, plain)]
    if which == "tiny_cog":  # the embedding as the first block receives it
        hooks.append(model.denoiser.transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: got.append(kw["temb"].clone()), with_kwargs=True))
    else:  # SVD adds add_embedding(time ids), repeats over frames, then SiLU -> time_emb_proj
        hooks.append(model.denoiser.add_embedding.register_forward_hook(lambda m, a, out: aug.append(out.clone())))
        hooks.append(model.denoiser.down_blocks[0].resnets[0].spatial_res_block.time_emb_proj.register_forward_pre_hook(
            lambda m, a: got.append(a[0].clone())))
    try:
        sample(model, IMG, "x", motion_embedder=_ScoreEmbedder(dim), object_intensity=3, camera_intensity=2, **run)
        sample(model, IMG, "x", motion_embedder=_ScoreEmbedder(dim, uncond_scores=(5.5, 5.5)),
               object_intensity=3, camera_intensity=2, **run)
    finally:
        for h in hooks:
            h.remove()
    e = plain[0]
    assert e.shape == (2, dim)  # the CFG batch [uncond; cond]
    both = e + 203.0  # 3 + 100 * 2 on both halves
    neutral = torch.stack([e[0] + 555.5, e[1] + 203.0])  # uncond half: 5.5 + 100 * 5.5
    if which == "tiny_svd":
        def downstream(x, a):
            return torch.nn.functional.silu((x + a).repeat_interleave(run["frames"], dim=0))

        both, neutral = downstream(both, aug[0]), downstream(neutral, aug[1])
    assert torch.equal(got[0], both)
    assert torch.equal(got[1], neutral)


def test_motion_score_embedding_cfg_embedding_is_used(tiny_cog):
    motion = pytest.importorskip("motion.embedding")
    emb = motion.MotionScoreEmbedding(tiny_cog.time_embed_dim, uncond_scores=(5.5, 5.5), motion_guidance_scale=3.0)
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_(0, 0.5)
    got = []
    h = tiny_cog.denoiser.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: got.append(kw["temb"].clone()), with_kwargs=True)
    plain = []
    h0 = _capture_time_embedding(tiny_cog, plain)
    try:
        sample(tiny_cog, IMG, "x", motion_embedder=emb, object_intensity=8, camera_intensity=2, **dict(RUN, steps=1))
    finally:
        h.remove()
        h0.remove()
    e_u, e_c = emb.cfg_embedding(torch.tensor([8.0]), torch.tensor([2.0]), RUN["cfg"])
    assert torch.allclose(got[0][0], plain[0][0] + e_u[0]) and torch.allclose(got[0][1], plain[0][1] + e_c[0])
    assert not torch.allclose(e_u, e_c)


def test_embedder_without_cfg_batch(tiny_cog):
    got, plain = [], []
    h = tiny_cog.denoiser.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: got.append(kw["temb"].clone()), with_kwargs=True)
    h0 = _capture_time_embedding(tiny_cog, plain)
    try:
        sample(tiny_cog, IMG, "x", motion_embedder=_ScoreEmbedder(tiny_cog.time_embed_dim, uncond_scores=(1, 1)),
               object_intensity=1, camera_intensity=1, **dict(RUN, steps=1, cfg=1.0))
    finally:
        h.remove()
        h0.remove()
    assert got[0].shape == (1, tiny_cog.time_embed_dim)
    assert torch.equal(got[0], plain[0] + 101.0)


def test_embedder_with_wrong_width_is_refused(tiny_cog):
    with pytest.raises(ValueError, match=r"expected \[1, 16\]"):
        sample(tiny_cog, IMG, "x", motion_embedder=_ConstEmbedder(7, 1.0), object_intensity=5, camera_intensity=5, **RUN)
    _no_hooks_left(tiny_cog)


# -- prediction-mixing schedules -----------------------------------------------------------------
def test_prediction_blend_hard_switch_equals_weight_hard_switch(tiny_cog):
    from merging.schedule import PredictionBlend

    den = tiny_cog.denoiser
    base = _snapshot(den)
    deltas = _random_deltas(den, every=2)
    a = sample(tiny_cog, IMG, "x", weight_schedule=ScheduledWeights(deltas, HardSwitch()), **RUN)
    b = sample(tiny_cog, IMG, "x", weight_schedule=ScheduledPredictions(deltas, PredictionBlend(HardSwitch())), **RUN)
    assert torch.equal(a.frames, b.frames)  # one model per step, mix weight 1: the same run
    assert [s.mix for s in b.trace] == [[(s.weights, 1.0)] for s in a.trace]
    assert "forward" not in den.__dict__
    _assert_bit_identical(den, base)


def test_prediction_blend_mixes_two_models(tiny_cog):
    from merging.schedule import LinearBlend, PredictionBlend

    den = tiny_cog.denoiser
    base = _snapshot(den)
    deltas = _random_deltas(den, every=2, scale=0.2)
    sched = ScheduledPredictions(deltas, PredictionBlend(LinearBlend()))
    v = sample(tiny_cog, IMG, "x", weight_schedule=sched, **dict(RUN, steps=2))
    assert "forward" not in den.__dict__
    _assert_bit_identical(den, base)
    # (the mixing arithmetic itself: test_mixing_forward_math)
    lv = v.trace[0].noise_level
    assert v.trace[0].mix == [({"dynamics": 1.0, "control": 0.0}, lv), ({"dynamics": 0.0, "control": 1.0}, 1 - lv)]
    assert v.settings["weight_writes"] == 4  # two models per step, each written once per step


def test_mixing_forward_math():
    from merging.patcher import WeightPatcher
    from pipelines.sampling import mixing_forward

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    deltas = {"a": {"weight": torch.randn(3, 4)}, "b": {"bias": torch.randn(3)}}

    class Plan:
        names = ("a", "b")
        mode = "predictions"

        def weights(self, level):
            return {"a": 0.3, "b": 0.7}

        def models(self, level):
            return [({"a": 2.0}, 0.3), ({"b": 1.0}, 0.7)]

    x = torch.randn(5, 4)
    base_w, base_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    expect = 0.3 * torch.nn.functional.linear(x, base_w + 2.0 * deltas["a"]["weight"], base_b) + \
        0.7 * torch.nn.functional.linear(x, base_w, base_b + deltas["b"]["bias"])
    sw = ScheduledPredictions(deltas, Plan())
    with WeightPatcher(lin, sw) as p:
        fwd = mixing_forward(lambda x, t: (lin(x),), p, lambda t: sw.calls(0.5), lambda a, kw: a[1])
        (out,) = fwd(x, 0)
    torch.testing.assert_close(out, expect)
    assert torch.equal(lin.weight, base_w) and torch.equal(lin.bias, base_b)
