"""Motion-score nodes: set object/camera intensity by hand, or measure it from a reference clip."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import host
from . import types as t

CATEGORY = "MotionDial/motion"


def _score_input(name: str, what: str, default: float = 5.0):
    return io.Float.Input(name, default=default, min=1.0, max=10.0, step=0.1, round=0.01,
                          tooltip=f"{what} intensity on the 1..10 scale of the motion estimator "
                                  "(1 = still, 10 = the fastest motion seen in training).")


def scores_summary(scores) -> str:
    return f"object {scores.object:.2f} / 10, camera {scores.camera:.2f} / 10 ({scores.estimator})"


class MotionScores(io.ComfyNode):
    """Object and camera motion intensity, set by hand."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialMotionScores",
            display_name="Motion Scores",
            category=CATEGORY,
            description="Object and camera motion intensity (1..10) for the I2V Sampler's motion embedder.",
            inputs=[_score_input("object", "Object-motion (things moving in the scene)"),
                    _score_input("camera", "Camera-motion (pan, tilt, zoom, orbit)")],
            outputs=[t.MotionScores.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, object: float, camera: float) -> io.NodeOutput:  # noqa: A002 -- the input's name
        from motion import MotionScores as Scores

        return io.NodeOutput(Scores(object=object, camera=camera, estimator="manual", fps=0.0))


class EstimateMotion(io.ComfyNode):
    """Measure a reference clip's object and camera motion (1..10), e.g. to transfer it to a new video."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialEstimateMotion",
            display_name="Estimate Motion",
            category=CATEGORY,
            description="Measures object and camera motion of a clip (IMAGE frames) on the 1..10 scale. The "
                        "numbers are shown on the node after a run.",
            inputs=[
                io.Image.Input("frames", tooltip="The reference clip: at least 2 frames (e.g. from Load Video -> "
                                                 "Get Video Components)."),
                io.Float.Input("fps", default=8.0, min=0.1, max=240.0, step=0.1,
                               tooltip="Frame rate of the clip. Scores are speeds per second, so a wrong fps "
                                       "scales them."),
                t.MotionEstimator.Input("estimator", optional=True,
                                        tooltip="From Load Motion Estimator; when not connected the weight-free "
                                                "optical-flow estimator is used."),
            ],
            outputs=[
                t.MotionScores.Output(display_name="scores"),
                io.Float.Output(display_name="object", tooltip="Object-motion score, 1..10."),
                io.Float.Output(display_name="camera", tooltip="Camera-motion score, 1..10."),
                io.String.Output(display_name="summary", tooltip="The scores as text."),
            ],
        )

    @classmethod
    def execute(cls, frames, fps: float, estimator=None) -> io.NodeOutput:
        from motion import estimate_motion

        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"Estimate Motion: frames must be an IMAGE batch [frames, height, width, 3], got shape "
                             f"{list(frames.shape)}")
        if frames.shape[0] < 2:
            raise ValueError(f"Estimate Motion: the reference clip has {frames.shape[0]} frame; motion needs at "
                             "least 2. Connect a video's frames (Load Video -> Get Video Components -> images), "
                             "not a single image.")
        host.check_interrupted()
        clip = (frames.clamp(0, 1) * 255.0).round().to("cpu").numpy().astype("uint8")  # [T,H,W,3] uint8
        scores = estimate_motion(clip, fps, estimator=estimator if estimator is not None else "flow",
                                 progress=host.progress_callback(max(1, clip.shape[0] - 1)))
        text = scores_summary(scores)
        return io.NodeOutput(scores, scores.object, scores.camera, text, ui=ui.PreviewText(text))


NODES = [MotionScores, EstimateMotion]
