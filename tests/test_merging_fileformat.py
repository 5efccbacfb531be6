"""The shared MotionDial file header (merging.fileformat): reading, checking, atomic writing."""

import os

import pytest
import torch
from safetensors.torch import save_file

from merging.fileformat import check_format, read_metadata, save_safetensors_atomic


class MyError(ValueError):
    pass


def _read(path):
    return read_metadata(path, format="motiondial.thing", version=2, what="thing", error=MyError)


def test_round_trip_and_permissions(tmp_path):
    path = tmp_path / "sub" / "t.safetensors"
    out = save_safetensors_atomic({"w": torch.ones(3)}, path, {"format": "motiondial.thing", "format_version": "2", "x": "y"})
    assert out == str(path)
    assert _read(path) == {"format": "motiondial.thing", "format_version": "2", "x": "y"}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(path.parent) == ["t.safetensors"]  # no temporary left behind


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        save_safetensors_atomic({"w": "not a tensor"}, tmp_path / "t.safetensors", {"format": "f"})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"format": "other", "format_version": "2"}, r"not a MotionDial thing \(format 'other', expected 'motiondial.thing'\)"),
        ({"format": "motiondial.thing"}, r"thing format version None is not supported \(expected 2\)"),
        ({"format": "motiondial.thing", "format_version": "3"}, r"thing format version '3' is not supported"),
        ({"format": "motiondial.thing", "format_version": "x"}, r"thing format version 'x' is not supported"),
    ],
)
def test_wrong_format_or_version(tmp_path, meta, match):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata=meta)
    with pytest.raises(MyError, match="bad.safetensors: " + match):
        _read(path)
    with pytest.raises(MyError, match=match):
        check_format(meta, str(path), format="motiondial.thing", version=2, what="thing", error=MyError)


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(MyError, match=r"thing file '.*gone.safetensors' does not exist"):
        _read(tmp_path / "gone.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(MyError, match="junk.safetensors: not a readable safetensors file"):
        _read(junk)
