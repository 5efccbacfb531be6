"""Bad input to merging: clear errors naming the file/key, and never a partial output."""
import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from merging import safetensors_io
from merging.errors import CheckpointError, MismatchError, OutputError
from merging.recipes import build_ed


def _sd(seed=0, n=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.w": torch.randn(16, 8, generator=g).to(dtype) for i in range(n)}


@pytest.fixture
def pair(tmp_path):
    b = str(tmp_path / "pre.safetensors")
    f = str(tmp_path / "ft.safetensors")
    save_file(_sd(0), b)
    save_file(_sd(1), f)
    return b, f


def _only(tmp_path, *names):
    """The folder holds exactly these names: no output, no temporary leftovers."""
    assert sorted(os.listdir(tmp_path)) == sorted(names), os.listdir(tmp_path)


def test_key_mismatch_counts_and_first(tmp_path, pair):
    b, _ = pair
    sd = _sd(1)
    for i in range(3):
        del sd[f"blocks.{i}.w"]
    sd["extra.a"] = torch.zeros(2)
    f = str(tmp_path / "other.safetensors")
    save_file(sd, f)
    with pytest.raises(MismatchError) as e:
        build_ed(b, f, str(tmp_path / "out"))
    msg = str(e.value)
    assert "3 key(s) of the base are missing" in msg and "blocks.0.w" in msg
    assert "1 key(s) it has are not in the base: extra.a" in msg and "other.safetensors" in msg
    _only(tmp_path, "pre.safetensors", "ft.safetensors", "other.safetensors")


def test_shape_and_dtype_mismatch(tmp_path, pair):
    b, _ = pair
    sd = _sd(1)
    sd["blocks.4.w"] = torch.zeros(8, 16)
    f = str(tmp_path / "shape.safetensors")
    save_file(sd, f)
    with pytest.raises(MismatchError, match=r"shape of 1 key\(s\): blocks.4.w: \[16, 8\] vs \[8, 16\]"):
        build_ed(b, f, str(tmp_path / "out"))
    g = str(tmp_path / "bf16.safetensors")
    save_file(_sd(1, dtype=torch.bfloat16), g)
    with pytest.raises(MismatchError, match="another dtype.*BF16 vs F32"):
        build_ed(b, g, str(tmp_path / "out"))
    # explicitly allowed: arithmetic in fp32 goes through
    build_ed(b, g, str(tmp_path / "out"), allow_dtype_mismatch=True)
    assert os.path.isdir(tmp_path / "out")


def test_non_finite_names_key_and_file(tmp_path, pair):
    b, _ = pair
    sd = _sd(1)
    sd["blocks.7.w"][3, 2] = float("inf")
    f = str(tmp_path / "nan.safetensors")
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"nan.safetensors: tensor 'blocks.7.w' \(finetuned\) holds non-finite"):
        build_ed(b, f, str(tmp_path / "out"))
    _only(tmp_path, "pre.safetensors", "ft.safetensors", "nan.safetensors")


def test_corrupt_and_truncated_files(tmp_path, pair):
    b, f = pair
    data = open(f, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"trunc.safetensors: truncated: tensor 'blocks.9.w'"):
        build_ed(b, str(trunc), str(tmp_path / "out"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors: corrupt safetensors header"):
        build_ed(b, str(garbage), str(tmp_path / "out"))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        build_ed(b, str(tiny), str(tmp_path / "out"))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="truncated"):
        build_ed(b, str(huge), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_ed(b, str(tmp_path / "missing.safetensors"), str(tmp_path / "out"))
    # an index naming a shard that is missing
    (tmp_path / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {"blocks.0.w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors: file does not exist"):
        build_ed(b, str(tmp_path / "x.safetensors.index.json"), str(tmp_path / "out"))
    (tmp_path / "y.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt index"):
        build_ed(b, str(tmp_path / "y.safetensors.index.json"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_unwritable_output_folder(tmp_path, pair, monkeypatch):
    b, f = pair
    with pytest.raises(OutputError, match="does not exist"):
        build_ed(b, f, str(tmp_path / "no" / "such" / "out"))
    real_mkdir = os.mkdir

    def denied(path, *a, **k):
        if ".out.tmp-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    # (tests may run as root, for whom chmod does not deny anything: simulate the refusal)
    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(OutputError, match="is not writable"):
        build_ed(b, f, str(tmp_path / "out"))
    _only(tmp_path, "pre.safetensors", "ft.safetensors")


def test_disk_full_mid_write_leaves_nothing(tmp_path, pair, monkeypatch):
    b, f = pair
    calls = {"n": 0}
    real = safetensors_io.SafetensorsWriter._write

    def filling(self, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise safetensors_io._output_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
        return real(self, data)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "_write", filling)
    with pytest.raises(OutputError, match="disk full while writing"):
        build_ed(b, f, str(tmp_path / "out"), max_shard_bytes=1000)
    _only(tmp_path, "pre.safetensors", "ft.safetensors")


def test_raw_enospc_from_the_file_object(tmp_path, pair, monkeypatch):
    """The writer turns the OS's ENOSPC into a clear error (simulated at the file level)."""
    b, f = pair
    real_open = open
    state = {"n": 0}

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            state["n"] += 1
            if state["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def fake_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return Full(fh) if "w" in mode and str(path).endswith(".safetensors") else fh

    monkeypatch.setattr(safetensors_io, "open", fake_open, raising=False)
    with pytest.raises(OutputError, match="disk full"):
        build_ed(b, f, str(tmp_path / "out"), max_shard_bytes=1000)
    _only(tmp_path, "pre.safetensors", "ft.safetensors")


def test_not_enough_space_up_front(tmp_path, pair, monkeypatch):
    b, f = pair
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OutputError, match="not enough space"):
        build_ed(b, f, str(tmp_path / "out"))
    _only(tmp_path, "pre.safetensors", "ft.safetensors")


def test_interrupt_and_existing_output(tmp_path, pair):
    b, f = pair

    def cancel(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_ed(b, f, str(tmp_path / "out"), progress=cancel, max_shard_bytes=1000)
    _only(tmp_path, "pre.safetensors", "ft.safetensors")
    build_ed(b, f, str(tmp_path / "out"))
    with pytest.raises(OutputError, match="already exists"):
        build_ed(b, f, str(tmp_path / "out"))
    build_ed(b, f, str(tmp_path / "out"), overwrite=True, seed=5)
    _only(tmp_path, "pre.safetensors", "ft.safetensors", "out")
    assert json.load(open(tmp_path / "out" / "recipe.json"))["seed"] == 5
