"""Test support for the ComfyUI nodes, without ComfyUI.

* ``env()``: one per test session — a temporary ComfyUI-like tree (models/, input/, output/) with
  tiny models in it, the ``nodes_comfy_stand_in`` modules, and the pack loaded the way ComfyUI
  loads it (by file path under a mangled name, with a stand-in top-level ``nodes`` module).
* ``run_api_graph(graph)``: executes an API-format workflow by calling the node classes, after
  the checks ComfyUI's ``/prompt`` makes (known class, required inputs, combo options, bounds);
  ComfyUI's core nodes that the workflows use are replaced by small stand-ins below.
* ``make_models_dir(root)``: the tiny models the shipped workflows name (also used by the real
  end-to-end test).
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from typing import Any

import nodes_comfy_stand_in as stand_in

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(PACK_DIR, "workflows")
# ComfyUI's nodes.load_custom_node names a pack module after its folder's full path, dots replaced.
PACK_MODULE = PACK_DIR.replace(".", "_x_")

# The names the shipped workflows use (see workflows/make_workflows.py).
BASE, FINETUNED, LOCKED = "CogVideoX1.5-5B-I2V", "CogVideoX1.5-5B-I2V-motion-ft", "CogVideoX-5b-I2V"
EMBEDDER, OTHER_EMBEDDER = "motiondial_cogvideox15_embedder.safetensors", "made_for_cogvideox10.safetensors"
TASK_VECTORS = "ed_cogvideox15"

# ComfyUI's own nodes in the workflows: input names in widget order (None: a link-only input).
# tests/test_comfy_e2e.py checks this table against the real server's /object_info.
CORE_NODES: dict[str, dict[str, Any]] = {
    "LoadImage": {"inputs": {"image": "COMBO"}, "outputs": ["IMAGE", "MASK"]},
    "LoadVideo": {"inputs": {"file": "COMBO"}, "outputs": ["VIDEO"]},
    "GetVideoComponents": {"inputs": {"video": "VIDEO"}, "outputs": ["IMAGE", "AUDIO", "FLOAT"]},
    "CreateVideo": {"inputs": {"images": "IMAGE", "fps": "FLOAT", "audio": "AUDIO"}, "outputs": ["VIDEO"],
                    "optional": ["audio"]},
    "SaveVideo": {"inputs": {"video": "VIDEO", "filename_prefix": "STRING", "format": "COMBO", "codec": "COMBO"},
                  "outputs": []},
    "PreviewAny": {"inputs": {"source": "*"}, "outputs": []},
    "ImageScaleBy": {"inputs": {"image": "IMAGE", "upscale_method": "COMBO", "scale_by": "FLOAT"},
                     "outputs": ["IMAGE"]},
}


def make_models_dir(root: str, task_vectors: bool = False) -> dict[str, str]:
    """Tiny models under ``root`` in ComfyUI's layout, named as the shipped workflows name them.

    The ED task vectors that workflow (b) loads are what workflow (d) builds; ``task_vectors=True``
    builds them here already (with the same parameters, so (d) then finds them built)."""
    import torch

    from merging.recipes import build_ed
    from motion.embedding import build_for_model, save_motion_embedder
    from pipelines import load_model
    from pipelines.tiny import build_tiny_model

    d = os.path.join(root, "diffusers")
    paths = {
        "base": build_tiny_model(os.path.join(d, BASE), "cogvideox1.5-i2v", seed=0),
        "finetuned": build_tiny_model(os.path.join(d, FINETUNED), "cogvideox1.5-i2v", seed=1),
        "locked": build_tiny_model(os.path.join(d, LOCKED), "cogvideox-i2v", seed=0),
    }
    emb_dir = os.path.join(root, "motion_embedders")
    for key, name in (("base", EMBEDDER), ("locked", OTHER_EMBEDDER)):
        model = load_model(paths[key])
        emb = build_for_model(model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a "trained" embedder: non-zero, so the scores change the video
            for p in emb.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        paths[key + "_embedder"] = save_motion_embedder(emb, os.path.join(emb_dir, name))
    paths["task_vectors"] = os.path.join(root, "task_vectors", TASK_VECTORS)
    os.makedirs(os.path.dirname(paths["task_vectors"]), exist_ok=True)
    if task_vectors:
        build_ed(paths["base"], paths["finetuned"], paths["task_vectors"])
    os.makedirs(os.path.join(root, "motion_estimators"), exist_ok=True)
    return paths


@dataclass
class Env:
    root: str
    models: str
    input: str
    output: str
    paths: dict
    pack: types.ModuleType
    nodes: types.ModuleType
    modules: dict
    by_id: dict = field(default_factory=dict)

    def install(self) -> None:
        sys.modules.update(self.modules)

    def uninstall(self) -> None:
        stand_in.uninstall()


_ENV: Env | None = None


def load_pack(module_name: str = PACK_MODULE) -> types.ModuleType:
    """Import the pack as ComfyUI does: its ``__init__.py`` by path under a mangled name, with
    ComfyUI's own top-level ``nodes`` module (here a stand-in) already imported."""
    sys.modules.setdefault("nodes", types.ModuleType("nodes"))  # ComfyUI's nodes.py, stand-in
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(PACK_DIR, "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod


def env() -> Env:
    """The session's environment (built on first use, removed at exit); stand-ins installed."""
    global _ENV
    if _ENV is None:
        root = tempfile.mkdtemp(prefix="motiondial-nodes-")
        atexit.register(shutil.rmtree, root, True)
        models, inp, out = (os.path.join(root, n) for n in ("models", "input", "output"))
        for p in (models, inp, out):
            os.makedirs(p)
        paths = make_models_dir(models, task_vectors=True)
        had_nodes = "nodes" in sys.modules
        modules = stand_in.install(models, inp, out)
        pack = load_pack()
        import asyncio

        ext = asyncio.run(pack.comfy_entrypoint())
        node_list = asyncio.run(ext.get_node_list())
        nodes_pkg = sys.modules[PACK_MODULE + ".nodes"]
        if not had_nodes:
            del sys.modules["nodes"]
        _ENV = Env(root, models, inp, out, paths, pack, nodes_pkg, modules,
                   {cls.define_schema().node_id: cls for cls in node_list})
    else:
        _ENV.install()
    return _ENV


# ----------------------------------------------------------------------------- core-node stand-ins
class CoreStandIns:
    """ComfyUI core nodes the workflows use, reduced to what they do to the data."""

    def __init__(self, e: Env) -> None:
        self.env = e
        self.saved: list[dict] = []
        self.previews: list[str] = []

    def LoadImage(self, image: str):  # noqa: N802
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(os.path.join(self.env.input, image)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)[None]
        return t, torch.zeros(t.shape[1:3])

    def LoadVideo(self, file: str):  # noqa: N802
        from motion import read_clip

        return (read_clip(os.path.join(self.env.input, file)),)

    def GetVideoComponents(self, video):  # noqa: N802
        import torch

        return torch.from_numpy(video.frames).float() / 255.0, None, float(video.fps)

    def CreateVideo(self, images, fps: float, audio=None):  # noqa: N802
        if not 1.0 <= fps <= 120.0:
            raise ValueError(f"CreateVideo: fps {fps} outside 1..120")
        return ({"images": images, "fps": fps},)

    def SaveVideo(self, video, filename_prefix: str, format: str, codec: str):  # noqa: N802, A002
        from motion import write_video

        frames = (video["images"].clamp(0, 1) * 255).round().to(dtype=__import__("torch").uint8).numpy()
        path = os.path.join(self.env.output, filename_prefix.replace("/", "_") + f"_{len(self.saved):05d}.mp4")
        write_video(path, frames, video["fps"])
        self.saved.append({"path": path, "frames": frames.shape[0], "fps": video["fps"]})
        return ()

    def ImageScaleBy(self, image, upscale_method: str, scale_by: float):  # noqa: N802
        import torch

        if upscale_method != "nearest-exact" or not 0.01 <= scale_by <= 8.0:  # what the workflows use
            raise ValueError(f"ImageScaleBy stand-in: {upscale_method} x{scale_by} not supported")
        h, w = round(image.shape[1] * scale_by), round(image.shape[2] * scale_by)
        out = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(h, w), mode="nearest-exact")
        return (out.movedim(1, -1),)

    def PreviewAny(self, source):  # noqa: N802
        self.previews.append(str(source))
        return ()


