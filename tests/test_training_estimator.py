"""train_estimator: pairs CSV validation, pseudo-label cache, losses, a smoke run."""
from __future__ import annotations

import json
import os

import pytest
import torch

from training.estimator_data import (
    EstimatorDataError,
    pair_accuracy,
    pseudo_labels,
    read_pairs_csv,
    split_clips,
    split_pairs,
)
from training.synth_motion import generate_dataset
from training.train_estimator import build_task, prepare_data, ranking_losses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(str(out), 12, 5, fmt="png", progress=False, pairs_per_clip=8, frames=4, height=32, width=32)
    return str(out)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_pairs_csv_reads(dataset):
    pairs = read_pairs_csv(os.path.join(dataset, "pairs.csv"), dataset)
    assert len(pairs) == 48
    assert all(os.path.isabs(p.clip_a) and p.object in ("a", "b", "same") for p in pairs)


@pytest.mark.parametrize("text, match", [
    ("clip_a,clip_b,object,camera\nclip_00000,clip_99999,a,b\n", r"line 2: clip 'clip_99999' not found"),
    ("clip_a,clip_b,object,camera\nclip_00000,clip_00001,a,more\n", r"line 2: camera label 'more' is not one of"),
    ("clip_a,clip_b,object,camera\nclip_00000,clip_00001,a\n", r"line 2: expected 4 fields"),
    ("a,b,c,d\n", r"line 1: header"),
    ("", r"empty file"),
    ('clip_a,clip_b,object,camera\n"clip_00000,clip_00001,a,b\n', r"malformed CSV"),
    ("clip_a,clip_b,object,camera\nclip_00000,clip_00000,a,b\n", r"paired with itself"),
    ("clip_a,clip_b,object,camera\n", r"no pairs"),
])
def test_bad_pairs_csv_names_file_and_line(dataset, tmp_path, text, match):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(EstimatorDataError, match=match) as e:
        read_pairs_csv(path, dataset)
    assert "bad.csv" in str(e.value)


def test_pseudo_label_cache_is_reused_and_resumable(tmp_path, dataset):
    clips = [os.path.join(dataset, f"clip_{i:05d}") for i in range(4)]
    cache = str(tmp_path / "labels.jsonl")
    calls: list[str] = []

    def scorer(path):
        calls.append(path)
        if len(calls) == 3 and scorer.fail:
            raise KeyboardInterrupt  # killed while scoring the third clip
        return {"object": 1.0 + len(path) % 3, "camera": 2.0, "ssim": 1.5}

    scorer.fail = True
    with pytest.raises(KeyboardInterrupt):
        pseudo_labels(clips, cache, scorer=scorer, version="v1", progress=False)
    assert len(open(cache).read().splitlines()) == 2  # the two finished clips were kept
    with open(cache, "a") as f:
        f.write('{"format": "motiondial.pseudo')  # a line torn by a kill
    scorer.fail = False
    calls.clear()
    labels = pseudo_labels(clips, cache, scorer=scorer, version="v1", progress=False)
    assert calls == clips[2:]  # only the missing ones
    assert set(labels) == set(clips)
    calls.clear()
    pseudo_labels(clips, cache, scorer=scorer, version="v1", progress=False)
    assert calls == []  # fully cached
    assert len(open(cache).read().splitlines()) == 4  # compacted: torn line gone
    pseudo_labels(clips, cache, scorer=scorer, version="v2", progress=False)
    assert calls == clips  # another labeller version: everything again
    calls.clear()
    frame = os.path.join(clips[1], sorted(os.listdir(clips[1]))[0])
    t = os.stat(frame).st_mtime_ns + 10**9
    os.utime(frame, ns=(t, t))  # a changed clip is scored again
    pseudo_labels(clips, cache, scorer=scorer, version="v2", progress=False)
    assert calls == [clips[1]]


