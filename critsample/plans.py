"""Plans as data: full guidance, limited-interval guidance, and the adaptive plan built from a critical window.

* full guidance: guided global denoiser at every step (two forwards per step).
* limited-interval guidance (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality"): guided global inside an interval, conditional global (one forward) outside.
* adaptive (this paper, sec. 5): guided global inside the critical window; outside it, by choice, local
  unconditional (default: one forward with window attention), local conditional, or global unconditional.
"""

from __future__ import annotations

import json
from pathlib import Path

from .denoisers import Denoiser
from .errors import UserError
from .sampling import Plan, Step

OUTSIDE = ("local-uncond", "local-cond", "global-uncond")


def parse_window(text: str | tuple[float, float]) -> tuple[float, float]:
    """'t0:t1' (critsample time, 0 = clean, 1 = noise) -> (t0, t1), checked to lie in [0, 1] and be non-empty."""
    try:
        t0, t1 = (float(v) for v in (text.split(":") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise UserError(f"A window is written t0:t1 with numbers in [0, 1], e.g. 0.3:0.6; got {text!r}.") from None
    if not (0.0 <= t0 < t1 <= 1.0):
        raise UserError(f"A window [t0, t1] needs 0 <= t0 < t1 <= 1 (t: 0 = clean, 1 = noise); got [{t0}, {t1}].")
    return t0, t1


def check_plan_radius(denoiser: Denoiser, radius: int | None) -> None:
    """A local radius must lie in [0, max(h, w) - 1] of the model's token grid (max(h, w) - 1 is already global)."""
    if radius is None:
        return
    c, hh, ww = denoiser.sample_shape[-3:]
    h, w = hh // denoiser.patch_size, ww // denoiser.patch_size
    if not isinstance(radius, int) or radius < 0 or radius > max(h, w) - 1:
        raise UserError(f"Radius {radius} does not fit {denoiser.name}'s {h}x{w} token grid; use 0..{max(h, w) - 1} (omit it for global attention).")


def read_summary(path: str | Path, denoiser: Denoiser | None = None) -> dict:
    """The ``summary.json`` of ``critsample detect``; refuses a summary of another model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"No summary at {path}; run `critsample detect --model ... --out DIR` first and pass DIR/summary.json.")
    try:
        summary = json.loads(path.read_text())
        window = summary["critical_window"]
        parse_window((window["t_start"], window["t_end"]))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(
            f"{path} has no critical_window.t_start / t_end: none was detected, or it is not a critsample summary; "
            "give an explicit window."
        ) from None
    if denoiser is not None and summary.get("model") not in (None, denoiser.name):
        raise UserError(f"{path} was measured on {summary.get('model')!r}, not on {denoiser.name!r}; detect the window of this model first.")
    return summary


def full_guidance(denoiser: Denoiser, steps: int, guidance: float, sampler: str = "auto") -> Plan:
    return Plan.from_rule(denoiser, steps, lambda t: Step("guided", None, guidance), sampler, name=f"full(w={guidance:g})")


def interval_guidance(denoiser: Denoiser, steps: int, guidance: float, interval, sampler: str = "auto") -> Plan:
    t0, t1 = parse_window(interval)

    def rule(t: float) -> Step:
        return Step("guided", None, guidance) if t0 <= t <= t1 else Step("cond", None, 1.0)

    return Plan.from_rule(denoiser, steps, rule, sampler, name=f"interval[{t0:g},{t1:g}](w={guidance:g})")


def adaptive(
    denoiser: Denoiser,
    steps: int,
    guidance: float,
    window,
    radius: int,
    outside: str = "local-uncond",
    sampler: str = "auto",
) -> Plan:
    """Guided global inside ``window``; ``outside`` elsewhere (local-uncond, local-cond or global-uncond)."""
    t0, t1 = parse_window(window)
    if outside not in OUTSIDE:
        raise UserError(f"--outside must be one of {', '.join(OUTSIDE)}; got {outside!r}.")
    r = None if outside == "global-uncond" else radius
    check_plan_radius(denoiser, r)
    out_step = Step("cond" if outside == "local-cond" else "uncond", r, 1.0)

    def rule(t: float) -> Step:
        return Step("guided", None, guidance) if t0 <= t <= t1 else out_step

    name = f"adaptive[{t0:g},{t1:g}](w={guidance:g}, outside={outside}" + (f", r={r})" if r is not None else ")")
    return Plan.from_rule(denoiser, steps, rule, sampler, name=name)
