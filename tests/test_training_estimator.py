"""train_estimator: pairs CSV validation, pseudo-label cache, losses, a smoke run."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

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


class StandIn(nn.Module):
    """A tiny video net with the estimator's interface (uint8 [B,T,H,W,3] -> object, camera)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def prepare(self, x):
        return x.permute(0, 4, 1, 2, 3).float() / 255.0

    def forward(self, x):
        h = torch.relu(self.conv(x[:, :, 1:] - x[:, :, :-1])).mean((2, 3, 4))
        out = 1 + 9 * torch.sigmoid(self.head(h))
        return out[:, 0], out[:, 1]


def _fake_scorer(dataset):
    metas = {m["clip"]: m for m in map(json.loads, open(os.path.join(dataset, "meta.jsonl")))}

    def scorer(path):
        m = metas[os.path.basename(path)]
        return {"object": 1 + min(9.0, m["object_speed"] / 2), "camera": 1 + min(9.0, m["camera_speed"] / 2),
                "ssim": 1.0}
    return scorer


def test_train_task_smoke_run(dataset, tmp_path):
    from training.runner import RunnerConfig, run

    data = prepare_data(dataset, os.path.join(dataset, "pairs.csv"), frames=4, height=16, width=16,
                        val_fraction=0.3, seed=0, cache=str(tmp_path / "c.jsonl"), progress=False,
                        scorer=_fake_scorer(dataset))
    assert data.frames.shape == (12, 4, 16, 16, 3) and data.labels.shape == (12, 2)
    assert data.val_pairs and data.train_pairs
    assert 0 <= data.baselines["flow_object_acc"] <= 1
    torch.manual_seed(0)
    task = build_task(data, StandIn(), batch=3, margin=0.1, lambda_reg=0.1)
    r = run(task, RunnerConfig(out_dir=str(tmp_path / "o"), steps=3, lr=1e-2, eval_every=2, checkpoint_every=2,
                               progress=False), log=lambda *a: None)
    assert r.status == "completed"
    ev = r.report["eval_history"]
    assert [e["step"] for e in ev] == [2, 3]
    assert set(ev[-1]) >= {"object_acc", "camera_acc", "mean_acc", "val_mse"}
    assert {"rank_object", "rank_camera", "reg_mse"} <= set(r.report["losses"][0])