def test_split_is_by_clip_and_stable(dataset):
    pairs = read_pairs_csv(os.path.join(dataset, "pairs.csv"), dataset)
    clips = sorted({p.clip_a for p in pairs} | {p.clip_b for p in pairs})
    tr, va = split_clips(clips, 0.3, seed=1)
    assert tr.isdisjoint(va) and tr | va == set(clips)
    assert split_clips(clips, 0.3, seed=1) == (tr, va)
    trp, vap, dropped = split_pairs(pairs, va)
    assert len(trp) + len(vap) + dropped == len(pairs)
    assert all(p.clip_a in va and p.clip_b in va for p in vap)
    assert all(p.clip_a in tr and p.clip_b in tr for p in trp)


def test_ranking_loss():
    sa = torch.tensor([3.0, 1.0, 2.0, 5.0], requires_grad=True)
    sb = torch.tensor([1.0, 3.0, 2.0, 1.0])
    lab = torch.tensor([1, 1, -1, 0])
    # ordered pairs: (3-1 right: 0), (1-3 wrong: 2), (b stronger, equal: 0) -> mean 2/3
    assert float(ranking_losses(sa, sb, lab, 0.0, 0.0).detach()) == pytest.approx(2 / 3)
    assert float(ranking_losses(sa, sb, lab, 1.0, 0.0).detach()) == pytest.approx((0 + 3 + 1) / 3)
    # "same" pairs only count with same_weight: |5-1| - margin 1 = 3
    assert float(ranking_losses(sa, sb, lab, 1.0, 0.5).detach()) == pytest.approx(4 / 3 + 0.5 * 3)
    ranking_losses(sa, sb, lab, 0.0, 0.0).backward()
    assert sa.grad[1] < 0 and sa.grad[0] == 0


def test_pair_accuracy_counts_ties_half(dataset):
    pairs = read_pairs_csv(os.path.join(dataset, "pairs.csv"), dataset)
    clips = {p.clip_a for p in pairs} | {p.clip_b for p in pairs}
    acc, n = pair_accuracy({c: 1.0 for c in clips}, pairs, "object")
    assert acc == 0.5 and n == sum(p.object != "same" for p in pairs)


TINY = {"pairs": 2, "size": 16, "widths": [8, 16], "head_hidden": 8}


def test_training_frames_are_the_estimators_own_view(dataset):
    from motion.clips import read_clip
    from motion.learned import prepare_clip

    from training.estimator_data import load_model_frames
    from training.train_estimator import estimator_scores, model_config, new_model

    cfg = model_config({**TINY, "pairs": 3, "size": 24})
    path = os.path.join(dataset, "clip_00003")
    clip = read_clip(path)
    net = new_model(cfg, 0).eval()
    fr = torch.from_numpy(load_model_frames(path, cfg))[None]
    with torch.no_grad():
        want = torch.stack(net(prepare_clip(clip.frames, clip.fps, cfg)[None]), -1)
        assert torch.equal(estimator_scores(net, fr), want)


def test_augmentation_flips_and_reverses_time(dataset):
    from training.estimator_data import load_model_frames
    from training.train_estimator import _augment, model_config

    cfg = model_config({**TINY, "pairs": 3})
    fr = torch.from_numpy(load_model_frames(os.path.join(dataset, "clip_00001"), cfg))[None]

    class Seq:
        def __init__(self, seq):
            self.seq = list(seq)

        def random(self):
            return self.seq.pop(0)

    rev = _augment(fr, Seq([0.9, 0.9, 0.1]))  # no flips, time reversed
    assert torch.equal(rev[0, 0], fr[0, -1]) and torch.equal(rev[0, 1], fr[0, -2])
    hflip = _augment(fr, Seq([0.1, 0.9, 0.9]))
    assert torch.equal(hflip[0, 2], fr[0, 2].flip(1))


def _fake_scorer(dataset):
    metas = {m["clip"]: m for m in map(json.loads, open(os.path.join(dataset, "meta.jsonl")))}

    def scorer(path):
        m = metas[os.path.basename(path)]
        return {"object": 1 + min(9.0, m["object_speed"] / 2), "camera": 1 + min(9.0, m["camera_speed"] / 2),
                "ssim": 1.0}
    return scorer


