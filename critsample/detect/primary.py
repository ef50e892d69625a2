"""The primary test of a detection, declared before the data, and the nonlocality windows as a function of radius.

A run makes one primary concurrence test (``DetectConfig.primary``: a symmetry-breaking probe, a nonlocality probe,
a radius r and a local denoiser); its outcome is the run's verdict (``summary["primary"]``,
``summary["concurrence"]["primary"]``) and every other pair is reported with ``role: "secondary"``. Everything the
primary test depends on is fixed by the config and the architecture, never by the measured curves:

* **Radius.** The nonlocality window is the one at the declared radius r (added to the probe's radii when missing),
  not "the largest radius probed" or "the smallest r >= 1", which change with the radii a run happened to probe.
  Beside it, d(r) = (symmetry-breaking center) - (nonlocality center at r) with its paired 95 % interval
  (``estimators.difference``) is reported for **every** probed radius (:func:`by_radius`), so no reported number
  depends on which other radii were probed.
* **Local denoiser** (:func:`resolve`). ``auto``: **strict** where the truncated (window) denoiser's receptive field
  covers the grid, depth x r >= grid - 1 (an L-layer network with radius-r attention reads L r tokens in every
  direction, so at such r the "local" window denoiser can read the whole image and its locality gap measures depth,
  not locality); **window** otherwise. Analytic oracles compute the strictly local score already (``strict_layout =
  "exact"``), so there the two are one computation. A model without a strict mode, or whose depth is unknown, keeps
  window, and the summary says so. The windowed scans have a window denoiser only. When the rule asks for strict and
  the run's ``--locality`` is ``window``, the locality gap computes the strict denoiser at the primary radius alone
  (``Detection.gap_strict_radii``), so the cost grows by one strict radius, not by all of them.
* **Local forward-backward** leaves the nonlocality family: the threshold of a local denoiser equals the global one
  at a covering radius by construction (and on dit-digits the r = 1 window denoiser already gives the global
  outcome for 83 % of images), so its location is a symmetry-breaking threshold of a handicapped denoiser, not an
  independent nonlocality window. What it says about locality is its **excess** over the global threshold,
  lambda_local(r) - lambda_global, reported per radius with its paired interval (``forward_backward_excess``).
"""

from __future__ import annotations

from . import estimators
from .estimators import Window


def depth(model) -> int | None:
    """Number of attention layers of a transformer denoiser (``transformer.config``: ``num_layers`` plus
    ``num_single_layers`` where present); None when unknown."""
    cfg = getattr(getattr(model, "transformer", None), "config", None)
    n = getattr(cfg, "num_layers", None) if cfg is not None else None
    if not isinstance(n, int):
        return None
    extra = getattr(cfg, "num_single_layers", 0)
    return n + (extra if isinstance(extra, int) else 0)


def resolve(primary, model, grid: int) -> dict:
    """The declared primary test with its local denoiser resolved by the rule of the module docstring:
    ``locality`` (window / strict), ``exact`` (True when strict and window are one computation), ``depth``,
    ``receptive_field_tokens`` (depth x r) and ``rule`` (a sentence for the summary)."""
    r, layout, L = int(primary.radius), getattr(model, "strict_layout", None), depth(model)
    covers = L is not None and L * r >= grid - 1
    out = {
        "symmetry_breaking": primary.symmetry_breaking,
        "nonlocality": primary.nonlocality,
        "radius": r,
        "locality_declared": primary.locality,
        "depth": L,
        "token_grid": grid,
        "receptive_field_tokens": L * r if L is not None else None,
        "exact": layout == "exact",
    }
    rule = (
        "auto: strict where the truncated (window) denoiser's receptive field covers the grid (depth x r >= grid "
        "- 1), window otherwise"
    )
    if primary.nonlocality == "window_locality":
        loc, why = "window", "the windowed scans have a window (truncated-attention) local denoiser only"
    elif layout == "exact":
        loc, why = "strict", "the model's local score reads only its radius-r window: strict and window are the same"
    elif primary.locality != "auto":
        loc, why = primary.locality, "declared in the config"
    elif layout is None:
        loc, why = "window", "the model has no strictly local mode"
    elif L is None:
        loc, why = "window", "the model's depth is unknown"
    else:
        loc = "strict" if covers else "window"
        why = (
            f"depth {L} x r {r} = {L * r} {'>=' if covers else '<'} grid - 1 = {grid - 1}: the truncated "
            f"denoiser's receptive field {'covers' if covers else 'does not cover'} the grid"
        )
    out.update(locality=loc, rule=f"{rule}; here {loc}: {why}")
    return out


