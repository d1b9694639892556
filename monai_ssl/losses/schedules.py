"""Loss-weight schedules: callables ``(iteration, max_iterations) -> weight`` (iteration counts from 0)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["WeightSchedule", "ConstantWeight", "GaussianRampUp", "LinearSchedule", "WarmupWeight", "as_schedule"]

WeightSchedule = Callable[[int, int], float]


class ConstantWeight:
    """The same weight at every iteration."""

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def __call__(self, iteration: int, max_iterations: int) -> float:
        return self.weight

    def __repr__(self) -> str:
        return f"ConstantWeight({self.weight})"


class GaussianRampUp:
    """``w(i) = max_weight * exp(-5 * (1 - i/T)^2)`` for ``i < T``, then ``max_weight`` (Laine & Aila ramp-up).

    ``T`` is ``ramp_iterations``, or ``ramp_fraction * max_iterations`` when that is not given (default: the
    whole run, as in the cross-teaching thesis).
    """

    def __init__(self, max_weight: float = 0.1, ramp_iterations: int | None = None, ramp_fraction: float = 1.0):
        self.max_weight, self.ramp_iterations, self.ramp_fraction = float(max_weight), ramp_iterations, ramp_fraction

    def __call__(self, iteration: int, max_iterations: int) -> float:
        ramp = self.ramp_iterations if self.ramp_iterations is not None else self.ramp_fraction * max_iterations
        if ramp <= 0:
            return self.max_weight
        t = min(max(iteration / ramp, 0.0), 1.0)
        return self.max_weight * math.exp(-5.0 * (1.0 - t) ** 2)

    def __repr__(self) -> str:
        return f"GaussianRampUp(max_weight={self.max_weight}, ramp_iterations={self.ramp_iterations})"


class LinearSchedule:
    """Linear interpolation from ``start`` at iteration 0 to ``end`` at ``max_iterations`` (e.g. MCSCv2's beta)."""

    def __init__(self, start: float, end: float):
        self.start, self.end = float(start), float(end)

    def __call__(self, iteration: int, max_iterations: int) -> float:
        t = min(max(iteration / max(max_iterations, 1), 0.0), 1.0)
        return self.start + (self.end - self.start) * t

    def __repr__(self) -> str:
        return f"LinearSchedule({self.start} -> {self.end})"


class WarmupWeight:
    """``weight`` for the first iterations, then 0: a term used only as a warm-up (e.g. contrastive pretraining).

    The warm-up lasts ``warmup_iterations``, or ``warmup_fraction * max_iterations`` when that is not given.
    """

    def __init__(self, weight: float = 1.0, warmup_iterations: int | None = None, warmup_fraction: float = 0.2):
        self.weight, self.warmup_iterations, self.warmup_fraction = float(weight), warmup_iterations, warmup_fraction

    def __call__(self, iteration: int, max_iterations: int) -> float:
        end = self.warmup_iterations if self.warmup_iterations is not None else self.warmup_fraction * max_iterations
        return self.weight if iteration < end else 0.0

    def __repr__(self) -> str:
        return f"WarmupWeight({self.weight}, warmup_iterations={self.warmup_iterations})"


def as_schedule(weight: float | WeightSchedule) -> WeightSchedule:
    """Numbers become :class:`ConstantWeight`; callables are used as they are."""
    return weight if callable(weight) else ConstantWeight(weight)
