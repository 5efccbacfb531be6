"""The example inputs that the shipped workflows name (an image and a reference clip).

ComfyUI's Load Image / Load Video nodes only read from ComfyUI's ``input`` folder, so the pack
copies its two small examples there once (never overwriting a user's file of the same name).
"""
from __future__ import annotations

import logging
import os
import shutil

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "inputs")
EXAMPLE_INPUTS = ("motiondial_example.png", "motiondial_reference.mp4")

log = logging.getLogger("MotionDial")


def install_example_inputs(input_dir: str | None = None) -> list[str]:
    """Copy missing example inputs into ``input_dir`` (default: ComfyUI's input folder);
    returns the files copied. Best effort: a read-only input folder only logs a warning."""
    if input_dir is None:
        import folder_paths

        input_dir = folder_paths.get_input_directory()
    copied = []
    for name in EXAMPLE_INPUTS:
        src, dst = os.path.join(EXAMPLES_DIR, name), os.path.join(input_dir, name)
        if os.path.exists(dst) or not os.path.isfile(src):
            continue
        tmp = f"{dst}.tmp-{os.getpid()}"
        try:
            os.makedirs(input_dir, exist_ok=True)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)  # atomic: ComfyUI never lists a half-copied file
            copied.append(dst)
        except OSError as e:
            log.warning("MotionDial: could not copy the example input %s to %s: %s", name, input_dir, e)
            if os.path.exists(tmp):
                os.remove(tmp)
    return copied
