"""``python -m merging.inspect FILE``: a delta's metadata and its norms per module.

``FILE`` is a delta (``.safetensors`` or ``.safetensors.index.json``) or a ``merging.build``
output folder (every delta in it). Tensors are read one at a time, so inspecting a 10 GB delta
needs little memory. Other safetensors checkpoints are accepted too (norms only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

EXIT_ERROR = 2


def module_of(key: str, depth: int) -> str:
    """The first ``depth`` dotted components of ``key``, counting a numeric index with its
    parent (``transformer_blocks.3.attn1.to_q.weight``, depth 2 -> ``transformer_blocks.3.attn1``)."""
    parts = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts) - 1 and len(out) < depth:
        if i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
            out.append(f"{parts[i]}.{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out) or key


def module_norms(path: str, depth: int = 2) -> list[dict[str, Any]]:
    """Per module: L2 norm, max |x|, fraction of non-zero entries, parameter count (fp32)."""
    import torch

    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    acc: dict[str, list[float]] = {}
    for key, t in ckpt.iter_tensors():
        if not t.is_floating_point():
            continue
        x = t.float()
        m = acc.setdefault(module_of(key, depth), [0.0, 0.0, 0, 0])
        m[0] += float(torch.sum(x * x))
        m[1] = max(m[1], float(x.abs().max()) if x.numel() else 0.0)
        m[2] += int(torch.count_nonzero(x))
        m[3] += x.numel()
    return [
        {"module": k, "l2": math.sqrt(v[0]), "max_abs": v[1], "nonzero": v[2] / max(v[3], 1), "params": v[3]}
        for k, v in acc.items()
    ]


def _targets(path: str) -> list[str]:
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        from .deltas import DELTA_FORMAT
        from .checkpoint import open_checkpoint

        found = []
        for n in sorted(os.listdir(path)):
            if n.endswith(".safetensors.index.json") or (n.endswith(".safetensors") and "-of-" not in n):
                p = os.path.join(path, n)
                if open_checkpoint(p).metadata.get("format") == DELTA_FORMAT:
                    found.append(p)
        if found:
            return found
    return [path]


def _describe(meta: dict[str, Any]) -> list[str]:
    from .fingerprint import describe_fingerprint

    lines = [
        f"  format: {meta['format']} v{meta['format_version']}",
        f"  name: {meta.get('name')}   recipe: {meta.get('recipe')}   seed: {meta.get('seed')}",
        f"  params: {json.dumps(meta.get('params'), sort_keys=True)}",
        f"  scope: {meta.get('scope')}",
        f"  dtype: {meta.get('dtype')} (arithmetic {meta.get('arithmetic')})   family: {meta.get('family') or '-'}",
    ]
    if meta.get("extra"):
        lines.append(f"  extra: {json.dumps(meta['extra'], sort_keys=True)}")
    if meta.get("base_fingerprint"):
        lines.append(f"  base: {describe_fingerprint(meta['base_fingerprint'])}")
    if meta.get("finetuned_fingerprint"):
        lines.append(f"  fine-tuned: {describe_fingerprint(meta['finetuned_fingerprint'])}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m merging.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a delta file, its index.json, or a merging.build output folder")
    p.add_argument("--depth", type=int, default=2, help="module depth for the norms (dotted components)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from .deltas import read_delta_metadata
    from .errors import CheckpointError, MergeError

    report = []
    try:
        for target in _targets(args.path):
            try:
                meta: dict[str, Any] | None = read_delta_metadata(target)
            except CheckpointError as e:
                if "not a MotionDial delta" not in str(e):
                    raise
                meta = None
            report.append({"path": target, "metadata": meta, "modules": module_norms(target, args.depth)})
    except (MergeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        for r in report:
            if r["metadata"] and "base_fingerprint" in r["metadata"]:
                r["metadata"]["base_fingerprint"].pop("tensors", None)
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
        return 0
    for r in report:
        print(r["path"])
        if r["metadata"] is None:
            print("  (not a MotionDial delta: norms of the tensors only)")
        else:
            print("\n".join(_describe(r["metadata"])))
        total = math.sqrt(sum(m["l2"] ** 2 for m in r["modules"]))
        print(f"  total L2 norm: {total:.6g}")
        width = max((len(m["module"]) for m in r["modules"]), default=6)
        print(f"  {'module':<{width}}  {'L2':>11}  {'max|x|':>11}  {'nonzero':>7}  {'params':>12}")
        for m in r["modules"]:
            print(f"  {m['module']:<{width}}  {m['l2']:>11.5g}  {m['max_abs']:>11.5g}  {m['nonzero']:>7.1%}  {m['params']:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
