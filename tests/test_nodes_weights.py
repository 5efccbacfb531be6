"""I2V Sampler's weight schedule through the nodes: prediction blending, a LoRA/full-trained motion
embedder's transformer delta, and both combined with ED task vectors (== their static merge)."""
import os

import pytest
import torch

import nodes_harness as h

RUN = dict(prompt="a boat", negative_prompt="", frames=9, steps=3, cfg=6.0, seed=1, object_intensity=7.0,
           camera_intensity=2.0, width=48, height=32, fps=0.0)
TRAINED = "trained_run/motion_embedder.safetensors"


def _load(nodes_env, name=h.BASE):
    return nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=name, dtype="fp32", device="cpu",
                                                       vae_tiling=False)[0]


@pytest.fixture(scope="module")
def model(nodes_env):
    return _load(nodes_env)


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 40, 60, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(nodes_env, model):
    """What train_motion writes for a LoRA/full run: the embedder naming its transformer delta beside it."""
    from merging.deltas import save_delta
    from motion.embedding import build_for_model, save_motion_embedder

    folder = os.path.join(nodes_env.models, "motion_embedders", "trained_run")
    os.makedirs(folder, exist_ok=True)
    emb = build_for_model(model.model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    sd = {k: v for k, v in model.model.denoiser.state_dict().items() if v.is_floating_point()}
    delta = {k: 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in sorted(sd.items())[::2]}
    save_delta(os.path.join(folder, "transformer_delta.safetensors"), delta, name="motion",
               base_fingerprint=model.model.fingerprint(), overwrite=True)
    save_motion_embedder(emb, os.path.join(folder, "motion_embedder.safetensors"),
                         extra={"delta": "transformer_delta.safetensors"})
    return delta


def _sampler(nodes_env, model, image, **kw):
    return nodes_env.by_id["MotionDialI2VSampler"].execute(model=model, image=image, **{**RUN, **kw})[0]


def _schedule(nodes_env, kind="hard_switch", blend="weights", keyframes="{}"):
    return nodes_env.by_id["MotionDialMotionSchedule"].execute(
        kind=kind, switch=0.5, start=0.0, end=1.0, dynamics_strength=1.5, control_strength=0.5,
        keyframes=keyframes, blend=blend)[0]


def _library(model, image, **kw):
    from pipelines import sample

    return sample(model.model, image[0], RUN["prompt"], frames=9, steps=3, cfg=6.0, seed=1, height=32, width=48,
                  **kw).frames


def _merged(nodes_env, deltas_and_weights):
    """A fresh copy of the base with ``W = base + sum w * delta`` (the patcher's static merge)."""
    from merging.patcher import static_merge

    m = _load(nodes_env)
    with torch.no_grad():
        for k, p in m.model.denoiser.state_dict().items():
            terms = [(d[k], w) for d, w in deltas_and_weights if k in d]
            if terms:
                p.copy_(static_merge(p, terms))
    return m


def test_prediction_blend_schedule_runs_both_models(nodes_env, model, image):
    from merging.patcher import ScheduledPredictions, ScheduledWeights

    tv = nodes_env.by_id["MotionDialLoadTaskVectors"].execute(model=model, task_vectors_name=h.TASK_VECTORS)[0]
    pred = _schedule(nodes_env, "linear", "predictions")
    weights = _schedule(nodes_env, "linear", "weights")
    a = _sampler(nodes_env, model, image, task_vectors=tv, schedule=pred)
    b = _sampler(nodes_env, model, image, task_vectors=tv, schedule=weights)
    assert torch.equal(a, _library(model, image, weight_schedule=ScheduledPredictions(tv.deltas, pred)))
    assert torch.equal(b, _library(model, image, weight_schedule=ScheduledWeights(tv.deltas, weights)))
    assert not torch.equal(a, b)


def test_trained_motion_delta_is_applied(nodes_env, model, image, trained):
    loaded = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=TRAINED)[0]
    assert loaded.weights is not None and set(loaded.weights.deltas) == {"motion"}
    out = _sampler(nodes_env, model, image, embedder=loaded)
    ref = _merged(nodes_env, [(trained, 1.0)])
    assert torch.equal(out, _library(ref, image, motion_embedder=loaded.embedder, object_intensity=7.0,
                                     camera_intensity=2.0))
    opts = next(i.options for i in nodes_env.by_id["MotionDialLoadMotionEmbedder"].define_schema().inputs
                if i.id == "embedder_name")
    assert TRAINED in opts and "trained_run/transformer_delta.safetensors" not in opts  # the delta is not offered
    # an embedder-only file still loads without a delta
    plain = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=h.EMBEDDER)[0]
    assert plain.weights is None and "transformer delta" not in repr(plain)


