"""End to end in a real ComfyUI server (skipped unless ``COMFYUI_DIR`` names a ComfyUI checkout).

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] \
    [COMFYUI_PYTHONPATH=extra/import/dirs] pytest tests/test_comfy_e2e.py

``COMFYUI_PYTHON`` is the interpreter with ComfyUI's requirements and this pack's (default: this
one); ``COMFYUI_PYTHONPATH`` is prepended to the server's ``PYTHONPATH`` (e.g. a torchvision
stand-in on a machine without torchvision). The test starts the server on 127.0.0.1 with the pack
(loaded by ComfyUI from a ``custom_nodes`` folder listed in an extra-model-paths config) and tiny
models in a temporary ``models`` folder, then checks: no import failure and every node in
``/object_info``; the core-node table of nodes_harness.py against the real schemas; each API
workflow runs and writes its video; ``POST /interrupt`` mid-sampling stops the run and a next run
succeeds; after ``POST /free`` (unload models, free memory) the model loads and runs again.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import nodes_harness as h

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI checkout to run the pack in"),
]
PACK_NAME = "MotionDial"
ORDER = ["motiondial_build_ed_task_vectors", "motiondial_i2v_dials", "motiondial_i2v_ed_schedule",
         "motiondial_motion_transfer", "motiondial_demo"]
AS_SHIPPED = {"motiondial_demo": 8}  # the bundled demo model's own settings are fast: frames written
FAST = {"frames": 9, "steps": 3, "height": 32, "width": 48}


def _http(url, body=None, timeout=60):
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


class Server:
    def __init__(self, tmp):
        self.base_dir = os.path.join(tmp, "base")
        custom = os.path.join(tmp, "custom_nodes")
        os.makedirs(custom)
        for d in ("models", "custom_nodes", "input", "output"):  # ComfyUI expects these under its base
            os.makedirs(os.path.join(self.base_dir, d))
        os.symlink(h.PACK_DIR, os.path.join(custom, PACK_NAME))
        self.models = os.path.join(self.base_dir, "models")
        h.make_models_dir(self.models)
        cfg = os.path.join(tmp, "extra_model_paths.yaml")
        with open(cfg, "w") as f:
            f.write(f"motiondial_e2e:\n    custom_nodes: {custom}\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        extra = os.environ.get("COMFYUI_PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
        self.log_path = os.path.join(tmp, "server.log")
        self.proc = subprocess.Popen(
            [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
             "--port", str(self.port), "--disable-auto-launch", "--extra-model-paths-config", cfg,
             "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:"],
            cwd=COMFYUI_DIR, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited rc={self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if _http(self.url + "/system_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ComfyUI did not start:\n{self.log()[-3000:]}")
            time.sleep(1)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def submit(self, prompt):
        code, r = _http(self.url + "/prompt", {"prompt": prompt, "client_id": "motiondial-e2e"})
        assert code == 200, f"/prompt refused the workflow: {r}"
        return r["prompt_id"]

    def wait(self, prompt_id, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, hist = _http(f"{self.url}/history/{prompt_id}")
            if hist and prompt_id in hist:
                return hist[prompt_id]
            time.sleep(0.3)
        raise TimeoutError(f"no result for {prompt_id} after {timeout}s")

    def run(self, prompt, timeout=300):
        entry = self.wait(self.submit(prompt), timeout)
        st = entry["status"]
        assert st["status_str"] == "success", json.dumps(st["messages"])[-3000:]
        return entry

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("comfy")))
    yield s
    s.stop()


def _fast(prompt):
    for node in prompt.values():
        if node["class_type"] == "MotionDialI2VSampler":
            node["inputs"].update(FAST)
    return prompt


def _video_frames(server, entry, save_node):
    """Frame count of the video a SaveVideo node wrote."""
    from motion import read_clip

    (item,) = entry["outputs"][save_node]["images"]
    path = os.path.join(server.base_dir, "output", item["subfolder"], item["filename"])
    return read_clip(path).frames.shape[0]


def test_pack_imports_and_lists_every_node(server):
    failed = [l for l in server.log().splitlines() if re.search(r"IMPORT FAILED|Cannot import", l) and PACK_NAME in l]
    assert not failed, failed
    _, info = _http(server.url + "/object_info", timeout=120)
    ours = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_NAME}"}
    e = h.env()
    try:
        assert ours == set(e.by_id)
        for nid in ours:  # the real server reads the same schema the stand-in tests check
            schema = e.by_id[nid].define_schema()
            real = info[nid]
            assert real["category"].startswith("MotionDial/")
            names = list(real["input"]["required"]) + list(real["input"].get("optional", {}))
            assert names == [i.id for i in schema.inputs], nid
            assert real["output"] == [o.io_type for o in schema.outputs], nid
            for group in ("required", "optional"):
                for name, spec in real["input"].get(group, {}).items():
                    assert spec[1].get("tooltip"), f"{nid}.{name} has no tooltip in ComfyUI"
    finally:
        e.uninstall()
    for core, spec in h.CORE_NODES.items():  # the harness's stand-ins mirror these
        real = info[core]
        names = list(real["input"]["required"]) + list(real["input"].get("optional", {}))
        assert names == list(spec["inputs"]), core
        assert real["output"] == spec["outputs"], core


def test_workflows_run_and_write_videos(server):
    for name in ORDER:
        prompt = h.load_workflow(name, api=True)
        if name not in AS_SHIPPED:
            prompt = _fast(prompt)
        entry = server.run(prompt)
        saves = [k for k, v in prompt.items() if v["class_type"] == "SaveVideo"]
        for k in saves:
            assert _video_frames(server, entry, k) == AS_SHIPPED.get(name, FAST["frames"]), name
        if name == "motiondial_build_ed_task_vectors":
            assert os.path.isfile(os.path.join(server.models, "task_vectors", h.TASK_VECTORS, "control.safetensors"))
        if name == "motiondial_motion_transfer":
            (text,) = entry["outputs"]["4"]["text"]
            assert re.match(r"object \d+\.\d\d / 10, camera \d+\.\d\d / 10 \(flow\)", text)
        if name == "motiondial_demo":  # the measured motion of the result, shown on Estimate Motion
            (text,) = entry["outputs"]["8"]["text"]
            assert re.match(r"object \d+\.\d\d / 10, camera \d+\.\d\d / 10 \(flow\)", text)


def test_interrupt_mid_sampling_then_the_model_still_works(server):
    prompt = _fast(h.load_workflow("motiondial_i2v_dials", api=True))
    server.run(prompt)  # loaders cached: the next prompt spends its time in the sampler
    slow = json.loads(json.dumps(prompt))
    # As slow as the widgets allow, so the interrupt lands mid-sampling even on a fast machine.
    slow["4"]["inputs"].update(steps=500, frames=161, seed=7)
    pid = server.submit(slow)
    deadline = time.time() + 60
    while not _http(server.url + "/queue")[1]["queue_running"]:
        assert time.time() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(0.5)
    _http(server.url + "/interrupt", {})
    entry = server.wait(pid, timeout=120)
    kinds = {m[0]: m[1] for m in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds, entry["status"]
    assert kinds["execution_interrupted"]["node_type"] == "MotionDialI2VSampler"
    again = json.loads(json.dumps(prompt))
    again["4"]["inputs"]["seed"] = 8
    entry = server.run(again)
    assert _video_frames(server, entry, "6") == FAST["frames"]


def test_free_memory_then_run_again(server):
    code, _ = _http(server.url + "/free", {"unload_models": True, "free_memory": True})
    assert code == 200
    time.sleep(1.0)  # /free is handled between prompts
    prompt = _fast(h.load_workflow("motiondial_i2v_dials", api=True))
    prompt["4"]["inputs"]["seed"] = 9
    entry = server.run(prompt)
    assert _video_frames(server, entry, "6") == FAST["frames"]


def test_bad_input_reaches_the_user_as_a_clear_message(server):
    """A one-frame 'clip' (a still image) into Estimate Motion: the error names the problem."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "motiondial_example.png"}},
        "2": {"class_type": "MotionDialEstimateMotion", "inputs": {"frames": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }
    entry = server.wait(server.submit(prompt), timeout=120)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "MotionDialEstimateMotion"
    assert "has 1 frame; motion needs at least 2" in errors[0]["exception_message"]
    assert errors[0]["exception_type"] == "ValueError"
