"""merging.ops against direct in-memory implementations of the formulas (exact in fp32)."""
import pytest
import torch

from merging import ops


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_task_vector_sum_extrapolate_exact():
    pre, ft, other = _rand(7, 5, seed=1), _rand(7, 5, seed=2), _rand(7, 5, seed=3)
    assert torch.equal(ops.task_vector(ft, pre), ft - pre)
    assert torch.equal(ops.scaled_sum([pre, ft, other], [0.5, -2.0, 3.0]), 0.5 * pre + -2.0 * ft + 3.0 * other)
    assert torch.equal(ops.extrapolate(pre, ft, 0.25), pre + 0.25 * (pre - ft))
    with pytest.raises(ValueError):
        ops.scaled_sum([pre], [1.0, 2.0])


def test_dare_formula_with_its_mask():
    x = _rand(64, 48, seed=4)
    p = 0.7
    keep = ops.dare_keep_mask(x.numel(), p, seed=3, key="k", stream="s").view(x.shape)
    expected = (x * keep) / (1 - p)
    assert torch.equal(ops.dare(x, p, seed=3, key="k", stream="s"), expected)


def test_dare_statistics_and_determinism():
    x = torch.full((1000, 1000), 2.0)
    y = ops.dare(x, 0.7, seed=0, key="w")
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.003  # binomial std 0.00046
    # E[DARE(x)] = x: std of the mean is 2*sqrt(p/(1-p))/1000 = 0.003
    assert abs(y.mean().item() - 2.0) < 0.02
    assert torch.equal(y, ops.dare(x, 0.7, seed=0, key="w"))
    assert not torch.equal(y, ops.dare(x, 0.7, seed=1, key="w"))
    assert not torch.equal(y, ops.dare(x, 0.7, seed=0, key="w2"))
    assert not torch.equal(y, ops.dare(x, 0.7, seed=0, key="w", stream="control"))


def test_dare_passes_1d_through_and_p0():
    b = _rand(100, seed=5)
    assert ops.dare(b, 0.9, seed=0, key="bias") is b
    x = _rand(4, 4, seed=6)
    assert ops.dare(x, 0.0, seed=0, key="x") is x
    with pytest.raises(ValueError):
        ops.dare(x, 1.0, seed=0, key="x")


def test_dare_mask_independent_of_chunking(monkeypatch):
    monkeypatch.setattr(ops, "MASK_BLOCK", 50)  # several blocks on a small tensor
    x = _rand(13, 17, seed=7)
    whole = ops.dare(x, 0.5, seed=9, key="k")
    flat = x.reshape(-1)
    parts = [ops.dare(flat[o:o + 37], 0.5, seed=9, key="k", shape=x.shape, offset=o) for o in range(0, flat.numel(), 37)]
    assert torch.equal(torch.cat(parts).view(x.shape), whole)


def test_magnitude_topk():
    x = torch.tensor([[0.1, -5.0, 3.0], [-0.2, 4.0, 0.0]])
    y = ops.magnitude_topk(x, 0.5)  # k = 3 of 6
    assert torch.equal(y, torch.tensor([[0.0, -5.0, 3.0], [0.0, 4.0, 0.0]]))
    r = _rand(50, 40, seed=8)
    y = ops.magnitude_topk(r, 0.1)
    k = 200
    thr = r.abs().reshape(-1).sort(descending=True).values[k - 1]
    assert torch.equal(y, torch.where(r.abs() >= thr, r, torch.zeros(())))
    assert ops.magnitude_topk(r, 1.0) is r


def test_ties_merge_direct():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0])
    b = torch.tensor([2.0, 1.0, -1.0, -0.5, 0.0])
    c = torch.tensor([-4.0, 1.0, 2.0, 0.25, 0.0])
    # density 1: elect sign of sum, mean of agreeing non-zero entries
    out = ops.ties_merge([a, b, c], density=1.0)
    # sums: -1 -> neg: mean(-4) ; 0 -> sign 0: nothing agrees -> 0 ; 4 -> pos: mean(3, 2) ; 0.25 -> pos: mean(.5,.25)
    assert torch.equal(out, torch.tensor([-4.0, 0.0, 2.5, 0.375, 0.0]))
    # with trimming, a generic direct implementation
    vs = [_rand(30, 20, seed=s) for s in range(3)]
    t = torch.stack([ops.magnitude_topk(v, 0.3) for v in vs])
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    expected = (t * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(ops.ties_merge(vs, 0.3), expected, rtol=0, atol=0)
