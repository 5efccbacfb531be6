"""Everything the nodes need from the ComfyUI process they run in: model folders, progress and
interrupt, and model memory management.

ComfyUI modules (``folder_paths``, ``comfy.*``) are imported inside the functions, never at module
import, so the node classes can be defined (and their schemas tested) without ComfyUI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

#: Model folders this pack adds to ComfyUI's ``models/`` (name -> accepted file extensions).
#: Users can point them elsewhere with ``extra_model_paths.yaml`` (same names).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "motion_estimators": (".safetensors",),
    "motion_embedders": (".safetensors",),
    "task_vectors": (".safetensors", ".json"),
    "finetune_deltas": (".safetensors",),
    "text_adapters": (".safetensors",),
}


def register_model_folders() -> None:
    """Register ``models/<name>`` for each of ``MODEL_FOLDERS`` (idempotent).

    Paths a user configured first (extra_model_paths.yaml) are kept; the default folder is added
    after them and the extension filter is set so non-weight files are not listed.
    """
    import folder_paths

    for name, exts in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, known = folder_paths.folder_names_and_paths[name]
        if isinstance(known, set):
            known.update(exts)
        else:  # an older ComfyUI stored a list
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | set(exts))


# ----------------------------------------------------------------------------- files and folders
def list_diffusers_models() -> list[str]:
    """The I2V models to offer: the pack's bundled demo model first (``pipelines.demo``, when its
    folder is present), then the diffusers model folders (those holding a ``model_index.json``)
    under ``models/diffusers``, as paths relative to their root, ``/``-separated; sub-folders are
    searched two levels deep."""
    import folder_paths
    from pipelines.demo import DEMO_MODEL, DEMO_MODEL_LABEL

    found: set[str] = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if "model_index.json" in filenames and depth > 0:
                found.add(rel.replace(os.sep, "/"))
                dirnames[:] = []  # a model's own sub-folders are its components
            elif depth >= 3:
                dirnames[:] = []
    found.discard(DEMO_MODEL_LABEL)  # a user folder of that name would be unreachable
    bundled = [DEMO_MODEL_LABEL] if os.path.isfile(os.path.join(DEMO_MODEL, "model_index.json")) else []
    return bundled + sorted(found)


def diffusers_model_path(name: str) -> str:
    """Absolute folder of a model listed by ``list_diffusers_models``; a clear error if it is gone."""
    import folder_paths
    from pipelines.demo import DEMO_MODEL, DEMO_MODEL_LABEL

    if name == DEMO_MODEL_LABEL:
        if not os.path.isfile(os.path.join(DEMO_MODEL, "model_index.json")):
            raise FileNotFoundError(f"{name!r}: the pack's bundled demo model is missing ({DEMO_MODEL}); "
                                    "reinstall MotionDial or pick a model from models/diffusers.")
        return DEMO_MODEL
    roots = folder_paths.get_folder_paths("diffusers")
    for root in roots:
        path = os.path.join(root, *name.split("/"))
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    raise FileNotFoundError(
        f"I2V model folder {name!r} was not found in models/diffusers (searched: {', '.join(roots)}). "
        "Put a diffusers-format model folder (with model_index.json) there and press R to refresh."
    )


def list_model_files(kind: str) -> list[str]:
    """Files in one of ``MODEL_FOLDERS`` (relative names, as ComfyUI lists them)."""
    import folder_paths

    return list(folder_paths.get_filename_list(kind))


def model_file_path(kind: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise FileNotFoundError(f"{name!r} was not found in models/{kind} "
                                f"(searched: {', '.join(folder_paths.get_folder_paths(kind))}).")
    return path


def text_encoder_roots() -> list[str]:
    """ComfyUI's text-encoder folders (``models/text_encoders``, then the legacy ``models/clip``)."""
    import folder_paths

    try:
        return folder_paths.get_folder_paths("text_encoders")
    except KeyError:  # a ComfyUI without the category: its two default folders
        return [os.path.join(folder_paths.models_dir, n) for n in ("text_encoders", "clip")]


