"""Recipes over checkpoints: the ED dynamics/control deltas, plain task vectors, TIES, merging.

Each ``build_*`` function opens its inputs, checks they line up, and streams the recipe through
``merging.engine.run`` into one output folder (written atomically). The ED recipe, exactly as
the reference (``../shared/spec/method.md``), as deltas against ``pre``:

* dynamics: ``Δ_dyn = b_dyn * DARE_p(a_dyn * (pre - ft))``   (``dyn = pre + Δ_dyn``)
* control:  ``Δ_con = (a_con * ft + b_con * DARE_p(ft - pre)) - pre``   (``con = pre + Δ_con``)

with independent masks for the two vectors (streams ``"dynamics"`` and ``"control"``).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from families import Family, get_family

from . import ops
from .checkpoint import Checkpoint, open_checkpoint
from .deltas import DELTA_FORMAT, compact_fingerprint, delta_metadata, load_delta
from .ed_params import ED_DEFAULTS
from .engine import DEFAULT_SHARD_BYTES, OutputSpec, Plan, check_compatible, parse_dtype, resolve_scope, run, short_dtype
from .fingerprint import fingerprint_checkpoint, fingerprint_with_delta
from .patcher import accumulate
from .schedule import reference_ed_schedule

__all__ = [
    "ED_DEFAULTS",
    "EDRecipe",
    "TaskVectorRecipe",
    "TiesRecipe",
    "ApplyRecipe",
    "FinetunedFromDelta",
    "BuildResult",
    "build_ed",
    "build_task_vector",
    "build_ties",
    "merge_deltas",
    "prepare",
]



# --------------------------------------------------------------------------------------------
# Recipes (fp32 in, fp32 out; see engine.Recipe)
# --------------------------------------------------------------------------------------------
class EDRecipe:
    """ED stages 2+3. Outputs ``dynamics``/``control`` deltas and optionally the merged models."""

    inputs = ("base", "finetuned")
    elementwise = True

    def __init__(self, a_dyn: float, b_dyn: float, a_con: float, b_con: float, p: float, seed: int, merged: bool = False) -> None:
        self.a_dyn, self.b_dyn, self.a_con, self.b_con, self.p, self.seed = a_dyn, b_dyn, a_con, b_con, p, seed
        self.merged = merged
        self.outputs = ("dynamics", "control") + (("dynamics_model", "control_model") if merged else ())
        self.delta_dtype: torch.dtype | None = None  # storage dtype of the deltas (set by the build)
        self._scratch: dict[str, torch.Tensor] = {}

    def _buf(self, name: str, like: torch.Tensor) -> torch.Tensor:
        # Scratch reused across chunks (fresh multi-MB allocations cost page faults each time).
        b = self._scratch.get(name)
        if b is None or b.numel() < like.numel():
            b = self._scratch[name] = torch.empty(like.numel(), dtype=torch.float32)
        return b[: like.numel()].view(like.shape)

    def compute(self, key, inputs, shape, offset):
        pre, ft = inputs["base"], inputs["finetuned"]
        # The formulas, evaluated in place in this order (each step rounds exactly as the
        # out-of-place expression would): fewer passes over memory on multi-GB checkpoints.
        # The returned tensors are scratch views, valid until the next call.
        # dynamics: b_dyn * DARE_p(a_dyn * (pre - ft))
        dyn = torch.sub(pre, ft, out=self._buf("dyn", pre)).mul_(self.a_dyn)
        dyn = ops.dare(dyn, self.p, self.seed, key, "dynamics", shape, offset, inplace=True).mul_(self.b_dyn)
        # control: (a_con * ft + b_con * DARE_p(ft - pre)) - pre
        con = torch.sub(ft, pre, out=self._buf("con", pre))
        con = ops.dare(con, self.p, self.seed, key, "control", shape, offset, inplace=True).mul_(self.b_con)
        # a_con * ft is ft itself when a_con == 1 (exact in IEEE arithmetic): skip that pass.
        con.add_(ft if self.a_con == 1.0 else torch.mul(ft, self.a_con, out=self._buf("aft", ft))).sub_(pre)
        out = {"dynamics": dyn, "control": con}
        if self.merged:
            out["dynamics_model"] = accumulate(pre, [(_as_stored(dyn, self.delta_dtype), 1.0)], out=self._buf("dyn_model", pre))
            out["control_model"] = accumulate(pre, [(_as_stored(con, self.delta_dtype), 1.0)], out=self._buf("con_model", pre))
        return out


class TaskVectorRecipe:
    """``Δ = scale * post(ft - pre)`` with ``post`` = DARE (``dare_p``) and/or top-k (``density``)."""

    inputs = ("base", "finetuned")

    def __init__(self, scale: float = 1.0, dare_p: float | None = None, density: float | None = None, seed: int = 0, name: str = "delta", merged: bool = False) -> None:
        self.scale, self.dare_p, self.density, self.seed, self.name = scale, dare_p, density, seed, name
        self.merged = merged
        self.elementwise = density is None  # top-k needs the whole tensor
        self.outputs = (name,) + ((f"{name}_model",) if merged else ())
        self.delta_dtype: torch.dtype | None = None  # storage dtype of the delta (set by the build)

    def compute(self, key, inputs, shape, offset):
        pre = inputs["base"]
        tau = ops.task_vector(inputs["finetuned"], pre)
        if self.density is not None:
            tau = ops.magnitude_topk(tau, self.density)
        if self.dare_p:
            tau = ops.dare(tau, self.dare_p, self.seed, key, self.name, shape, offset)
        d = self.scale * tau
        out = {self.name: d}
        if self.merged:
            out[f"{self.name}_model"] = accumulate(pre, [(_as_stored(d, self.delta_dtype), 1.0)], out=torch.empty_like(pre))
        return out


class TiesRecipe:
    """TIES over several fine-tunes of one base: ``Δ = scale * ties(ft_i - pre)``."""

    elementwise = False

    def __init__(self, n: int, density: float, scale: float = 1.0, weights: Sequence[float] | None = None, name: str = "delta", merged: bool = False) -> None:
        self.inputs = ("base",) + tuple(f"finetuned{i}" for i in range(n))
        self.density, self.scale, self.weights, self.name, self.merged = density, scale, weights, name, merged
        self.outputs = (name,) + ((f"{name}_model",) if merged else ())
        self.delta_dtype: torch.dtype | None = None  # storage dtype of the delta (set by the build)

    def compute(self, key, inputs, shape, offset):
        pre = inputs["base"]
        taus = [inputs[n] - pre for n in self.inputs[1:]]
        d = self.scale * ops.ties_merge(taus, self.density, self.weights)
        out = {self.name: d}
        if self.merged:
            out[f"{self.name}_model"] = accumulate(pre, [(_as_stored(d, self.delta_dtype), 1.0)], out=torch.empty_like(pre))
        return out


class ApplyRecipe:
    """``merged = base + sum_k w_k * Δ_k`` (deltas may cover a subset of keys).

    The arithmetic is the patcher's (``merging.patcher.accumulate``): a key a delta lacks is no
    term at all (not a zero term), so the result equals what a ``Constant`` schedule of the
    same weights writes into the model, bit for bit.
    """

    elementwise = True

    def __init__(self, weights: Mapping[str, float], name: str = "merged",
                 keys: Mapping[str, Any] | None = None) -> None:
        self.weights = dict(weights)
        self.inputs = ("base",) + tuple(self.weights)
        self.outputs = (name,)
        self.name = name
        # name -> the keys that delta holds (None: every key)
        self.keys = {n: (set(keys[n]) if keys is not None and n in keys else None) for n in self.weights}
        self._out: torch.Tensor | None = None

    def compute(self, key, inputs, shape, offset):
        base = inputs["base"]
        terms = [(inputs[n], w) for n, w in self.weights.items() if self.keys[n] is None or key in self.keys[n]]
        if self._out is None or self._out.numel() < base.numel():
            self._out = torch.empty(base.numel(), dtype=torch.float32)
        out = self._out[: base.numel()].view(base.shape)
        return {self.name: accumulate(base, terms, out=out)}


def _as_stored(delta: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The delta as a sampler will read it back from its file (rounded to the storage dtype).

    A ``--merged`` model is ``base + (stored delta)``, so that it equals patching the base with
    the delta file (``Constant`` schedule) bit for bit, also for bf16/fp16 deltas.
    """
    if dtype is None or dtype == torch.float32:
        return delta
    return delta.to(dtype).float()


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
@dataclass
class BuildResult:
    """What a build wrote (or, for a dry run, would write)."""

    out_dir: str
    plan: Plan
    files: dict[str, str] = field(default_factory=dict)  # output name -> path to load it from
    dry_run: bool = False

    def summary(self) -> str:
        p = self.plan
        lines = [
            f"keys: {len(p.keys)} in the base, {len(p.scope_keys)} in scope",
            f"read: {p.read_bytes / 1e9:.3f} GB",
        ]
        for name, nb in p.write_bytes.items():
            lines.append(f"write {name}: {nb / 1e9:.3f} GB in {len(p.shards[name])} file(s)")
        lines.append(f"memory for the arithmetic: about {p.peak_memory_bytes / 1e6:.0f} MB (plus ~0.3 GB for Python and torch)")
        return "\n".join(lines)


