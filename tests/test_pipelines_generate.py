"""The main job ``python -m pipelines.generate``."""
import os
import subprocess
import sys

import re

import numpy as np
import pytest

from pipelines import demo, generate

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_sample_image_is_small_and_readable():
    from PIL import Image

    assert os.path.getsize(generate.DEFAULT_IMAGE) < 200_000
    with Image.open(generate.DEFAULT_IMAGE) as im:
        assert im.mode == "RGB" and min(im.size) >= 128


needs_demo = pytest.mark.skipif(not demo.demo_available(),
                                reason=f"the bundled demo model is missing ({demo.DEMO_DIR}): a partial checkout")


@pytest.mark.slow  # ~3-6 s: the first test here to load diffusers, the model and the estimator
@needs_demo
def test_default_command_runs_the_bundled_demo_and_measures_motion(tmp_path, capsys):
    from motion.clips import read_clip

    out = tmp_path / "clip.mp4"
    rc = generate.main(["--out", str(out), "--no-progress"])  # the README's command, defaults only
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "UNTRAINED" not in text and "bundled demo model" in text and "training.train_demo" in text
    for setting in ("frames: 8", f"steps: {demo.DEMO_DEFAULTS['steps']}", "cfg: 1.0", "height: 32", "width: 32", "fps: 7.0", "family: \"svd\"",
                    "object_intensity: 5.0", "camera_intensity: 5.0", "motion_embedder: \"MotionScoreEmbedding\"",
                    "sample_image.png", "motion_embedder.safetensors", "upscale: 8", "demo_model: true"):
        assert setting in text, setting
    m = re.search(r"requested object 5 / camera 5 -> measured object (\d+\.\d) / camera (\d+\.\d)", text)
    assert m, text
    assert all(1.0 <= float(v) <= 10.0 for v in m.groups())
    assert text.rstrip().endswith(f"wrote {out}")
    clip = read_clip(str(out))  # 32x32 frames, written 8x larger (nearest) so the file can be watched
    assert clip.frames.shape == (8, 256, 256, 3) and clip.fps == 7.0
    blocks = clip.frames[:, ::8, ::8].astype(np.int16)  # nearest upscale: 8x8 blocks of one colour
    assert np.abs(clip.frames[:, 3::8, 3::8].astype(np.int16) - blocks).mean() < 4  # (codec noise only)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary files left


