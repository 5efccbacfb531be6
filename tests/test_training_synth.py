"""Synthetic motion clips: determinism, ground truth, files and pairs."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from training.synth_motion import (
    ClipSpec,
    ObjectSpec,
    compare_speeds,
    generate_dataset,
    make_clip,
    main,
    render_clip,
    spec_from_json,
)
from training.textures import TEXTURE_KINDS, make_texture

SMALL = dict(frames=6, height=48, width=64, fps=8.0)


def test_make_clip_is_deterministic_per_seed():
    a, ma = make_clip(7, **SMALL)
    b, mb = make_clip(7, **SMALL)
    c, _ = make_clip(8, **SMALL)
    assert a.shape == (6, 48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ma == mb
    assert not np.array_equal(a, c)
    # the recorded spec rebuilds the same clip
    again, _ = render_clip(spec_from_json(ma["spec"]))
    assert np.array_equal(again, a)


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_textures_have_detail(kind):
    t = make_texture(kind, np.random.default_rng(0), 40, 50)
    assert t.shape == (40, 50, 3) and t.dtype == np.uint8
    assert t.std() > 15  # flat textures would hide motion


def _spec(**kw) -> ClipSpec:
    base = dict(kind="both", frames=5, height=64, width=64, fps=10.0, background="noise", noise=0.0, seed=3)
    base.update(kw)
    return ClipSpec(**base)


def test_pan_ground_truth_is_exact():
    # A pure pan of 10 % diagonal / s moves every pixel by the same amount: camera speed 10.
    frames, meta = render_clip(_spec(kind="camera", pan=(6.0, 8.0)))
    assert meta["camera_speed"] == pytest.approx(10.0, rel=1e-9)
    assert meta["object_speed"] == 0.0
    assert meta["unit"] == "pct_diag_per_s" and len(meta["camera_curve"]) == 4
    # and the pixels really move by that much: 10 % of the diagonal at 10 fps = 0.905 px/frame
    diag = np.hypot(64, 64)
    px = 10.0 / 100 * diag / 10.0
    g0, g1 = frames[0].astype(float), frames[1].astype(float)
    dx, dy = 6.0 / 10 * px, 8.0 / 10 * px  # world moves right/down -> content shifts left/up
    import cv2

    shifted = cv2.warpAffine(g1, np.float32([[1, 0, dx], [0, 1, dy]]), (64, 64))
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(shifted[inner] - g0[inner]).mean() < 0.25 * np.abs(g1[inner] - g0[inner]).mean()


def test_zoom_and_roll_ground_truth_scale_linearly():
    _, z1 = render_clip(_spec(kind="camera", zoom=0.1))
    _, z2 = render_clip(_spec(kind="camera", zoom=0.2))
    _, r1 = render_clip(_spec(kind="camera", roll=5.0))
    assert z2["camera_speed"] == pytest.approx(2 * z1["camera_speed"], rel=0.05)
    assert r1["camera_speed"] > 0 and z1["object_speed"] == 0.0


def test_object_ground_truth_is_residual_to_camera():
    obj = ObjectSpec(shape="circle", texture="checker", size=0.3, offset=(0.0, 0.0), velocity=(0.0, 12.0), seed=1)
    _, only_obj = render_clip(_spec(kind="object", objects=[obj]))
    assert only_obj["camera_speed"] == 0.0
    assert only_obj["object_speed"] == pytest.approx(12.0, rel=1e-6)
    # With a pan added the object's own (residual) speed is unchanged.
    _, both = render_clip(_spec(kind="both", objects=[obj], pan=(5.0, 0.0)))
    assert both["object_speed"] == pytest.approx(12.0, rel=1e-6)
    assert both["camera_speed"] == pytest.approx(5.0, rel=1e-6)
    # An object fixed in the world moves with the background: no object motion.
    still = ObjectSpec(**{**obj.__dict__, "velocity": (0.0, 0.0)})
    _, cam = render_clip(_spec(kind="camera", objects=[still], pan=(5.0, 0.0)))
    assert cam["object_speed"] == 0.0


def test_static_clip_has_no_motion():
    frames, meta = make_clip(1, kinds=["static"], **SMALL)
    assert meta["object_speed"] == 0 and meta["camera_speed"] == 0
    assert np.abs(frames[1:].astype(int) - frames[:-1].astype(int)).mean() < 2.0  # sensor noise only


@pytest.mark.parametrize("kind", ["camera", "object", "both"])
def test_kinds_move_what_they_say(kind):
    for seed in range(3):
        _, m = make_clip(seed, kinds=[kind], **SMALL)
        assert (m["camera_speed"] > 0.5) == (kind in ("camera", "both"))
        assert (m["object_speed"] > 0.5) == (kind in ("object", "both"))


def test_compare_speeds_labels():
    assert compare_speeds(10.0, 5.0) == "a"
    assert compare_speeds(5.0, 10.0) == "b"
    assert compare_speeds(10.0, 8.5) == "same"  # within 20 %
    assert compare_speeds(0.1, 0.3) == "same"  # both below the visibility floor
    assert compare_speeds(10.0, 7.0) == "a"


def test_cli_writes_clips_meta_and_pairs(tmp_path):
    out = tmp_path / "ds"
    rc = main(["--out", str(out), "--count", "5", "--seed", "4", "--frames", "4", "--size", "32x48",
               "--format", "png", "--pairs-per-clip", "4"])
    assert rc == 0
    metas = [json.loads(line) for line in open(out / "meta.jsonl")]
    assert [m["clip"] for m in metas] == [f"clip_{i:05d}" for i in range(5)]
    from motion.clips import read_clip

    clip = read_clip(out / metas[2]["clip"])
    assert clip.frames.shape == (4, 32, 48, 3)
    frames, _ = make_clip(np.random.default_rng([4, 2]), frames=4, height=32, width=48)
    assert np.array_equal(clip.frames, frames)  # PNG is lossless: the file holds exactly make_clip's frames
    rows = list(csv.reader(open(out / "pairs.csv")))
    assert rows[0] == ["clip_a", "clip_b", "object", "camera"]
    assert len(rows) - 1 == 10  # 4 pairs per clip * 5 clips / 2
    by = {m["clip"]: m for m in metas}
    for a, b, o, c in rows[1:]:
        assert a != b and a in by and b in by
        assert o == compare_speeds(by[a]["object_speed"], by[b]["object_speed"])
        assert c == compare_speeds(by[a]["camera_speed"], by[b]["camera_speed"])
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary leftovers


def test_dataset_clips_do_not_depend_on_count(tmp_path):
    m3 = generate_dataset(str(tmp_path / "a"), 3, 9, fmt="png", progress=False, frames=3, height=24, width=24)
    m5 = generate_dataset(str(tmp_path / "b"), 5, 9, fmt="png", progress=False, frames=3, height=24, width=24)
    assert [m["spec"] for m in m3] == [m["spec"] for m in m5[:3]]


def test_mp4_output_reads_back(tmp_path):
    metas = generate_dataset(str(tmp_path), 1, 0, fmt="mp4", progress=False, frames=4, height=32, width=32)
    from motion.clips import read_clip

    clip = read_clip(tmp_path / metas[0]["clip"])
    assert clip.frames.shape == (4, 32, 32, 3) and clip.fps == pytest.approx(8.0)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="kind"):
        make_clip(0, kinds=["dance"])
    with pytest.raises(ValueError, match="frames"):
        render_clip(_spec(frames=1))
    with pytest.raises(SystemExit):
        main(["--out", "x", "--count", "1", "--size", "big"])


def test_photo_backgrounds(tmp_path):
    import cv2

    from training.textures import load_photo_backgrounds

    photo = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), photo)
    (tmp_path / "notes.txt").write_text("not a photo")
    paths = load_photo_backgrounds(str(tmp_path))
    assert paths == [str(tmp_path / "a.png")]
    kinds = set()
    for seed in range(6):
        frames, meta = make_clip(seed, photos=paths, **SMALL)
        kinds.add(meta["spec"]["background"].split(":")[0])
        assert frames.shape == (6, 48, 64, 3)
    assert "photo" in kinds
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_photo_backgrounds(str(empty))
