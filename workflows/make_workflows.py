"""Write the shipped workflows: UI format (``workflows/*.json``, what ComfyUI's Templates menu lists
and drag-and-drop loads) and the API-format copies (``workflows/api/*.json``, for ``POST /prompt``).

    python workflows/make_workflows.py

Each graph is described once below (nodes, widget values by name, links) and both files are
written from it, so the two formats cannot drift apart. tests/test_workflows_schema.py checks
every file against the nodes' current schemas; tests/test_workflows_run.py runs the API copies.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the pack's library (pipelines.demo: the bundled demo's names)
from pipelines.demo import DEMO_DEFAULTS, DEMO_EMBEDDER_LABEL, DEMO_MODEL_LABEL  # noqa: E402

# The models the templates name. Put these folders / files into ComfyUI's models/ (see docs/comfyui.md).
BASE_MODEL = "CogVideoX1.5-5B-I2V"
FINETUNED_MODEL = "CogVideoX1.5-5B-I2V-motion-ft"
EMBEDDER = "motiondial_cogvideox15_embedder.safetensors"
TASK_VECTORS = "ed_cogvideox15"
EXAMPLE_IMAGE = "motiondial_example.png"
EXAMPLE_CLIP = "motiondial_reference.mp4"
PROMPT = "a sail boat drifts across a calm lake below green hills, the sun shines, gentle waves"
NEGATIVE = "blurry, distorted, static, low quality"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets: list[tuple[str, Any]] = field(default_factory=list)  # (input name, value), schema order
    sockets: list[tuple[str, str, bool]] = field(default_factory=list)  # (name, type, optional) inputs
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    title: str | None = None
    extra_widget_values: dict[int, Any] = field(default_factory=dict)  # UI-only values (upload, control)
    color: tuple[str, str] | None = None


@dataclass
class Graph:
    name: str
    title: str
    nodes: list[Node]
    links: list[tuple[int, int, int, str]]  # (from node, from slot, to node, to input name)


SAMPLER_WIDGETS = [("prompt", PROMPT), ("negative_prompt", NEGATIVE), ("frames", 49), ("steps", 50), ("cfg", 6.0),
                   ("seed", 42), ("object_intensity", 5.0), ("camera_intensity", 5.0), ("width", 0), ("height", 0),
                   ("fps", 0.0)]
SAMPLER_SOCKETS = [("model", "MD_I2V_MODEL", False), ("image", "IMAGE", False), ("scores", "MD_MOTION_SCORES", True),
                   ("embedder", "MD_MOTION_EMBEDDER", True), ("task_vectors", "MD_TASK_VECTORS", True),
                   ("schedule", "MD_SCHEDULE", True), ("text_adapter", "MD_TEXT_CONTROL", True)]


def load_model(id_: int, pos) -> Node:
    return Node(id_, "MotionDialLoadI2VModel", pos, (320, 130),
                [("model_name", BASE_MODEL), ("dtype", "auto"), ("device", "auto"), ("vae_tiling", True)],
                outputs=[("model", "MD_I2V_MODEL")])


def load_embedder(id_: int, pos, name: str = EMBEDDER) -> Node:
    return Node(id_, "MotionDialLoadMotionEmbedder", pos, (320, 60), [("embedder_name", name)],
                [("model", "MD_I2V_MODEL", False)], [("embedder", "MD_MOTION_EMBEDDER")])


def load_image(id_: int, pos) -> Node:
    return Node(id_, "LoadImage", pos, (320, 330), [("image", EXAMPLE_IMAGE)],
                outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], extra_widget_values={1: "image"})


def sampler(id_: int, pos, object_intensity: float = 5.0, camera_intensity: float = 5.0, **widgets_: Any) -> Node:
    widgets_.update(object_intensity=object_intensity, camera_intensity=camera_intensity)
    widgets = [(k, widgets_.get(k, v)) for k, v in SAMPLER_WIDGETS]
    return Node(id_, "MotionDialI2VSampler", pos, (400, 560), widgets, SAMPLER_SOCKETS,
                [("frames", "IMAGE"), ("fps", "FLOAT")], extra_widget_values={6: "fixed"})


def estimate_motion(id_: int, pos, fps: float = 8.0) -> Node:
    return Node(id_, "MotionDialEstimateMotion", pos, (320, 110), [("fps", fps)],
                [("frames", "IMAGE", False), ("estimator", "MD_MOTION_ESTIMATOR", True)],
                [("scores", "MD_MOTION_SCORES"), ("object", "FLOAT"), ("camera", "FLOAT"), ("summary", "STRING")])


def preview_any(id_: int, pos, title: str) -> Node:
    return Node(id_, "PreviewAny", pos, (320, 120), sockets=[("source", "*", False)], title=title)


def create_video(id_: int, pos) -> Node:
    return Node(id_, "CreateVideo", pos, (270, 80), [("fps", 8.0)],
                [("images", "IMAGE", False), ("audio", "AUDIO", True)], [("VIDEO", "VIDEO")])


def save_video(id_: int, pos, prefix: str) -> Node:
    return Node(id_, "SaveVideo", pos, (420, 480), [("filename_prefix", prefix), ("format", "auto"),
                                                     ("codec", "auto")], [("video", "VIDEO", False)])


def note(id_: int, pos, size, text: str) -> Node:
    return Node(id_, "Note", pos, size, [("text", text)], title="About this workflow", color=("#432", "#653"))


NOTE_SETUP = (f"\n\nNeeds: models/diffusers/{BASE_MODEL} (a diffusers folder), the example inputs "
              f"{EXAMPLE_IMAGE} / {EXAMPLE_CLIP} (copied to input/ by the pack) and, for the intensity dials, a "
              f"motion embedder trained for that model in models/motion_embedders. See docs/comfyui.md.")


def graph_dials() -> Graph:
    return Graph("motiondial_i2v_dials", "Image to video with object / camera motion dials", [
        load_model(1, (40, 60)),
        load_embedder(2, (40, 230)),
        load_image(3, (40, 340)),
        sampler(4, (420, 60), object_intensity=7.0, camera_intensity=2.0),
        create_video(5, (880, 60)),
        save_video(6, (880, 180), "video/motiondial_dials"),
        note(7, (420, 660), (400, 220),
             "Image -> video with two motion dials.\n\nObject intensity (1..10) sets how much things in the scene "
             "move; camera intensity (1..10) how much the camera moves. They act through the motion embedder "
             "(trained for this base model; without it the dials have no effect). Here: a lively scene (object 7) "
             "seen from a steady camera (camera 2). Output frames go to ComfyUI's own Create Video / Save Video."
             + NOTE_SETUP),
    ], [(1, 0, 2, "model"), (1, 0, 4, "model"), (3, 0, 4, "image"), (2, 0, 4, "embedder"),
        (4, 0, 5, "images"), (4, 1, 5, "fps"), (5, 0, 6, "video")])


def graph_ed() -> Graph:
    return Graph("motiondial_i2v_ed_schedule", "Image to video with the ED dynamics / control schedule", [
        load_model(1, (40, 60)),
        load_embedder(2, (40, 230)),
        load_image(3, (40, 340)),
        Node(4, "MotionDialLoadTaskVectors", (40, 730), (320, 80), [("task_vectors_name", TASK_VECTORS)],
             [("model", "MD_I2V_MODEL", False)], [("task_vectors", "MD_TASK_VECTORS"), ("schedule", "MD_SCHEDULE")]),
        Node(5, "MotionDialMotionSchedule", (40, 850), (320, 330),
             [("kind", "hard_switch"), ("switch", 0.5), ("start", 0.0), ("end", 1.0), ("dynamics_strength", 1.0),
              ("control_strength", 1.0),
              ("keyframes", '{"dynamics": [[0.4, 0.0], [0.6, 1.0]], "control": [[0.4, 1.0], [0.6, 0.0]]}'),
              ("blend", "weights")], outputs=[("schedule", "MD_SCHEDULE")]),
        sampler(6, (420, 60)),
        create_video(7, (880, 60)),
        save_video(8, (880, 180), "video/motiondial_ed"),
        note(9, (420, 660), (400, 260),
             "Image -> video with ED (extrapolate & decouple) motion control.\n\nThe 'dynamics' task vector "
             "(the base pushed away from its fine-tune, sparsified) raises motion; the 'control' vector "
             "(fine-tune amplified) makes motion follow the prompt. Motion Schedule applies dynamics at high "
             "noise (the first steps decide the motion) and control at low noise (details): the ED reference is "
             "a hard switch at noise level 0.5. Try linear/cosine blends or your own keyframes, and the two "
             "strengths. Task vectors come from the 'build ED task vectors' workflow." + NOTE_SETUP),
    ], [(1, 0, 2, "model"), (1, 0, 4, "model"), (1, 0, 6, "model"), (3, 0, 6, "image"), (2, 0, 6, "embedder"),
        (4, 0, 6, "task_vectors"), (5, 0, 6, "schedule"), (6, 0, 7, "images"), (6, 1, 7, "fps"), (7, 0, 8, "video")])


def graph_transfer() -> Graph:
    return Graph("motiondial_motion_transfer", "Motion transfer: reference clip -> scores -> image -> video", [
        Node(1, "LoadVideo", (40, 60), (320, 330), [("file", EXAMPLE_CLIP)], outputs=[("VIDEO", "VIDEO")],
             extra_widget_values={1: "image"}),
        Node(2, "GetVideoComponents", (40, 420), (320, 70), sockets=[("video", "VIDEO", False)],
             outputs=[("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
        Node(3, "MotionDialLoadMotionEstimator", (40, 520), (320, 60), [("estimator", "flow (weight-free)")],
             outputs=[("estimator", "MD_MOTION_ESTIMATOR")]),
        estimate_motion(4, (400, 420)),
        preview_any(5, (400, 590), "Estimated motion"),
        load_model(6, (400, 60)),
        load_embedder(7, (400, 230)),
        load_image(8, (40, 620)),
        sampler(9, (760, 60)),
        create_video(10, (1200, 60)),
        save_video(11, (1200, 180), "video/motiondial_transfer"),
        note(12, (760, 660), (400, 220),
             "Motion transfer.\n\nEstimate Motion measures the reference clip's object and camera motion on the "
             "1..10 scale (weight-free optical flow by default, or a trained estimator from "
             "models/motion_estimators); the numbers show on the node and in 'Estimated motion'. The scores "
             "drive the I2V Sampler (they override its two dials), so the new video moves like the reference."
             + NOTE_SETUP),
    ], [(1, 0, 2, "video"), (2, 0, 4, "frames"), (2, 2, 4, "fps"), (3, 0, 4, "estimator"), (4, 3, 5, "source"),
        (6, 0, 7, "model"), (6, 0, 9, "model"), (8, 0, 9, "image"), (4, 0, 9, "scores"), (7, 0, 9, "embedder"),
        (9, 0, 10, "images"), (9, 1, 10, "fps"), (10, 0, 11, "video")])


def graph_build() -> Graph:
    return Graph("motiondial_build_ed_task_vectors", "Build ED task vectors from a base and a fine-tuned model", [
        Node(1, "MotionDialBuildTaskVectors", (40, 60), (360, 330),
             [("base_model", BASE_MODEL), ("finetuned_model", FINETUNED_MODEL), ("name", TASK_VECTORS),
              ("a_dyn", 0.25), ("b_dyn", 0.75), ("a_con", 1.0), ("b_con", 0.25), ("drop_rate", 0.7), ("dare_seed", 0),
              ("scope", "all"), ("overwrite", False), ("finetuned_delta", "(none)")],
             outputs=[("task_vectors", "MD_TASK_VECTORS"), ("schedule", "MD_SCHEDULE"), ("summary", "STRING")]),
        Node(3, "PreviewAny", (40, 470), (360, 120), sockets=[("source", "*", False)], title="Result"),
        note(2, (440, 60), (400, 300),
             "Build the ED task vectors (stages 2-3 of Extrapolating & Decoupling).\n\nFrom a base I2V model and "
             "the same model fine-tuned on motion (stage 1), this writes models/task_vectors/<name>/ with "
             "dynamics.safetensors = b_dyn * DARE(a_dyn * (base - finetuned)) and control.safetensors = "
             "a_con * finetuned + b_con * DARE(finetuned - base) - base (DARE drop rate p, seeded), plus the "
             "reference schedule. Defaults are the paper's. The checkpoints are streamed key by key, so memory "
             "stays bounded; the result loads with Load ED Task Vectors.\n\nNeeds models/diffusers/"
             f"{BASE_MODEL} and models/diffusers/{FINETUNED_MODEL}. Press Run: 'Result' shows where the set was "
             "written (a set already built from the same weights and parameters is reused)."),
    ], [(1, 2, 3, "source")])


# The demo graph samples at the bundled model's trained-for settings and enlarges the 32-px frames
# 8x (nearest: the pixels stay honest) for viewing; Estimate Motion reads the native frames.
DEMO_UPSCALE = 8.0


def graph_demo() -> Graph:
    d = DEMO_DEFAULTS
    return Graph("motiondial_demo", "MotionDial demo: the bundled 32-px model, object / camera dials, no download", [
        Node(1, "MotionDialLoadI2VModel", (40, 60), (320, 130),
             [("model_name", DEMO_MODEL_LABEL), ("dtype", "fp32"), ("device", "auto"), ("vae_tiling", True)],
             outputs=[("model", "MD_I2V_MODEL")]),
        load_embedder(2, (40, 230), DEMO_EMBEDDER_LABEL),
        load_image(3, (40, 340)),
        sampler(4, (420, 60), object_intensity=7.0, camera_intensity=5.0, prompt="", negative_prompt="",
                frames=d["frames"], steps=d["steps"], cfg=d["cfg"], width=d["width"], height=d["height"],
                fps=d["fps"]),
        Node(5, "ImageScaleBy", (880, 60), (320, 82), [("upscale_method", "nearest-exact"), ("scale_by", DEMO_UPSCALE)],
             [("image", "IMAGE", False)], [("IMAGE", "IMAGE")], title="Enlarge 8x for viewing"),
        create_video(6, (880, 190)),
        save_video(7, (880, 310), "video/motiondial_demo"),
        estimate_motion(8, (40, 720), fps=d["fps"]),
        preview_any(9, (40, 950), "Measured motion of the result"),
        note(10, (420, 660), (400, 300),
             "The MotionDial demo: see the motion dials work without downloading anything.\n\nThe bundled demo "
             "model is a tiny Stable Video Diffusion (32x32 pixels, 8 frames, 7 fps) trained from scratch on "
             "synthetic clips (the camera pans right, one object moves down) with MotionDial's decoupled motion "
             "scores; the bundled embedder turns the object / camera intensities (1..10; trained on 1..9) into its "
             "conditioning. The example image is centre-cropped to a square. cfg stays 1: the model was trained "
             "without condition dropout, so guidance has nothing to push against. The 32-px frames are enlarged "
             "8x for the saved video; Estimate Motion measures the native frames, so you can compare what you "
             "asked for with what you got. Try object 1..9 and camera 1..9. A toy: it shows control, not video "
             "quality. For real models see docs/comfyui.md."),
    ], [(1, 0, 2, "model"), (1, 0, 4, "model"), (3, 0, 4, "image"), (2, 0, 4, "embedder"),
        (4, 0, 5, "image"), (5, 0, 6, "images"), (4, 1, 6, "fps"), (6, 0, 7, "video"),
        (4, 0, 8, "frames"), (4, 1, 8, "fps"), (8, 3, 9, "source")])


GRAPHS = [graph_dials, graph_ed, graph_transfer, graph_build, graph_demo]


def _widget_values(n: Node) -> list:
    vals = [v for _, v in n.widgets]
    for index, value in sorted(n.extra_widget_values.items()):
        vals.insert(index, value)
    return vals


def to_ui(g: Graph) -> dict:
    links = []
    inputs_by_node: dict[int, dict[str, int]] = {}
    outputs_by_node: dict[tuple[int, int], list[int]] = {}
    types = {n.id: n for n in g.nodes}
    for i, (src, slot, dst, name) in enumerate(g.links, start=1):
        links.append([i, src, slot, dst, None, types[src].outputs[slot][1]])
        inputs_by_node.setdefault(dst, {})[name] = i
        outputs_by_node.setdefault((src, slot), []).append(i)
    nodes = []
    for order, n in enumerate(g.nodes):
        linked = inputs_by_node.get(n.id, {})
        ins = []
        for name, typ, optional in n.sockets:
            d = {"name": name, "type": typ, "link": linked.get(name)}
            if optional:
                d["shape"] = 7
            ins.append(d)
        for name, value in n.widgets:  # a widget fed by a link gets a socket that names the widget
            if name in linked:
                typ = "FLOAT" if isinstance(value, float) else "INT" if isinstance(value, int) else "STRING"
                ins.append({"name": name, "type": typ, "widget": {"name": name}, "link": linked[name]})
        for name in linked:
            if not any(i["name"] == name for i in ins):
                raise ValueError(f"{g.name}: node {n.id} ({n.type}) has no input {name!r}")
        for i in ins:  # the link's target slot is the input's index on the node
            if i["link"] is not None:
                links[i["link"] - 1][4] = ins.index(i)
        outs = [{"name": name, "type": typ, "slot_index": k, "links": outputs_by_node.get((n.id, k), [])}
                for k, (name, typ) in enumerate(n.outputs)]
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
                "mode": 0, "inputs": ins, "outputs": outs,
                "properties": {"Node name for S&R": n.type} if n.type != "Note" else {},
                "widgets_values": _widget_values(n)}
        if n.title:
            node["title"] = n.title
        if n.color:
            node["color"], node["bgcolor"] = n.color
        nodes.append(node)
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "motiondial/" + g.name)), "revision": 0,
            "last_node_id": max(n.id for n in g.nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def to_api(g: Graph) -> dict:
    out = {}
    for n in g.nodes:
        if n.type == "Note":  # a frontend-only node: not part of the prompt
            continue
        inputs: dict[str, Any] = {k: v for k, v in n.widgets}
        for src, slot, dst, name in g.links:
            if dst == n.id:
                inputs[name] = [str(src), slot]
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def main() -> None:
    os.makedirs(os.path.join(HERE, "api"), exist_ok=True)
    for make in GRAPHS:
        g = make()
        for path, data in ((os.path.join(HERE, g.name + ".json"), to_ui(g)),
                           (os.path.join(HERE, "api", g.name + "_api.json"), to_api(g))):
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
            print("wrote", os.path.relpath(path, HERE))


if __name__ == "__main__":
    main()
