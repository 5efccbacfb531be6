"""Quiet, exact fallbacks for running transformers without torchvision (this pack never installs it)."""
from __future__ import annotations

import importlib.util


def prefer_pil_image_processor() -> None:
    """Bind ``transformers.CLIPImageProcessor`` (SVD's feature extractor) to
    ``CLIPImageProcessorPil`` when torchvision is missing. Call before importing diffusers'
    pipelines, which look the name up at import time.

    transformers makes this very substitution on the first lookup, but warns ("requires
    torchvision ... falling back to CLIPImageProcessorPil") in every fresh process, so on every
    run of the demo. Same class, same outputs; only the warning goes.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    import sys

    import transformers

    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    # Resolving a lazy name can put a fresh module object into sys.modules: bind it on that one.
    module = sys.modules["transformers"]
    if pil is not None and "CLIPImageProcessor" not in vars(module):  # else already resolved
        setattr(module, "CLIPImageProcessor", pil)