@dataclass
class Prepared:
    base: Checkpoint
    others: dict[str, Checkpoint]
    family: Family | None
    scope_keys: list[str]
    dtype: torch.dtype
    from_delta: tuple[str, ...] = ()  # fine-tuned inputs given as deltas (ft = base + delta)


class FinetunedFromDelta:
    """Wrap a recipe so that the fine-tuned inputs named in ``names`` may be deltas.

    Before the recipe sees a chunk, each such input becomes ``ft = base + delta`` with the
    patcher's arithmetic (``accumulate``); a key the delta lacks is a zero delta (``ft`` is the
    base, bit for bit). The result equals running the recipe on ``merge_deltas(base, {delta:
    1.0})`` written in fp32, exactly.
    """

    def __init__(self, recipe: Any, names: Mapping[str, Checkpoint]) -> None:
        self.recipe = recipe
        self.inputs, self.outputs, self.elementwise = recipe.inputs, recipe.outputs, recipe.elementwise
        self.keys = {n: set(c.tensors) for n, c in names.items()}

    def compute(self, key, inputs, shape, offset):
        base = inputs["base"]
        for n, keys in self.keys.items():
            d = inputs[n]  # the engine's fp32 buffer for this input: overwritten in place
            accumulate(base, [(d, 1.0)] if key in keys else [], out=d)
        return self.recipe.compute(key, inputs, shape, offset)


