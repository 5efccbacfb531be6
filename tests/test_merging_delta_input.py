"""--finetuned given as a motiondial.delta; one merge arithmetic for static merges and the patcher;
merging.build's thread setting stays inside the CLI."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging import build
from merging.deltas import load_delta, save_delta
from merging.errors import FingerprintMismatchError
from merging.fingerprint import fingerprint_checkpoint
from merging.patcher import ScheduledWeights, WeightPatcher, static_merge
from merging.recipes import build_ed, build_task_vector, merge_deltas
from merging.schedule import Constant


def _read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _bits(t):
    # Compare storage bits (torch.equal calls -0.0 and 0.0 equal).
    return t.contiguous().view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _stage1_delta(base_dir, path, *, skip_every=3, seed=1):
    """A fine-tune given as a delta over some of the denoiser's keys (the others: zero delta)."""
    wfile = os.path.join(base_dir, "transformer", "diffusion_pytorch_model.safetensors")
    sd = load_file(wfile)
    g = torch.Generator().manual_seed(seed)
    keys = [k for k, v in sd.items() if v.is_floating_point()][::skip_every]
    delta = {k: 0.05 * sd[k].float().abs().mean() * torch.randn(sd[k].shape, generator=g) for k in keys}
    return save_delta(path, delta, name="finetune", base_fingerprint=fingerprint_checkpoint(base_dir), recipe="stage1")


def test_build_ed_from_delta_equals_build_from_full_copy(tiny_model_dir, tmp_path):
    base = tiny_model_dir("cogvideox-i2v")
    delta = _stage1_delta(base, str(tmp_path / "finetune_delta.safetensors"))
    # The fine-tuned model as a full fp32 copy: base + delta, written by the static merge.
    full = merge_deltas(base, {delta: 1.0}, str(tmp_path / "ft")).files["merged"]
    a = build_ed(base, delta, str(tmp_path / "from_delta"), seed=5)
    b = build_ed(base, full, str(tmp_path / "from_full"), seed=5)
    for name in ("dynamics", "control"):
        ta, ma = _read(a.files[name])
        tb, mb = _read(b.files[name])
        assert ta.keys() == tb.keys() and all(_same_bits(ta[k], tb[k]) for k in ta), name
        # Same metadata too: the fine-tune's fingerprint is that of base + delta.
        assert ma == mb
    assert any(bool(t.any()) for t in _read(a.files["control"])[0].values())  # not vacuous
    # Whole-tensor recipes (top-k) read whole tensors: same result there.
    ka = build_task_vector(base, delta, str(tmp_path / "tv_delta"), density=0.5, scale=-0.5)
    kb = build_task_vector(base, full, str(tmp_path / "tv_full"), density=0.5, scale=-0.5)
    ta, tb = _read(ka.files["delta"])[0], _read(kb.files["delta"])[0]
    assert all(_same_bits(ta[k], tb[k]) for k in ta)


