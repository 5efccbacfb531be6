"""merging.patcher on plain modules: arithmetic, precision, validation, restore, memory."""
import pytest
import torch
from torch import nn

from merging.patcher import PatchError, ScheduledPredictions, ScheduledWeights, WeightPatcher, static_merge
from merging.schedule import Constant, HardSwitch, LinearBlend, PredictionBlend


def _net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8)).to(dtype)
    net.register_buffer("table", torch.randn(4, 4).to(dtype))
    return net


def _deltas(net, names=("dynamics", "control"), keys=None, scale=1e-3, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = net.state_dict()
    keys = keys or list(sd)
    return {n: {k: torch.randn(sd[k].shape, generator=g) * scale for k in keys} for n in names}


def _snap(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_formula_and_restore_fp32():
    net = _net()
    base = _snap(net)
    deltas = _deltas(net)
    sched = LinearBlend(high="dynamics", low="control")
    with WeightPatcher(net, ScheduledWeights(deltas, sched)) as p:
        for level in (0.9, 0.3):
            assert p.apply(level)
            w = sched.weights(level)
            for k, v in net.state_dict().items():
                expect = base[k] + w["dynamics"] * deltas["dynamics"][k] + w["control"] * deltas["control"][k]
                torch.testing.assert_close(v, expect, rtol=0, atol=1e-7)
                assert torch.equal(v, static_merge(base[k], [(deltas["dynamics"][k], w["dynamics"]),
                                                             (deltas["control"][k], w["control"])]))
        assert p.current_weights == sched.weights(0.3)
    assert _equal(_snap(net), base)


def test_writes_only_when_weights_change():
    net = _net()
    deltas = _deltas(net)
    with WeightPatcher(net, ScheduledWeights(deltas, HardSwitch(switch=0.5))) as p:
        writes = [p.apply(level) for level in (1.0, 0.9, 0.7, 0.5, 0.3, 0.0)]
        assert writes == [True, False, False, True, False, False]
        assert p.writes == 2
    with WeightPatcher(net, ScheduledWeights(deltas, Constant({"dynamics": 0.0}))) as p:
        assert not p.apply(0.5)  # all-zero weights: the base already is what is wanted
        assert p.writes == 0


def test_bf16_no_drift_over_many_switches():
    """Recomputed from the kept base in fp32: after 50 switches a bf16 parameter holds exactly
    the single-rounded fp32 result (no accumulated bf16 error), and the base comes back bit for bit."""
    net = _net(torch.bfloat16)
    base = _snap(net)
    deltas = _deltas(net, scale=2e-4)
    sched = HardSwitch(switch=0.5, high_weight=0.75, low_weight=-1.25)
    with WeightPatcher(net, ScheduledWeights(deltas, sched)) as p:
        for i in range(50):
            p.apply(0.9 if i % 2 == 0 else 0.1)
        assert p.writes == 50
        for k, v in net.state_dict().items():
            assert torch.equal(v, (base[k].float() - 1.25 * deltas["control"][k]).bfloat16()), k
    assert _equal(_snap(net), base)


def test_base_kept_only_for_patched_nonzero_keys():
    net = _net()
    deltas = _deltas(net, keys=["0.weight", "2.bias", "table"])
    deltas["control"]["2.bias"] = torch.zeros(8)  # a frozen layer: tau = 0
    deltas["dynamics"]["2.bias"] = torch.zeros(8)
    with WeightPatcher(net, ScheduledWeights(deltas, HardSwitch())) as p:
        assert sorted(p._base) == ["0.weight", "table"]
        p.apply(0.9)
    assert sorted(p._base) == []  # released on exit


def test_buffers_are_patched_and_restored():
    net = _net()
    base = _snap(net)
    deltas = {"d": {"table": torch.ones(4, 4)}}
    with WeightPatcher(net, ScheduledWeights(deltas, Constant({"d": 2.0}))) as p:
        p.apply(0.5)
        assert torch.equal(net.table, base["table"] + 2.0)
    assert torch.equal(net.table, base["table"])


def test_restore_after_exception_inside_with():
    net = _net()
    base = _snap(net)
    with pytest.raises(KeyboardInterrupt):
        with WeightPatcher(net, ScheduledWeights(_deltas(net), HardSwitch())) as p:
            p.apply(1.0)
            raise KeyboardInterrupt
    assert _equal(_snap(net), base)


def test_validation_errors():
    net = _net()
    good = _deltas(net)
    with pytest.raises(PatchError, match=r"'nope.weight'"):
        WeightPatcher(net, ScheduledWeights({"d": {"nope.weight": torch.zeros(1)}}, Constant({"d": 1.0})))
    with pytest.raises(PatchError, match=r"'0.weight' has shape \(3,\) but the model's parameter has \(64, 64\)"):
        WeightPatcher(net, ScheduledWeights({"d": {"0.weight": torch.zeros(3)}}, Constant({"d": 1.0})))
    with pytest.raises(PatchError, match=r"uses delta\(s\) \['control'\]"):
        ScheduledWeights({"dynamics": good["dynamics"]}, HardSwitch())
    with pytest.raises(PatchError, match="mixes predictions .* use merging.patcher.ScheduledPredictions"):
        ScheduledWeights(good, PredictionBlend(HardSwitch()))
    with pytest.raises(PatchError, match="needs a schedule of mode 'predictions'"):
        ScheduledPredictions(good, HardSwitch())
    with WeightPatcher(net, ScheduledPredictions(good, PredictionBlend(HardSwitch()))) as p:
        with pytest.raises(PatchError, match="mixes predictions: use calls"):
            p.apply(0.5)
    with pytest.raises(PatchError, match="non-empty"):
        ScheduledWeights({}, Constant({"d": 1.0}))
    with pytest.raises(PatchError, match="floating-point tensor"):
        ScheduledWeights({"d": {"0.weight": torch.zeros(64, 64, dtype=torch.int64)}}, Constant({"d": 1.0}))
    with pytest.raises(PatchError, match="weights\\(noise_level\\)"):
        ScheduledWeights(good, object())

    class Rogue:
        def weights(self, level):
            return {"dynamics": float("inf")}

    with WeightPatcher(net, ScheduledWeights(good, Rogue())) as p:
        with pytest.raises(PatchError, match="non-finite"):
            p.apply(0.5)
    with pytest.raises(RuntimeError, match="outside"):
        p.apply(0.5)


def test_bf16_deltas_on_fp32_model_use_fp32_math():
    net = _net()
    base = _snap(net)
    d16 = {"d": {k: v.bfloat16() for k, v in _deltas(net, ("d",))["d"].items()}}
    with WeightPatcher(net, ScheduledWeights(d16, Constant({"d": 0.3}))) as p:
        p.apply(0.5)
        for k, v in net.state_dict().items():
            assert torch.equal(v, base[k] + 0.3 * d16["d"][k].float()) or torch.equal(
                v, torch.add(base[k], d16["d"][k].float(), alpha=0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_arithmetic_matches_whole_tensor_fp32(monkeypatch, dtype):
    import merging.patcher as patcher

    monkeypatch.setattr(patcher, "CHUNK", 64)  # many chunks and a ragged last one
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1000, generator=g).to(dtype)
    d1, d2 = torch.randn(1000, generator=g) * 1e-2, (torch.randn(1000, generator=g) * 1e-2).bfloat16()
    got = static_merge(base, [(d1, 0.5), (d2, -2.0)])
    expect = base.float() + 0.5 * d1
    expect = (expect + (-2.0) * d2.float()).to(dtype)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    # a non-contiguous base goes through the unchunked path with the same fp32 arithmetic
    tb = base.reshape(25, 40).t()
    got_t = static_merge(tb, [(d1.reshape(25, 40).t(), 0.5)])
    expect_t = (tb.float() + 0.5 * d1.reshape(25, 40).t()).to(dtype)
    torch.testing.assert_close(got_t, expect_t, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_calls_for_weight_and_prediction_schedules():
    net = _net()
    good = _deltas(net)
    sw = ScheduledWeights(good, HardSwitch(switch=0.5))
    assert sw.mode == "weights"
    assert sw.calls(0.7) == [({"dynamics": 1.0, "control": 0.0}, 1.0)]
    pb = ScheduledPredictions(good, PredictionBlend(LinearBlend(), strengths={"dynamics": 0.5}))
    assert pb.mode == "predictions"
    calls = pb.calls(0.25)  # LinearBlend: dynamics share = level
    assert calls == [({"dynamics": 0.5, "control": 0.0}, 0.25), ({"dynamics": 0.0, "control": 1.0}, 0.75)]
    assert pb.calls(1.0) == [({"dynamics": 0.5, "control": 0.0}, 1.0)]
    with WeightPatcher(net, pb) as p:
        assert p.set_weights({"control": 1.0}) and not p.set_weights({"control": 1.0, "dynamics": 0.0})
        with pytest.raises(PatchError, match="unknown"):
            p.set_weights({"other": 1.0})


def test_base_copy_on_another_device_setting():
    net = _net(torch.bfloat16)
    base = _snap(net)
    deltas = _deltas(net)
    with WeightPatcher(net, ScheduledWeights(deltas, HardSwitch()), base_device="cpu") as p:
        assert all(b.device.type == "cpu" for b in p._base.values())
        p.apply(0.9)
        assert torch.equal(net.state_dict()["0.weight"], static_merge(base["0.weight"], [(deltas["dynamics"]["0.weight"], 1.0)]))
    assert _equal(_snap(net), base)
