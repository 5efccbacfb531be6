"""Training: synthetic motion data, the shared training runner and the trainers.

Submodules are imported on demand (``training.runner``, ``training.synth_motion`` ...); importing
this package is cheap and has no side effects.
"""
