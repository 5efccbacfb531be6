"""Node behaviour on tiny models, without ComfyUI: clear messages for bad input, progress and
cancel, and the hand-over to ComfyUI's model manager (stand-ins in nodes_comfy_stand_in.py)."""

import pytest
import torch

import nodes_harness as h


@pytest.fixture(scope="module")
def model(nodes_env):
    return nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=h.BASE, dtype="auto", device="auto",
                                                       vae_tiling=True)[0]


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 40, 60, 3)


def _sample(nodes_env, model, image, **kw):
    args = dict(model=model, image=image, prompt="a boat", negative_prompt="", frames=9, steps=3, cfg=6.0,
                seed=1, object_intensity=5.0, camera_intensity=5.0, width=48, height=32, fps=0.0)
    args.update(kw)
    return nodes_env.by_id["MotionDialI2VSampler"].execute(**args)


def _task_vectors(nodes_env, model):
    return nodes_env.by_id["MotionDialLoadTaskVectors"].execute(model=model, task_vectors_name=h.TASK_VECTORS)


# ----------------------------------------------------------------------------- bad input
def test_missing_model_folder_is_named(nodes_env):
    with pytest.raises(FileNotFoundError, match=r"'Gone-I2V' was not found in models/diffusers"):
        nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name="Gone-I2V", dtype="auto", device="auto",
                                                    vae_tiling=True)


def test_embedder_made_for_another_base_is_refused(nodes_env, model):
    with pytest.raises(ValueError, match=h.OTHER_EMBEDDER.replace(".", r"\.")) as e:
        nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=h.OTHER_EMBEDDER)
    assert "Traceback" not in str(e.value) and len(str(e.value)) < 2000


def test_task_vectors_for_another_base_are_refused(nodes_env, model):
    tv, sched = _task_vectors(nodes_env, model)
    locked = nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=h.LOCKED, dtype="fp32", device="cpu",
                                                         vae_tiling=False)[0]
    with pytest.raises(ValueError, match="dynamics|control"):
        nodes_env.by_id["MotionDialLoadTaskVectors"].execute(model=locked, task_vectors_name=h.TASK_VECTORS)
    with pytest.raises(ValueError, match="dynamics|control"):  # loaded for one model, wired to another
        _sample(nodes_env, locked, torch.rand(1, 32, 32, 3), width=0, height=0, task_vectors=tv, schedule=sched)


def test_reference_clip_of_one_frame(nodes_env):
    with pytest.raises(ValueError, match=r"1 frame; motion needs at least 2"):
        nodes_env.by_id["MotionDialEstimateMotion"].execute(frames=torch.rand(1, 32, 32, 3), fps=8.0)


def test_wrong_image_size_for_a_resolution_locked_model(nodes_env, image):
    locked = nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=h.LOCKED, dtype="fp32", device="cpu",
                                                         vae_tiling=False)[0]
    with pytest.raises(ValueError, match=r"resolution-locked .* only generates 32x32"):
        _sample(nodes_env, locked, image, width=0, height=0)  # a 3:2 image for a square-locked model
    with pytest.raises(ValueError, match=r"only takes 32x32"):
        _sample(nodes_env, locked, torch.rand(1, 32, 32, 3), width=64, height=64)
    out, fps = _sample(nodes_env, locked, torch.rand(1, 32, 32, 3), width=0, height=0)
    assert tuple(out.shape) == (9, 32, 32, 3)


def test_schedule_without_task_vectors_and_scores_without_embedder(nodes_env, model, image):
    sched = nodes_env.by_id["MotionDialMotionSchedule"].execute(
        kind="linear", switch=0.5, start=0.0, end=1.0, dynamics_strength=1.0, control_strength=1.0,
        keyframes="{}", blend="weights")[0]
    with pytest.raises(ValueError, match="no task vectors"):
        _sample(nodes_env, model, image, schedule=sched)
    with pytest.raises(ValueError, match="keyframes must be JSON"):
        nodes_env.by_id["MotionDialMotionSchedule"].execute(kind="keyframes", switch=0.5, start=0.0, end=1.0,
                                                      dynamics_strength=1.0, control_strength=1.0,
                                                      keyframes="{oops", blend="weights")


