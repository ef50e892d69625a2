"""Integrated probes: windowed conditioning and windowed locality scans (paper secs. 3.4-3.5, App. C.4).

A window W = [t0, min(t0 + w, 1)] (critsample time: 0 = clean, 1 = noise) is slid over t0; every position is a
:class:`~critsample.sampling.Plan` whose step at time t depends only on whether t lies in W:

* windowed conditioning, ``cond_in``:  conditioning (guided(w), or plain cond if w = 1) inside W, unconditional outside;
  ``cond_out``: the complement (conditioning only outside W). Global attention throughout.
* windowed locality, ``loc_in``:  global conditional inside W, local(r) unconditional outside;
  ``loc_out``: the reverse (local(r) unconditional inside W, global conditional outside). These switch conditioning
  and attention together (the paper's design), so they also re-measure the conditioning window.
* conditioning-fixed windowed locality, ``loccond_in``: global conditional inside W, local(r) *conditional* outside;
  ``loccond_out``: the reverse. Conditioning is on everywhere, so only the attention changes with the window.
* ``baseline``: always conditioned (guided, global): the reference of the FID and the floor of the error.

Samples are scored by classifier error against the class they were conditioned on and by FID to the
always-conditioned baseline (metrics.py); the scans' minima locate the critical window (``detect.estimators``).
"""

from __future__ import annotations

from ..denoisers import Denoiser
from ..errors import UserError
from ..sampling import Plan, Step

SCANS = ("cond_in", "cond_out", "loc_in", "loc_out", "loccond_in", "loccond_out")


def check_window(t0: float, width: float) -> None:
    if not (0.0 < float(width) <= 1.0):
        raise UserError(f"A window width must lie in (0, 1] (t: 0 = clean, 1 = noise); got {width}.")
    if not (0.0 <= float(t0) < 1.0):
        raise UserError(f"A window start t0 must lie in [0, 1) (t: 0 = clean, 1 = noise); got {t0}.")


def window_bounds(t0: float, width: float) -> tuple[float, float]:
    """[t0, min(t0 + w, 1)]: windows reaching past the noisy end are truncated (App. C.4)."""
    check_window(t0, width)
    return float(t0), min(float(t0) + float(width), 1.0)


def window_plan(
    denoiser: Denoiser, steps: int, scan: str, t0: float, width: float, *, guidance: float, radius: int | None = None,
    sampler: str = "auto",
) -> Plan:
    """The plan of one scan position (see the module docstring for ``scan``)."""
    lo, hi = window_bounds(t0, width)
    inside_window = lambda t: lo <= t <= hi  # noqa: E731
    if scan == "cond_in":
        rule = lambda t: Step.conditional(guidance) if inside_window(t) else Step("uncond")  # noqa: E731
    elif scan == "cond_out":
        rule = lambda t: Step("uncond") if inside_window(t) else Step.conditional(guidance)  # noqa: E731
    elif scan == "loc_in":
        rule = lambda t: Step.conditional(guidance) if inside_window(t) else Step("uncond", radius)  # noqa: E731
    elif scan == "loc_out":
        rule = lambda t: Step("uncond", radius) if inside_window(t) else Step.conditional(guidance)  # noqa: E731
    elif scan == "loccond_in":
        rule = lambda t: Step.conditional(guidance) if inside_window(t) else Step("cond", radius)  # noqa: E731
    elif scan == "loccond_out":
        rule = lambda t: Step("cond", radius) if inside_window(t) else Step.conditional(guidance)  # noqa: E731
    else:
        raise ValueError(f"Unknown scan {scan!r}; use one of {SCANS}.")
    return Plan.from_rule(denoiser, steps, rule, sampler,
                          name=f"{scan}[{lo:g},{hi:g}]" + (f"(r={radius})" if radius is not None else ""))


def baseline_plan(denoiser: Denoiser, steps: int, *, guidance: float, sampler: str = "auto") -> Plan:
    return Plan.from_rule(denoiser, steps, lambda t: Step.conditional(guidance), sampler,
                          name=f"baseline(w={guidance:g})")
