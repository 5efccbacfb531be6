"""Every shipped workflow matches the nodes' current schemas: node types, socket inputs and
outputs, links, widget values (count, order, bounds, options), and its API-format copy.

A renamed or re-ordered input fails here rather than in a user's saved graph.
"""
import json
import os
import sys

import pytest

import nodes_harness as h

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NAMES = h.workflow_names()


def _schema_widgets(schema):
    """(input, ui slot count) in widgets_values order: seeds with control_after_generate take two."""
    return [(i, 2 if getattr(i, "control_after_generate", None) else 1) for i in schema.inputs
            if i.io_type in WIDGET_TYPES]


def test_the_five_workflows_are_shipped_with_thumbnails_and_api_copies():
    assert NAMES == ["motiondial_build_ed_task_vectors", "motiondial_demo", "motiondial_i2v_dials",
                     "motiondial_i2v_ed_schedule", "motiondial_motion_transfer"]
    for n in NAMES:
        assert os.path.isfile(os.path.join(h.WORKFLOWS, n + ".jpg")), f"{n}.jpg thumbnail missing"
        assert os.path.isfile(os.path.join(h.WORKFLOWS, "api", n + "_api.json"))
    # ComfyUI lists <pack>/workflows/*.json only: the API copies in workflows/api/ stay out of Templates.
    assert sorted(os.listdir(os.path.join(h.WORKFLOWS, "api"))) == sorted(n + "_api.json" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_schemas(nodes_env, name):
    wf = h.load_workflow(name, api=False)
    assert wf.get("version") == 0.4 and wf["nodes"] and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert notes and len(notes[0]["widgets_values"][0]) > 100, "each workflow explains itself in a Note"
    for n in wf["nodes"]:
        where = f"{name}: node {n['id']} ({n['type']})"
        if n["type"] == "Note":
            continue
        if n["type"] in h.CORE_NODES:
            core = h.CORE_NODES[n["type"]]
            assert [o["type"] for o in n["outputs"]] == core["outputs"], where
            for i in n["inputs"]:
                assert i["name"] in core["inputs"], f"{where}: unknown input {i['name']}"
            continue
        assert n["type"] in nodes_env.by_id, f"{where}: unknown node type"
        schema = nodes_env.by_id[n["type"]].define_schema()
        # outputs: names and types, in order
        assert [(o["name"], o["type"]) for o in n["outputs"]] == \
            [(o.display_name, o.io_type) for o in schema.outputs], where
        # socket inputs: every non-widget input of the schema, optional ones marked
        sockets = [i for i in n["inputs"] if "widget" not in i]
        assert [(i["name"], i["type"]) for i in sockets] == \
            [(i.id, i.io_type) for i in schema.inputs if i.io_type not in WIDGET_TYPES], where
        for i in sockets:
            spec = next(s for s in schema.inputs if s.id == i["name"])
            assert (i.get("shape") == 7) == bool(spec.optional), f"{where}: optional marker of {i['name']}"
            if not spec.optional:
                assert i["link"] is not None, f"{where}: required input {i['name']} not connected"
        # widget values: count, order, values
        values = list(n["widgets_values"])
        widgets = _schema_widgets(schema)
        assert len(values) == sum(k for _, k in widgets), f"{where}: {len(values)} widget values"
        k = 0
        for spec, slots in widgets:
            v = values[k]
            k += slots
            w = f"{where}.{spec.id}={v!r}"
            if spec.io_type == "COMBO":
                assert v in spec.options, w
            elif spec.io_type in ("INT", "FLOAT"):
                assert not isinstance(v, bool) and isinstance(v, (int, float)), w
                assert spec.min <= v <= spec.max, w
            elif spec.io_type == "STRING":
                assert isinstance(v, str), w
            elif spec.io_type == "BOOLEAN":
                assert isinstance(v, bool), w
            if slots == 2:
                assert values[k - 1] in ("fixed", "increment", "decrement", "randomize"), w
        for i in n["inputs"]:
            if "widget" in i:
                assert i["widget"]["name"] in {s.id for s, _ in widgets}, f"{where}: {i['name']} is not a widget"


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_are_consistent(name):
    wf = h.load_workflow(name, api=False)
    nodes = {n["id"]: n for n in wf["nodes"]}
    ids = set()
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        ids.add(link_id)
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, f"{name}: link {link_id}"
        assert out["type"] == typ and inp["type"] in (typ, "*"), f"{name}: link {link_id} type {typ}"
    for n in wf["nodes"]:
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in ids, f"{name}: dangling link on node {n['id']}"
    assert wf["last_link_id"] >= max(ids, default=0) and wf["last_node_id"] >= max(nodes)


@pytest.mark.parametrize("name", NAMES)
def test_api_copy_is_the_same_graph(nodes_env, name):
    ui = h.load_workflow(name, api=False)
    api = h.load_workflow(name, api=True)
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert set(api) == set(nodes)
    links = {l[0]: l for l in ui["links"]}
    for nid, node in api.items():
        u = nodes[nid]
        assert node["class_type"] == u["type"]
        expected = {}
        for i in u["inputs"]:
            if i["link"] is not None:
                _, src, slot, *_ = links[i["link"]]
                expected[i["name"]] = [str(src), slot]
        if u["type"] in nodes_env.by_id:
            widgets = _schema_widgets(nodes_env.by_id[u["type"]].define_schema())
            k = 0
            for spec, slots in widgets:
                if spec.id not in expected:
                    expected[spec.id] = u["widgets_values"][k]
                k += slots
        else:
            names = [n for n, t in h.CORE_NODES[u["type"]]["inputs"].items() if t in WIDGET_TYPES]
            for n, v in zip(names, u["widgets_values"]):
                expected.setdefault(n, v)
        assert node["inputs"] == expected, f"{name}: node {nid}"
        h.validate_inputs(nodes_env.by_id[u["type"]].define_schema(), node["inputs"], nid) \
            if u["type"] in nodes_env.by_id else None


def test_generator_reproduces_the_shipped_files(tmp_path):
    """workflows/make_workflows.py is the source of truth; the JSON files must be its output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_workflows", os.path.join(h.WORKFLOWS, "make_workflows.py"))
    mw = importlib.util.module_from_spec(spec)
    sys.modules["make_workflows"] = mw  # dataclasses look their module up
    try:
        spec.loader.exec_module(mw)
    finally:
        del sys.modules["make_workflows"]
    for make in mw.GRAPHS:
        g = make()
        assert mw.to_ui(g) == h.load_workflow(g.name, api=False)
        assert mw.to_api(g) == h.load_workflow(g.name, api=True)
    json.dumps(mw.to_ui(mw.GRAPHS[0]()))
