"""Streaming recipes over checkpoints == the formulas applied in memory (exact in fp32)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging import engine, ops
from merging.deltas import load_delta, load_deltas, read_delta_metadata, save_delta
from merging.fingerprint import fingerprint_checkpoint, fingerprint_state
from merging.recipes import build_ed, build_task_vector, build_ties, merge_deltas

KEYS = {
    "patch_embed.proj.weight": (24, 8, 2, 2),
    "patch_embed.proj.bias": (24,),
    "transformer_blocks.0.attn1.to_q.weight": (24, 24),
    "transformer_blocks.0.attn1.to_q.bias": (24,),
    "transformer_blocks.0.ff.net.0.proj.weight": (96, 24),
    "transformer_blocks.1.attn1.to_out.0.weight": (24, 24),
    "norm_final.weight": (24,),
    "empty.weight": (0, 4),  # zero-size tensors exist in real checkpoints (unused buffers)
}


def _pair(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in KEYS.items()}
    ft = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in pre.items()}
    return pre, ft


def _save(sd, path):
    save_file(sd, str(path))
    return str(path)


def _save_sharded(sd, folder, name="diffusion_pytorch_model"):
    os.makedirs(folder, exist_ok=True)
    keys = list(sd)
    half = len(keys) // 2
    parts = [keys[:half], keys[half:]]
    wm = {}
    for i, part in enumerate(parts):
        fn = f"{name}-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, os.path.join(folder, fn))
        wm.update({k: fn for k in part})
    with open(os.path.join(folder, f"{name}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    return str(folder)


def _mask(key, shape, stream, p=0.7, seed=0):
    n = 1
    for s in shape:
        n *= s
    return ops.dare_keep_mask(n, p, seed, key, stream).view(shape)


def _ed_reference(pre, ft, a_dyn=0.25, b_dyn=0.75, a_con=1.0, b_con=0.25, p=0.7, seed=0):
    dyn, con = {}, {}
    for k in pre:
        x, y = pre[k].float(), ft[k].float()
        if x.dim() >= 2:
            md, mc = _mask(k, x.shape, "dynamics", p, seed), _mask(k, x.shape, "control", p, seed)
            dyn[k] = b_dyn * ((a_dyn * (x - y)) * md / (1 - p))
            con[k] = (a_con * y + b_con * ((y - x) * mc / (1 - p))) - x
        else:
            dyn[k] = b_dyn * (a_dyn * (x - y))
            con[k] = (a_con * y + b_con * (y - x)) - x
    return dyn, con


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_ed_matches_formula_exactly(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)  # several chunks per tensor, odd sizes
    monkeypatch.setattr(ops, "MASK_BLOCK", 64)
    pre, ft = _pair()
    if layout == "file":
        b, f = _save(pre, tmp_path / "pre.safetensors"), _save(ft, tmp_path / "ft.safetensors")
    else:
        b, f = _save_sharded(pre, tmp_path / "pre"), _save_sharded(ft, tmp_path / "ft")
    res = build_ed(b, f, str(tmp_path / "out"), seed=0, merged=True, max_shard_bytes=4000)
    dyn_ref, con_ref = _ed_reference(pre, ft)
    deltas = load_deltas(tmp_path / "out", fingerprint_checkpoint(b))
    for k in KEYS:
        assert torch.equal(deltas["dynamics"][k], dyn_ref[k]), k
        assert torch.equal(deltas["control"][k], con_ref[k]), k
    merged = load_file(res.files["dynamics_model"]) if res.files["dynamics_model"].endswith(".safetensors") else None
    if merged is None:  # sharded merged model
        from merging.checkpoint import open_checkpoint
        merged = dict(open_checkpoint(res.files["dynamics_model"]).iter_tensors())
    for k in KEYS:
        assert torch.equal(merged[k], pre[k] + dyn_ref[k])
    # the output is sharded with a diffusers-style index, and readable by safetensors itself
    assert len(res.plan.shards["dynamics"]) > 1
    index = json.load(open(tmp_path / "out" / "dynamics.safetensors.index.json"))
    assert set(index["weight_map"]) == set(KEYS) and index["metadata"]["total_size"] == res.plan.write_bytes["dynamics"]
    for fn in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "out" / fn), "pt") as fh:
            assert fh.metadata()["format"] == "motiondial.delta"
    meta = read_delta_metadata(tmp_path / "out" / "dynamics.safetensors.index.json")
    assert meta["params"] == {"a_dyn": 0.25, "b_dyn": 0.75, "a_con": 1.0, "b_con": 0.25, "p": 0.7}
    assert meta["seed"] == 0 and meta["scope"]["scope"] == "all" and meta["dtype"] == "fp32" and meta["recipe"] == "ed"
    assert meta["base_fingerprint"] == fingerprint_checkpoint(b)
    assert json.load(open(tmp_path / "out" / "schedule.json"))["type"] == "hard_switch"
    # no temporary leftovers next to the output
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + [os.path.basename(b), os.path.basename(f)])


def test_ed_expectation_and_independent_masks(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(400, 500, generator=g)}
    ft = {"w": pre["w"] + 1.0}  # tau = 1 everywhere
    b, f = _save(pre, tmp_path / "a.safetensors"), _save(ft, tmp_path / "b.safetensors")
    build_ed(b, f, str(tmp_path / "out"))
    d = load_deltas(tmp_path / "out")
    # in expectation dyn = pre - 0.1875 tau and con = pre + 1.25 tau
    assert d["dynamics"]["w"].mean().item() == pytest.approx(-0.1875, abs=0.005)
    assert d["control"]["w"].mean().item() == pytest.approx(1.25, abs=0.005)
    kept_d = d["dynamics"]["w"] < -0.3  # kept: -0.75 * 0.25 / 0.3
    kept_c = d["control"]["w"] > 1.5  # kept: 1 + 0.25 / 0.3
    overlap = (kept_d & kept_c).float().mean().item()
    assert overlap == pytest.approx(0.09, abs=0.005)  # independent: 0.3 * 0.3


def test_scopes_and_dtype(tmp_path):
    pre, ft = _pair()
    b, f = _save(pre, tmp_path / "pre.safetensors"), _save(ft, tmp_path / "ft.safetensors")
    res = build_task_vector(b, f, str(tmp_path / "t"), scope="temporal", family="cogvideox-i2v", dtype="bf16")
    d = load_delta(res.files["delta"])
    assert set(d) == {"transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn1.to_q.bias",
                      "transformer_blocks.1.attn1.to_out.0.weight"}
    for k in d:
        assert d[k].dtype == torch.bfloat16 and torch.equal(d[k], (ft[k] - pre[k]).to(torch.bfloat16))
    assert d.metadata["dtype"] == "bf16" and d.metadata["scope"] == {"scope": "temporal", "n_keys": 3}
    res = build_task_vector(b, f, str(tmp_path / "r"), scope=r"\.bias$", scale=-2.0)
    d = load_delta(res.files["delta"])
    assert set(d) == {k for k in KEYS if k.endswith(".bias")}
    assert all(torch.equal(d[k], -2.0 * (ft[k] - pre[k])) for k in d)
    with pytest.raises(ValueError, match="needs the model family"):
        build_task_vector(b, f, str(tmp_path / "x"), scope="temporal")
    with pytest.raises(ValueError, match="selects none"):
        build_task_vector(b, f, str(tmp_path / "x"), scope="nomatch")
    with pytest.raises(ValueError, match="valid regex"):
        build_task_vector(b, f, str(tmp_path / "x"), scope="([")


def test_task_vector_dare_topk_ties_and_apply(tmp_path):
    pre, ft = _pair()
    _, ft2 = _pair(seed=1)
    ft2 = {k: pre[k] + 0.1 * (ft2[k] - _pair(seed=1)[0][k]) for k in pre}
    b = _save(pre, tmp_path / "pre.safetensors")
    f = _save(ft, tmp_path / "ft.safetensors")
    f2 = _save(ft2, tmp_path / "ft2.safetensors")
    res = build_task_vector(b, f, str(tmp_path / "dare"), dare_p=0.5, seed=3, scale=1.5)
    d = load_delta(res.files["delta"])
    for k in KEYS:
        tau = ft[k] - pre[k]
        exp = 1.5 * ((tau * _mask(k, tau.shape, "delta", 0.5, 3)) / 0.5) if tau.dim() >= 2 else 1.5 * tau
        assert torch.equal(d[k], exp), k
    res = build_task_vector(b, f, str(tmp_path / "topk"), density=0.25)
    d = load_delta(res.files["delta"])
    for k in KEYS:
        assert torch.equal(d[k], ops.magnitude_topk(ft[k] - pre[k], 0.25))
    res = build_ties(b, [f, f2], str(tmp_path / "ties"), density=0.5)
    d = load_delta(res.files["delta"])
    for k in KEYS:
        assert torch.equal(d[k], ops.ties_merge([ft[k] - pre[k], ft2[k] - pre[k]], 0.5))
    # static merge of two deltas into the base
    e = build_ed(b, f, str(tmp_path / "ed"))
    m = merge_deltas(b, {e.files["dynamics"]: 0.5, e.files["control"]: 2.0}, str(tmp_path / "merged"))
    merged = load_file(m.files["merged"])
    dd = load_deltas(tmp_path / "ed")
    for k in KEYS:
        assert torch.equal(merged[k], pre[k] + 0.5 * dd["dynamics"][k] + 2.0 * dd["control"][k])


def test_save_and_load_delta_in_memory(tmp_path):
    pre, ft = _pair()
    fp = fingerprint_state(pre)
    tensors = {k: ft[k] - pre[k] for k in KEYS}
    path = save_delta(tmp_path / "d.safetensors", tensors, name="mine", base_fingerprint=fp, params={"x": 1})
    d = load_delta(path, fp)
    assert d.name == "mine" and d.metadata["params"] == {"x": 1}
    assert all(torch.equal(d[k], tensors[k]) for k in KEYS)
    lazy = load_delta(path, fp, lazy=True)
    assert torch.equal(lazy["norm_final.weight"], tensors["norm_final.weight"]) and len(lazy) == len(KEYS)
    from merging.errors import FingerprintMismatchError
    with pytest.raises(FingerprintMismatchError, match="was built for base"):
        load_delta(path, fingerprint_state(ft))
    with pytest.raises(ValueError, match="non-finite"):
        save_delta(tmp_path / "n.safetensors", {"a": torch.tensor([[1.0, float("nan")]])}, name="n", base_fingerprint=fp)
    assert not os.path.exists(tmp_path / "n.safetensors")
