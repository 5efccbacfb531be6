"""Each shipped workflow runs end to end on tiny models: the API-format copy is executed by calling
the node classes (ComfyUI's core nodes replaced by small stand-ins, see nodes_harness.py).

Only the sampler's size and step count are lowered for speed; everything else is as shipped.
"""
import os

import numpy as np
import pytest
import torch

import nodes_harness as h

FAST = {"frames": 9, "steps": 3, "height": 32, "width": 48}


def _fast(graph: dict) -> dict:
    for node in graph.values():
        if node["class_type"] == "MotionDialI2VSampler":
            node["inputs"].update(FAST)
    return graph


def _sampler_frames(graph: dict, result) -> torch.Tensor:
    nid = next(k for k, v in graph.items() if v["class_type"] == "MotionDialI2VSampler")
    frames, fps = result.outputs[nid]
    assert isinstance(fps, float) and fps > 0
    return frames


def _check_video(graph, result):
    frames = _sampler_frames(graph, result)
    assert tuple(frames.shape) == (9, 32, 48, 3) and frames.dtype == torch.float32
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    assert len(result.core.saved) == 1 and result.core.saved[0]["frames"] == 9
    assert os.path.getsize(result.core.saved[0]["path"]) > 0
    return frames


def test_build_ed_task_vectors_workflow(nodes_env):
    g = h.load_workflow("motiondial_build_ed_task_vectors", api=True)
    r = h.run_api_graph(g)  # the session's models dir already holds this set: found, not rebuilt
    assert r.outputs["1"][2].startswith("already built")
    g["1"]["inputs"]["name"] = "ed_fresh"  # a real build
    r = h.run_api_graph(g)
    tv, schedule, summary = r.outputs["1"]
    folder = os.path.join(nodes_env.models, "task_vectors", "ed_fresh")
    assert summary.startswith("built") and folder in summary and r.core.previews == [summary]
    assert sorted(tv.deltas) == ["control", "dynamics"] and tv.folder == folder
    assert os.path.isfile(os.path.join(folder, "dynamics.safetensors"))
    assert schedule.weights(0.9) == {"dynamics": 1.0, "control": 0.0}  # the ED reference hard switch
    # same inputs again: reused, not rebuilt; other parameters under the same name: refused
    mtime = os.path.getmtime(os.path.join(folder, "dynamics.safetensors"))
    assert h.run_api_graph(g).outputs["1"][2].startswith("already built")
    assert os.path.getmtime(os.path.join(folder, "dynamics.safetensors")) == mtime
    g["1"]["inputs"]["dare_seed"] = 1
    with pytest.raises(FileExistsError, match="already exists"):
        h.run_api_graph(g)


def test_dials_workflow(nodes_env):
    g = _fast(h.load_workflow("motiondial_i2v_dials", api=True))
    frames = _check_video(g, h.run_api_graph(g))
    # The dials reach the model: other intensities, other frames (the test embedder is not zero).
    g["4"]["inputs"]["object_intensity"] = 1.0
    other = _sampler_frames(g, h.run_api_graph(g))
    assert (frames - other).abs().max() > 1e-4


def test_ed_schedule_workflow(nodes_env):
    g = _fast(h.load_workflow("motiondial_i2v_ed_schedule", api=True))
    with_ed = _check_video(g, h.run_api_graph(g))
    # The task vectors change the result; strengths 0 give back the plain model.
    g["5"]["inputs"].update(dynamics_strength=0.0, control_strength=0.0)
    plain_weights = _sampler_frames(g, h.run_api_graph(g))
    del g["6"]["inputs"]["task_vectors"], g["6"]["inputs"]["schedule"]
    no_ed = _sampler_frames(g, h.run_api_graph(g))
    assert (with_ed - no_ed).abs().max() > 1e-4
    assert torch.allclose(plain_weights, no_ed, atol=1e-5)


def test_motion_transfer_workflow(nodes_env):
    g = _fast(h.load_workflow("motiondial_motion_transfer", api=True))
    r = h.run_api_graph(g)
    _check_video(g, r)
    scores, obj, cam, summary = r.outputs["4"]
    # the reference clip: a disc crossing a panning background -> both motions clearly present
    assert 2.0 < obj <= 10.0 and 2.0 < cam <= 10.0 and scores.estimator == "flow"
    assert r.core.previews == [summary] and f"{obj:.2f}" in summary
    assert r.ui["4"]["text"] == (summary,)


@pytest.mark.skipif(not os.path.isfile(os.path.join(h.PACK_DIR, "assets", "demo_model", "model", "model_index.json")),
                    reason="the bundled demo model (assets/demo_model) is missing: a partial checkout")
def test_demo_workflow_runs_as_shipped_on_the_bundled_model(nodes_env):
    """No fast overrides: the demo's own settings (8 frames, 25 steps, 32x32) are already fast."""
    import re

    from motion import read_clip
    from pipelines.demo import DEMO_MODEL

    g = h.load_workflow("motiondial_demo", api=True)
    r = h.run_api_graph(g)
    assert os.path.realpath(r.outputs["1"][0].model.path) == os.path.realpath(DEMO_MODEL)
    frames = _sampler_frames(g, r)
    assert tuple(frames.shape) == (8, 32, 32, 3) and torch.isfinite(frames).all()
    assert r.outputs["4"][1] == 7.0
    (saved,) = r.core.saved
    clip = read_clip(saved["path"])  # enlarged 8x for viewing
    assert clip.frames.shape == (8, 256, 256, 3) and clip.fps == 7.0
    (summary,) = r.core.previews  # measured on the native frames
    assert re.fullmatch(r"object \d+\.\d\d / 10, camera \d+\.\d\d / 10 \(flow\)", summary), summary
    _, obj, cam, _ = r.outputs["8"]
    assert 1.0 <= obj <= 10.0 and 1.0 <= cam <= 10.0
    g["4"]["inputs"]["object_intensity"] = 1.0  # the dials reach the trained embedder
    assert (frames - _sampler_frames(g, h.run_api_graph(g))).abs().max() > 1e-3


def test_example_inputs_are_what_the_workflows_name():
    from PIL import Image

    from motion import read_clip

    img = Image.open(os.path.join(h.WORKFLOWS, "inputs", "motiondial_example.png"))
    assert img.size == (360, 240)
    clip = read_clip(os.path.join(h.WORKFLOWS, "inputs", "motiondial_reference.mp4"))
    assert clip.frames.shape[0] == 24 and clip.fps == 8.0
    assert np.abs(np.diff(clip.frames.astype(np.int16), axis=0)).mean() > 5  # it moves
