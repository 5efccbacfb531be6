"""The bundled demo model: where it lives in the pack and the settings it was trained for.

A tiny Stable Video Diffusion (family ``svd``) with a decoupled motion-score embedder, trained
from scratch on synthetic clips by ``python -m training.train_demo`` (see docs/demo_model.md).
``pipelines.generate`` uses it when no ``--model`` is given; the ComfyUI loaders list it as
``DEMO_MODEL_LABEL`` / ``DEMO_EMBEDDER_LABEL``. Everything about its architecture (latent
channels, VAE downsampling, ...) is read from the folder; only the sampling defaults below are
fixed, because they are what the model was trained on.

Importing this module is cheap (no torch).
"""
from __future__ import annotations

import os

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(PACK_DIR, "assets", "demo_model")
#: The diffusers folder (``model_index.json``, safetensors weights).
DEMO_MODEL = os.path.join(DEMO_DIR, "model")
#: The motion-score embedder trained with it (fingerprinted for its UNet).
DEMO_EMBEDDER = os.path.join(DEMO_DIR, "motion_embedder.safetensors")

#: Names the ComfyUI loaders list for them.
DEMO_MODEL_LABEL = "MotionDial demo (bundled, 32px)"
DEMO_EMBEDDER_LABEL = "MotionDial demo embedder (bundled)"

#: Sampling settings of the demo: its training clips are 8 frames of 32x32 at 7 fps (SVD's
#: default fps conditioning). cfg 1 because it was trained without condition dropout, so SVD's
#: unconditional branch means nothing. Scores 5/5: the middle of the dials.
DEMO_DEFAULTS = {"frames": 8, "steps": 25, "cfg": 1.0, "height": 32, "width": 32, "fps": 7.0,
                 "object": 5.0, "camera": 5.0}
#: Scores were drawn from 1..9 in training (10 moves a 32-px object out of frame in 8 frames).
DEMO_TRAINED_MAX_SCORE = 9.0
#: The command that reproduced the weights (seeded).
DEMO_TRAIN_COMMAND = "python -m training.train_demo --out runs/demo --seed 0 --threads 1"


def demo_available() -> bool:
    """``True`` when the bundled model folder and its embedder are both present (a partial
    checkout may lack them)."""
    return os.path.isfile(os.path.join(DEMO_MODEL, "model_index.json")) and os.path.isfile(DEMO_EMBEDDER)
