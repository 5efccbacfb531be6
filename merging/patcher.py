"""The live weight patcher: per-step scheduled weights inside a running sampler.

``ScheduledWeights(deltas, schedule)`` pairs named deltas (``{"dynamics": {key: tensor}, ...}``,
keys are the denoiser's state-dict keys) with a schedule (``.weights(noise_level) -> {name:
float}``). ``WeightPatcher(module, scheduled)`` is a context manager: on entry it validates the
deltas against the module and keeps a copy of the base value of every patched parameter (and of
nothing else); ``apply(noise_level)`` sets every patched parameter to

    W = W_base + sum_k w_k(level) * delta_k          (terms with w_k == 0 are skipped)

recomputed from the kept base in fp32 -- ``torch.add(acc, delta_k, alpha=w_k)`` term by term, in
the order of the deltas mapping -- and written only when the weights differ from the last ones
written; on exit the base values are written back bit for bit.

Why from the base and in fp32: adding and removing a small delta in place, step after step, in
bf16 destroys it (platform.md measured a relative error of 2.3 after 50 steps). Here the only
rounding is the final cast to the parameter's dtype, once per change.

Static merges use the same function (``accumulate``: ``static_merge`` here, and
``merging.recipes`` for ``--merged`` models and ``merge_deltas``), so a ``Constant`` schedule
samples exactly what the statically merged model samples.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["ScheduledWeights", "ScheduledPredictions", "WeightPatcher", "PatchError", "accumulate", "static_merge",
           "scheduled", "combine"]


class PatchError(ValueError):
    """Deltas that do not fit the module, or a schedule that names deltas not given."""


# Elements per chunk. Mixed-dtype arithmetic (bf16 operands, fp32 result) over a whole large
# tensor is memory-bound and ~7x slower on CPU than over cache-sized chunks with a reused fp32
# scratch (measured: 14 vs 2 ns per value, one thread). A multiple of every SIMD width, so each
# chunk is vectorised exactly as the whole tensor would be.
CHUNK = 1 << 18


def _fp32_operand(t: torch.Tensor) -> torch.Tensor:
    # fp32 and reduced-precision operands meet in fp32 (TensorIterator promotes to the common
    # dtype); an fp64 delta would pull the arithmetic into fp64, so it is rounded to fp32 first.
    return t if t.dtype != torch.float64 else t.float()


def accumulate(base: torch.Tensor, terms: list[tuple[torch.Tensor, float]], out: torch.Tensor,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``out = base + sum_k w_k * delta_k`` with every operation in fp32; returns ``out``.

    The one implementation of MotionDial's merge arithmetic: the patcher writes parameters with
    it, ``static_merge`` and the static merges of ``merging.recipes`` (``--merged``,
    ``merge_deltas``) compute with it, so they agree bit for bit.

    Terms with ``w_k == 0`` are skipped. The first remaining term is fused with the copy of the
    base (``torch.add(base, delta, alpha=w, out=)``), the rest accumulate in place, in order;
    every operation sees at least one fp32 operand, so bf16/fp16 operands are promoted to fp32
    before any arithmetic (two bf16 operands alone would be added in bf16: then the base is
    copied into the fp32 accumulator first). ``out`` may be the parameter itself (any float
    dtype): for a non-fp32 ``out`` the sum is formed in fp32 scratch (at least
    ``min(numel, CHUNK)`` elements; allocated if not given) and rounded once. Tensors larger
    than ``CHUNK`` are processed chunk by chunk (same elementwise arithmetic).
    """
    nonzero = [(_fp32_operand(d), w) for d, w in terms if w != 0.0]
    if not nonzero:
        return out.copy_(base)
    base = _fp32_operand(base)
    fuse = torch.promote_types(base.dtype, nonzero[0][0].dtype) == torch.float32
    n = out.numel()
    direct = out.dtype == torch.float32
    if scratch is None and not direct:
        scratch = torch.empty(min(n, CHUNK), dtype=torch.float32, device=out.device)

    def first(b: torch.Tensor, d: torch.Tensor, w: float, acc: torch.Tensor) -> None:
        if fuse:
            torch.add(b, d, alpha=w, out=acc)
        else:  # both reduced precision: widen the base, then add (same fp32 kernel as the fused op)
            acc.copy_(b).add_(d, alpha=w)

    if n <= CHUNK:  # one piece: no flat views needed (most tensors; keeps the per-key overhead low)
        acc = out if direct else scratch[:n].view(out.shape)
        first(base, nonzero[0][0], nonzero[0][1], acc)
        for d, w in nonzero[1:]:
            acc.add_(d, alpha=w)
        return out if direct else out.copy_(acc)
    if not (out.is_contiguous() and base.is_contiguous() and all(d.is_contiguous() for d, _ in nonzero)):
        acc = base.to(torch.float32, copy=True)  # rare (no flat views): same fp32 arithmetic, unchunked
        for d, w in nonzero:
            acc.add_(d, alpha=w)
        return out.copy_(acc)
    o, b = out.view(-1), base.view(-1)
    ds = [(d.view(-1), w) for d, w in nonzero]
    for i in range(0, n, CHUNK):
        j = min(n, i + CHUNK)
        acc = o[i:j] if direct else scratch[: j - i]
        first(b[i:j], ds[0][0][i:j], ds[0][1], acc)
        for d, w in ds[1:]:
            acc.add_(d[i:j], alpha=w)
        if not direct:
            o[i:j].copy_(acc)
    return out


