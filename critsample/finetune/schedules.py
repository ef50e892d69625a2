"""Locality-regularized schedules over diffusion time: attention radius r(t) and loss weight w(t).

The paper's conclusion: outside the critical window the score is local, so training may restrict attention there and
spend its signal near the window. Both schedules are plain data (dataclasses), so they appear in the logged config,
and both can be seeded from a ``summary.json`` of ``critsample detect``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GLOBAL_RADIUS = 1 << 20  # any radius >= grid size - 1 is global attention


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    t0, t1 = (float(v) for v in window)
    if not (0.0 <= t0 < t1 <= 1.0):
        raise ValueError(f"A window [t0, t1] needs 0 <= t0 < t1 <= 1; got [{t0}, {t1}].")
    return t0, t1


def window_from_summary(path: str | Path) -> tuple[float, float]:
    """The combined critical window [t0, t1] written by ``critsample detect`` into ``summary.json``."""
    summary = json.loads(Path(path).read_text())
    try:
        w = summary["critical_window"]
        return _check_window((w["t_start"], w["t_end"]))
    except KeyError as e:
        raise ValueError(f"{path} has no critical_window.t_start / t_end; is it a critsample summary.json?") from e


@dataclass
class RadiusSchedule:
    """Global attention inside ``window`` = [t0, t1], radius ``radius`` outside it.

    ``anneal_steps`` > 0 makes a curriculum: the outside radius shrinks linearly from global (at step 0) to ``radius``
    (at ``anneal_steps``), measured in Chebyshev radius on the token grid of size ``grid_size``.
    """

    window: tuple[float, float] = (0.3, 0.7)
    radius: int = 1
    anneal_steps: int = 0
    grid_size: int = 8
    summary: str | None = None  # a summary.json whose critical window replaces ``window``

    def __post_init__(self):
        if self.summary:
            self.window = window_from_summary(self.summary)
        self.window = _check_window(self.window)
        if self.radius < 0:
            raise ValueError(f"Radius must be >= 0; got {self.radius}.")

    def outside_radius(self, step: int) -> int:
        if self.anneal_steps <= 0 or step >= self.anneal_steps:
            return self.radius
        full = self.grid_size - 1
        return int(round(full + (self.radius - full) * step / self.anneal_steps))

    def radii(self, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        """(B,) long radii for times ``t``; GLOBAL_RADIUS inside the window."""
        t0, t1 = self.window
        inside = (t >= t0) & (t <= t1)
        r = torch.full(t.shape, self.outside_radius(step), dtype=torch.long)
        return torch.where(inside, torch.full_like(r, GLOBAL_RADIUS), r)


@dataclass
class LossWeighting:
    """w(t) = ``inside`` on the window, ``outside`` elsewhere, rescaled so that E_t[w] = 1 under uniform t."""

    window: tuple[float, float] = (0.3, 0.7)
    inside: float = 2.0
    outside: float = 1.0
    summary: str | None = None

    def __post_init__(self):
        if self.summary:
            self.window = window_from_summary(self.summary)
        self.window = _check_window(self.window)
        if self.inside < 0 or self.outside < 0 or self.inside + self.outside == 0:
            raise ValueError("Loss weights must be non-negative and not both zero.")

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        t0, t1 = self.window
        frac = t1 - t0
        mean = self.inside * frac + self.outside * (1 - frac)
        inside = (t >= t0) & (t <= t1)
        w = torch.where(inside, torch.tensor(self.inside, dtype=torch.float64), torch.tensor(self.outside, dtype=torch.float64))
        return w / mean