def _open_finetuned(base: Checkpoint, others: Mapping[str, str | Checkpoint]) -> tuple[dict[str, Checkpoint], tuple[str, ...]]:
    """Open the fine-tuned inputs; those that are ``motiondial.delta`` files must belong to ``base``.

    Returns the checkpoints and the names of the inputs given as deltas. A delta built for
    another base raises ``FingerprintMismatchError`` naming the delta and both models.
    """
    opened = {n: (c if isinstance(c, Checkpoint) else open_checkpoint(c)) for n, c in others.items()}
    deltas = tuple(n for n, c in opened.items() if c.metadata.get("format") == DELTA_FORMAT)
    if deltas:
        base_fp = fingerprint_checkpoint(base)
        for n in deltas:
            load_delta(opened[n].path, base_fp, lazy=True)  # format/version and base checks
    return opened, deltas


def _finetuned_fingerprint(prep: "Prepared", name: str) -> dict[str, Any]:
    c = prep.others[name]
    return fingerprint_with_delta(prep.base, c) if name in prep.from_delta else fingerprint_checkpoint(c)


def _auto_dtype(base: Checkpoint, keys: Sequence[str]) -> torch.dtype:
    counts = Counter(base.tensors[k].dtype for k in keys if base.tensors[k].dtype.is_floating_point)
    if not counts:
        return torch.float32
    dt = counts.most_common(1)[0][0]
    return dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def prepare(
    base: str | Checkpoint,
    others: Mapping[str, str | Checkpoint],
    *,
    scope: str = "all",
    family: str | Family | None = None,
    dtype: str | torch.dtype = "auto",
    allow_dtype_mismatch: bool = False,
    partial: Sequence[str] = (),
    finetuned_deltas: bool = False,
) -> Prepared:
    """Open and cross-check the inputs; resolve the family, the scope and the output dtype.

    With ``finetuned_deltas`` every input in ``others`` may also be a ``motiondial.delta`` of
    ``base`` (checked by fingerprint): it then stands for ``base + delta``, keys it lacks being
    zero (``Prepared.from_delta`` names those inputs; wrap the recipe in ``FinetunedFromDelta``).
    """
    b = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    if finetuned_deltas:
        o, from_delta = _open_finetuned(b, others)
    else:
        o, from_delta = {n: (c if isinstance(c, Checkpoint) else open_checkpoint(c)) for n, c in others.items()}, ()
    check_compatible(b, o, allow_dtype_mismatch=allow_dtype_mismatch, partial=tuple(partial) + from_delta)
    fam = get_family(family) if isinstance(family, str) else family
    fam = fam or b.family or next((c.family for c in o.values() if c.family is not None), None)
    if fam is None:  # a delta records the family it was built for
        fam = next((get_family(o[n].metadata["family"]) for n in from_delta if o[n].metadata.get("family")), None)
    floating = [k for k, i in b.tensors.items() if i.dtype.is_floating_point]
    scope_keys = resolve_scope(scope, floating, fam)
    dt = _auto_dtype(b, scope_keys) if dtype == "auto" else parse_dtype(dtype)
    return Prepared(b, o, fam, scope_keys, dt, from_delta)


