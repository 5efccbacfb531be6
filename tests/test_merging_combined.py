"""merging.schedule.Combined and merging.patcher.combine: several delta sets under one schedule
(e.g. a trained motion delta plus the ED task vectors), equal to their static merge."""
import json

import numpy as np
import pytest
import torch

from merging.patcher import PatchError, ScheduledPredictions, ScheduledWeights, combine, scheduled, static_merge
from merging.schedule import Combined, Constant, HardSwitch, LinearBlend, PredictionBlend, Schedule, ScheduleError
from pipelines import load_model, sample


def test_combined_weights_are_the_union_and_round_trip_through_json():
    c = Combined([HardSwitch(switch=0.5, high_weight=2.0), Constant({"motion": 1.0})])
    assert c.mode == "weights" and c.names == ("dynamics", "control", "motion")
    assert c.weights(0.9) == {"dynamics": 2.0, "control": 0.0, "motion": 1.0}
    assert c.weights(0.2) == {"dynamics": 0.0, "control": 1.0, "motion": 1.0}
    back = Schedule.from_json(json.loads(json.dumps(c.to_json())))
    assert back == c and isinstance(back, Combined) and back.weights(0.9) == c.weights(0.9)


def test_combined_refuses_overlapping_names_and_two_prediction_mixes():
    with pytest.raises(ScheduleError, match=r"'dynamics' is used by part 0 and part 1"):
        Combined([HardSwitch(), Constant({"dynamics": 1.0})])
    with pytest.raises(ScheduleError, match="at most one part may mix predictions"):
        Combined([PredictionBlend(HardSwitch()), PredictionBlend(LinearBlend("a", "b"))])
    with pytest.raises(ScheduleError, match="non-empty list"):
        Combined([])
    with pytest.raises(ScheduleError, match="not a merging.schedule.Schedule"):
        Combined([HardSwitch(), object()])


def test_combined_prediction_mix_applies_the_other_parts_to_every_model():
    # mix weights 0.3 / 0.5 leave 0.2 to the base model, which gets the motion delta too
    pred = PredictionBlend(Constant({"dynamics": 0.3, "control": 0.5}), strengths={"dynamics": 2.0})
    c = Combined([Constant({"motion": 0.7}), pred])
    assert c.mode == "predictions"
    calls = c.models(0.4)
    assert calls == [({"dynamics": 2.0, "motion": 0.7}, 0.3), ({"control": 1.0, "motion": 0.7}, 0.5),
                     ({"motion": 0.7}, pytest.approx(0.2))]
    with pytest.raises(ScheduleError, match="no part mixes predictions"):
        Combined([Constant({"motion": 1.0}), HardSwitch()]).models(0.4)


def _delta(seed: int, shape=(3, 2)):
    return {"w": torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


def test_combine_picks_the_class_by_mode_and_refuses_clashes():
    motion = ScheduledWeights({"motion": _delta(0)}, Constant({"motion": 1.0}))
    ed = scheduled({"dynamics": _delta(1), "control": _delta(2)}, HardSwitch())
    both = combine(motion, ed)
    assert type(both) is ScheduledWeights and list(both.deltas) == ["motion", "dynamics", "control"]
    assert both.weights(0.9) == {"motion": 1.0, "dynamics": 1.0, "control": 0.0}
    pred = scheduled({"dynamics": _delta(1), "control": _delta(2)}, PredictionBlend(HardSwitch()))
    assert type(pred) is ScheduledPredictions
    mixed = combine(motion, pred)
    assert type(mixed) is ScheduledPredictions
    assert mixed.calls(0.9) == [({"motion": 1.0, "dynamics": 1.0, "control": 0.0}, 1.0)]
    assert combine(motion) is motion
    with pytest.raises(PatchError, match=r"\['motion'\] appear in two"):
        combine(motion, ScheduledWeights({"motion": _delta(3)}, Constant({"motion": 1.0})))


def _image():
    return (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def test_sampling_with_a_combination_equals_the_static_merge_of_both(tiny_model_dir):
    model = load_model(tiny_model_dir("cogvideox-i2v"))
    sd = {k: v for k, v in model.denoiser.state_dict().items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(5)

    def random_delta(keys):
        return {k: 0.05 * sd[k].abs().mean() * torch.randn(sd[k].shape, generator=g) for k in keys}

    keys = sorted(sd)
    motion = random_delta(keys[::2])  # the parts touch overlapping key sets
    dyn, con = random_delta(keys[::3]), random_delta(keys)
    both = combine(ScheduledWeights({"motion": motion}, Constant({"motion": 1.0})),
                   ScheduledWeights({"dynamics": dyn, "control": con}, Constant({"dynamics": 0.8, "control": 0.3})))
    run = dict(frames=9, steps=2, cfg=6.0, seed=1)
    patched = sample(model, _image(), "a boat", weight_schedule=both, **run)
    assert patched.settings["weight_schedule"] == "Combined"

    merged = load_model(tiny_model_dir("cogvideox-i2v"))
    with torch.no_grad():
        for k, p in merged.denoiser.state_dict().items():
            terms = [(d[k], w) for d, w in ((motion, 1.0), (dyn, 0.8), (con, 0.3)) if k in d]
            if terms:
                p.copy_(static_merge(p, terms))
    static = sample(merged, _image(), "a boat", **run)
    assert torch.equal(patched.frames, static.frames)
    plain = sample(model, _image(), "a boat", **run)  # the weights were restored, and they mattered
    assert not torch.equal(plain.frames, static.frames)
