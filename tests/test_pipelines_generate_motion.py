"""``python -m pipelines.generate --embedder``: a LoRA/full-trained motion run (embedder + transformer
delta) is loaded with ``motion.embedding.load_trained_motion`` and its delta applied while sampling."""
import os

import pytest
import torch

from pipelines import generate, load_model


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """What train_motion writes for a LoRA/full run, and an embedder-only copy of the same embedder."""
    from merging.deltas import save_delta
    from motion.embedding import build_for_model, save_motion_embedder

    model_dir = tiny_model_dir("cogvideox1.5-i2v")
    model = load_model(model_dir)
    root = tmp_path_factory.mktemp("trained_motion")
    emb = build_for_model(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    sd = {k: v for k, v in model.denoiser.state_dict().items() if v.is_floating_point()}
    run = root / "run"
    run.mkdir()
    save_delta(str(run / "transformer_delta.safetensors"),
               {k: 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in sd.items()},
               name="motion", base_fingerprint=model.fingerprint())
    save_motion_embedder(emb, str(run / "motion_embedder.safetensors"), extra={"delta": "transformer_delta.safetensors"})
    only = save_motion_embedder(emb, str(root / "embedder_only.safetensors"))
    return model_dir, str(run), only


def _capture(monkeypatch):
    import pipelines.sampling as sampling

    seen = {}
    real = sampling.sample

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    return seen


def test_trained_folder_applies_its_delta(trained_run, tmp_path, monkeypatch, capsys):
    model_dir, run, only = trained_run
    seen = _capture(monkeypatch)
    common = ["--model", model_dir, "--frames", "9", "--steps", "1", "--object", "8", "--camera", "2",
              "--height", "32", "--width", "32", "--no-progress"]
    assert generate.main(common + ["--embedder", run, "--out", str(tmp_path / "a.mp4")]) == 0
    ws = seen["weight_schedule"]
    assert set(ws.deltas) == {"motion"} and ws.weights(0.5) == {"motion": 1.0}
    assert seen["motion_embedder"] is not None
    assert "motion_delta: true" in capsys.readouterr().out
    seen.clear()
    assert generate.main(common + ["--embedder", only, "--out", str(tmp_path / "b.mp4")]) == 0
    assert seen["weight_schedule"] is None and seen["motion_embedder"] is not None


def test_missing_delta_and_embedder_are_named(trained_run, tmp_path, capsys):
    model_dir, run, _ = trained_run
    broken = tmp_path / "broken"
    broken.mkdir()
    os.link(os.path.join(run, "motion_embedder.safetensors"), broken / "motion_embedder.safetensors")
    assert generate.main(["--model", model_dir, "--embedder", str(broken), "--out", str(tmp_path / "a.mp4")]) == 2
    assert "transformer_delta.safetensors" in capsys.readouterr().err
    assert generate.main(["--embedder", str(tmp_path / "gone"), "--out", str(tmp_path / "a.mp4")]) == 2
    assert "gone: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists()
