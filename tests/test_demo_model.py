"""The demo model: builder -> real loader and sampler; train_demo runs, exports and resumes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from training.demo_data import DemoDataConfig
from training.demo_model import DemoModelConfig, build_demo_model

TINY_DATA = DemoDataConfig(frames=4)
TINY_MODEL = DemoModelConfig(frames=4)


def test_demo_model_loads_and_samples_with_the_real_pipeline(tmp_path):
    from motion.embedding import MotionScoreEmbedding
    from pipelines import load_model, sample

    folder = build_demo_model(tmp_path / "demo", TINY_MODEL, seed=3)
    model = load_model(folder)
    assert model.family.name == "svd"
    assert model.time_embed_dim == 4 * TINY_MODEL.unet_channels[0]
    assert model.pipeline.vae_scale_factor == 2  # one 2x downsampling level in the VAE
    emb = MotionScoreEmbedding(model.time_embed_dim, family="svd", base_fingerprint=model.fingerprint())
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    video = sample(model, img, frames=4, steps=2, cfg=1.0, seed=0, object_intensity=7, camera_intensity=2,
                   motion_embedder=emb)
    assert tuple(video.frames.shape) == (4, 32, 32, 3)
    assert torch.isfinite(video.frames).all()
    # Same seed, same weights: the builder is deterministic.
    again = build_demo_model(tmp_path / "demo2", TINY_MODEL, seed=3)
    from safetensors.torch import load_file

    a = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(again, "unet", "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_demo_exports_loadable_files_and_resumes(tmp_path):
    from motion.embedding import load_motion_embedder
    from pipelines import load_model
    from training.train_demo import DemoTrainConfig, train_demo

    def cfg(steps):
        return DemoTrainConfig(out=str(tmp_path / "run"), seed=0, model=TINY_MODEL, data=TINY_DATA, clips=4,
                               vae_steps=2, vae_batch=1, steps=steps, batch=1, warmup_steps=1,
                               checkpoint_every=1, eval_every=0, vae_check_seeds=0, progress=False, refine_steps=0)

    s1 = train_demo(cfg(2), log=lambda *_: None)
    assert s1["status"] == "completed" and s1["step"] == 2
    q = json.load(open(tmp_path / "run" / "vae" / "vae_quality.json"))
    assert q["scaling_factor"] > 0 and np.isfinite(q["psnr_db"])
    model = load_model(s1["files"]["model"])
    assert model.vae.config.scaling_factor == pytest.approx(q["scaling_factor"])
    # The embedder belongs to the exported (trained) UNet: its fingerprint check passes.
    emb = load_motion_embedder(s1["files"]["embedder"], model)
    assert emb.time_embed_dim == model.time_embed_dim

    # Raising the step count resumes from the checkpoint at step 2 (not from scratch).
    s2 = train_demo(cfg(3), log=lambda *_: None)
    assert s2["status"] == "completed" and s2["step"] == 3
    report = json.load(open(tmp_path / "run" / "motion" / "report.json"))
    assert [sess["started_at_step"] for sess in report["sessions"]][-1] == 2

    # ED on it: a 1-step stage-1 fine-tune of the temporal layers, the ED deltas, and the four
    # motion degrees through the real sampler (scheduled weights restored after each run).
    from training.demo_ed import run_demo_ed

    ed = run_demo_ed(s2["files"]["model"], s2["files"]["embedder"], str(tmp_path / "ed"), steps=1, batch=1, clips=24,
                     images=1, sample_steps=2, progress=False, log=lambda *_: None)
    assert ed["status"] == "completed"
    assert set(ed["motion_degree"]) == {"base", "finetuned", "extrapolated", "ed_scheduled"}
    assert all(np.isfinite(v["total"]) for v in ed["motion_degree"].values())
    assert os.path.isfile(tmp_path / "ed" / "ed" / "dynamics.safetensors")


def test_frame_wise_decoder_decodes_each_frame_alone():
    """The demo VAE's temporal decoder is an exact per-frame decoder: a still clip decodes to
    identical frames (no flicker at the clip's ends) and a frame's decoding does not depend on
    its neighbours."""
    from training.demo_model import build_demo_pipeline, temporal_decoder_parameters

    vae = build_demo_pipeline(TINY_MODEL, seed=1).vae.eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, TINY_MODEL.latent_channels, 16, 16, generator=g)
    with torch.no_grad():
        still = vae.decode(z.repeat(4, 1, 1, 1), num_frames=4).sample
        assert torch.equal(still, still[:1].expand_as(still))
        other = torch.randn(4, TINY_MODEL.latent_channels, 16, 16, generator=g)
        mixed = other.clone()
        mixed[2] = z[0]
        out = vae.decode(mixed, num_frames=4).sample
    torch.testing.assert_close(out[2], still[0], rtol=0, atol=1e-5)
    names = temporal_decoder_parameters(vae)
    assert "decoder.time_conv_out.weight" in names and any(".temporal_res_block." in n for n in names)
    # A VAE built without the option really mixes frames (the test above can fail).
    mixing = build_demo_pipeline(DemoModelConfig(frames=4, frame_wise_decoder=False), seed=1).vae.eval()
    with torch.no_grad():
        still = mixing.decode(z.repeat(4, 1, 1, 1), num_frames=4).sample
    assert not torch.allclose(still[0], still[1], atol=1e-4)


def test_vae_stage_keeps_the_decoder_frame_wise(tmp_path):
    """Stage 1 trains the autoencoder but never the frame-mixing parameters."""
    from training.demo_model import temporal_decoder_parameters
    from training.train_demo import DemoTrainConfig

    cfg = DemoTrainConfig(out=str(tmp_path / "run"), seed=0, model=TINY_MODEL, data=TINY_DATA, clips=2,
                          vae_steps=2, vae_batch=1, steps=0, vae_check_seeds=0, progress=False, eval_every=0)
    from training.demo_data import DemoClipDataset
    from training.demo_model import build_demo_pipeline
    from training.runner import run
    from training.train_demo import _vae_task

    pipe = build_demo_pipeline(TINY_MODEL, cfg.seed)
    before = {n: p.detach().clone() for n, p in pipe.vae.named_parameters()}
    task, rcfg = _vae_task(cfg, pipe, DemoClipDataset(2, 0, TINY_DATA))
    assert run(task, rcfg, log=lambda *_: None).status == "completed"
    after = dict(pipe.vae.named_parameters())
    frozen = set(temporal_decoder_parameters(pipe.vae))
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], p) for n, p in after.items() if n not in frozen)
    # Deterministic autoencoder: the exported posterior has a fixed, tiny std whatever the input.
    from diffusers import AutoencoderKLTemporalDecoder

    vae = AutoencoderKLTemporalDecoder.from_pretrained(os.path.join(tmp_path, "run", "vae", "model", "vae"))
    with torch.no_grad():
        dist = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    torch.testing.assert_close(dist.std, torch.full_like(dist.std, float(np.exp(-5.0))))


def test_train_demo_cli_refuses_bad_vae_channels(tmp_path, capsys):
    """A malformed --vae-channels is named in the error and nothing is written."""
    from training.train_demo import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--vae-channels", "64,abc", "--no-progress"]) == 2
    assert "--vae-channels '64,abc'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_refine_stage_continues_stage_two_with_fast_pans_in_every_batch(tmp_path):
    """Stage 3 starts from stage 2's exported weights (DIR/motion/result), draws its shares of
    fast-pan and both-fast clips into every batch, writes the final DIR/model, and a re-run resumes in stage 3."""
    from dataclasses import replace
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from motion.embedding import load_motion_embedder
    from pipelines import load_model
    from training.train_demo import FAST_CAMERA, DemoTrainConfig, _motion_task, train_demo

    def cfg(refine_steps):
        return DemoTrainConfig(out=str(tmp_path / "run"), seed=0, model=TINY_MODEL, data=TINY_DATA, clips=16,
                               vae_steps=1, vae_batch=1, steps=1, batch=4, warmup_steps=1, checkpoint_every=1,
                               eval_every=0, vae_check_seeds=0, progress=False, refine_steps=refine_steps,
                               refine_fast_share=0.5, refine_both_fast_share=0.25)

    s = train_demo(cfg(1), log=lambda *_: None)
    assert s["status"] == "completed" and s["stage"] == "demo_refine" and s["step"] == 1
    run = tmp_path / "run"
    unet = os.path.join("model", "unet", "diffusion_pytorch_model.safetensors")
    stage2, final = load_file(run / "motion" / "result" / unet), load_file(run / unet)
    assert stage2.keys() == final.keys() and any(not torch.equal(stage2[k], final[k]) for k in stage2)
    model = load_model(s["files"]["model"])
    load_motion_embedder(s["files"]["embedder"], model)  # fingerprinted for the refined UNet
    report = json.load(open(run / "refine" / "report.json"))
    assert report["config"]["task"]["fast_share"] == 0.5 and report["config"]["task"]["both_fast_share"] == 0.25
    assert report["config"]["task"]["after_steps"] == 1

    # Every refine batch of 4 holds round(0.5 * 4) = 2 fast-pan clips plus round(0.25 * 4) = 1
    # clip where both axes are fast, at least; stage 2 draws uniformly.
    from training.demo_data import DemoClipDataset

    data = DemoClipDataset(16, 0, TINY_DATA)
    fast_pan = data.scores[:, 1] >= FAST_CAMERA
    assert fast_pan.sum() < 8 and (fast_pan & (data.scores[:, 0] >= FAST_CAMERA)).sum() == 1  # rare in a uniform draw
    task = _motion_task(cfg(1), s["files"]["model"], data, stage="refine", embedder_file=s["files"]["embedder"])[0]
    rng = np.random.default_rng(5)
    for _ in range(20):
        b = task.batch_fn(SimpleNamespace(rng=rng))
        assert int((b["camera"] >= FAST_CAMERA).sum()) >= 3
        assert int(((b["camera"] >= FAST_CAMERA) & (b["object"] >= FAST_CAMERA)).sum()) >= 1
    with pytest.raises(ValueError, match="more than a whole batch"):
        _motion_task(replace(cfg(1), refine_both_fast_share=0.75), s["files"]["model"], data, stage="refine",
                     embedder_file=s["files"]["embedder"])

    # More refine steps: stage 2 is not run again, stage 3 resumes from its checkpoint at step 1.
    s2 = train_demo(cfg(2), log=lambda *_: None)
    assert s2["status"] == "completed" and s2["step"] == 2
    assert json.load(open(run / "motion" / "report.json"))["steps_done"] == 1
    assert [sess["started_at_step"] for sess in json.load(open(run / "refine" / "report.json"))["sessions"]][-1] == 1
    # Other stage-2 settings: the finished stage 2 is not silently reused.
    with pytest.raises(ValueError, match="other stage-2 settings .*batch"):
        train_demo(replace(cfg(2), batch=2), log=lambda *_: None)


def test_train_demo_cli_refuses_bad_refine_settings(tmp_path, capsys):
    from training.train_demo import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--refine-steps", "10", "--refine-fast-share", "1.5", "--no-progress"]) == 2
    assert "--refine-fast-share 1.5" in capsys.readouterr().err
    assert main(["--out", str(out), "--refine-steps", "-1", "--no-progress"]) == 2
    assert "--refine-steps -1" in capsys.readouterr().err
    assert main(["--out", str(out), "--refine-steps", "10", "--refine-fast-share", "0.75",
                 "--refine-both-fast-share", "0.5", "--no-progress"]) == 2
    assert "add up to more than a whole batch" in capsys.readouterr().err
    assert not out.exists()