def static_merge(base: torch.Tensor, terms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """A static merge with the patcher's exact arithmetic, for one tensor, in ``base.dtype``.

    ``terms`` = ``[(delta_k, w_k), ...]`` in the order of the deltas mapping. A model whose
    weights are set with this samples bit-identically to one patched with a ``Constant``
    schedule of the same weights.
    """
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    return accumulate(base.contiguous(), [(d.to(base.device).contiguous(), float(w)) for d, w in terms], out=out)


class ScheduledWeights:
    """Named deltas plus a schedule saying how strongly each applies at a noise level.

    Args:
        deltas: ``{name: {state-dict key: tensor}}``; tensors of any float dtype (fp32 math is
            done on the fly, they are not copied). Treated as immutable once given.
        schedule: anything with ``weights(noise_level) -> {name: float}`` (``merging.schedule``).
            Names it returns must be in ``deltas``; deltas it does not mention get weight 0.
    """

    _mode = "weights"

    def __init__(self, deltas: Mapping[str, Mapping[str, torch.Tensor]], schedule: Any) -> None:
        if not isinstance(deltas, Mapping) or not deltas:
            raise PatchError(f"{type(self).__name__} needs a non-empty mapping {{delta name: {{key: tensor}}}}")
        if not callable(getattr(schedule, "weights", None)):
            raise PatchError(f"schedule must have a weights(noise_level) method, got {type(schedule).__name__}")
        self.mode = getattr(schedule, "mode", "weights")
        if self.mode != self._mode:
            if self.mode == "predictions":
                raise PatchError(
                    f"{type(schedule).__name__} mixes predictions (mode 'predictions'); it cannot be applied by "
                    "patching weights: use merging.patcher.ScheduledPredictions(deltas, schedule)"
                )
            raise PatchError(f"{type(self).__name__} needs a schedule of mode {self._mode!r}, "
                             f"{type(schedule).__name__} has mode {self.mode!r}")
        if self.mode == "predictions" and not callable(getattr(schedule, "models", None)):
            raise PatchError(f"{type(schedule).__name__} mixes predictions but has no models(noise_level) method")
        self.deltas: dict[str, Mapping[str, torch.Tensor]] = {}
        for name, delta in deltas.items():
            if not isinstance(delta, Mapping) or not delta:
                raise PatchError(f"delta {name!r} must be a non-empty mapping {{key: tensor}}")
            for key, t in delta.items():
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise PatchError(f"delta {name!r}: {key!r} must be a floating-point tensor, got {type(t).__name__}")
            self.deltas[name] = delta
        names = getattr(schedule, "names", None)
        if names is not None:
            unknown = sorted(set(names) - set(self.deltas))
            if unknown:
                raise PatchError(f"the schedule uses delta(s) {unknown} but only {sorted(self.deltas)} were given")
        self.schedule = schedule
        self._nonzero: dict[tuple[str, str], bool] = {}

    def is_nonzero(self, name: str, key: str) -> bool:
        """Whether delta ``name`` changes ``key`` at all (cached: deltas are treated as immutable)."""
        cached = self._nonzero.get((name, key))
        if cached is None:
            cached = self._nonzero[(name, key)] = bool(self.deltas[name][key].any())
        return cached

    @property
    def keys(self) -> list[str]:
        """Every parameter key some delta touches, in first-seen order."""
        seen: dict[str, None] = {}
        for delta in self.deltas.values():
            seen.update(dict.fromkeys(delta))
        return list(seen)

    def _full(self, raw: Mapping[str, float], noise_level: float) -> dict[str, float]:
        unknown = sorted(set(raw) - set(self.deltas))
        if unknown:
            raise PatchError(f"the schedule returned weights for unknown delta(s) {unknown}")
        out = {}
        for name in self.deltas:
            w = float(raw.get(name, 0.0))
            if not math.isfinite(w):
                raise PatchError(f"the schedule gave delta {name!r} a non-finite weight {w} at level {noise_level}")
            out[name] = w
        return out

    def weights(self, noise_level: float) -> dict[str, float]:
        """Delta weights ``{name: w}`` for every delta (0.0 for those the schedule leaves out).

        Only for ``mode == "weights"``; prediction-mixing schedules are evaluated with ``calls``.
        """
        if self.mode != "weights":
            raise PatchError(f"{type(self.schedule).__name__} mixes predictions: use calls(noise_level)")
        return self._full(self.schedule.weights(noise_level), noise_level)

    def calls(self, noise_level: float) -> list[tuple[dict[str, float], float]]:
        """The denoiser calls one step needs: ``[(delta weights {name: w}, mix weight), ...]``.

        ``"weights"`` mode: one call, ``[(weights(level), 1.0)]``. ``"predictions"`` mode
        (``merging.schedule.PredictionBlend``): one call per model with a non-zero mix weight;
        the prediction is ``sum_k mix_k * prediction_k``.
        """
        if self.mode == "weights":
            return [(self.weights(noise_level), 1.0)]
        out = []
        for w, mix in self.schedule.models(noise_level):
            mix = float(mix)
            if not math.isfinite(mix):
                raise PatchError(f"the schedule gave a non-finite mix weight {mix} at level {noise_level}")
            out.append((self._full(w, noise_level), mix))
        if not out:
            raise PatchError(f"the schedule asked for no denoiser call at level {noise_level}")
        return out


class ScheduledPredictions(ScheduledWeights):
    """Named deltas plus a prediction-mixing schedule (``merging.schedule.PredictionBlend``).

    Each step runs one model per non-zero mix weight (``calls(level)``), each with weights
    ``W_base + sum_k w_k delta_k`` set by a ``WeightPatcher``, and mixes their predictions:
    ``sum_k mix_k * prediction_k``. ``pipelines.sample`` accepts it as ``weight_schedule``.
    """

    _mode = "predictions"


def scheduled(deltas: Mapping[str, Mapping[str, torch.Tensor]], schedule: Any) -> ScheduledWeights:
    """``ScheduledPredictions`` for a prediction-mixing schedule (``mode == "predictions"``),
    else ``ScheduledWeights``: the one place that picks the class by the schedule's mode."""
    cls = ScheduledPredictions if getattr(schedule, "mode", "weights") == "predictions" else ScheduledWeights
    return cls(deltas, schedule)


def combine(*parts: ScheduledWeights) -> ScheduledWeights:
    """Several scheduled delta sets applied together, e.g. a trained motion delta plus ED task vectors.

    The deltas are the union (names must be disjoint; the order of ``parts`` is the order of
    the merge arithmetic), the schedule is ``merging.schedule.Combined`` of the parts'
    schedules. With a constant schedule in every part this samples bit for bit what the static
    merge of all deltas (``static_merge``, same order) samples. If one part mixes predictions,
    the other parts' deltas apply to every model of the mix.
    """
    from merging.schedule import Combined

    parts = tuple(p for p in parts if p is not None)
    if not parts:
        raise PatchError("combine needs at least one ScheduledWeights")
    for p in parts:
        if not isinstance(p, ScheduledWeights):
            raise PatchError(f"combine: expected merging.patcher.ScheduledWeights, got {type(p).__name__}")
    if len(parts) == 1:
        return parts[0]
    deltas: dict[str, Mapping[str, torch.Tensor]] = {}
    for p in parts:
        clash = sorted(set(p.deltas) & set(deltas))
        if clash:
            raise PatchError(f"combine: delta name(s) {clash} appear in two of the combined sets; rename one")
        deltas.update(p.deltas)
    return scheduled(deltas, Combined([p.schedule for p in parts]))


class WeightPatcher:
    """Context manager that applies ``ScheduledWeights`` to ``module``'s parameters in place.

    ``apply(level)`` (weight schedules) and ``set_weights({name: w})`` (one model of a
    prediction mix) are cheap when the weights do not change (one dict comparison). Counts:
    ``writes`` = how many times the parameters were rewritten. Re-entrant use is refused.
    """

    def __init__(self, module: torch.nn.Module, scheduled: ScheduledWeights,
                 base_device: str | torch.device | None = None) -> None:
        if not isinstance(scheduled, ScheduledWeights):
            raise PatchError(f"expected merging.patcher.ScheduledWeights, got {type(scheduled).__name__}")
        self.module = module
        # Where the kept base copy lives: None = beside each parameter (fastest; costs memory on
        # the parameter's device, e.g. VRAM); "cpu" = host memory, copied to the parameter's
        # device at each write.
        self.base_device = torch.device(base_device) if base_device is not None else None
        self.scheduled = scheduled
        self.writes = 0
        self._entered = False
        self._params: dict[str, torch.Tensor] = {}
        self._base: dict[str, torch.Tensor] = {}
        self._terms: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self._current: dict[str, float] | None = None
        self.validate()

    def _tensors(self) -> dict[str, torch.Tensor]:
        # State-dict keys: parameters and (persistent or not) buffers, e.g. CogVideoX's pos_embedding.
        return {**dict(self.module.named_buffers()), **dict(self.module.named_parameters())}

    def validate(self) -> None:
        """Check every delta key exists in the module with the same shape (clear error otherwise)."""
        params = self._tensors()
        for name, delta in self.scheduled.deltas.items():
            missing = [k for k in delta if k not in params]
            if missing:
                raise PatchError(
                    f"delta {name!r}: {len(missing)} key(s) are not in the state dict of the {type(self.module).__name__} "
                    f"(e.g. {missing[0]!r}); was it made for another model (or with a component prefix)?"
                )
            for k, t in delta.items():
                p = params[k]
                if p.is_meta:
                    raise PatchError(f"{k!r} is on the meta device (offloaded layer by layer?); cannot patch it")
                if tuple(t.shape) != tuple(p.shape):
                    raise PatchError(
                        f"delta {name!r}: {k!r} has shape {tuple(t.shape)} but the model's parameter has {tuple(p.shape)}"
                    )

    def __enter__(self) -> "WeightPatcher":
        if self._entered:
            raise RuntimeError("WeightPatcher is already active")
        params = self._tensors()
        try:
            for key in self.scheduled.keys:
                # All-zero deltas (frozen layers of a task vector) change nothing: skip them, and
                # keep no base copy of a parameter that no non-zero delta touches.
                terms = [(n, d[key]) for n, d in self.scheduled.deltas.items()
                         if key in d and self.scheduled.is_nonzero(n, key)]
                if not terms:
                    continue
                p = params[key]
                self._params[key] = p
                self._base[key] = (p.detach().clone() if self.base_device is None
                                   else p.detach().to(self.base_device, copy=True))
                self._terms[key] = terms
        except BaseException:  # e.g. out of memory while copying: release what was taken
            self._params, self._base, self._terms = {}, {}, {}
            raise
        self._scratch_numel = min(CHUNK, max((p.numel() for p in self._params.values()), default=1))
        self._current = {n: 0.0 for n in self.scheduled.deltas}  # the base is "all weights zero"
        self._entered = True
        return self

    @property
    def current_weights(self) -> dict[str, float] | None:
        """The delta weights the parameters hold now (all zero = base); ``None`` outside ``with``."""
        return dict(self._current) if self._entered and self._current is not None else None

    def apply(self, noise_level: float) -> bool:
        """Set the weights for ``noise_level``; returns whether the parameters were rewritten."""
        if not self._entered:
            raise RuntimeError("WeightPatcher.apply outside its `with` block")
        return self.set_weights(self.scheduled.weights(noise_level))

    def set_weights(self, weights: Mapping[str, float]) -> bool:
        """Set explicit delta weights ``{name: w}`` (missing names: 0); returns whether rewritten."""
        if not self._entered:
            raise RuntimeError("WeightPatcher.set_weights outside its `with` block")
        w = self.scheduled._full(weights, float("nan"))
        if w == self._current:
            return False
        self._write(w)
        self._current = w
        self.writes += 1
        return True

    @torch.no_grad()
    def _write(self, w: Mapping[str, float]) -> None:
        scratch: dict[torch.device, torch.Tensor] = {}  # one fp32 chunk per device, reused for every key
        for key, p in self._params.items():
            data = p.data
            dev = data.device
            base = self._base[key]
            if base.device != dev:  # offloaded base, or model offload moved the module since we copied it
                base = base.to(dev)
                if self.base_device is None:
                    self._base[key] = base
            terms = [(d if d.device == dev else d.to(dev), w[n]) for n, d in self._terms[key]]
            buf = None
            if data.dtype != torch.float32:
                buf = scratch.get(dev)
                if buf is None:
                    buf = scratch[dev] = torch.empty(self._scratch_numel, dtype=torch.float32, device=dev)
            accumulate(base, terms, out=data, scratch=buf)  # straight into the parameter's storage

    @torch.no_grad()
    def restore(self) -> None:
        """Write the base values back (bit-identical); safe to call more than once."""
        for key, p in self._params.items():
            base = self._base[key]
            p.data.copy_(base if base.device == p.device else base.to(p.device))
        self._current = {n: 0.0 for n in self.scheduled.deltas}

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._entered:
                self.restore()
        finally:
            self._entered = False
            self._params, self._base, self._terms = {}, {}, {}