def _wrap(recipe: Any, prep: Prepared) -> Any:
    recipe.delta_dtype = prep.dtype
    return FinetunedFromDelta(recipe, {n: prep.others[n] for n in prep.from_delta}) if prep.from_delta else recipe


def _link_or_copy_tree(src: str, dst: str) -> None:
    """Mirror a component folder with hard links (no extra space), copying where links fail."""
    for root, _dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            s, d = os.path.join(root, f), os.path.join(dst, rel, f)
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


def _model_folder_writer(base: Checkpoint, family: Family | None, model_dirs: Sequence[str]) -> Callable[[str], None] | None:
    """For a diffusers base: complete each merged model folder (index, other components, config)."""
    if base.family is None or family is None:
        return None
    root = base.path

    def write(tmp: str) -> None:
        for d in model_dirs:
            target = os.path.join(tmp, d)
            shutil.copy2(os.path.join(root, "model_index.json"), os.path.join(target, "model_index.json"))
            for entry in sorted(os.listdir(root)):
                src = os.path.join(root, entry)
                if entry == family.denoiser:
                    # Configs etc. of the denoiser, but not its weights (we wrote merged ones).
                    for f in os.listdir(src):
                        if not (f.endswith(".safetensors") or f.endswith(".safetensors.index.json") or f.endswith(".bin")):
                            p = os.path.join(src, f)
                            if os.path.isfile(p):
                                shutil.copy2(p, os.path.join(target, entry, f))
                elif os.path.isdir(src):
                    _link_or_copy_tree(src, os.path.join(target, entry))
                elif entry != "model_index.json":
                    shutil.copy2(src, os.path.join(target, entry))

    return write


def _model_stem(base: Checkpoint, family: Family | None, name: str) -> tuple[str, str]:
    """(stem of the merged weights, path to load the merged model from), relative to out_dir."""
    if base.family is not None and family is not None:
        return f"{name}/{family.denoiser}/diffusion_pytorch_model", name
    return name, name