def test_trained_motion_plus_ed_task_vectors_equals_the_static_merge(nodes_env, model, image, trained):
    tv = nodes_env.by_id["MotionDialLoadTaskVectors"].execute(model=model, task_vectors_name=h.TASK_VECTORS)[0]
    loaded = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=TRAINED)[0]
    # one keyframe per curve: constant weights (x the strengths 1.5 / 0.5), i.e. a static merge
    const = _schedule(nodes_env, "keyframes", keyframes='{"dynamics": [[0.5, 1.0]], "control": [[0.5, 1.0]]}')
    out = _sampler(nodes_env, model, image, embedder=loaded, task_vectors=tv, schedule=const)
    strength = {"dynamics": 1.5, "control": 0.5}  # static merge in the patcher's order: motion, then the set's
    ref = _merged(nodes_env, [(trained, 1.0)] + [(d, strength[n]) for n, d in tv.deltas.items()])
    expect = _library(ref, image, motion_embedder=loaded.embedder, object_intensity=7.0, camera_intensity=2.0)
    assert torch.equal(out, expect)
    # the ED reference schedule with the motion delta runs too, and the weights come back
    before = {k: v.clone() for k, v in model.model.denoiser.state_dict().items()}
    _sampler(nodes_env, model, image, embedder=loaded, task_vectors=tv)
    assert all(torch.equal(before[k], v) for k, v in model.model.denoiser.state_dict().items())


def test_prediction_blend_with_a_motion_delta_applies_it_to_every_model(nodes_env, model, image, trained):
    from merging.patcher import ScheduledPredictions

    tv = nodes_env.by_id["MotionDialLoadTaskVectors"].execute(model=model, task_vectors_name=h.TASK_VECTORS)[0]
    loaded = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=TRAINED)[0]
    pred = _schedule(nodes_env, "linear", "predictions")
    out = _sampler(nodes_env, model, image, embedder=loaded, task_vectors=tv, schedule=pred)
    # reference: the motion-trained model (static merge), then prediction blending of the ED vectors on it
    ref = _merged(nodes_env, [(trained, 1.0)])
    expect = _library(ref, image, weight_schedule=ScheduledPredictions(tv.deltas, pred),
                      motion_embedder=loaded.embedder, object_intensity=7.0, camera_intensity=2.0)
    assert torch.equal(out, expect)


def test_trained_motion_delta_wired_to_another_model_is_refused(nodes_env, model, image, trained):
    loaded = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=TRAINED)[0]
    other = _load(nodes_env, h.FINETUNED)  # same architecture, other weights
    with pytest.raises(ValueError, match="transformer_delta.safetensors"):
        _sampler(nodes_env, other, image, embedder=loaded)


def test_missing_delta_file_is_named(nodes_env, model, trained):
    import shutil

    src = os.path.join(nodes_env.models, "motion_embedders", "trained_run")
    dst = os.path.join(nodes_env.models, "motion_embedders", "trained_without_delta")
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "motion_embedder.safetensors"), dst)
    with pytest.raises(ValueError, match="transformer_delta.safetensors.*missing"):
        nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(
            model=model, embedder_name="trained_without_delta/motion_embedder.safetensors")