def test_train_task_smoke_run(dataset, tmp_path):
    from training.runner import RunnerConfig, run
    from training.train_estimator import model_config, new_model

    cfg = model_config(TINY)
    data = prepare_data(dataset, os.path.join(dataset, "pairs.csv"), model_config=cfg,
                        val_fraction=0.3, seed=0, cache=str(tmp_path / "c.jsonl"), progress=False,
                        scorer=_fake_scorer(dataset))
    assert data.frames.shape == (12, 4, 16, 16, 3) and data.labels.shape == (12, 2)
    assert data.val_pairs and data.train_pairs
    assert 0 <= data.baselines["flow_object_acc"] <= 1
    task = build_task(data, new_model(cfg, 0), batch=3, margin=0.1, lambda_reg=0.1)
    r = run(task, RunnerConfig(out_dir=str(tmp_path / "o"), steps=3, lr=1e-2, eval_every=2, checkpoint_every=2,
                               progress=False), log=lambda *a: None)
    assert r.status == "completed"
    ev = r.report["eval_history"]
    assert [e["step"] for e in ev] == [2, 3]
    assert set(ev[-1]) >= {"object_acc", "camera_acc", "mean_acc", "val_mse"}
    assert {"rank_object", "rank_camera", "reg_mse"} <= set(r.report["losses"][0])


def test_cli_trains_saves_and_resumes(dataset, tmp_path, capsys):
    """The real CLI and model, a few steps, real pseudo-labels; the file loads in estimate_motion."""
    from motion import estimate_motion
    from motion.clips import read_clip

    from training.train_estimator import main

    out = tmp_path / "est"
    args = ["--clips", dataset, "--pairs", os.path.join(dataset, "pairs.csv"), "--out", str(out),
            "--steps", "2", "--batch", "2", "--eval-every", "1", "--checkpoint-every", "1", "--val-fraction", "0.4",
            "--cache", str(tmp_path / "labels.jsonl"), "--model-config", json.dumps(TINY), "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "ssim_object_acc" in summary and "object_acc" in summary
    rep = json.load(open(out / "report.json"))
    assert rep["status"] == "completed" and rep["baselines"]["val_pairs_object"] >= 0
    assert len(open(tmp_path / "labels.jsonl").read().splitlines()) == 12  # every clip labelled once
    est = str(out / "estimator.safetensors")
    scores = estimate_motion(read_clip(os.path.join(dataset, "clip_00000")).frames, 8.0, estimator=est)
    assert 1 <= scores.object <= 10 and 1 <= scores.camera <= 10
    # Running it again with more steps resumes (no relabelling: the cache is complete).
    assert main(args[:7] + ["4"] + args[8:]) == 0
    rep = json.load(open(out / "report.json"))
    assert rep["steps_done"] == 4 and rep["sessions"][-1]["started_at_step"] == 2


def test_cli_bad_input_exit_code_and_message(dataset, tmp_path, capsys):
    from training.train_estimator import main

    bad = _write(tmp_path / "pairs.csv", "clip_a,clip_b,object,camera\nclip_00000,clip_00001,a,sideways\n")
    rc = main(["--clips", dataset, "--pairs", bad, "--out", str(tmp_path / "o"), "--model-config", json.dumps(TINY)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pairs.csv, line 2" in err and "sideways" in err
    rc = main(["--clips", str(tmp_path / "nope"), "--pairs", bad, "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["--clips", dataset, "--pairs", os.path.join(dataset, "pairs.csv"), "--out", str(tmp_path / "o"),
               "--model-config", '{"colour": 3}'])
    assert rc == 2 and "colour" in capsys.readouterr().err


def test_cli_time_budget_finishes_with_steps_done(dataset, tmp_path, capsys):
    from training.train_estimator import main

    out = tmp_path / "tb"
    rc = main(["--clips", dataset, "--pairs", os.path.join(dataset, "pairs.csv"), "--out", str(out),
               "--steps", "50", "--batch", "2", "--max-minutes", "1e-6", "--val-fraction", "0.4",
               "--cache", str(tmp_path / "labels.jsonl"), "--model-config", json.dumps(TINY), "--no-progress"])
    assert rc == 0
    rep = json.load(open(out / "report.json"))
    assert rep["status"] == "completed" and rep["steps_done"] == 1 and rep["steps"] == 1
    assert os.path.isfile(out / "estimator.safetensors")
    assert rep["eval_history"][-1]["step"] == 1
