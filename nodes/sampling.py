"""I2V Sampler: image (+ prompt, motion scores, ED schedule) -> video frames."""
from __future__ import annotations

from comfy_api.latest import io

from . import host
from . import types as t

CATEGORY = "MotionDial/sampling"


class I2VSampler(io.ComfyNode):
    """Generate a video from an image with a MotionDial I2V model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialI2VSampler",
            display_name="I2V Sampler",
            category=CATEGORY,
            description="Image-to-video sampling. Motion is set by the object/camera intensities (with a motion "
                        "embedder) and by the ED schedule of task vectors. Outputs frames (IMAGE) and fps for "
                        "Create Video / Save Video.",
            inputs=[
                t.I2VModel.Input("model", tooltip="From Load I2V Model."),
                io.Image.Input("image", tooltip="The first frame. Only the first image of a batch is used. A "
                                                "resolution-locked model (CogVideoX 1.0: 720x480) needs that size "
                                                "unless width/height are set."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What happens in the video. SVD ignores text."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid (classifier-free guidance's negative text). SVD ignores it."),
                # Bounds mirror pipelines.sample's checks (frames per family are checked there).
                io.Int.Input("frames", default=49, min=2, max=161, step=1,
                             tooltip="Number of frames to generate (CogVideoX: 8k+1, e.g. 49 or 81, up to 161; "
                                     "SVD: 2..128, SVD-XT is trained for 25)."),
                io.Int.Input("steps", default=50, min=1, max=500, step=1,
                             tooltip="Denoising steps. More is slower and usually cleaner."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (CogVideoX ~6, SVD ~3). 1 = no guidance "
                                       "(faster)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Random seed of the initial noise: same seed + same inputs = same video."),
                io.Float.Input("object_intensity", default=5.0, min=1.0, max=10.0, step=0.1, round=0.01,
                               tooltip="Object motion, 1 (still) .. 10 (fast). Needs a motion embedder; ignored "
                                       "when a scores input is connected."),
                io.Float.Input("camera_intensity", default=5.0, min=1.0, max=10.0, step=0.1, round=0.01,
                               tooltip="Camera motion, 1 (fixed camera) .. 10 (fast pan/zoom). Needs a motion "
                                       "embedder; ignored when a scores input is connected."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="Output width in pixels; 0 = the model's native size if it has a fixed one, "
                                     "else the image's."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="Output height in pixels; 0 = the model's native size if it has a fixed one, "
                                     "else the image's."),
                io.Float.Input("fps", default=0.0, min=0.0, max=120.0, step=1.0,
                               tooltip="Frame rate of the result (also conditions SVD); 0 = the model family's "
                                       "default (CogVideoX 8, SVD 7)."),
                t.MotionScores.Input("scores", optional=True,
                                     tooltip="Object/camera scores from Motion Scores or Estimate Motion; override "
                                             "the two intensity widgets."),
                t.MotionEmbedder.Input("embedder", optional=True,
                                       tooltip="From Load Motion Embedder: makes the intensities steer the model. "
                                               "Without it the intensities have no effect."),
                t.TaskVectors.Input("task_vectors", optional=True,
                                    tooltip="ED dynamics/control task vectors (Build or Load ED Task Vectors)."),
                t.Schedule.Input("schedule", optional=True,
                                 tooltip="When each task vector applies (Motion Schedule). Default with task "
                                         "vectors: the ED reference hard switch at noise level 0.5."),
                t.TextControl.Input("text_adapter", optional=True,
                                    tooltip="From Load Text Adapter (SVD only): the prompt and negative prompt "
                                            "steer SVD's temporal layers through the trained text adapter."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The video's frames, [frames, height, width, 3]."),
                io.Float.Output(display_name="fps", tooltip="Frame rate, for Create Video."),
            ],
        )

    @classmethod
    def execute(cls, model, image, prompt: str, negative_prompt: str, frames: int, steps: int, cfg: float,
                seed: int, object_intensity: float, camera_intensity: float, width: int, height: int, fps: float,
                scores=None, embedder=None, task_vectors=None, schedule=None, text_adapter=None) -> io.NodeOutput:
        import torch
        from pipelines import sample

        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"I2V Sampler: image must be an IMAGE [batch, height, width, 3], got {list(image.shape)}")
        weight_schedule = weight_schedule_for(model, embedder, task_vectors, schedule)
        if scores is not None:
            object_intensity, camera_intensity = scores.object, scores.camera

        model.prepare()
        if text_adapter is not None:  # it runs inside the denoiser: same device (a no-op on the CPU)
            text_adapter.adapter.to(model.model.device)
            text_adapter.text.encoder.to(model.model.device)
        video = sample(
            model.model, image[0], prompt,
            negative_prompt=negative_prompt, frames=frames, steps=steps, cfg=cfg, seed=seed,
            height=height or None, width=width or None, fps=fps or None,
            object_intensity=object_intensity if embedder is not None else None,
            camera_intensity=camera_intensity if embedder is not None else None,
            weight_schedule=weight_schedule, motion_embedder=embedder.embedder if embedder is not None else None,
            text_control=text_adapter, progress=host.progress_callback(steps),
        )
        out = torch.as_tensor(video.frames).to(device="cpu", dtype=torch.float32)
        return io.NodeOutput(out, float(video.fps))


def weight_schedule_for(model, embedder=None, task_vectors=None, schedule=None):
    """The sampler's ``weight_schedule``: the motion delta of a LoRA/full-trained embedder and the
    ED task vectors under their schedule, combined (``merging.patcher.combine``), or ``None``.

    A prediction-blending schedule gives ``ScheduledPredictions``; a motion delta then applies
    to every model of the mix (it is part of the model the task vectors were made for).
    """
    from merging.patcher import combine, scheduled

    if schedule is not None and task_vectors is None:
        raise ValueError("I2V Sampler: a schedule is connected but no task vectors; connect Build ED Task "
                         "Vectors or Load ED Task Vectors to task_vectors.")
    motion = None
    if embedder is not None and embedder.weights is not None:
        embedder.check_base(model.model)
        motion = embedder.weights
    ed = None
    if task_vectors is not None:
        from merging.schedule import reference_ed_schedule

        sched = schedule if schedule is not None else reference_ed_schedule()
        missing = [n for n in sched.names if n not in task_vectors.deltas]
        if missing:
            raise ValueError(f"I2V Sampler: the schedule uses task vector(s) {missing}, but the connected task "
                             f"vectors hold {sorted(task_vectors.deltas)}.")
        task_vectors.check_base(model.model)
        ed = scheduled(task_vectors.deltas, sched)
    if motion is not None and ed is not None:
        clash = sorted(set(motion.deltas) & set(task_vectors.deltas))
        if clash:
            raise ValueError(f"I2V Sampler: the task vectors {task_vectors.folder!r} and the motion embedder's delta "
                             f"both name {clash}; rename the task vector.")
        # motion first: the trained model is the base the ED vectors are added to
        return combine(motion, ed)
    return motion or ed


NODES = [I2VSampler]
