"""Every node's schema is valid: ids, category, types, bounds, defaults, a tooltip on every input.

Runs without ComfyUI: tests/nodes_comfy_stand_in.py mirrors the comfy_api.latest signatures.
"""
import asyncio
import math
import os
import subprocess
import sys
import textwrap

import pytest

import nodes_harness as h

EXPECTED = {
    "MotionDialLoadI2VModel", "MotionDialMotionScores", "MotionDialLoadMotionEstimator", "MotionDialEstimateMotion",
    "MotionDialLoadMotionEmbedder", "MotionDialBuildTaskVectors", "MotionDialLoadTaskVectors",
    "MotionDialMotionSchedule", "MotionDialI2VSampler", "MotionDialLoadTextAdapter",
}
CUSTOM_TYPES = {"MD_I2V_MODEL", "MD_MOTION_SCORES", "MD_MOTION_ESTIMATOR", "MD_MOTION_EMBEDDER", "MD_TASK_VECTORS",
                "MD_SCHEDULE", "MD_TEXT_CONTROL"}
CORE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "IMAGE"}


@pytest.fixture(scope="module")
def schemas(nodes_env):
    return {nid: cls.define_schema() for nid, cls in nodes_env.by_id.items()}


def test_extension_lists_every_node_once(nodes_env):
    assert set(nodes_env.by_id) == EXPECTED
    ext = asyncio.run(nodes_env.pack.comfy_entrypoint())
    listed = asyncio.run(ext.get_node_list())
    assert len(listed) == len(EXPECTED)


def test_schema_basics(schemas):
    for nid, s in schemas.items():
        s.validate()
        assert s.node_id == nid and nid.startswith("MotionDial")
        assert s.category.startswith("MotionDial/"), nid
        assert s.display_name and s.description, nid
        assert s.outputs, f"{nid} has no outputs"
        for o in s.outputs:
            assert o.io_type in CORE_TYPES | CUSTOM_TYPES, (nid, o.io_type)


def test_every_input_has_a_tooltip_and_sane_widget(schemas):
    for nid, s in schemas.items():
        for i in s.inputs:
            where = f"{nid}.{i.id}"
            assert i.tooltip and len(i.tooltip) > 15, f"{where}: missing or empty tooltip"
            assert i.io_type in CORE_TYPES | CUSTOM_TYPES, where
            if i.io_type in ("INT", "FLOAT"):
                assert i.min is not None and i.max is not None and i.min < i.max, where
                assert i.default is not None and i.min <= i.default <= i.max, f"{where}: default outside bounds"
                if i.io_type == "INT":
                    assert isinstance(i.default, int) and isinstance(i.min, int) and isinstance(i.max, int), where
                assert all(math.isfinite(v) for v in (i.min, i.max, i.default)), where
            if i.io_type == "COMBO":
                assert isinstance(i.options, list), where
                if i.default is not None:
                    assert i.default in i.options, f"{where}: default {i.default!r} not an option"
            if i.io_type in CUSTOM_TYPES | {"IMAGE"}:
                assert i.default is None, where


def test_scores_are_on_the_1_to_10_scale(schemas):
    for nid, name in [("MotionDialMotionScores", "object"), ("MotionDialMotionScores", "camera"),
                      ("MotionDialI2VSampler", "object_intensity"), ("MotionDialI2VSampler", "camera_intensity")]:
        i = next(i for i in schemas[nid].inputs if i.id == name)
        assert (i.min, i.max) == (1.0, 10.0)


def test_sampler_outputs_feed_core_video_nodes(schemas):
    s = schemas["MotionDialI2VSampler"]
    assert [o.io_type for o in s.outputs] == ["IMAGE", "FLOAT"]  # Create Video takes images + FLOAT fps
    optional = {i.id for i in s.inputs if i.optional}
    assert optional == {"scores", "embedder", "task_vectors", "schedule", "text_adapter"}


def test_combos_list_the_registered_model_folders(nodes_env, schemas):
    import folder_paths

    for kind in ("motion_estimators", "motion_embedders", "task_vectors", "finetune_deltas", "text_adapters"):
        assert folder_paths.get_folder_paths(kind)[0] == os.path.join(nodes_env.models, kind)
    opts = {i.id: i.options for i in schemas["MotionDialLoadI2VModel"].inputs if i.io_type == "COMBO"}
    assert h.BASE in opts["model_name"] and h.FINETUNED in opts["model_name"]
    emb = next(i for i in schemas["MotionDialLoadMotionEmbedder"].inputs if i.id == "embedder_name")
    assert h.EMBEDDER in emb.options
    tv = next(i for i in schemas["MotionDialLoadTaskVectors"].inputs if i.id == "task_vectors_name")
    assert h.TASK_VECTORS in tv.options


def test_examples_were_copied_to_input(nodes_env):
    assert sorted(os.listdir(nodes_env.input)) == ["motiondial_example.png", "motiondial_reference.mp4"]


def test_nodes_package_imports_only_relatively():
    """`import nodes` inside the pack would get ComfyUI's nodes.py: only relative imports allowed."""
    root = os.path.join(h.PACK_DIR, "nodes")
    for f in os.listdir(root):
        if f.endswith(".py"):
            src = open(os.path.join(root, f), encoding="utf-8").read()
            assert "import nodes" not in src and "from nodes" not in src, f


def test_entrypoint_like_comfyui_in_a_fresh_interpreter(tmp_path):
    """ComfyUI's way: file path, mangled name, its own `nodes` module first; the stand-in for comfy_api."""
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, importlib.util, os, sys, types
        sys.path.insert(0, {tests!r})
        import nodes_comfy_stand_in as s
        d = {str(tmp_path)!r}
        s.install(os.path.join(d, "models"), os.path.join(d, "in"), os.path.join(d, "out"))
        comfy_nodes = types.ModuleType("nodes"); sys.modules["nodes"] = comfy_nodes
        spec = importlib.util.spec_from_file_location({h.PACK_MODULE!r}, {os.path.join(h.PACK_DIR, "__init__.py")!r})
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        ext = asyncio.run(mod.comfy_entrypoint())
        names = sorted(c.define_schema().node_id for c in asyncio.run(ext.get_node_list()))
        assert sys.modules["nodes"] is comfy_nodes
        assert "torch" not in sys.modules, "defining the nodes must not import torch"
        print(",".join(names))
    """)], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.strip().split(",")) == EXPECTED


def test_web_extension_names_existing_nodes():
    """nodes/web/motiondial_results.js draws ui.text on these nodes; they must exist and return text."""
    import re

    src = open(os.path.join(h.PACK_DIR, "nodes", "web", "motiondial_results.js"), encoding="utf-8").read()
    names = re.findall(r'"(MotionDial\w+)"', src)
    assert names and set(names) <= EXPECTED
    assert set(names) == {"MotionDialEstimateMotion", "MotionDialBuildTaskVectors"}
