"""Image-to-video model families over diffusers: loading, tiny models, sampling, the main job.

``load_model(path) -> I2VModel``; ``sample(model, image, prompt, ...) -> Video``;
``tiny.build_tiny_model(folder, family)``. ``python -m pipelines.generate`` is the main job.

Importing this package is cheap: torch and diffusers load on first use of a name below.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "I2VModel": "pipelines.loading",
    "ModelLoadError": "pipelines.loading",
    "load_model": "pipelines.loading",
    "check_safetensors_file": "pipelines.loading",
    "Video": "pipelines.sampling",
    "sample": "pipelines.sampling",
    "build_tiny_model": "pipelines.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