def window_name(resolved: dict, cfg_locality: str) -> str:
    """Summary name of the primary nonlocality window (``locality_gap_strict`` when the strict window sits beside a
    window one)."""
    name = resolved["nonlocality"]
    if resolved["exact"] or name != "locality_gap":
        return name
    if resolved["locality"] == "strict":
        return name if cfg_locality == "strict" else f"{name}_strict"
    return f"{name} (window denoiser: not measured with --locality strict)" if cfg_locality == "strict" else name


def probed(radius: int, radii) -> int:
    """``radius`` (the primary radius) when it is among the probed ``radii``; it always is (``Detection`` adds it), so
    a miss is an internal error, never a silent read at another radius."""
    if int(radius) not in [int(r) for r in radii]:
        raise RuntimeError(f"Internal error: the primary radius {radius} is not among the probed radii {list(radii)}.")
    return int(radius)


def needs_strict_gaps(resolved: dict, cfg_locality: str) -> bool:
    """Whether the locality gap must compute the strict denoiser beyond what ``--locality`` asks for."""
    return (
        resolved["nonlocality"] == "locality_gap"
        and resolved["locality"] == "strict"
        and not resolved["exact"]
        and cfg_locality == "window"
    )


def _window_record(w: Window) -> dict:
    return {
        "log_snr_center": w.log_snr_center,
        "log_snr_uncertainty": w.log_snr_uncertainty,
        "t_center": w.center,
        "valid": w.valid,
        "reason": w.reason,
    }


def by_radius(sb: Window | None, windows: dict[int, Window], tolerance: float) -> list[dict]:
    """d(r) = sb - nonlocality(r) with its paired interval and three-outcome test, one row per probed radius (sorted);
    a row whose sides are not both valid has outcome "no window" and no d."""
    rows = []
    for r in sorted(windows):
        w = windows[r]
        test = estimators.concurrence(sb, w, tolerance)
        row = {"radius": int(r), "nonlocality_window": _window_record(w), "outcome": test["outcome"]}
        if "center_difference_log_snr" in test:
            row.update(
                d_log_snr=test["center_difference_log_snr"],
                d_ci95_log_snr=test["center_difference_ci95_log_snr"],
                d_sigma_log_snr=test["combined_uncertainty_log_snr"],
                pairing=test["uncertainty"].get("pairing"),
            )
        rows.append(row)
    return rows


def excess_by_radius(global_window: Window | None, windows: dict[int, Window]) -> list[dict]:
    """Local forward-backward's excess lambda_local(r) - lambda_global per radius, with its paired interval."""
    rows = []
    for r in sorted(windows):
        w = windows[r]
        row = {"radius": int(r), "local_threshold": _window_record(w)}
        if global_window is not None and global_window.valid and w.valid:
            diff = estimators.difference(w, global_window)
            row.update(
                excess_log_snr=diff["d"],
                excess_ci95_log_snr=diff["ci95"],
                excess_sigma_log_snr=diff["sigma"],
                uncertainty={k: v for k, v in diff["parts"].items()},
            )
        else:
            row.update(excess_log_snr=None, reason="the global or the local threshold is invalid")
        rows.append(row)
    return rows


def test(resolved: dict, windows: dict[str, Window], tolerance: float, cfg_locality: str) -> dict:
    """The primary concurrence test (``estimators.concurrence``) with its declaration; "no window" naming the probe
    when a side was not run."""
    sb = windows.get(resolved["symmetry_breaking"])
    name = window_name(resolved, cfg_locality)
    nl = windows.get(name)
    out = estimators.concurrence(sb, nl, tolerance)
    if sb is None or nl is None:
        missing = [p for p, w in ((resolved["symmetry_breaking"], sb), (name, nl)) if w is None]
        out["verdict"] = f"no window: the primary test's {' and '.join(missing)} was not measured (--probes)"
    out.update(role="primary", radius=resolved["radius"], locality=resolved["locality"], nonlocality=name)
    return out
