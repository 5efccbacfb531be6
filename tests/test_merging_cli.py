"""python -m merging.build / merging.inspect."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from merging import build, inspect as md_inspect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {
        "transformer_blocks.0.attn1.to_q.weight": torch.randn(16, 16, generator=g),
        "transformer_blocks.0.ff.net.0.proj.weight": torch.randn(32, 16, generator=g),
        "norm_out.weight": torch.randn(16, generator=g),
    }
    ft = {k: v + 0.1 for k, v in pre.items()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return str(tmp_path / "pre.safetensors"), str(tmp_path / "ft.safetensors")


def test_help_runs_as_module():
    for mod in ("merging.build", "merging.inspect"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout


def test_dry_run_build_inspect(tmp_path, capsys):
    b, f = _pair(tmp_path)
    out = str(tmp_path / "out")
    assert build.main(["--base", b, "--finetuned", f, "--out", out, "--family", "cogvideox-i2v",
                       "--scope", "temporal", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "transformer_blocks.0.attn1.to_q.weight  [16, 16]" in text and "ff.net" not in text
    assert "peak memory needed" in text and "keys in scope (1 of 3)" in text
    assert not os.path.exists(out)
    assert build.main(["--base", b, "--finetuned", f, "--out", out, "--seed", "7", "--dtype", "bf16", "--quiet", "--merged"]) == 0
    assert sorted(os.listdir(out)) == ["control.safetensors", "control_model.safetensors", "dynamics.safetensors",
                                       "dynamics_model.safetensors", "recipe.json", "schedule.json"]
    capsys.readouterr()
    assert md_inspect.main([out]) == 0
    text = capsys.readouterr().out
    assert "recipe: ed   seed: 7" in text and "dtype: bf16" in text and "transformer_blocks.0.ff" in text
    assert md_inspect.main([os.path.join(out, "dynamics.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["metadata"]["params"]["p"] == 0.7
    mods = {m["module"]: m for m in report[0]["modules"]}
    # dynamics of a constant tau = 0.1: |delta| = 0.75 * 0.25 * 0.1 / 0.3 where kept
    assert abs(mods["transformer_blocks.0.attn1"]["max_abs"] - 0.0625) < 1e-3
    assert mods["norm_out"]["nonzero"] == 1.0  # 1-D passes through DARE whole


def test_errors_exit_2(tmp_path, capsys):
    b, f = _pair(tmp_path)
    assert build.main(["--base", b, "--finetuned", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert build.main(["--base", b, "--finetuned", f, "--out", str(tmp_path / "o"), "--scope", "temporal"]) == 2
    assert "needs the model family" in capsys.readouterr().err
    assert md_inspect.main([str(tmp_path / "nope.safetensors")]) == 2
    assert not os.path.exists(tmp_path / "o")
