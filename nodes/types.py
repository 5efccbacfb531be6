"""The pack's custom wire types (``io.Custom``): what flows between MotionDial nodes.

Each name is prefixed ``MD_`` so it cannot collide with another pack's types; ComfyUI only lets
a link join an output and an input of the same type.
"""
from comfy_api.latest import io

#: ``host.ManagedI2VModel``: a loaded diffusers I2V pipeline (``pipelines.I2VModel``) and its
#: ComfyUI memory-management handle.
I2VModel = io.Custom("MD_I2V_MODEL")
#: ``motion.MotionScores``: object and camera intensity, 1..10.
MotionScores = io.Custom("MD_MOTION_SCORES")
#: A motion estimator for ``motion.estimate_motion``: ``"flow"``, ``"ssim"`` or a loaded learned one.
MotionEstimator = io.Custom("MD_MOTION_ESTIMATOR")
#: ``nodes.loaders.TrainedMotion``: a score embedder (``motion.embedding.MotionScoreEmbedding``,
#: turns the two scores into a time-embedding offset) and, for LoRA/full runs, its transformer delta.
MotionEmbedder = io.Custom("MD_MOTION_EMBEDDER")
#: ``nodes.merging.TaskVectors``: named weight deltas of the denoiser (ED: ``dynamics``, ``control``).
TaskVectors = io.Custom("MD_TASK_VECTORS")
#: ``merging.schedule.Schedule``: delta weights as a function of the noise level.
Schedule = io.Custom("MD_SCHEDULE")

#: ``textadapter.TextControl``: an SVD text adapter with its CLIP text encoder (ED stage 1).
TextControl = io.Custom("MD_TEXT_CONTROL")

ALL = (I2VModel, MotionScores, MotionEstimator, MotionEmbedder, TaskVectors, Schedule, TextControl)
