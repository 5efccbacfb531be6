"""Schedules: how strongly each named delta applies, as a function of the noise level.

The noise level is the common 0..1 scale of ``families.noise`` (0 = clean, 1 = pure noise); for
the discrete-time families ``level = t / 1000``, so the ED reference rule "steps with t > 500 use
the dynamics model, the rest the control model" is ``HardSwitch(switch=0.5)``.

Two ways of consuming a schedule (``Schedule.mode``):

* ``"weights"`` (default, one denoiser call per step): before each denoiser call the sampler sets
  ``W = W_base + sum_k w_k(level) * delta_k`` (``merging.patcher.ScheduledWeights``).
* ``"predictions"`` (``PredictionBlend``, the alternative of the ED reference): each named delta
  defines a model ``W_base + strength_k * delta_k``; every model with a non-zero mix weight is run
  and the predictions are mixed, ``eps = sum_k m_k(level) * eps_k (+ (1 - sum_k m_k) * eps_base)``.
  It runs the denoiser once per model with a non-zero weight: **twice the cost** for the usual
  dynamics/control pair, three times where the mix weights do not sum to one.

Every schedule round-trips through JSON (``to_json`` / ``Schedule.from_json``, ``save`` /
``Schedule.load``) so it can be stored in workflows and next to deltas.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar, Mapping, Sequence

__all__ = [
    "Schedule",
    "Constant",
    "HardSwitch",
    "LinearBlend",
    "CosineBlend",
    "Keyframes",
    "PredictionBlend",
    "Combined",
    "ScheduleError",
    "reference_ed_schedule",
]

SCHEDULE_FORMAT = "motiondial.schedule"
SCHEDULE_VERSION = 1


class ScheduleError(ValueError):
    """A schedule's parameters or its JSON form are invalid."""


def _level(noise_level: float) -> float:
    level = float(noise_level)
    if not math.isfinite(level):
        raise ScheduleError(f"noise level must be a finite number in [0, 1], got {noise_level!r}")
    # The samplers' level is clamped already; tolerate tiny float excursions without surprises.
    return min(max(level, 0.0), 1.0)


