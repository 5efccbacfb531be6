"""merging.fingerprint: state dict == checkpoint, dtype policy, clear mismatch errors."""
import os

import pytest
import torch
from safetensors.torch import save_file

from merging.errors import FingerprintMismatchError
from merging.fingerprint import check_fingerprint, fingerprint_checkpoint, fingerprint_state, sample_indices


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.to_q.weight": torch.randn(64, 32, generator=g),
        "blocks.0.attn.to_q.bias": torch.randn(64, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "scale": torch.randn(3, generator=g),
    }


def test_state_equals_checkpoint_file_and_shards(tmp_path):
    sd = _state()
    save_file(sd, str(tmp_path / "m.safetensors"))
    fp = fingerprint_state(sd)
    assert fingerprint_checkpoint(str(tmp_path / "m.safetensors")) == fp
    # sharded with an index
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:2]}, str(tmp_path / "s-1.safetensors"))
    save_file({k: sd[k] for k in keys[2:]}, str(tmp_path / "s-2.safetensors"))
    import json
    wm = {k: ("s-1.safetensors" if i < 2 else "s-2.safetensors") for i, k in enumerate(keys)}
    (tmp_path / "s.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert fingerprint_checkpoint(str(tmp_path / "s.safetensors.index.json")) == fp
    assert fp["n_keys"] == 4 and fp["n_params"] == sum(t.numel() for t in sd.values())


def test_dtype_policy(tmp_path):
    sd = _state()
    fp32 = fingerprint_state(sd)
    bf16 = fingerprint_state({k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert fp32["values"] != bf16["values"] and fp32["values_bf16"] == bf16["values_bf16"]
    check_fingerprint(fp32, bf16, "delta")  # same model loaded in bf16: accepted
    # bf16 storage read back as fp32 is exact: identical fingerprints
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
    assert fingerprint_checkpoint(str(tmp_path / "b.safetensors"))["values"] == fingerprint_state(
        {k: v.to(torch.bfloat16).float() for k, v in sd.items()})["values"]


def test_small_change_is_refused_with_details():
    base = _state()
    ft = {k: v.clone() for k, v in base.items()}
    ft["blocks.0.attn.to_q.weight"] += 1e-3  # a fine-tune-sized change to one tensor
    with pytest.raises(FingerprintMismatchError) as e:
        check_fingerprint(fingerprint_state(base), fingerprint_state(ft), "delta dyn.safetensors")
    msg = str(e.value)
    assert "delta dyn.safetensors" in msg and "1 of 4 tensors" in msg and "blocks.0.attn.to_q.weight" in msg


def test_structure_mismatch_message():
    base = _state()
    other = dict(base)
    del other["scale"]
    other["conv.weight"] = torch.zeros(8, 4, 1, 1)
    other["extra.weight"] = torch.zeros(2)
    with pytest.raises(FingerprintMismatchError) as e:
        check_fingerprint(fingerprint_state(base), fingerprint_state(other), "delta X")
    msg = str(e.value)
    assert "1 key(s) missing" in msg and "scale" in msg
    assert "1 key(s) the base did not have" in msg and "extra.weight" in msg
    assert "conv.weight [8, 4, 3, 3] vs [8, 4, 1, 1]" in msg
    with pytest.raises(FingerprintMismatchError, match="missing or not"):
        check_fingerprint({}, fingerprint_state(base), "delta X")


def test_sampling_is_cheap_and_deterministic(tmp_path):
    idx = sample_indices("a.weight", 10**9)
    assert idx == sample_indices("a.weight", 10**9) and len(idx) == 8 and idx[:2] == [0, 10**9 - 1]
    assert sample_indices("b", 5) == [0, 1, 2, 3, 4]
    # a 64 MB file: fingerprinting reads a few bytes per tensor, not the file
    big = {"w": torch.zeros(4096, 4096)}
    path = str(tmp_path / "big.safetensors")
    save_file(big, path)
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, n=-1):
            b = self.f.read(n)
            reads.append(len(b))
            return b

        def __getattr__(self, name):
            return getattr(self.f, name)

    import builtins
    builtins.open = lambda *a, **k: Counting(real_open(*a, **k))
    try:
        fingerprint_checkpoint(path)
    finally:
        builtins.open = real_open
    assert sum(reads) < 10_000, sum(reads)
    assert os.path.getsize(path) > 60_000_000