@needs_demo
def test_flags_override_the_demo_defaults(tmp_path, capsys):
    from motion.clips import read_clip

    out = tmp_path / "o.mp4"
    rc = generate.main(["--object", "2", "--camera", "10", "--frames", "6", "--steps", "2", "--cfg", "2",
                        "--height", "16", "--seed", "4", "--fps", "5", "--upscale", "3", "--vae-slicing",
                        "--out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    for setting in ("frames: 6", "steps: 2", "cfg: 2.0", "height: 16", "width: 16", "seed: 4", "fps: 5.0",
                    "object_intensity: 2.0", "camera_intensity: 10.0", "upscale: 3", "vae_slicing: true"):
        assert setting in cap.out, setting
    assert "requested object 2 / camera 10 -> measured" in cap.out
    # outside the demo's training range / meaningless guidance: said, not refused
    assert "--camera 10: the demo model was trained on scores 1..9" in cap.err
    assert "--cfg 2: the demo model was trained without condition dropout" in cap.err
    clip = read_clip(str(out))
    assert clip.frames.shape == (6, 48, 48, 3) and clip.fps == 5.0


@needs_demo
def test_demo_defaults_follow_the_folder_given_as_model(tmp_path, capsys):
    """--model naming the bundled folder gets its defaults; the sizes come from the folder's
    configs (here the pipeline resolves 32x32 from the demo folder, width following --width)."""
    out = tmp_path / "w.mp4"
    assert generate.main(["--model", demo.DEMO_MODEL, "--width", "24", "--steps", "1", "--upscale", "1",
                          "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "height: 24" in text and "width: 24" in text and "frames: 8" in text and "demo_model: true" in text


def test_bundled_folder_swapped_for_another_svd_configuration(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Nothing about the demo's architecture is hard-coded: another SVD folder (the tiny test
    model: other VAE/UNet configs) with its own embedder in the bundled place runs the same way."""
    from motion.embedding import build_for_model, save_motion_embedder
    from pipelines import load_model

    folder = tiny_model_dir("svd")
    emb = save_motion_embedder(build_for_model(load_model(folder)), str(tmp_path / "emb.safetensors"))
    monkeypatch.setattr(generate, "DEMO_MODEL", folder)
    monkeypatch.setattr(generate, "DEMO_EMBEDDER", emb)
    monkeypatch.setattr(generate, "demo_available", lambda: True)
    out = tmp_path / "s.mp4"
    assert generate.main(["--steps", "2", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"model: \"{folder}" in text and "embedder: \"" + emb in text and "height: 32" in text
    assert "requested object 5 / camera 5 -> measured object" in text and out.is_file()


def test_missing_bundled_folder_falls_back_to_an_untrained_model(tmp_path, monkeypatch, capsys):
    from motion.clips import read_clip

    monkeypatch.setattr(generate, "demo_available", lambda: False)
    out = tmp_path / "clip.mp4"
    rc = generate.main(["--frames", "9", "--steps", "2", "--seed", "3", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "UNTRAINED" in text and "bundled demo model is missing" in text and f"wrote {out}" in text
    for setting in ("frames: 9", "steps: 2", "seed: 3", "cfg: 6.0", "height: 80", "width: 128", "upscale: 1",
                    "measured object", "(no scores requested)"):
        assert setting in text, setting
    clip = read_clip(str(out))
    assert clip.frames.shape[0] == 9 and clip.frames.shape[1:3] == (80, 128)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_bad_arguments_give_one_line_errors(tmp_path, tiny_model_dir, capsys):
    svd = tiny_model_dir("svd")
    assert generate.main(["--model", svd, "--object", "5", "--out", str(tmp_path / "a.mp4")]) == 2
    assert "--object/--camera need --embedder" in capsys.readouterr().err
    assert generate.main(["--image", str(tmp_path / "none.png")]) == 2
    assert "none.png: no such file" in capsys.readouterr().err
    assert generate.main(["--model", str(tmp_path), "--out", str(tmp_path / "a.mp4")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert generate.main(["--out", str(tmp_path / "a.gif")]) == 2
    assert generate.main(["--upscale", "0", "--out", str(tmp_path / "a.mp4")]) == 2
    assert "--upscale 0: expected an integer in [1, 16]" in capsys.readouterr().err
    assert generate.main(["--embedder", str(tmp_path / "gone"), "--out", str(tmp_path / "a.mp4")]) == 2
    assert "gone: no such file or folder" in capsys.readouterr().err
    if demo.demo_available():  # the demo model's own limits, named
        assert generate.main(["--frames", "1", "--out", str(tmp_path / "a.mp4"), "--no-progress"]) == 2
        assert "frames=1" in capsys.readouterr().err
        assert generate.main(["--height", "30", "--out", str(tmp_path / "a.mp4"), "--no-progress"]) == 2
        assert "height=30: must be a positive multiple of 8" in capsys.readouterr().err
        assert generate.main(["--object", "11", "--out", str(tmp_path / "a.mp4"), "--no-progress"]) == 2
        assert "object_intensity=11.0" in capsys.readouterr().err
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
    assert generate.main(["--steps", "2", "--out", str(tmp_path / "x.mp4"), "--no-progress"]) == 130
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
    r = subprocess.run([sys.executable, "-m", "pipelines.generate", "--out", str(out), "--no-progress"],
                       cwd=PACK, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "measured object" in r.stdout and out.is_file()