def _finite(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ScheduleError(f"{name} must be finite, got {value!r}")
    return v


def _unit(name: str, value: Any) -> float:
    v = _finite(name, value)
    if not 0.0 <= v <= 1.0:
        raise ScheduleError(f"{name} is a noise level and must lie in [0, 1], got {v}")
    return v


def _name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ScheduleError(f"{what} must be a non-empty delta name, got {value!r}")
    return value


class Schedule:
    """Base class. Subclasses implement ``weights`` and ``_params``; they are immutable values.

    Attributes:
        mode: ``"weights"`` (patch the weights, one denoiser call per step) or ``"predictions"``
            (run one model per delta and mix the predictions; see ``PredictionBlend``).
    """

    kind: ClassVar[str] = ""
    mode: ClassVar[str] = "weights"
    _registry: ClassVar[dict[str, type["Schedule"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Schedule._registry[cls.kind] = cls

    # -- evaluation ---------------------------------------------------------------------------
    def weights(self, noise_level: float) -> dict[str, float]:
        """Weight of every named delta at ``noise_level`` (0 clean .. 1 pure noise).

        Always returns the same set of names (``self.names``), zeros included, so a consumer
        can tell "off" from "unknown".
        """
        raise NotImplementedError

    @property
    def names(self) -> tuple[str, ...]:
        """The delta names this schedule refers to (each must be provided to the sampler)."""
        raise NotImplementedError

    # -- serialisation ------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``Schedule.from_json`` rebuilds an equal schedule."""
        return {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "type": self.kind, **self._params()}

    @staticmethod
    def from_json(d: Mapping[str, Any] | str) -> "Schedule":
        """Rebuild a schedule from ``to_json()`` output (a dict or its JSON text)."""
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise ScheduleError(f"schedule JSON is not valid JSON: {e}") from None
        if not isinstance(d, Mapping):
            raise ScheduleError(f"a schedule must be a JSON object, got {type(d).__name__}")
        version = d.get("version", SCHEDULE_VERSION)
        if d.get("format", SCHEDULE_FORMAT) != SCHEDULE_FORMAT or version != SCHEDULE_VERSION:
            raise ScheduleError(
                f"not a {SCHEDULE_FORMAT} v{SCHEDULE_VERSION} schedule: format={d.get('format')!r} version={version!r}"
            )
        kind = d.get("type")
        cls = Schedule._registry.get(kind)
        if cls is None:
            raise ScheduleError(f"unknown schedule type {kind!r}; known: {', '.join(sorted(Schedule._registry))}")
        params = {k: v for k, v in d.items() if k not in ("format", "version", "type")}
        try:
            return cls._from_params(params)
        except TypeError as e:
            raise ScheduleError(f"bad parameters for schedule {kind!r}: {e}") from None

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> "Schedule":
        return cls(**params)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``to_json()`` to ``path`` atomically (temporary name, then rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @staticmethod
    def load(path: str | os.PathLike) -> "Schedule":
        """Read a schedule saved with ``save``; errors name the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ScheduleError(f"cannot read schedule file {path}: {e.strerror or e}") from None
        try:
            return Schedule.from_json(text)
        except ScheduleError as e:
            raise ScheduleError(f"{path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._params() == other._params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.kind, json.dumps(self._params(), sort_keys=True)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The same weights at every noise level: ``Constant({"dynamics": 1.0})`` is a static merge."""

    kind = "constant"

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise ScheduleError("Constant needs a non-empty mapping {delta name: weight}")
        self._weights = {_name("delta name", k): _finite(f"weight of {k!r}", v) for k, v in weights.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._weights)

    def weights(self, noise_level: float) -> dict[str, float]:
        _level(noise_level)
        return dict(self._weights)

    def _params(self) -> dict[str, Any]:
        return {"weights": dict(self._weights)}


class _TwoDeltaSchedule(Schedule):
    """Shared parameters of the schedules that move from a ``high``-noise to a ``low``-noise delta."""

    def __init__(self, high: str, low: str, high_weight: float, low_weight: float) -> None:
        self.high = _name("high", high)
        self.low = _name("low", low)
        if self.high == self.low:
            raise ScheduleError(f"high and low must name different deltas, both are {high!r}")
        self.high_weight = _finite("high_weight", high_weight)
        self.low_weight = _finite("low_weight", low_weight)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.high, self.low)

    def _mix(self, u: float) -> dict[str, float]:
        """``u`` = share of the high-noise delta in [0, 1]."""
        return {self.high: self.high_weight * u, self.low: self.low_weight * (1.0 - u)}

    def _common(self) -> dict[str, Any]:
        return {"high": self.high, "low": self.low, "high_weight": self.high_weight, "low_weight": self.low_weight}


class HardSwitch(_TwoDeltaSchedule):
    """The ED reference: ``high`` only while ``level > switch``, ``low`` only once ``level <= switch``.

    ``switch=0.5`` is "t > 500 of 1000 uses dynamics"; with 50 trailing DDIM steps that is 25
    steps each. ``high_weight`` / ``low_weight`` scale each delta (1.0 = the recipe's strength).
    """

    kind = "hard_switch"

    def __init__(
        self,
        high: str = "dynamics",
        low: str = "control",
        switch: float = 0.5,
        high_weight: float = 1.0,
        low_weight: float = 1.0,
    ) -> None:
        super().__init__(high, low, high_weight, low_weight)
        self.switch = _unit("switch", switch)

    def weights(self, noise_level: float) -> dict[str, float]:
        return self._mix(1.0 if _level(noise_level) > self.switch else 0.0)

    def _params(self) -> dict[str, Any]:
        return {**self._common(), "switch": self.switch}


class LinearBlend(_TwoDeltaSchedule):
    """Linear cross-fade: the ``high`` share rises from 0 at ``start`` to 1 at ``end`` (levels).

    Below ``start`` only ``low`` applies, above ``end`` only ``high``. With the defaults
    (0, 1) the ``high`` share equals the noise level itself: the reference's unused
    alternative (dynamics weight ``t/1000``, control ``1 - t/1000``).
    """

    kind = "linear_blend"

    def __init__(
        self,
        high: str = "dynamics",
        low: str = "control",
        start: float = 0.0,
        end: float = 1.0,
        high_weight: float = 1.0,
        low_weight: float = 1.0,
    ) -> None:
        super().__init__(high, low, high_weight, low_weight)
        self.start = _unit("start", start)
        self.end = _unit("end", end)
        if not self.start < self.end:
            raise ScheduleError(f"start must be below end, got start={self.start} end={self.end}")

    def _share(self, level: float) -> float:
        return min(max((level - self.start) / (self.end - self.start), 0.0), 1.0)

    def weights(self, noise_level: float) -> dict[str, float]:
        return self._mix(self._share(_level(noise_level)))

    def _params(self) -> dict[str, Any]:
        return {**self._common(), "start": self.start, "end": self.end}


class CosineBlend(LinearBlend):
    """Like ``LinearBlend`` but eased: share ``(1 - cos(pi * u)) / 2`` with ``u`` the linear share.

    Flat near both ends, so the switch region is narrower than a linear blend's while the
    weights stay continuous (no jump in the predictions, unlike ``HardSwitch``).
    """

    kind = "cosine_blend"

    def weights(self, noise_level: float) -> dict[str, float]:
        u = self._share(_level(noise_level))
        return self._mix(0.5 * (1.0 - math.cos(math.pi * u)))


class Keyframes(Schedule):
    """User-drawn curves: for each delta, points ``(level, weight)``, piecewise linear in level.

    Outside its first/last point a curve holds its end value. Example::

        Keyframes({"dynamics": [(0.4, 0.0), (0.6, 1.0)], "control": [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]})
    """

    kind = "keyframes"

    def __init__(self, points: Mapping[str, Sequence[Sequence[float]]]) -> None:
        if not isinstance(points, Mapping) or not points:
            raise ScheduleError("Keyframes needs a non-empty mapping {delta name: [(level, weight), ...]}")
        self._points: dict[str, list[tuple[float, float]]] = {}
        for name, pts in points.items():
            _name("delta name", name)
            try:
                parsed = [(_unit(f"level of a {name!r} keyframe", p[0]), _finite(f"weight of a {name!r} keyframe", p[1])) for p in pts]
            except (TypeError, IndexError):
                raise ScheduleError(f"keyframes of {name!r} must be (level, weight) pairs, got {pts!r}") from None
            if not parsed:
                raise ScheduleError(f"delta {name!r} has no keyframes")
            parsed.sort(key=lambda p: p[0])
            levels = [p[0] for p in parsed]
            if len(set(levels)) != len(levels):
                raise ScheduleError(f"delta {name!r} has two keyframes at the same level: {levels}")
            self._points[name] = parsed

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._points)

    @staticmethod
    def _interp(pts: list[tuple[float, float]], level: float) -> float:
        if level <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if level <= x1:
                return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
        return pts[-1][1]

    def weights(self, noise_level: float) -> dict[str, float]:
        level = _level(noise_level)
        return {name: self._interp(pts, level) for name, pts in self._points.items()}

    def _params(self) -> dict[str, Any]:
        return {"points": {k: [list(p) for p in v] for k, v in self._points.items()}}


class PredictionBlend(Schedule):
    """Run one model per delta and mix their *predictions* by noise level (not their weights).

    ``blend`` gives the mix weights ``m_k(level)``; model ``k`` has weights
    ``W_base + strengths[k] * delta_k`` (strength 1.0 by default). The sampler computes
    ``eps = sum_k m_k * eps_k``; where ``sum_k m_k`` differs from 1 (beyond 1e-6) the base
    model's prediction takes the remainder: ``+ (1 - sum_k m_k) * eps_base``.

    Cost: one denoiser call per model with a non-zero mix weight, i.e. **twice** the cost of
    weight patching for a dynamics/control blend (three times when the base takes a share).
    ``PredictionBlend(LinearBlend())`` is the reference's unused alternative (dynamics
    prediction weighted ``t/1000``). ``weights()`` returns the *mix* weights.
    """

    kind = "prediction_blend"
    mode = "predictions"

    def __init__(self, blend: Schedule | Mapping[str, Any] | None = None, strengths: Mapping[str, float] | None = None) -> None:
        if blend is None:
            blend = LinearBlend()
        if isinstance(blend, Mapping):
            blend = Schedule.from_json(blend)
        if not isinstance(blend, Schedule) or isinstance(blend, PredictionBlend):
            raise ScheduleError("PredictionBlend needs a weight schedule (HardSwitch, LinearBlend, ...) to mix by")
        self.blend = blend
        strengths = dict(strengths or {})
        unknown = set(strengths) - set(blend.names)
        if unknown:
            raise ScheduleError(f"strengths name deltas the blend does not use: {sorted(unknown)}")
        self.strengths = {n: _finite(f"strength of {n!r}", strengths.get(n, 1.0)) for n in blend.names}

    @property
    def names(self) -> tuple[str, ...]:
        return self.blend.names

    def weights(self, noise_level: float) -> dict[str, float]:
        return self.blend.weights(noise_level)

    def models(self, noise_level: float) -> list[tuple[dict[str, float], float]]:
        """The denoiser calls this step needs: ``[(delta weights of the model, mix weight), ...]``.

        Models with a zero mix weight are left out; the base model (no delta) appears with
        ``{}`` when the mix weights do not sum to one. The sampler runs each model (weights
        ``W_base + sum_k w_k delta_k``) and returns ``sum(mix * prediction)``.
        """
        mix = self.weights(noise_level)
        calls = [({n: self.strengths[n]}, m) for n, m in mix.items() if m != 0.0]
        rest = 1.0 - sum(mix.values())
        if abs(rest) > 1e-6:
            calls.append(({}, rest))
        return calls

    def _params(self) -> dict[str, Any]:
        return {"blend": self.blend.to_json(), "strengths": dict(self.strengths)}


class Combined(Schedule):
    """Several schedules over disjoint delta names, applied together.

    ``weights(level)`` is the union of the parts' weights, e.g. the ED schedule of
    ``dynamics``/``control`` plus ``Constant({"motion": 1.0})`` for a trained motion delta. At most
    one part may mix predictions (``PredictionBlend``); the combination then has mode
    ``"predictions"`` and the weights of the other parts apply to **every** model of the mix
    (the base remainder included): ``models(level)`` adds them to each call. Parts are kept in
    order; ``merging.patcher.combine`` pairs a combination with the union of the deltas.
    """

    kind = "combined"

    def __init__(self, parts: Sequence[Schedule | Mapping[str, Any]]) -> None:
        if isinstance(parts, (str, Mapping)) or not isinstance(parts, Sequence) or not parts:
            raise ScheduleError("Combined needs a non-empty list of schedules")
        self.parts: tuple[Schedule, ...] = tuple(Schedule.from_json(p) if isinstance(p, Mapping) else p for p in parts)
        seen: dict[str, int] = {}
        for i, part in enumerate(self.parts):
            if not isinstance(part, Schedule):
                raise ScheduleError(f"Combined: part {i} is a {type(part).__name__}, not a merging.schedule.Schedule")
            for name in part.names:
                if name in seen:
                    raise ScheduleError(f"Combined: delta {name!r} is used by part {seen[name]} and part {i}; the "
                                        "parts must name disjoint deltas")
                seen[name] = i
        mixing = [p for p in self.parts if p.mode == "predictions"]
        if len(mixing) > 1:
            raise ScheduleError("Combined: at most one part may mix predictions (PredictionBlend)")
        self._mixing = mixing[0] if mixing else None
        self.mode = "predictions" if mixing else "weights"  # type: ignore[misc]  # per instance

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for p in self.parts for n in p.names)

    def weights(self, noise_level: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in self.parts:
            out.update(part.weights(noise_level))
        return out

    def models(self, noise_level: float) -> list[tuple[dict[str, float], float]]:
        """Prediction mode: the mixing part's calls, each with the other parts' weights added."""
        if self._mixing is None:
            raise ScheduleError("Combined.models: no part mixes predictions; use weights(noise_level)")
        shared: dict[str, float] = {}
        for part in self.parts:
            if part is not self._mixing:
                shared.update(part.weights(noise_level))
        return [({**w, **shared}, mix) for w, mix in self._mixing.models(noise_level)]

    def _params(self) -> dict[str, Any]:
        return {"parts": [p.to_json() for p in self.parts]}


def reference_ed_schedule() -> HardSwitch:
    """The ED reference default: dynamics delta above t = 500 of 1000, control delta below."""
    return HardSwitch(high="dynamics", low="control", switch=0.5)