def list_text_encoder_folders() -> list[str]:
    """Sub-folders of the text-encoder folders that hold a transformers text encoder
    (``config.json``, or ``text_encoder/config.json`` in a pipeline-style layout), ``/``-separated.
    ComfyUI's own single-file encoders (``*.safetensors``) are not listed: the text adapter
    needs the tokenizer files beside the weights."""
    found: set[str] = set()
    for root in text_encoder_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth > 0 and ("config.json" in filenames
                              or os.path.isfile(os.path.join(dirpath, "text_encoder", "config.json"))):
                found.add(rel.replace(os.sep, "/"))
                dirnames[:] = []
            elif depth >= 2:
                dirnames[:] = []
    return sorted(found)


def text_encoder_path(name: str) -> str:
    roots = text_encoder_roots()
    for root in roots:
        path = os.path.join(root, *name.split("/"))
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"text encoder folder {name!r} was not found in models/text_encoders or models/clip "
                            f"(searched: {', '.join(roots)}).")


def safetensors_metadata(path: str) -> dict:
    """The ``__metadata__`` of a safetensors file's header, read without torch (node schemas are
    built without importing it); ``{}`` for a file that cannot be read as safetensors."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return {}
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def model_folder(kind: str) -> str:
    """The first folder of ``kind``: where files the pack writes go."""
    import folder_paths

    return folder_paths.get_folder_paths(kind)[0]


# ----------------------------------------------------------------------------- progress and cancel
def progress_callback(total: int) -> Callable[[int, int], None]:
    """A ``progress(step, total)`` for the library: moves the node's progress bar and raises
    ComfyUI's interrupt exception when the user cancels (the library restores its state)."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def progress(step: int, total: int) -> None:
        bar.update_absolute(step, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return progress


def check_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


# ----------------------------------------------------------------------------- devices and memory
def torch_device() -> Any:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def offload_device() -> Any:
    import comfy.model_management

    return comfy.model_management.unet_offload_device()


def _components_holder(model: Any):
    """One ``nn.Module`` that owns the pipeline's torch components, for ``ModelPatcher``.

    ComfyUI's ``ModelPatcher`` writes ``model.device`` after moving weights, which diffusers'
    modules expose as a read-only property; a plain container module takes that write instead.
    """
    import torch

    class DiffusersComponents(torch.nn.Module):
        def __init__(self, modules: dict[str, torch.nn.Module], device: Any) -> None:
            super().__init__()
            self.components = torch.nn.ModuleDict(modules)
            self.device = device

    pipe = model.pipeline
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    return DiffusersComponents(modules, offload_device())


@dataclass
class ManagedI2VModel:
    """What flows on a ``MD_I2V_MODEL`` wire: the loaded ``pipelines.I2VModel`` plus, when
    ComfyUI manages its memory, the ``ModelPatcher`` that ComfyUI's model manager knows it by.

    With ``patcher`` set, ``prepare()`` asks ComfyUI to load the weights onto the compute device
    (freeing other models first if needed) before a run; afterwards they stay loaded until
    ComfyUI needs the memory for something else, unloads all models (the *Free model memory*
    button, ``POST /free``) or drops this object from its cache — as ComfyUI's own models do.
    """

    model: Any
    managed: bool
    options: dict = field(default_factory=dict)
    patcher: Any = None

    @classmethod
    def wrap(cls, model: Any, managed: bool, options: dict) -> "ManagedI2VModel":
        patcher = None
        if managed:
            import comfy.model_management
            import comfy.model_patcher

            holder = _components_holder(model)
            patcher = comfy.model_patcher.ModelPatcher(
                holder, load_device=torch_device(), offload_device=offload_device(),
                size=comfy.model_management.module_size(holder),
            )
        return cls(model=model, managed=managed, options=dict(options), patcher=patcher)

    def prepare(self) -> None:
        """Load the weights to the compute device through ComfyUI's model manager.

        ``force_full_load``: the diffusers modules are not ComfyUI's cast-on-the-fly layers, so
        a partial (low-VRAM) load would leave some weights on the CPU and fail inside torch.
        """
        if self.patcher is None:
            return
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.model.device = self.patcher.load_device  # I2VModel records where its weights are

    def __repr__(self) -> str:  # shown in ComfyUI's logs and Preview Any
        m = self.model
        return f"MotionDial I2V model {getattr(m, 'path', '?')!r} ({getattr(m, 'family', '?')}, {self.options})"
