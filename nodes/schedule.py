"""Motion Schedule: when, during denoising, the ED dynamics and control task vectors apply."""
from __future__ import annotations

import json

from comfy_api.latest import io

from . import types as t

CATEGORY = "MotionDial/ED"

KINDS = ["hard_switch", "linear", "cosine", "keyframes"]
BLENDS = ["weights", "predictions"]
DEFAULT_KEYFRAMES = '{"dynamics": [[0.4, 0.0], [0.6, 1.0]], "control": [[0.4, 1.0], [0.6, 0.0]]}'


def build_schedule(kind: str, switch: float, start: float, end: float, dynamics_strength: float,
                   control_strength: float, keyframes: str, blend: str):
    """The ``merging.schedule`` object the widgets describe (``high`` = dynamics, ``low`` = control)."""
    from merging.schedule import CosineBlend, HardSwitch, Keyframes, LinearBlend, PredictionBlend

    strengths = {"dynamics": dynamics_strength, "control": control_strength}
    if blend not in BLENDS:
        raise ValueError(f"Motion Schedule: unknown blend {blend!r}; expected one of {BLENDS}")

    def two_delta(high_weight: float, low_weight: float):
        if kind == "hard_switch":
            return HardSwitch("dynamics", "control", switch=switch, high_weight=high_weight, low_weight=low_weight)
        cls = LinearBlend if kind == "linear" else CosineBlend
        return cls("dynamics", "control", start=start, end=end, high_weight=high_weight, low_weight=low_weight)

    if kind in ("hard_switch", "linear", "cosine"):
        if blend == "predictions":  # the schedule gives the mix; each model runs at its own strength
            return PredictionBlend(two_delta(1.0, 1.0), strengths=strengths)
        return two_delta(dynamics_strength, control_strength)
    if kind != "keyframes":
        raise ValueError(f"Motion Schedule: unknown kind {kind!r}; expected one of {KINDS}")
    if blend == "predictions":
        raise ValueError("Motion Schedule: blend=predictions mixes two models' outputs along a two-delta "
                         "schedule; use it with hard_switch, linear or cosine")
    try:
        points = json.loads(keyframes)
    except json.JSONDecodeError as e:
        raise ValueError(f"Motion Schedule: keyframes must be JSON like {DEFAULT_KEYFRAMES} "
                         f"(noise level 0..1, weight); {e}") from None
    if not isinstance(points, dict) or not all(isinstance(v, list) for v in points.values()):
        raise ValueError(f"Motion Schedule: keyframes must map task-vector names to [level, weight] pairs, "
                         f"e.g. {DEFAULT_KEYFRAMES}")
    return Keyframes({name: [[p[0], p[1] * strengths.get(name, 1.0)] if isinstance(p, list) and len(p) == 2 else p
                             for p in pts] for name, pts in points.items()})


class MotionSchedule(io.ComfyNode):
    """ED timestep schedule: the dynamics task vector at high noise (motion), control at low noise (detail)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        level = ("Noise level 0..1 (1 = the first, noisiest step; for CogVideoX the timestep / 1000).")
        return io.Schema(
            node_id="MotionDialMotionSchedule",
            display_name="Motion Schedule",
            category=CATEGORY,
            description="Says how strongly the ED 'dynamics' and 'control' task vectors apply at each denoising "
                        "step. Reference ED: dynamics while the noise level is above 0.5, control below.",
            inputs=[
                io.Combo.Input("kind", options=KINDS, default="hard_switch",
                               tooltip="hard_switch: dynamics above the switch level, control below (ED "
                                       "reference). linear / cosine: cross-fade from control (at start) to "
                                       "dynamics (at end). keyframes: your own curves (see keyframes)."),
                io.Float.Input("switch", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="hard_switch only: the noise level where dynamics hands over to control. "
                                       + level),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="linear/cosine only: at and below this noise level only control applies. "
                                       + level),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="linear/cosine only: at and above this noise level only dynamics applies."),
                io.Float.Input("dynamics_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the dynamics task vector (1 = as built). Higher = more motion."),
                io.Float.Input("control_strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="Scale of the control task vector (1 = as built). Higher = follows the "
                                       "prompt's motion more closely."),
                io.String.Input("keyframes", default=DEFAULT_KEYFRAMES, multiline=True,
                                tooltip="keyframes only: JSON {task vector: [[noise level, weight], ...]}; linear "
                                        "between points, held flat outside them; weights are multiplied by the "
                                        "strengths above."),
                io.Combo.Input("blend", options=BLENDS, default="weights",
                               tooltip="weights: one denoiser call per step with W = base + sum(weight * delta). "
                                       "predictions: run the dynamics and control models and mix their "
                                       "predictions (the ED paper's alternative; twice the cost)."),
            ],
            outputs=[t.Schedule.Output(display_name="schedule")],
        )

    @classmethod
    def execute(cls, kind: str, switch: float, start: float, end: float, dynamics_strength: float,
                control_strength: float, keyframes: str, blend: str) -> io.NodeOutput:
        return io.NodeOutput(build_schedule(kind, switch, start, end, dynamics_strength, control_strength,
                                            keyframes, blend))


NODES = [MotionSchedule]
