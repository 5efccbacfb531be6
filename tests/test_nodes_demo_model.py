"""The loaders offer the pack's bundled demo model and embedder (pipelines.demo), first in their
lists, resolve them to the pack's own files, and say so clearly when they are missing."""
import os

import pytest

import nodes_harness as h
from pipelines import demo

needs_demo = pytest.mark.skipif(not demo.demo_available(),
                                reason=f"the bundled demo model is missing ({demo.DEMO_DIR}): a partial checkout")


def _options(nodes_env, node_id, input_id):
    return next(i.options for i in nodes_env.by_id[node_id].define_schema().inputs if i.id == input_id)


@needs_demo
def test_bundled_demo_is_listed_first_and_resolves_to_the_pack(nodes_env):
    host, loaders = nodes_env.nodes.host, nodes_env.nodes.loaders
    models = _options(nodes_env, "MotionDialLoadI2VModel", "model_name")
    assert models[0] == demo.DEMO_MODEL_LABEL and h.BASE in models  # the user's models still listed
    assert _options(nodes_env, "MotionDialBuildTaskVectors", "base_model")[0] == demo.DEMO_MODEL_LABEL
    embedders = _options(nodes_env, "MotionDialLoadMotionEmbedder", "embedder_name")
    assert embedders[0] == demo.DEMO_EMBEDDER_LABEL and h.EMBEDDER in embedders
    assert host.diffusers_model_path(demo.DEMO_MODEL_LABEL) == demo.DEMO_MODEL
    assert loaders.motion_embedder_path(demo.DEMO_EMBEDDER_LABEL) == demo.DEMO_EMBEDDER
    assert loaders.motion_embedder_path(h.EMBEDDER) == os.path.join(nodes_env.models, "motion_embedders", h.EMBEDDER)


@needs_demo
def test_bundled_pair_loads_and_the_demo_embedder_refuses_another_model(nodes_env):
    load_model = nodes_env.by_id["MotionDialLoadI2VModel"].execute
    load_embedder = nodes_env.by_id["MotionDialLoadMotionEmbedder"].execute
    model = load_model(model_name=demo.DEMO_MODEL_LABEL, dtype="fp32", device="cpu", vae_tiling=True)[0]
    assert model.model.family.name == "svd"
    emb = load_embedder(model=model, embedder_name=demo.DEMO_EMBEDDER_LABEL)[0]
    assert emb.path == demo.DEMO_EMBEDDER and emb.weights is None
    other = load_model(model_name=h.BASE, dtype="fp32", device="cpu", vae_tiling=False)[0]
    with pytest.raises(ValueError, match="motion_embedder.safetensors"):
        load_embedder(model=other, embedder_name=demo.DEMO_EMBEDDER_LABEL)


def test_missing_bundled_files_are_not_listed_and_named_when_asked_for(nodes_env, tmp_path, monkeypatch):
    host, loaders = nodes_env.nodes.host, nodes_env.nodes.loaders
    monkeypatch.setattr(demo, "DEMO_MODEL", str(tmp_path / "model"))
    monkeypatch.setattr(demo, "DEMO_EMBEDDER", str(tmp_path / "motion_embedder.safetensors"))
    assert demo.DEMO_MODEL_LABEL not in host.list_diffusers_models() and h.BASE in host.list_diffusers_models()
    assert demo.DEMO_EMBEDDER_LABEL not in loaders.list_motion_embedders()
    with pytest.raises(FileNotFoundError, match="bundled demo model is missing"):
        host.diffusers_model_path(demo.DEMO_MODEL_LABEL)
    with pytest.raises(FileNotFoundError, match="bundled demo embedder is missing"):
        loaders.motion_embedder_path(demo.DEMO_EMBEDDER_LABEL)