# ----------------------------------------------------------------------------- validation + execution
class GraphError(ValueError):
    pass


def validate_inputs(schema, inputs: dict, node_id: str) -> None:
    """The checks ComfyUI's /prompt makes on a pack node's inputs before anything runs."""
    for inp in schema.inputs:
        name = inp.id
        if name not in inputs:
            if not inp.optional:
                raise GraphError(f"node {node_id} ({schema.node_id}): required input {name!r} missing")
            continue
        v = inputs[name]
        if isinstance(v, list):  # a link
            continue
        kind = inp.io_type
        if kind == "COMBO" and v not in inp.options:
            raise GraphError(f"node {node_id} ({schema.node_id}): {name}={v!r} not in {inp.options}")
        if kind in ("INT", "FLOAT"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "INT" and not isinstance(v, int)):
                raise GraphError(f"node {node_id} ({schema.node_id}): {name}={v!r} is not {kind}")
            if (inp.min is not None and v < inp.min) or (inp.max is not None and v > inp.max):
                raise GraphError(f"node {node_id} ({schema.node_id}): {name}={v} outside [{inp.min}, {inp.max}]")
        if kind == "STRING" and not isinstance(v, str):
            raise GraphError(f"node {node_id} ({schema.node_id}): {name}={v!r} is not a string")
        if kind == "BOOLEAN" and not isinstance(v, bool):
            raise GraphError(f"node {node_id} ({schema.node_id}): {name}={v!r} is not a boolean")
    unknown = set(inputs) - {i.id for i in schema.inputs}
    if unknown:
        raise GraphError(f"node {node_id} ({schema.node_id}): unknown inputs {sorted(unknown)}")


