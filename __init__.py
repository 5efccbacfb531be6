"""MotionDial: motion control for image-to-video diffusion models, as a ComfyUI node pack.

This file is what ComfyUI imports. ComfyUI loads the pack by file path under a mangled module
name and does not put the pack's folder on ``sys.path``; it also owns top-level modules named
``nodes``, ``utils``, ``comfy`` ... So:

* the pack's own ``nodes`` package is only ever imported relatively (``from .nodes import``);
* the library packages (``families``, ``pipelines``, ``merging``, ``motion``, ``training``)
  import each other by absolute name, so the pack's folder is *appended* to ``sys.path`` (never
  prepended: that would shadow ComfyUI's own top-level modules);
* we then check that each library package resolves to *this* folder and fail with a clear
  message if another custom node pack's same-named package was found first.

Nothing here imports ComfyUI or torch at import time, so importing the pack without ComfyUI works.
"""
from __future__ import annotations

import importlib.util
import os
import sys

__version__ = "0.1.0"

PACK_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PACKAGES = ("families", "pipelines", "merging", "motion", "textadapter", "training")


def _module_dir(name: str) -> str | None:
    mod = sys.modules.get(name)
    if mod is not None:
        origin = getattr(mod, "__file__", None)
    else:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
    return os.path.dirname(os.path.dirname(os.path.abspath(origin))) if origin else None


def _make_library_importable() -> None:
    if PACK_DIR not in sys.path:
        sys.path.append(PACK_DIR)
    for name in LIBRARY_PACKAGES:
        found = _module_dir(name)
        if found is None:
            raise ImportError(
                f"MotionDial: its package {name!r} is missing from {PACK_DIR} (incomplete checkout?)"
            )
        if os.path.realpath(found) != os.path.realpath(PACK_DIR):
            raise ImportError(
                f"MotionDial: the top-level package {name!r} resolves to {found!r}, not to this pack "
                f"({PACK_DIR}). Another installed package or custom node pack provides a module named "
                f"{name!r} earlier on sys.path; remove or rename it, or load MotionDial first."
            )


_make_library_importable()


async def comfy_entrypoint():
    """ComfyUI's entry point for current-schema (``comfy_api.latest``) node packs."""
    from .nodes import MotionDialExtension  # relative: ComfyUI has its own top-level `nodes`

    return MotionDialExtension()


# A small frontend extension draws the nodes' result text (e.g. the estimated scores) on the node.
# ComfyUI lists <pack>/workflows/*.json in its Templates menu by itself.
WEB_DIRECTORY = "./nodes/web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY", "__version__"]
