"""motion.clips: reading videos / frame folders, atomic writing, clear errors on bad input."""
import os

import cv2
import numpy as np
import pytest

from motion.clips import ClipError, read_clip, write_frames, write_video


def _frames(t=6, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth content compresses well, so a lossy round trip stays close.
    base = cv2.resize(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.stack([np.roll(base, i, axis=1) for i in range(t)])


def _no_temp_files(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")] == []


@pytest.mark.parametrize("name", ["clip.mp4", "clip.avi"])
def test_video_round_trip(tmp_path, name):
    fr = _frames()
    path = write_video(tmp_path / name, fr, fps=12)
    clip = read_clip(path)
    assert clip.frames.shape == fr.shape and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(12.0)
    assert np.abs(clip.frames.astype(int) - fr).mean() < 12  # lossy codecs, same picture
    assert clip.path == str(path)
    assert _no_temp_files(tmp_path)


def test_float_frames_and_odd_size_are_written(tmp_path):
    fr = _frames(h=47, w=63).astype(np.float32) / 255.0
    clip = read_clip(write_video(tmp_path / "odd.mp4", fr, fps=8))
    # mp4v stores even sizes: padded by one row/column, never cropped.
    assert clip.frames.shape == (6, 48, 64, 3)


def test_png_folder_round_trip_is_exact_and_replaces_atomically(tmp_path):
    fr = _frames()
    out = write_video(tmp_path / "frames", fr, fps=8)
    clip = read_clip(out)
    assert np.array_equal(clip.frames, fr)
    assert clip.fps == 8.0  # folders have no frame rate: DEFAULT_FPS
    write_frames(out, fr[:3])  # replace an existing folder
    assert sorted(os.listdir(out)) == [f"frame_{i:05d}.png" for i in range(3)]
    assert _no_temp_files(tmp_path)


def test_folder_sorts_numbers_naturally_and_honours_limits(tmp_path):
    fr = _frames(t=12, h=40, w=40)
    for i in range(12):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), cv2.cvtColor(fr[i], cv2.COLOR_RGB2BGR))
    clip = read_clip(tmp_path, max_frames=11, fps=24)
    assert np.array_equal(clip.frames, fr[:11])  # f10 after f9, not after f1
    assert clip.fps == 24.0


def test_gif_is_read(tmp_path):
    if not hasattr(cv2, "Animation"):
        pytest.skip("this OpenCV cannot write animations")
    anim = cv2.Animation()
    fr = _frames(t=4)
    anim.frames = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in fr]
    anim.durations = [100] * 4
    assert cv2.imwriteanimation(str(tmp_path / "a.gif"), anim)
    clip = read_clip(tmp_path / "a.gif")
    assert clip.frames.shape == fr.shape
    assert clip.fps == pytest.approx(10.0)


def test_large_frames_are_downscaled_while_reading(tmp_path):
    big = np.zeros((2, 1500, 2400, 3), dtype=np.uint8)
    big[1, 500:900, 700:1300] = 255
    folder = write_frames(tmp_path / "big", big)
    clip = read_clip(folder, max_side=320)
    assert clip.frames.shape == (2, 200, 320, 3)
    assert clip.frames[1].max() == 255


def test_missing_corrupt_and_empty_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_clip(tmp_path / "nope.mp4")
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ClipError, match="corrupt.mp4"):
        read_clip(bad)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ClipError, match="empty"):
        read_clip(empty)


def test_folder_errors(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(ClipError, match="no frames"):
        read_clip(tmp_path / "none")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    cv2.imwrite(str(mixed / "0.png"), np.zeros((20, 30, 3), np.uint8))
    cv2.imwrite(str(mixed / "1.png"), np.zeros((22, 30, 3), np.uint8))
    with pytest.raises(ClipError, match="different sizes.*1.png"):
        read_clip(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    cv2.imwrite(str(broken / "0.png"), np.zeros((20, 30, 3), np.uint8))
    (broken / "1.png").write_bytes(b"not a png")
    with pytest.raises(ClipError, match="1.png"):
        read_clip(broken)


def test_bad_writes_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="webm"):
        write_video(tmp_path / "x.webm", _frames(), fps=8)
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "x.mp4", np.zeros((4, 8, 8, 5), np.uint8), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "x.mp4", _frames(), fps=0)
    assert os.listdir(tmp_path) == []


def test_sixteen_bit_and_grey_frames_become_rgb_uint8(tmp_path):
    cv2.imwrite(str(tmp_path / "0.png"), np.full((10, 12), 65535, np.uint16))
    cv2.imwrite(str(tmp_path / "1.png"), np.full((10, 12), 0, np.uint16))
    clip = read_clip(tmp_path)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (2, 10, 12, 3)
    assert clip.frames[0].min() == 255 and clip.frames[1].max() == 0