@dataclass
class RunResult:
    outputs: dict  # node id -> tuple of outputs
    ui: dict  # node id -> ui dict
    core: CoreStandIns


def run_api_graph(graph: dict, e: Env | None = None) -> RunResult:
    """Validate, then execute every node of an API-format graph in dependency order."""
    e = e or env()
    core = CoreStandIns(e)
    for nid, node in graph.items():
        ct = node["class_type"]
        if ct in e.by_id:
            validate_inputs(e.by_id[ct].define_schema(), node["inputs"], nid)
        elif ct not in CORE_NODES:
            raise GraphError(f"node {nid}: unknown class_type {ct!r}")
        for name, v in node["inputs"].items():
            if isinstance(v, list) and str(v[0]) not in graph:
                raise GraphError(f"node {nid}: input {name!r} links to missing node {v[0]}")
    done: dict[str, tuple] = {}
    ui: dict[str, Any] = {}

    def run(nid: str, stack: tuple = ()) -> tuple:
        if nid in done:
            return done[nid]
        if nid in stack:
            raise GraphError(f"cycle through node {nid}")
        node = graph[nid]
        kwargs = {}
        for name, v in node["inputs"].items():
            if isinstance(v, list):
                src = run(str(v[0]), stack + (nid,))
                kwargs[name] = src[v[1]]
            else:
                kwargs[name] = v
        ct = node["class_type"]
        if ct in e.by_id:
            out = e.by_id[ct].execute(**kwargs)
            done[nid] = tuple(out.args)
            if out.ui is not None:
                ui[nid] = out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui
        else:
            done[nid] = tuple(getattr(core, ct)(**kwargs))
        return done[nid]

    for nid in graph:
        run(nid)
    return RunResult(done, ui, core)


def load_workflow(name: str, api: bool) -> dict:
    path = os.path.join(WORKFLOWS, "api", name + "_api.json") if api else os.path.join(WORKFLOWS, name + ".json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def workflow_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
