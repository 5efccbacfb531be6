"""The main job ``python -m pipelines.generate``."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines import generate

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_sample_image_is_small_and_readable():
    from PIL import Image

    assert os.path.getsize(generate.DEFAULT_IMAGE) < 200_000
    with Image.open(generate.DEFAULT_IMAGE) as im:
        assert im.mode == "RGB" and min(im.size) >= 128


def test_embedded_default_writes_mp4_and_says_untrained(tmp_path, capsys):
    from motion.clips import read_clip

    out = tmp_path / "clip.mp4"
    rc = generate.main(["--frames", "9", "--steps", "2", "--seed", "3", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "UNTRAINED" in text and f"wrote {out}" in text
    for setting in ("frames: 9", "steps: 2", "seed: 3", "cfg: 6.0", "height: 80", "width: 128", "sample_image.png"):
        assert setting in text, setting
    clip = read_clip(str(out))
    assert clip.frames.shape[0] == 9 and clip.frames.shape[1:3] == (80, 128)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary files left


def test_bad_arguments_give_one_line_errors(tmp_path, capsys):
    assert generate.main(["--object", "5", "--out", str(tmp_path / "a.mp4")]) == 2
    assert "--object/--camera need --embedder" in capsys.readouterr().err
    assert generate.main(["--image", str(tmp_path / "none.png")]) == 2
    assert "none.png: no such file" in capsys.readouterr().err
    assert generate.main(["--model", str(tmp_path), "--out", str(tmp_path / "a.mp4")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert generate.main(["--frames", "10", "--out", str(tmp_path / "a.mp4"), "--no-progress"]) == 2
    assert "frames=10" in capsys.readouterr().err
    assert generate.main(["--out", str(tmp_path / "a.gif")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path, monkeypatch, capsys):
    import pipelines.sampling as sampling

    real = sampling.sample

    def interrupted(*a, **kw):
        def progress(step, total):
            raise KeyboardInterrupt

        kw["progress"] = progress
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "sample", interrupted)
    assert generate.main(["--frames", "9", "--steps", "2", "--out", str(tmp_path / "x.mp4"), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_argument_and_embedder(tmp_path, tiny_model_dir, capsys):
    motion = pytest.importorskip("motion.embedding")
    from pipelines import load_model

    folder = tiny_model_dir("cogvideox-i2v")
    model = load_model(folder)
    emb_path = tmp_path / "emb.safetensors"
    motion.save_motion_embedder(motion.build_for_model(model), str(emb_path))
    image = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "o.mp4"
    rc = generate.main(["--model", folder, "--image", str(image), "--embedder", str(emb_path), "--object", "7",
                        "--camera", "2", "--frames", "9", "--steps", "2", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "UNTRAINED" not in text
    assert "object_intensity: 7.0" in text and "camera_intensity: 2.0" in text and "MotionScoreEmbedding" in text
    assert out.is_file()


@pytest.mark.slow
def test_module_runs_as_a_script(tmp_path):
    out = tmp_path / "s.mp4"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pipelines.generate", "--frames", "9", "--steps", "1", "--out", str(out),
                        "--no-progress"], cwd=PACK, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and out.is_file()
