"""Locality-regularized schedules over diffusion time: attention radius r(t) and loss weight w(t).

The paper's conclusion: outside the critical window the score is local, so training may restrict attention there and
spend its signal near the window. Both schedules are plain data (dataclasses), so they appear in the logged config
(``critsample fit --print_config``, the run's ``config.yaml``, the W&B run config), and both can be seeded from a
``summary.json`` of ``critsample detect`` (its ``critical_window`` replaces ``window``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import summary
from ..attention import check_radius
from ..errors import UserError
from ..options import TimeWindow, global_radius

GLOBAL_RADIUS = 1 << 20  # any radius >= grid size - 1 is global attention


def _check_window(window) -> tuple[float, float]:
    return tuple(TimeWindow.parse(window))


def window_from_summary(path: str | Path) -> tuple[float, float]:
    """The combined critical window [t0, t1] written by ``critsample detect`` into ``summary.json``."""
    return tuple(summary.critical_window(summary.read(path), path))


def _inside(t: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    return TimeWindow(*window).contains(t)


@dataclass
class RadiusSchedule:
    """Global attention inside ``window`` = [t0, t1], Chebyshev radius ``radius`` on the token grid outside it.

    ``anneal_steps`` > 0 makes a curriculum: the outside radius shrinks linearly from global (grid size - 1, at step
    0) to ``radius`` (at ``anneal_steps``). ``local_prob`` < 1 trains only that fraction of the outside samples with
    the local radius and the rest globally, so the global model stays trained at every t (full guidance keeps working).
    """

    window: tuple[float, float] = (0.3, 0.7)
    radius: int = 1
    anneal_steps: int = 0
    local_prob: float = 1.0
    grid_size: int | None = None  # max(h, w) of the token grid; None = the model's own (set by the training module)
    summary: str | None = None  # a summary.json whose critical window replaces ``window``

    def __post_init__(self):
        if self.summary:
            self.window = window_from_summary(self.summary)
        self.window = _check_window(self.window)
        check_radius(self.radius, (0, 0))  # an integer >= 0; the training module checks it against its token grid
        if self.anneal_steps < 0:
            raise UserError(f"anneal_steps must be >= 0 (0 = no curriculum); got {self.anneal_steps}.")
        if not 0.0 <= self.local_prob <= 1.0:
            raise UserError(f"local_prob is a probability in [0, 1]; got {self.local_prob}.")

    def outside_radius(self, step: int, grid_size: int | None = None) -> int:
        """Radius outside the window at optimizer step ``step``: linear from grid_size - 1 to ``radius``."""
        if self.anneal_steps <= 0 or step >= self.anneal_steps:
            return self.radius
        n = grid_size or self.grid_size
        if n is None:
            raise UserError("A radius curriculum (anneal_steps > 0) needs the token grid size; set grid_size.")
        full = global_radius(n)
        return int(round(full + (self.radius - full) * step / self.anneal_steps))

    def radii(self, t: torch.Tensor, step: int = 0, grid_size: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) long radii for times ``t`` (B,); ``GLOBAL_RADIUS`` inside the window (and for the outside samples
        that ``local_prob`` leaves global)."""
        local = ~_inside(t, self.window)
        if self.local_prob < 1.0:
            local &= torch.rand(t.shape, generator=generator) < self.local_prob
        r = torch.full(t.shape, self.outside_radius(step, grid_size), dtype=torch.long)
        return torch.where(local, r, torch.full_like(r, GLOBAL_RADIUS))


def _import(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    module, _, name = path.replace(":", ".").rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"Cannot import the loss weighting function {path!r}; give "
                        "'package.module.function'.") from None
    if not callable(fn):
        raise UserError(f"{path!r} is not callable; a loss weighting function maps t (B,) float64 to weights (B,).")
    return fn


@dataclass
class LossWeighting:
    """w(t), rescaled so that its mean under uniform t in [0, 1] is 1 (the loss keeps its scale, only moves).

    Default: ``inside`` on ``window``, ``outside`` elsewhere. ``function``: the import path of any w(t) instead
    ("package.module.function", t (B,) float64 in [0, 1] -> (B,) non-negative), normalised numerically.
    """

    window: tuple[float, float] = (0.3, 0.7)
    inside: float = 2.0
    outside: float = 1.0
    function: str | None = None
    summary: str | None = None  # a summary.json whose critical window replaces ``window``

    def __post_init__(self):
        if self.summary:
            self.window = window_from_summary(self.summary)
        self.window = _check_window(self.window)
        if self.inside < 0 or self.outside < 0 or self.inside + self.outside == 0:
            raise UserError(f"Loss weights must be non-negative and not both zero; got inside={self.inside}, "
                            f"outside={self.outside}.")
        self._fn = _import(self.function) if self.function else None
        self._mean = self._raw_mean()

    def _raw(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        if self._fn is not None:
            return torch.as_tensor(self._fn(t), dtype=torch.float64).expand(t.shape)
        return torch.where(_inside(t, self.window), self.inside, self.outside).double()

    def _raw_mean(self) -> float:
        if self._fn is None:  # exact: E_t[w] = inside * |window| + outside * (1 - |window|)
            frac = self.window[1] - self.window[0]
            return self.inside * frac + self.outside * (1 - frac)
        n = 100_000
        w = self._raw((torch.arange(n, dtype=torch.float64) + 0.5) / n)  # midpoint rule on [0, 1]
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.mean()) <= 0:
            raise UserError(f"The loss weighting {self.function!r} must be finite, non-negative and not zero on [0, "
                            "1].")
        return float(w.mean())

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float64 weights for times ``t`` (B,)."""
        return self._raw(t) / self._mean
