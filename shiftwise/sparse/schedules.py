"""Density schedules and the prune-rate decay of dynamic sparse training.

A density schedule gives, for a training step, the fraction of its final sparsity a layer
has reached: every layer's density is ``d(t) = d_final + (1 - d_final) * remaining(t)`` with
``remaining`` going from 1 (dense) at ``start`` to 0 at ``end``:

* ``"constant"``: ``remaining = 0`` from step 0 (sparse from the start, as SLaK),
* ``"gradual"``: cubic, ``(1 - progress)^3`` (Zhu & Gupta 2017),
* ``"linear"``: ``1 - progress``.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "gradual", "linear")


def check_density(density: float, name: str = "density") -> float:
    """``density`` as a float in ``(0, 1]``, else ``ValueError`` saying so."""
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < d <= 1.0 or math.isnan(d):
        raise ValueError(f"{name} must be in (0, 1] (the fraction of tiles kept), got {density!r}")
    return d


class DensitySchedule:
    """How far from dense each layer is at a step (see the module docs).

    Args:
        kind: ``"constant"``, ``"gradual"`` or ``"linear"``.
        start, end: steps where the move from dense to the target begins and ends
            (ignored by ``"constant"``); ``0 <= start < end``.

    Example::

        >>> s = DensitySchedule("gradual", start=0, end=100)
        >>> s.remaining(0), s.remaining(50), s.remaining(100)
        (1.0, 0.125, 0.0)
    """

    def __init__(self, kind: str = "constant", start: int = 0, end: int = 0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown density schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        self.kind = kind
        self.start, self.end = int(start), int(end)
        if kind != "constant" and not 0 <= self.start < self.end:
            raise ValueError(f"schedule {kind!r} needs 0 <= start < end, got start={start}, end={end}")

    def remaining(self, step: int) -> float:
        """1 while dense, 0 once the target density is reached."""
        if self.kind == "constant" or step >= self.end:
            return 0.0
        if step <= self.start:
            return 1.0
        left = 1.0 - (step - self.start) / (self.end - self.start)
        return left ** 3 if self.kind == "gradual" else left

    def density(self, final: float, step: int) -> float:
        """A layer's density at ``step`` when its target is ``final``."""
        return final + (1.0 - final) * self.remaining(step)

    def __repr__(self) -> str:
        span = "" if self.kind == "constant" else f", start={self.start}, end={self.end}"
        return f"DensitySchedule({self.kind!r}{span})"


def cosine_prune_rate(step: int, total: int, initial: float, floor: float) -> float:
    """Prune fraction at ``step``: cosine from ``initial`` at 0 to ``floor`` at ``total`` (as SLaK)."""
    if total <= 0:
        return floor
    progress = min(max(step / total, 0.0), 1.0)
    return floor + 0.5 * (initial - floor) * (1.0 + math.cos(math.pi * progress))
