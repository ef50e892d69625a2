"""Time and noise-level conventions, and conversions between the four forms of one prediction.

One user-facing time ``t`` in [0, 1] (0 = clean data, 1 = pure noise) for every model:

* DDPM (DiT, dit-digits, 1000 discrete steps): ``t = k / 1000``, ``x_t = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps``.
  A ``t`` between two steps is rounded to the nearest step ``k`` (the model was only trained there).
* Flow matching (SD3): ``t = sigma``, ``x_t = (1 - sigma) x_0 + sigma eps``; the model's timestep is ``1000 sigma``.

Two kinds of maps, kept apart on purpose:

* **The noise level the network sees** (:meth:`Schedule.native`, :meth:`Schedule.snap`, :meth:`Schedule.alpha_sigma`,
  :meth:`Schedule.alpha_bar`, :meth:`Schedule.ou_time`): a DDPM model is only defined at its 1000 steps, so a ``t``
  between two steps is rounded to the nearest one. ``alpha_bar`` is the variance-preserving signal fraction and
  ``s = -1/2 log(alpha_bar)`` the Ornstein-Uhlenbeck time of the analytic oracles
  (OU process ``x_s = e^{-s} x_0 + sqrt(1 - e^{-2s}) z``).
* **The log-SNR axis for reporting and comparing models** (:meth:`Schedule.log_snr`, its inverse
  :meth:`Schedule.t_from_log_snr`, :meth:`Schedule.log_snr_slope`): one continuous, monotone convention.
  ``log_snr = log(alpha^2 / sigma^2)`` in nats, decreasing in t; DDPM: linear in t between the steps (equal to the
  network's value at every step; constant above the last step), flow matching: analytic, with t clamped to
  [1e-4, 1 - 1e-4] so both ends stay finite. Windows, their centers and uncertainties are computed on this axis;
  nothing else in the package converts between t and log-SNR.

Predictions (all tensors shaped like ``x``) with ``x = alpha x0 + sigma eps``:
``eps``; ``x0``; ``score = -eps / sigma`` (DESIGN.md); ``velocity = eps - x0`` (the flow-matching target of SD3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import UserError

Kind = Literal["eps", "x0", "score", "velocity"]
KINDS: tuple[str, ...] = ("eps", "x0", "score", "velocity")
_FLOW_EPS = 1e-4  # flow-matching t is clamped to [eps, 1 - eps] in log-SNR so both ends stay finite
_INVERSE_POINTS = 20001  # t grid of the log-SNR inverse (exact between DDPM steps: every 20th point is a step)


@dataclass(frozen=True)
class Schedule:
    """A noise schedule: maps user time ``t`` to (alpha, sigma) and to the model's native timestep."""

    kind: Literal["ddpm", "flow"] = "ddpm"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    @classmethod
    def from_scheduler_config(cls, config) -> "Schedule":
        """Build from a diffusers scheduler config (DDPM/DDIM/DPM-Solver family or FlowMatchEuler)."""
        name = config.get("_class_name", "") if hasattr(config, "get") else ""
        if "FlowMatch" in name or config.get("prediction_type", "") == "flow_prediction":
            return cls(kind="flow", num_train_timesteps=int(config.get("num_train_timesteps", 1000)))
        return cls(
            kind="ddpm",
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config.get("beta_schedule", "linear")),
        )

    # -- discrete DDPM table -------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 ``alpha_bar_k`` of the DDPM chain, as diffusers' DDPMScheduler computes it."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2
        elif self.beta_schedule == "squaredcos_cap_v2":
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
        else:
            raise UserError(f"Unsupported beta_schedule {self.beta_schedule!r}; use linear, scaled_linear or "
                            "squaredcos_cap_v2.")
        return torch.cumprod(1.0 - betas, dim=0)

    # -- time maps -----------------------------------------------------------------------------
    def native(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is called with: DDPM step ``k = round(t T)`` (long), flow ``1000 sigma`` (float)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "ddpm":
            return (t * self.num_train_timesteps).round().clamp(0, self.num_train_timesteps - 1).long()
        return t * self.num_train_timesteps

    def snap(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` moved to the nearest time the model is defined at (DDPM grid; identity for flow)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "ddpm":
            return self.native(t).double() / self.num_train_timesteps
        return t.clamp(0.0, 1.0)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 ``(alpha, sigma)`` with ``x_t = alpha x_0 + sigma eps``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "ddpm":
            abar = self.alphas_cumprod()[self.native(t)]
            return abar.sqrt(), (1.0 - abar).sqrt()
        t = t.clamp(0.0, 1.0)
        return 1.0 - t, t

    def log_snr(self, t) -> torch.Tensor:
        """Continuous float64 ``log(alpha^2 / sigma^2)`` (nats) of ``t`` (module docstring: linear between DDPM
        steps)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            tc = t.clamp(_FLOW_EPS, 1 - _FLOW_EPS)
            return 2.0 * (torch.log1p(-tc) - tc.log())
        grid, lam = self._log_snr_table()
        return torch.from_numpy(np.asarray(np.interp(t.detach().cpu().numpy(), grid, lam))).reshape(t.shape)

    def t_from_log_snr(self, log_snr) -> torch.Tensor:
        """Inverse of :meth:`log_snr`: the t in [0, 1] with that log-SNR (monotone; ends clamp to 0 and 1)."""
        lam = torch.as_tensor(log_snr, dtype=torch.float64)
        grid = np.linspace(0.0, 1.0, _INVERSE_POINTS)
        lg = self.log_snr(torch.from_numpy(grid)).numpy()
        # -lambda increases with t
        return torch.from_numpy(np.asarray(np.interp(-lam.detach().cpu().numpy(), -lg, grid))).reshape(lam.shape)

    def log_snr_slope(self, t: float, h: float = 1e-3) -> float:
        """|d log_snr / dt| at ``t`` (central difference, one-sided at the ends): maps a t-uncertainty to nats."""
        lo, hi = max(float(t) - h, 0.0), min(float(t) + h, 1.0)
        return abs(float(self.log_snr(hi) - self.log_snr(lo))) / (hi - lo)

    def alpha_bar(self, t) -> torch.Tensor:
        """Variance-preserving signal fraction ``alpha^2 / (alpha^2 + sigma^2)`` the network sees at ``t`` (snapped)."""
        a, s = self.alpha_sigma(t)
        return a**2 / (a**2 + s**2)

    def ou_time(self, t) -> torch.Tensor:
        """Ornstein-Uhlenbeck time ``s = -1/2 log(alpha_bar)`` (alpha_bar = e^{-2s}) the network sees at ``t``."""
        return -0.5 * self.alpha_bar(t).log()

    def _log_snr_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(t_k, log_snr_k) at the DDPM steps k = 0..T-1, t_k = k / T."""
        T = self.num_train_timesteps
        a, s = self.alpha_sigma(torch.arange(T, dtype=torch.float64) / T)
        return np.arange(T) / T, (2.0 * (a.log() - s.log())).numpy()

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = alpha x0 + sigma eps`` (float64 coefficients, result in x0's dtype)."""
        a, s = (_bcast(c, x0) for c in self.alpha_sigma(t.to(x0.device) if torch.is_tensor(t) else t))
        return (a * x0.double() + s * noise.double()).to(x0.dtype)


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(c, dtype=torch.float64, device=x.device)
    if c.ndim == 0:
        return c
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def convert(pred: torch.Tensor, src: Kind, dst: Kind, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Convert a prediction of kind ``src`` into kind ``dst`` at state ``x = alpha x0 + sigma eps``.

    ``alpha`` and ``sigma`` are scalars or (B,) tensors. Computed in the prediction's dtype
    (the coefficients are float64 and cast once).
    """
    if src not in KINDS or dst not in KINDS:
        raise ValueError(f"Prediction kinds are {KINDS}; got {src!r} -> {dst!r}.")
    if src == dst:
        return pred
    a = _bcast(alpha, x).to(pred.dtype)
    s = _bcast(sigma, x).to(pred.dtype)
    if src == "eps":
        eps = pred
    elif src == "score":
        eps = -s * pred
    elif src == "x0":
        eps = (x - a * pred) / s
    else:  # velocity v = eps - x0  =>  x0 = (x - sigma v) / (alpha + sigma)
        x0 = (x - s * pred) / (a + s)
        if dst == "x0":
            return x0
        eps = pred + x0
    if dst == "eps":
        return eps
    if dst == "score":
        return -eps / s
    x0 = (x - s * eps) / a
    if dst == "x0":
        return x0
    return eps - x0