def test_delta_for_another_base_is_refused(tiny_model_dir, tmp_path, capsys):
    base = tiny_model_dir("cogvideox-i2v")
    other = tiny_model_dir("cogvideox1.5-i2v")
    wrong = _stage1_delta(other, str(tmp_path / "x_delta.safetensors"))
    with pytest.raises(FingerprintMismatchError, match="was built for base"):
        build_ed(base, wrong, str(tmp_path / "o"))
    assert build.main(["--base", base, "--finetuned", wrong, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "x_delta.safetensors" in err and "was built for base" in err
    assert not os.path.exists(tmp_path / "o")


def _bf16_pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    # 300k values: several patcher chunks (2^18) and a ragged last one; one engine chunk.
    base = {"0.weight": torch.randn(600, 500, generator=g).bfloat16(), "0.bias": torch.randn(600, generator=g).bfloat16(),
            "1.weight": torch.randn(4, 600, generator=g).bfloat16()}
    base["0.weight"][0, :4] = -0.0  # signed zeros must survive untouched entries
    bpath = str(tmp_path / "base.safetensors")
    save_file(base, bpath)
    fp = fingerprint_checkpoint(bpath)
    d1 = {k: (1e-2 * torch.randn(v.shape, generator=g)) for k, v in base.items() if k != "1.weight"}
    d1["0.weight"][0, :2] = 0.0
    d2 = {"0.weight": 1e-2 * torch.randn(600, 500, generator=g)}
    p1 = save_delta(str(tmp_path / "d1.safetensors"), d1, name="a", base_fingerprint=fp, dtype=torch.bfloat16)
    p2 = save_delta(str(tmp_path / "d2.safetensors"), d2, name="b", base_fingerprint=fp)  # fp32
    return base, bpath, fp, p1, p2


def _net_from(base):
    net = torch.nn.Sequential(torch.nn.Linear(500, 600), torch.nn.Linear(600, 4, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        for k, p in net.state_dict().items():
            p.copy_(base[k])
    return net


def test_static_merge_equals_constant_schedule_bit_for_bit(tmp_path):
    base, bpath, fp, p1, p2 = _bf16_pair(tmp_path)
    weights = {"a": 0.3, "b": -0.7}
    merged = merge_deltas(bpath, {p1: weights["a"], p2: weights["b"]}, str(tmp_path / "m")).files["merged"]
    static = load_file(merged)
    net = _net_from(base)
    deltas = {"a": load_delta(p1, fp), "b": load_delta(p2, fp)}
    with WeightPatcher(net, ScheduledWeights(deltas, Constant(weights))) as patcher:
        patcher.apply(0.5)
        live = {k: v.clone() for k, v in net.state_dict().items()}
    for k in base:
        assert _same_bits(live[k], static[k]), k
        assert _same_bits(static_merge(base[k], [(d[k], weights[n]) for n, d in deltas.items() if k in d]), static[k]), k
    assert not torch.equal(static["0.weight"], base["0.weight"])


def test_bf16_operands_are_added_in_fp32():
    # Two bf16 operands alone would be added in bf16 by torch; the merge widens the base first.
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5000, generator=g).bfloat16()
    d1, d2 = (1e-2 * torch.randn(5000, generator=g)).bfloat16(), (1e-2 * torch.randn(5000, generator=g)).bfloat16()
    got = static_merge(base, [(d1, 0.3), (d2, 0.5)])
    ref = torch.add(base.float(), d1.float(), alpha=0.3).add_(d2.float(), alpha=0.5).bfloat16()
    assert _same_bits(got, ref)


def test_ed_merged_models_use_the_stored_deltas(tmp_path):
    # A bf16 base: the deltas are stored in bf16, and --merged must be base + (stored delta),
    # what the patcher makes of the delta files, not base + (unrounded fp32 delta).
    base, bpath, fp, p1, _ = _bf16_pair(tmp_path)
    ft = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(4))).bfloat16()
          for k, v in base.items()}
    fpath = str(tmp_path / "ft.safetensors")
    save_file(ft, fpath)
    res = build_ed(bpath, fpath, str(tmp_path / "ed"), merged=True)
    for name in ("dynamics", "control"):
        d = load_delta(res.files[name], fp)
        assert d["0.weight"].dtype == torch.bfloat16
        model = load_file(res.files[f"{name}_model"])
        net = _net_from(base)
        with WeightPatcher(net, ScheduledWeights({name: d}, Constant({name: 1.0}))) as patcher:
            patcher.apply(0.5)
            assert all(_same_bits(v, model[k]) for k, v in net.state_dict().items()), name


def test_build_cli_keeps_the_callers_thread_count_and_results_do_not_depend_on_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {"a.weight": torch.randn(600, 700, generator=g), "b.weight": torch.randn(77, generator=g)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    before = torch.get_num_threads()
    outs = {}
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = str(tmp_path / f"out{n}")
            assert build.main(["--base", str(tmp_path / "pre.safetensors"), "--finetuned", str(tmp_path / "ft.safetensors"),
                               "--out", out, "--merged", "--quiet"]) == 0
            assert torch.get_num_threads() == n  # not changed behind the caller's back
            outs[n] = {f: load_file(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")}
    finally:
        torch.set_num_threads(before)
    assert outs[1].keys() == outs[3].keys() and len(outs[1]) == 4
    for f in outs[1]:
        assert all(_same_bits(outs[1][f][k], outs[3][f][k]) for k in outs[1][f]), f
