"""train_motion's bad-input errors: short clips, missing captions, stale score caches, base mismatch."""
import json
import os

import numpy as np
import pytest

from motion.embedding import MotionEmbedderFileError, build_for_model, load_motion_embedder, save_motion_embedder
from training.motion_data import MotionDataError, compute_scores, read_index
from training.synth_motion import make_clip, write_clip
from training.train_motion import main


def _clips(folder, n=2, frames=9, size=32):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        fr, _ = make_clip(i, frames=frames, height=size, width=size, fps=8.0)
        write_clip(os.path.join(folder, f"c{i}"), fr, 8.0)
    return [f"c{i}" for i in range(n)]


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_index_formats(tmp_path):
    names = _clips(tmp_path)
    j = read_index(_jsonl(tmp_path / "a.jsonl", [{"path": n, "prompt": f"p{n}"} for n in names]))
    (tmp_path / "b.csv").write_text("video,text\n" + "".join(f"{n},p{n}\n" for n in names))
    c = read_index(str(tmp_path / "b.csv"))
    for n in names:
        (tmp_path / f"{n}.txt").write_text(f"p{n}\n")
    d = read_index(str(tmp_path))
    assert j == c == d and [r.caption for r in j] == ["pc0", "pc1"]
    assert all(os.path.isabs(r.path) for r in j)


def test_missing_captions_are_named(tmp_path):
    names = _clips(tmp_path)
    with pytest.raises(MotionDataError, match=r"a\.jsonl, entry 2: clip 'c1' has no caption"):
        read_index(_jsonl(tmp_path / "a.jsonl", [{"clip": "c0", "caption": "x"}, {"clip": "c1", "caption": " "}]))
    (tmp_path / "b.csv").write_text("clip\n" + "".join(f"{n}\n" for n in names))
    with pytest.raises(MotionDataError, match="b.csv, entry 2: clip 'c0' has no caption"):
        read_index(str(tmp_path / "b.csv"))
    (tmp_path / "c0.txt").write_text("only one")
    with pytest.raises(MotionDataError, match=r"c1' has no caption: expected .*c1\.txt"):
        read_index(str(tmp_path))
    with pytest.raises(MotionDataError, match="does not exist"):
        read_index(_jsonl(tmp_path / "m.jsonl", [{"clip": "nope", "caption": "x"}]))
    with pytest.raises(MotionDataError, match="unknown index format"):
        (tmp_path / "x.txt").write_text("")
        read_index(str(tmp_path / "x.txt"))


def test_clip_shorter_than_frame_count(tmp_path):
    _clips(tmp_path, n=1, frames=9)
    recs = read_index(_jsonl(tmp_path / "a.jsonl", [{"clip": "c0", "caption": "x"}]))
    with pytest.raises(MotionDataError, match=r"c0' has 9 frames, fewer than the 13 frames"):
        compute_scores(recs, frames=13, progress=False)


def test_score_cache_for_other_clips_is_refused(tmp_path):
    _clips(tmp_path, n=3)
    a = read_index(_jsonl(tmp_path / "a.jsonl", [{"clip": "c0", "caption": "x"}, {"clip": "c1", "caption": "y"}]))
    b = read_index(_jsonl(tmp_path / "b.jsonl", [{"clip": "c0", "caption": "x"}, {"clip": "c2", "caption": "y"}]))
    cache = str(tmp_path / "cache.safetensors")
    s1 = compute_scores(a, frames=9, cache_path=cache, progress=False)
    assert s1.shape == (2, 2) and ((s1 >= 1) & (s1 <= 10)).all()
    np.testing.assert_array_equal(compute_scores(a, frames=9, cache_path=cache, progress=False), s1)  # cache hit
    with pytest.raises(MotionDataError, match="built for other clips: 1 clip.*not in the cache.*c2"):
        compute_scores(b, frames=9, cache_path=cache, progress=False)
    with pytest.raises(MotionDataError, match="frames=9, this run uses frames=5"):
        compute_scores(a, frames=5, cache_path=cache, progress=False)
    with pytest.raises(MotionDataError, match="estimator='flow', this run uses estimator='ssim'"):
        compute_scores(a, frames=9, estimator="ssim", cache_path=cache, progress=False)
    # A clip re-rendered in place (same name) also invalidates the cache.
    frame = os.path.join(a[1].path, sorted(os.listdir(a[1].path))[0])
    with open(frame, "ab") as f:
        f.write(b"\0")
    with pytest.raises(MotionDataError, match="files changed on disk"):
        compute_scores(a, frames=9, cache_path=cache, progress=False)


def test_embedder_on_another_base_is_refused(tiny_model_dir, tmp_path):
    from pipelines import load_model
    from pipelines.tiny import build_tiny_model

    base = load_model(tiny_model_dir("cogvideox-i2v"))
    emb = build_for_model(base)
    path = save_motion_embedder(emb, tmp_path / "e.safetensors")
    assert load_motion_embedder(path, base).time_embed_dim == base.time_embed_dim
    other = load_model(build_tiny_model(tmp_path / "other", "cogvideox-i2v", seed=1))
    with pytest.raises(MotionEmbedderFileError, match=r"e\.safetensors.*trained on base .*cannot be loaded onto model .*other"):
        load_motion_embedder(path, other)
    svd = load_model(tiny_model_dir("svd"))
    with pytest.raises(MotionEmbedderFileError, match="family 'cogvideox-i2v', but .* is 'svd'"):
        load_motion_embedder(path, svd)


def test_cli_reports_bad_input_clearly(tiny_model_dir, tmp_path, capsys):
    _clips(tmp_path / "d", n=1, frames=9)
    data = _jsonl(tmp_path / "d" / "a.jsonl", [{"clip": "c0", "caption": "x"}])
    model = tiny_model_dir("cogvideox-i2v")
    common = ["--model", model, "--data", data, "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress"]
    assert main(common + ["--frames", "8"]) == 2
    assert "needs 4k+1 frames" in capsys.readouterr().err
    assert main(common + ["--frames", "13"]) == 2
    assert "has 9 frames, fewer than the 13" in capsys.readouterr().err
    assert main(common + ["--frames", "9", "--height", "64", "--width", "64"]) == 2
    assert "only takes 32x32" in capsys.readouterr().err
    assert main(common + ["--trainable", "full", "--dtype", "bf16"]) == 2
    assert "use --dtype fp32" in capsys.readouterr().err
    assert main(common + ["--frames", "9", "--estimator", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "motion_embedder.safetensors")