def _files(plan: Plan, out_dir: str, specs: Sequence[OutputSpec], model_paths: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for s in specs:
        if s.name in model_paths and os.path.isdir(os.path.join(out_dir, model_paths[s.name])):
            out[s.name] = os.path.join(out_dir, model_paths[s.name])
        elif len(plan.shards[s.name]) > 1:
            out[s.name] = os.path.join(out_dir, f"{s.stem}.safetensors.index.json")
        else:
            out[s.name] = os.path.join(out_dir, f"{s.stem}.safetensors")
    return out


def _execute(
    prep: Prepared,
    inputs: dict[str, Checkpoint],
    recipe: Any,
    delta_meta: Mapping[str, dict[str, str]],
    model_names: Sequence[str],
    out_dir: str,
    *,
    dry_run: bool,
    overwrite: bool,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
    recipe_json: Mapping[str, Any],
    write_schedule: bool = False,
) -> BuildResult:
    specs: list[OutputSpec] = [OutputSpec(n, n, "delta", prep.dtype, dict(m)) for n, m in delta_meta.items()]
    model_paths = {}
    for n in model_names:
        stem, load = _model_stem(prep.base, prep.family, n)
        model_paths[n] = load
        meta = {"format": "pt", "motiondial": json.dumps({"merged_from": recipe_json}, sort_keys=True)}
        specs.append(OutputSpec(n, stem, "full", prep.dtype, meta))
    from .engine import plan as make_plan

    if dry_run:
        p = make_plan(prep.base, inputs, recipe, specs, prep.scope_keys, max_shard_bytes=max_shard_bytes)
        return BuildResult(out_dir, p, {}, dry_run=True)
    model_writer = _model_folder_writer(prep.base, prep.family, [model_paths[n] for n in model_names])

    def extra(tmp: str) -> None:
        with open(os.path.join(tmp, "recipe.json"), "w", encoding="utf-8") as f:
            json.dump(recipe_json, f, indent=2, sort_keys=True)
        if write_schedule:
            reference_ed_schedule().save(os.path.join(tmp, "schedule.json"))
        if model_writer is not None:
            model_writer(tmp)

    p = run(
        prep.base, inputs, recipe, specs, out_dir, scope_keys=prep.scope_keys, max_shard_bytes=max_shard_bytes,
        overwrite=overwrite, extra_files=extra, progress=progress,
    )
    return BuildResult(out_dir, p, _files(p, out_dir, specs, model_paths))


def build_ed(
    base: str | Checkpoint,
    finetuned: str | Checkpoint,
    out_dir: str,
    *,
    a_dyn: float = 0.25,
    b_dyn: float = 0.75,
    a_con: float = 1.0,
    b_con: float = 0.25,
    p: float = 0.7,
    seed: int = 0,
    scope: str = "all",
    family: str | Family | None = None,
    dtype: str | torch.dtype = "auto",
    merged: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_dtype_mismatch: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Build the ED dynamics and control deltas from ``(base, finetuned)`` into ``out_dir``.

    Writes ``dynamics.safetensors`` and ``control.safetensors`` (sharded above
    ``max_shard_bytes``), ``schedule.json`` (the reference hard switch at level 0.5) and
    ``recipe.json``; with ``merged=True`` also the merged models ``dynamics_model`` and
    ``control_model`` (complete diffusers folders when ``base`` is one; other components are
    hard-linked, or copied where links are impossible). ``dtype`` is the storage dtype of
    the outputs (``"auto"`` = the base's). Arithmetic is fp32. See ``ED_DEFAULTS``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    prep = prepare(base, {"finetuned": finetuned}, scope=scope, family=family, dtype=dtype,
                   allow_dtype_mismatch=allow_dtype_mismatch, finetuned_deltas=True)
    inputs = {"base": prep.base, **prep.others}
    params = {"a_dyn": a_dyn, "b_dyn": b_dyn, "a_con": a_con, "b_con": b_con, "p": p}
    recipe = _wrap(EDRecipe(a_dyn, b_dyn, a_con, b_con, p, seed, merged=merged), prep)
    fam = prep.family.name if prep.family else None
    if dry_run:
        base_fp = ft_fp = {"format": "motiondial.fingerprint"}
    else:
        base_fp = fingerprint_checkpoint(prep.base)
        ft_fp = _finetuned_fingerprint(prep, "finetuned")
    common = dict(recipe="ed", params=params, seed=seed, scope=scope, n_keys=len(prep.scope_keys), dtype=prep.dtype,
                  family=fam, base_fingerprint=base_fp, finetuned_fingerprint=ft_fp)
    meta = {
        "dynamics": delta_metadata(name="dynamics", **common, extra={"formula": "b_dyn * DARE_p(a_dyn * (pre - ft))"}),
        "control": delta_metadata(name="control", **common, extra={"formula": "(a_con * ft + b_con * DARE_p(ft - pre)) - pre"}),
    }
    recipe_json = {
        "format": "motiondial.build", "version": 1, "recipe": "ed", "params": params, "seed": seed, "scope": scope,
        "n_keys_in_scope": len(prep.scope_keys), "dtype": short_dtype(prep.dtype), "family": fam,
        "base": os.path.abspath(prep.base.path), "finetuned": os.path.abspath(prep.others["finetuned"].path),
        "finetuned_is_delta": "finetuned" in prep.from_delta, "base_fingerprint": compact_fingerprint(base_fp), "finetuned_fingerprint": compact_fingerprint(ft_fp),
    }
    return _execute(
        prep, inputs, recipe, meta, ["dynamics_model", "control_model"] if merged else [], out_dir,
        dry_run=dry_run, overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
        recipe_json=recipe_json, write_schedule=True,
    )


def _build_one_delta(
    prep: Prepared,
    recipe: Any,
    out_dir: str,
    *,
    recipe_name: str,
    name: str,
    params: dict[str, Any],
    seed: int | None,
    scope: str,
    finetuned: str | None,
    merged: bool,
    dry_run: bool,
    overwrite: bool,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> BuildResult:
    """The shared tail of the recipes that write one delta ``name`` (task vector, TIES):
    fingerprints, delta metadata, ``recipe.json``, then the streaming run.

    ``seed``: ``None`` for seedless recipes (then ``recipe.json`` has no ``seed``);
    ``finetuned``: the input whose fingerprint the delta records, ``None`` when there is no
    single fine-tune (TIES merges several).
    """
    base_fp = {"format": "motiondial.fingerprint"} if dry_run else fingerprint_checkpoint(prep.base)
    ft_fp = None if dry_run or finetuned is None else _finetuned_fingerprint(prep, finetuned)
    fam = prep.family.name if prep.family else None
    meta = {name: delta_metadata(name=name, recipe=recipe_name, params=params, seed=seed, scope=scope,
                                 n_keys=len(prep.scope_keys), dtype=prep.dtype, family=fam, base_fingerprint=base_fp,
                                 finetuned_fingerprint=ft_fp)}
    recipe_json = {"format": "motiondial.build", "version": 1, "recipe": recipe_name, "params": params,
                   **({} if seed is None else {"seed": seed}), "scope": scope, "dtype": short_dtype(prep.dtype),
                   "family": fam}
    return _execute(prep, {"base": prep.base, **prep.others}, _wrap(recipe, prep), meta,
                    [f"{name}_model"] if merged else [], out_dir, dry_run=dry_run, overwrite=overwrite,
                    max_shard_bytes=max_shard_bytes, progress=progress, recipe_json=recipe_json)


def build_task_vector(
    base: str | Checkpoint,
    finetuned: str | Checkpoint,
    out_dir: str,
    *,
    scale: float = 1.0,
    dare_p: float | None = None,
    density: float | None = None,
    seed: int = 0,
    name: str = "delta",
    scope: str = "all",
    family: str | Family | None = None,
    dtype: str | torch.dtype = "auto",
    merged: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_dtype_mismatch: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """One delta ``scale * post(ft - pre)`` (``post``: top-k ``density``, then DARE ``dare_p``).

    ``scale > 1`` extrapolates towards/past the fine-tune, ``scale < 0`` away from it.
    """
    prep = prepare(base, {"finetuned": finetuned}, scope=scope, family=family, dtype=dtype,
                   allow_dtype_mismatch=allow_dtype_mismatch, finetuned_deltas=True)
    return _build_one_delta(
        prep, TaskVectorRecipe(scale, dare_p, density, seed, name, merged), out_dir, recipe_name="task_vector",
        name=name, params={"scale": scale, "dare_p": dare_p, "density": density}, seed=seed, scope=scope,
        finetuned="finetuned", merged=merged, dry_run=dry_run, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
        progress=progress,
    )


def build_ties(
    base: str | Checkpoint,
    finetuned: Sequence[str | Checkpoint],
    out_dir: str,
    *,
    density: float = 0.2,
    scale: float = 1.0,
    weights: Sequence[float] | None = None,
    name: str = "delta",
    scope: str = "all",
    family: str | Family | None = None,
    dtype: str | torch.dtype = "auto",
    merged: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_dtype_mismatch: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """One delta merging several fine-tunes of the same base with TIES (trim, elect sign, disjoint mean)."""
    if not finetuned:
        raise ValueError("build_ties needs at least one fine-tuned checkpoint")
    others = {f"finetuned{i}": c for i, c in enumerate(finetuned)}
    prep = prepare(base, others, scope=scope, family=family, dtype=dtype, allow_dtype_mismatch=allow_dtype_mismatch,
                   finetuned_deltas=True)
    params = {"density": density, "scale": scale, "weights": list(weights) if weights else None, "n_finetuned": len(finetuned)}
    return _build_one_delta(
        prep, TiesRecipe(len(finetuned), density, scale, weights, name, merged), out_dir, recipe_name="ties",
        name=name, params=params, seed=None, scope=scope, finetuned=None, merged=merged, dry_run=dry_run,
        overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
    )


def merge_deltas(
    base: str | Checkpoint,
    deltas: Mapping[str, float],
    out_dir: str,
    *,
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """A static merge ``base + sum_k w_k * Δ_k`` written as a full model (``out_dir/merged``).

    ``deltas`` maps delta paths to weights. Each delta must have been built for ``base``
    (fingerprint check). For a diffusers ``base`` the result is a complete model folder.
    """
    b = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    fp = fingerprint_checkpoint(b)
    named: dict[str, Checkpoint] = {}
    weights: dict[str, float] = {}
    for i, (path, w) in enumerate(deltas.items()):
        d = load_delta(path, fp, lazy=True)
        named[f"delta{i}"] = d._checkpoint
        weights[f"delta{i}"] = float(w)
    prep = prepare(b, named, scope="all", dtype=dtype, partial=list(named), allow_dtype_mismatch=True)
    rank = {k: i for i, k in enumerate(b.tensors)}
    scope_keys = sorted(set().union(*[set(c.tensors) for c in named.values()]), key=rank.__getitem__)
    prep.scope_keys = scope_keys
    recipe = ApplyRecipe(weights, name="merged", keys={n: c.tensors for n, c in named.items()})
    recipe_json = {"format": "motiondial.build", "version": 1, "recipe": "apply",
                   "deltas": {os.path.abspath(p): float(w) for p, w in deltas.items()}, "dtype": short_dtype(prep.dtype)}
    return _execute(prep, {"base": b, **named}, recipe, {}, ["merged"], out_dir, dry_run=False, overwrite=overwrite,
                    max_shard_bytes=max_shard_bytes, progress=progress, recipe_json=recipe_json)
