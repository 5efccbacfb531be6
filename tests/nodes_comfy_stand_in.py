"""A small stand-in for the parts of ComfyUI that MotionDial's nodes touch, for tests that run
without ComfyUI.

It mirrors the *signatures* of ``comfy_api.latest`` (io inputs/outputs, Schema, ComfyNode,
NodeOutput, ui.PreviewText, ComfyExtension; only the keyword arguments ComfyUI 0.3.64 accepts,
so a misspelt option fails here as it would there), ``folder_paths`` (model folders under a
temporary ``models`` dir), ``comfy.utils.ProgressBar``, ``comfy.model_management`` (interrupt
flag, devices, a list of loaded models) and ``comfy.model_patcher.ModelPatcher`` (records loads
and unloads). The real thing is exercised by tests/test_comfy_e2e.py.

Use ``install(models_dir, input_dir)`` to put the modules into ``sys.modules`` and ``uninstall()``
to take them out again.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

MODULE_NAMES = ("comfy_api", "comfy_api.latest", "folder_paths", "comfy", "comfy.utils",
                "comfy.model_management", "comfy.model_patcher")


# ----------------------------------------------------------------------------- comfy_api.latest.io
class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class UploadType(str, Enum):
    image = "image_upload"
    video = "video_upload"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class _Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,  # noqa: A002
                 lazy: bool = None, extra_dict=None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.default = None


class _WidgetInput(_Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,  # noqa: A002
                 socketless=None, widget_type=None, force_input=None, extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default, self.force_input = default, force_input


class _Output:
    io_type = "*"

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):  # noqa: A002
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _type(io_type: str, input_base=_Input, py_type=Any):
    ns = types.SimpleNamespace()
    ns.io_type = io_type
    ns.Type = py_type
    ns.Input = type(f"{io_type}Input", (input_base,), {"io_type": io_type})
    ns.Output = type(f"{io_type}Output", (_Output,), {"io_type": io_type})
    return ns


class _IntInput(_WidgetInput):
    io_type = "INT"

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,  # noqa: A002
                 min=None, max=None, step=None, control_after_generate=None, display_mode=None,  # noqa: A002
                 socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.min, self.max, self.step, self.control_after_generate = min, max, step, control_after_generate


class _FloatInput(_WidgetInput):
    io_type = "FLOAT"

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,  # noqa: A002
                 min=None, max=None, step=None, round=None, display_mode=None,  # noqa: A002
                 socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.min, self.max, self.step, self.round = min, max, step, round


class _StringInput(_WidgetInput):
    io_type = "STRING"

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,  # noqa: A002
                 placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.multiline = multiline


class _BooleanInput(_WidgetInput):
    io_type = "BOOLEAN"

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,  # noqa: A002
                 label_on=None, label_off=None, socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)


class _ComboInput(_WidgetInput):
    io_type = "COMBO"

    def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,  # noqa: A002
                 default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                 socketless=None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
        self.options = list(options) if options is not None else []


Int = _type("INT", py_type=int)
Int.Input = _IntInput
Float = _type("FLOAT", py_type=float)
Float.Input = _FloatInput
String = _type("STRING", py_type=str)
String.Input = _StringInput
Boolean = _type("BOOLEAN", py_type=bool)
Boolean.Input = _BooleanInput
Combo = _type("COMBO", py_type=str)
Combo.Input = _ComboInput
Image = _type("IMAGE")
Video = _type("VIDEO")


def Custom(io_type: str):  # noqa: N802 -- mirrors io.Custom
    return _type(io_type)


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs or []] + [o.id for o in self.outputs or [] if o.id is not None]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"ids must be unique: {dup}")


class ComfyNode:
    hidden = types.SimpleNamespace(unique_id=None, prompt=None, extra_pnginfo=None)

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class _PreviewText:
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self):
        raise NotImplementedError


def _io_module() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest._io")
    for name in ("NumberDisplay", "UploadType", "Hidden", "Int", "Float", "String", "Boolean", "Combo", "Image",
                 "Video", "Custom", "Schema", "ComfyNode", "NodeOutput"):
        setattr(io, name, globals()[name])
    io.Input, io.WidgetInput, io.Output = _Input, _WidgetInput, _Output
    return io


# ----------------------------------------------------------------------------- folder_paths
def _folder_paths(models_dir: str, input_dir: str, output_dir: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    fp.folder_names_and_paths = {
        "diffusers": ([os.path.join(models_dir, "diffusers")], {"folder"}),
        # as ComfyUI registers it: the legacy models/clip folder is the second text-encoder path
        "text_encoders": ([os.path.join(models_dir, "text_encoders"), os.path.join(models_dir, "clip")],
                          {".safetensors"}),
    }

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        if folder_name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[folder_name][0]
            if full_folder_path not in paths:
                paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)
        else:
            fp.folder_names_and_paths[folder_name] = ([full_folder_path], set())

    def get_folder_paths(folder_name):
        return list(fp.folder_names_and_paths[folder_name][0])

    def get_filename_list(folder_name):
        paths, exts = fp.folder_names_and_paths[folder_name]
        out = set()
        for p in paths:
            for root, _dirs, files in os.walk(p):
                for f in files:
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.add(os.path.relpath(os.path.join(root, f), p).replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(folder_name, filename):
        for p in fp.folder_names_and_paths[folder_name][0]:
            full = os.path.join(p, filename)
            if os.path.isfile(full):
                return full
        return None

    def get_full_path_or_raise(folder_name, filename):
        full = get_full_path(folder_name, filename)
        if full is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return full

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.get_input_directory = lambda: input_dir
    fp.get_output_directory = lambda: output_dir
    fp.get_annotated_filepath = lambda name: os.path.join(input_dir, name)
    return fp


# ----------------------------------------------------------------------------- comfy.*
class InterruptProcessingException(Exception):
    pass


@dataclass
class MemoryRecord:
    """What the stand-in model manager saw: loads, unloads and the current list."""
    loaded: list = field(default_factory=list)
    load_calls: int = 0
    interrupt: bool = False


def _cpu():
    import torch  # lazily: installing the stand-in must not import torch

    return torch.device("cpu")


def _comfy_modules() -> dict[str, types.ModuleType]:
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so "import comfy.utils" works
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")
    mp = types.ModuleType("comfy.model_patcher")
    mm.record = MemoryRecord()
    mm.InterruptProcessingException = InterruptProcessingException

    def throw_exception_if_processing_interrupted():
        if mm.record.interrupt:
            mm.record.interrupt = False
            raise InterruptProcessingException()

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        mm.record.load_calls += 1
        for m in models:
            m.model.to(m.load_device)
            if m not in mm.record.loaded:
                mm.record.loaded.append(m)

    def unload_all_models():
        for m in mm.record.loaded:
            m.model.to(m.offload_device)
        mm.record.loaded.clear()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.load_models_gpu = load_models_gpu
    mm.unload_all_models = unload_all_models
    mm.get_torch_device = _cpu
    mm.unet_offload_device = _cpu
    mm.intermediate_device = _cpu
    mm.soft_empty_cache = lambda force=False: None
    mm.module_size = lambda module: sum(t.numel() * t.element_size() for t in module.state_dict().values())

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.size = size or mm.module_size(model)

    mp.ModelPatcher = ModelPatcher

    class ProgressBar:
        updates: list = []  # (current, total) of every bar, in order; tests read and clear it

        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            ProgressBar.updates.append((self.current, self.total))

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar
    comfy.utils, comfy.model_management, comfy.model_patcher = utils, mm, mp
    return {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm, "comfy.model_patcher": mp}


def install(models_dir: str, input_dir: str, output_dir: str) -> dict[str, types.ModuleType]:
    """Put the stand-in modules into ``sys.modules`` (refusing if a real ComfyUI is imported)."""
    for name in MODULE_NAMES:
        if name in sys.modules and not getattr(sys.modules[name], "_motiondial_stand_in", False):
            raise RuntimeError(f"a real {name!r} is already imported; the stand-in would shadow it")
    api = types.ModuleType("comfy_api")
    api.__path__ = []
    latest = types.ModuleType("comfy_api.latest")
    latest.io = _io_module()
    latest.ui = types.SimpleNamespace(PreviewText=_PreviewText)
    latest.ComfyExtension = ComfyExtension
    api.latest = latest
    mods = {"comfy_api": api, "comfy_api.latest": latest,
            "folder_paths": _folder_paths(models_dir, input_dir, output_dir), **_comfy_modules()}
    for name, mod in mods.items():
        mod._motiondial_stand_in = True
        sys.modules[name] = mod
    return mods


def uninstall() -> None:
    for name in MODULE_NAMES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "_motiondial_stand_in", False):
            del sys.modules[name]
