"""Plans as data: full guidance, limited-interval guidance, and the adaptive plan built from a critical window.

* full guidance: guided global denoiser at every step (two forwards per step; one when w = 1).
* limited-interval guidance (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality"): guided global inside an interval, conditional global (one forward) outside.
* adaptive (this paper, sec. 5): guided global inside the critical window; outside it, by choice, local
  conditional (the default), local unconditional (the paper's), or global unconditional; with an attention window,
  the outside steps inside it keep global attention. ``critsample.certify`` chooses among these.

The default outside mode is decided by measurement (``bench/adaptive.py``, README "Adaptive sampling"): local-cond
and local-uncond cost the same (one forward with window attention per outside step), and on dit-digits, in the race
on fresh noise at the certified window (25 steps, 600 samples), local-cond kept full guidance's class accuracy
(drop 0.00 points) where local-uncond lost 3.3 +- 0.8 points and raised FD by 31 %; in the search local-uncond failed
the 1-point tolerance at every window tried.
"""

from __future__ import annotations

from .attention import check_radius
from .denoisers import Denoiser
from .errors import UserError
from .options import TimeWindow
from .outside import NETWORK, check_kind, takes_radius
from .sampling import Plan, Step

OUTSIDE = ("local-cond", "local-uncond", "global-uncond")
DEFAULT_OUTSIDE = "local-cond"  # measured, see the module docstring


def full_guidance(denoiser: Denoiser, steps: int, guidance: float, sampler: str = "auto") -> Plan:
    return Plan.from_rule(denoiser, steps, lambda t: Step.conditional(guidance), sampler, name=f"full(w={guidance:g})")


def interval_guidance(denoiser: Denoiser, steps: int, guidance: float, interval, sampler: str = "auto") -> Plan:
    t0, t1 = win = TimeWindow.parse(interval)

    def rule(t: float) -> Step:
        return Step.conditional(guidance) if t in win else Step("cond")

    return Plan.from_rule(denoiser, steps, rule, sampler, name=f"interval[{t0:g},{t1:g}](w={guidance:g})")


def adaptive(
    denoiser: Denoiser,
    steps: int,
    guidance: float,
    window,
    radius: int,
    outside: str = DEFAULT_OUTSIDE,
    sampler: str = "auto",
    attention=None,
    kinds: tuple[str, str] = (NETWORK, NETWORK),
) -> Plan:
    """Guided global inside ``window``; ``outside`` elsewhere (local-cond, local-uncond or global-uncond).

    ``attention`` (optional t0:t1, the attention window): steps outside the guidance window but inside it keep global
    attention with the outside conditioning (one forward); local attention is used only outside both windows.
    ``kinds`` (high-noise side t > t1, low-noise side t < t0): the denoiser of the outside steps on each side,
    ``network`` (the model with its window) or an outside kind of :mod:`critsample.outside` (gaussian, local-linear,
    student), with the outside mode's conditioning; a kind without a radius (gaussian) runs globally."""
    t0, t1 = guided = TimeWindow.parse(window)
    a0, a1 = att_window = TimeWindow.parse(attention) if attention is not None else guided
    if outside not in OUTSIDE:
        raise UserError(f"--outside must be one of {', '.join(OUTSIDE)}; got {outside!r}.")
    high, low = (check_kind(k, "kinds") for k in kinds)
    r = None if outside == "global-uncond" else radius
    if r is None and outside != "global-uncond" and (takes_radius(high) or takes_radius(low)):
        raise UserError(f"An adaptive plan with outside={outside} needs a local radius (the summary suggested none); "
                        "give one.")
    check_radius(r, denoiser.token_grid, bound="grid", model=denoiser.name)
    mode = "cond" if outside == "local-cond" else "uncond"
    out_global = Step(mode, None, 1.0)
    if r is None and any(k != NETWORK and takes_radius(k) for k in (high, low)):
        raise UserError(f"The outside kinds {high}/{low} read a radius-r window; give a local radius "
                        f"(outside={outside} has none).")
    sides = {k: Step(mode, r if takes_radius(k) else None, 1.0, k) for k in (high, low)}

    def rule(t: float) -> Step:
        if t in guided:
            return Step.conditional(guidance)
        return out_global if t in att_window else sides[high if t > t1 else low]

    att = f", attention[{a0:g},{a1:g}]" if attention is not None and r is not None else ""
    name = f"adaptive[{t0:g},{t1:g}](w={guidance:g}, outside={outside}" + (f", r={r}{att}" if r is not None else "")
    name += ")" if (high, low) == (NETWORK, NETWORK) else f", kinds={high}/{low})"
    return Plan.from_rule(denoiser, steps, rule, sampler, name=name)