def test_schedule_kinds(nodes_env):
    run = nodes_env.by_id["MotionDialMotionSchedule"].execute
    common = dict(switch=0.3, start=0.2, end=0.8, dynamics_strength=2.0, control_strength=0.5,
                  keyframes='{"dynamics": [[0.0, 0.0], [1.0, 1.0]]}')
    hard = run(kind="hard_switch", blend="weights", **common)[0]
    assert hard.weights(0.31) == {"dynamics": 2.0, "control": 0.0} and hard.weights(0.3)["control"] == 0.5
    lin = run(kind="linear", blend="weights", **common)[0]
    assert lin.weights(0.5) == pytest.approx({"dynamics": 1.0, "control": 0.25})
    cos = run(kind="cosine", blend="weights", **common)[0]
    assert cos.weights(0.2) == pytest.approx({"dynamics": 0.0, "control": 0.5})
    key = run(kind="keyframes", blend="weights", **common)[0]
    assert key.weights(0.5) == pytest.approx({"dynamics": 1.0})  # 0.5 * strength 2
    pred = run(kind="linear", blend="predictions", **common)[0]
    assert pred.mode == "predictions" and pred.strengths == {"dynamics": 2.0, "control": 0.5}


def test_manual_scores_drive_the_sampler_like_the_widgets(nodes_env, model, image):
    emb = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute(model=model, embedder_name=h.EMBEDDER)[0]
    scores = nodes_env.by_id["MotionDialMotionScores"].execute(object=8.0, camera=2.0)[0]
    assert (scores.object, scores.camera) == (8.0, 2.0)
    a = _sample(nodes_env, model, image, embedder=emb, scores=scores)[0]
    b = _sample(nodes_env, model, image, embedder=emb, object_intensity=8.0, camera_intensity=2.0)[0]
    c = _sample(nodes_env, model, image, embedder=emb, object_intensity=1.0, camera_intensity=9.0)[0]
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4


# ----------------------------------------------------------------------------- progress, cancel, memory
def test_progress_per_step_and_cancel_leaves_the_model_usable(nodes_env, model, image):
    import comfy.model_management as mm
    import comfy.utils

    tv, sched = _task_vectors(nodes_env, model)
    before = {k: v.clone() for k, v in model.model.denoiser.state_dict().items()}
    comfy.utils.ProgressBar.updates.clear()
    ref = _sample(nodes_env, model, image, steps=4, task_vectors=tv, schedule=sched)[0]
    assert comfy.utils.ProgressBar.updates == [(1, 4), (2, 4), (3, 4), (4, 4)]

    orig = comfy.utils.ProgressBar.update_absolute

    def interrupt_at_step_2(self, value, total=None, preview=None):
        orig(self, value, total, preview)
        if value == 2:
            mm.record.interrupt = True  # what POST /interrupt sets

    comfy.utils.ProgressBar.update_absolute = interrupt_at_step_2
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _sample(nodes_env, model, image, steps=4, task_vectors=tv, schedule=sched)
    finally:
        comfy.utils.ProgressBar.update_absolute = orig
    after = model.model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "cancel must restore the weights"
    again = _sample(nodes_env, model, image, steps=4, task_vectors=tv, schedule=sched)[0]
    assert torch.equal(ref, again)


def test_auto_device_registers_the_whole_pipeline_with_comfys_model_manager(nodes_env, model, image):
    import comfy.model_management as mm

    assert model.managed and model.patcher is not None
    holder = model.patcher.model
    owned = {id(p) for p in holder.parameters()}
    for comp in (model.model.denoiser, model.model.vae, model.model.text_encoder):
        assert all(id(p) in owned for p in comp.parameters())
    assert model.patcher.size == sum(t.numel() * t.element_size() for t in holder.state_dict().values())
    calls = mm.record.load_calls
    _sample(nodes_env, model, image)
    assert mm.record.load_calls == calls + 1 and model.patcher in mm.record.loaded
    mm.unload_all_models()  # "Free model memory": ComfyUI moves it to the offload device
    assert model.patcher not in mm.record.loaded
    _sample(nodes_env, model, image)  # and loads it back for the next run
    assert model.patcher in mm.record.loaded


def test_cpu_device_is_not_managed(nodes_env):
    m = nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=h.BASE, dtype="auto", device="cpu",
                                                    vae_tiling=False)[0]
    assert not m.managed and m.patcher is None and m.options["dtype"] == "fp32"
    with pytest.raises(ValueError, match="CPU"):
        nodes_env.by_id["MotionDialLoadI2VModel"].execute(model_name=h.BASE, dtype="auto", device="model_offload",
                                                    vae_tiling=False)
