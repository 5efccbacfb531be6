"""merging.schedule: weights per noise level, JSON round trips, validation."""
import json
import math

import pytest

from merging.schedule import (
    Constant, CosineBlend, HardSwitch, Keyframes, LinearBlend, PredictionBlend, Schedule, ScheduleError,
    reference_ed_schedule,
)


def test_hard_switch_reference():
    s = reference_ed_schedule()
    # "t > 500 of 1000 uses dynamics"
    assert s.weights(0.501) == {"dynamics": 1.0, "control": 0.0}
    assert s.weights(0.5) == {"dynamics": 0.0, "control": 1.0}
    assert s.weights(0.0) == {"dynamics": 0.0, "control": 1.0}
    s2 = HardSwitch(switch=0.3, high_weight=0.5, low_weight=2.0)
    assert s2.weights(0.9) == {"dynamics": 0.5, "control": 0.0}
    assert s2.weights(0.2) == {"dynamics": 0.0, "control": 2.0}
    # 50 trailing DDIM steps on 0..999: 25 each side
    levels = [t / 1000 for t in range(999, 0, -20)]
    assert sum(s.weights(l)["dynamics"] == 1.0 for l in levels) == 25


def test_blends():
    lin = LinearBlend()
    for level in (0.0, 0.3, 1.0):
        w = lin.weights(level)
        assert w["dynamics"] == pytest.approx(level) and w["control"] == pytest.approx(1 - level)
    lin2 = LinearBlend(start=0.4, end=0.6, high_weight=2.0)
    assert lin2.weights(0.3) == {"dynamics": 0.0, "control": 1.0}
    assert lin2.weights(0.5)["dynamics"] == pytest.approx(1.0)
    assert lin2.weights(0.7) == {"dynamics": 2.0, "control": 0.0}
    cos = CosineBlend()
    assert cos.weights(0.5)["dynamics"] == pytest.approx(0.5)
    assert cos.weights(0.25)["dynamics"] == pytest.approx((1 - math.cos(math.pi * 0.25)) / 2)
    assert cos.weights(0.0)["dynamics"] == 0.0


def test_keyframes_and_constant():
    k = Keyframes({"dynamics": [(0.6, 1.0), (0.4, 0.0)], "control": [(0.5, 0.7)]})
    assert k.weights(0.5) == pytest.approx({"dynamics": 0.5, "control": 0.7})
    assert k.weights(0.1)["dynamics"] == 0.0 and k.weights(0.9)["dynamics"] == 1.0
    assert Constant({"a": 0.3}).weights(0.77) == {"a": 0.3}
    with pytest.raises(ScheduleError, match="same level"):
        Keyframes({"d": [(0.5, 1.0), (0.5, 0.0)]})
    with pytest.raises(ScheduleError, match=r"\[0, 1\]"):
        Keyframes({"d": [(1.5, 1.0)]})


def test_json_round_trip(tmp_path):
    schedules = [
        Constant({"dynamics": 0.5}), HardSwitch(switch=0.7, low_weight=0.8), LinearBlend(start=0.1, end=0.9),
        CosineBlend(high="a", low="b"), Keyframes({"d": [(0.0, 0.0), (1.0, 1.0)]}),
        PredictionBlend(LinearBlend(), strengths={"dynamics": 0.5}),
    ]
    for s in schedules:
        d = json.loads(json.dumps(s.to_json()))
        r = Schedule.from_json(d)
        assert r == s and type(r) is type(s)
        assert r.weights(0.37) == s.weights(0.37)
        path = tmp_path / f"{s.kind}.json"
        s.save(path)
        assert Schedule.load(path) == s
    assert Schedule.from_json(json.dumps(HardSwitch().to_json())) == HardSwitch()


def test_bad_json_and_params(tmp_path):
    with pytest.raises(ScheduleError, match="unknown schedule type"):
        Schedule.from_json({"type": "zigzag"})
    with pytest.raises(ScheduleError, match="bad parameters"):
        Schedule.from_json({"type": "hard_switch", "wobble": 1})
    with pytest.raises(ScheduleError, match="switch"):
        HardSwitch(switch=2.0)
    with pytest.raises(ScheduleError, match="different"):
        HardSwitch(high="x", low="x")
    with pytest.raises(ScheduleError, match="below"):
        LinearBlend(start=0.6, end=0.4)
    with pytest.raises(ScheduleError, match="finite"):
        HardSwitch().weights(float("nan"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ScheduleError, match="bad.json"):
        Schedule.load(bad)


def test_prediction_blend_calls():
    pb = PredictionBlend(LinearBlend())
    assert pb.mode == "predictions"
    assert HardSwitch().mode == "weights"
    assert pb.models(0.3) == [({"dynamics": 1.0}, pytest.approx(0.3)), ({"control": 1.0}, pytest.approx(0.7))]
    # end of the schedule: one model only
    assert pb.models(1.0) == [({"dynamics": 1.0}, 1.0)]
    # mix weights summing to 1.5: the base takes -0.5
    pb2 = PredictionBlend(Constant({"dynamics": 1.0, "control": 0.5}))
    calls = pb2.models(0.5)
    assert calls[-1][0] == {} and calls[-1][1] == pytest.approx(-0.5)
    with pytest.raises(ScheduleError):
        PredictionBlend(pb)
