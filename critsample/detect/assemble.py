"""Assembling a detection: the probes' outputs -> family windows, concurrence, the combined critical window, the
suggested radius, ``summary.json`` (``summary.py``), ``config.yaml``, the report (``report.py``) and W&B
(``tracking.py``). Rank 0 only; every number comes from the stored units, so a resumed run writes exactly what an
uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from .. import summary as summary_io
from ..report import write_detect_report
from ..store import atomic_write
from ..summary import LOG_SNR_CONVENTION, T_CONVENTION
from ..tracking import log_detect
from . import estimators, primary
from .context import Detection
from .estimators import Window
from .protocol import ProbeOutput

# Secondary pairs of one symmetry-breaking and one nonlocality window that measure the same thing two ways (the
# primary pair is declared in the config: detect.primary). Local forward-backward is not a nonlocality window: it
# enters as its excess over the global threshold (``forward_backward_excess``).
PAIRS = (("instantaneous", "cond_gap", "locality_gap"),
         ("windowed", "window_cond", "window_locality"))
# With --locality both (or strict at the primary radius): the strictly local denoiser's locality gap, tested beside
# the window one (never combined into the critical window, which stays the paper's truncated-attention one).
STRICT_PAIRS = (("instantaneous_strict", "cond_gap", "locality_gap_strict"),)


def _is_strict_extra(name: str) -> bool:
    return name.endswith("_strict")


def family_windows(windows: dict[str, Window], family: str) -> list[Window]:
    """The windows of ``family``, without the ``*_strict`` ones that sit beside a window one (``--locality both``)."""
    return [w for name, w in windows.items() if w.family == family and not _is_strict_extra(name)]


def strict_concurrence(windows: dict[str, Window], schedule, tolerance: float, conc: dict,
                       w_sb: Window | None) -> Window | None:
    """With ``--locality both``: the strict pairs' tests and ``overall_strict`` into ``conc``; returns the strict
    nonlocality window (the strict windows, and the windowed scan's, which has no strict version)."""
    strict = {name: w for name, w in windows.items() if _is_strict_extra(name) and w.family == "nonlocality"}
    if not strict:
        return None
    for pair, a, b in STRICT_PAIRS:
        if a in windows and b in windows:
            conc[pair] = estimators.concurrence(windows[a], windows[b], tolerance)
    replaced = {name[: -len("_strict")] for name in strict}
    nl = [w for name,
          w in windows.items() if w.family == "nonlocality" and not _is_strict_extra(name) and name not in replaced]
    w_nl = estimators.combine(list(strict.values()) + nl, schedule, "nonlocality")
    if w_sb is not None and w_nl is not None:
        conc["overall_strict"] = estimators.concurrence(w_sb, w_nl, tolerance)
    return w_nl


def concurrence(windows: dict[str, Window], schedule, tolerance: float, probes_run: list[str]) -> tuple[
    dict, Window | None, Window | None, Window | None]:
    """Per-pair and overall three-outcome tests (``estimators.concurrence``), the two family windows and the combined
    critical window. A pair whose probes both ran is always reported ("no window" when a side is invalid)."""
    conc = {}
    ran = set(probes_run)
    for pair, a, b in PAIRS:
        if a in ran and b in ran:
            conc[pair] = estimators.concurrence(windows.get(a), windows.get(b), tolerance)
    sb, nl = family_windows(windows, "symmetry_breaking"), family_windows(windows, "nonlocality")
    w_sb, w_nl = estimators.combine(sb, schedule, "symmetry_breaking"), estimators.combine(nl, schedule, "nonlocality")
    if sb and nl:
        conc["overall"] = estimators.concurrence(w_sb, w_nl, tolerance)
    return conc, w_sb, w_nl, estimators.combine(sb + nl, schedule)


def suggested_radius(det: Detection, probes: dict) -> int | None:
    """The smallest radius that is good enough outside the critical window, for ``critsample sample --adaptive``
    (:func:`radius_suggestion` without its reason)."""
    return radius_suggestion(det, probes)[0]


def radius_suggestion(det: Detection, probes: dict) -> tuple[int | None, str]:
    """(radius, reason): the smallest radius that is good enough outside the critical window, for ``critsample sample
    --adaptive``, and why there is none.

    From the conditioning-fixed windowed-locality scan over several radii (``estimators.best_of_radii`` on the
    classifier's per-sample negative log-likelihood): the smallest radius not significantly worse than the best, and
    only when the radii show contrast; None with the reason otherwise (one radius scanned, no contrast, a tie).
    """
    rec = probes.get("window_locality")
    if rec is None:
        return None, "window_locality was not run"
    choice = rec.get("suggested_radius") or {}
    return choice.get("radius"), choice.get("reason") or ""


def radius_tables(det: Detection, outputs: dict[str, ProbeOutput], windows: dict[str, Window],
                  tolerance: float) -> tuple[dict, dict]:
    """(nonlocality_by_radius, forward_backward_excess): d(r) of every nonlocality window against the primary
    symmetry-breaking window, and local forward-backward's excess over the global threshold, at every probed radius
    (``detect.primary``)."""
    by_r = {k: v for o in outputs.values() for k, v in o.by_radius.items()}
    sb = windows.get(det.primary["symmetry_breaking"])
    nl = {name: primary.by_radius(sb, ws, tolerance) for name, ws in by_r.items()
          if not name.startswith("forward_backward_local")}
    fb = {name: primary.excess_by_radius(windows.get("forward_backward"), ws) for name, ws in by_r.items()
          if name.startswith("forward_backward_local")}
    return nl, fb


def build_summary(det: Detection, outputs: dict[str, ProbeOutput], units: list, counts: tuple[int, int], out: Path,
                  wall: float) -> dict:
    """The summary dict (schema: docs/summary-schema.md) from the probes' outputs; ``counts`` = (computed, loaded)
    units of this run over every rank."""
    cfg, model, sch = det.cfg, det.model, det.model.schedule
    windows = {k: w for o in outputs.values() for k, w in o.windows.items()}
    probes = {name: o.record for name, o in outputs.items() if o.record is not None}
    figures = {k: v for o in outputs.values() for k, v in o.figures.items() if v is not None}
    conc, w_sb, w_nl, combined = concurrence(windows, sch, cfg.concurrence_tolerance, list(cfg.probes))
    w_nl_strict = strict_concurrence(windows, sch, cfg.concurrence_tolerance, conc, w_sb)
    for v in conc.values():
        v["role"] = "secondary"
    head = primary.test(det.primary, windows, cfg.concurrence_tolerance, cfg.locality)
    conc = {"primary": head, **conc}
    nl_by_r, fb_excess = radius_tables(det, outputs, windows, cfg.concurrence_tolerance)
    radius, radius_reason = radius_suggestion(det, probes)
    cw = None
    if combined is not None:
        cw = combined.to_dict()
        cw["members"] = combined.extra["members"]
    return {
        "schema": summary_io.SCHEMA,
        "model": model.name,
        "model_id": det.model_id,
        "schedule": {
            "kind": sch.kind, "num_train_timesteps": sch.num_train_timesteps, "beta_start": sch.beta_start,
            "beta_end": sch.beta_end,
            "beta_schedule": sch.beta_schedule, "t_convention": T_CONVENTION, "log_snr_convention": LOG_SNR_CONVENTION,
        },
        "preset": cfg.preset,
        "seed": cfg.seed,
        "probes_run": list(cfg.probes),
        "guidance": det.guidance,
        "class_id": det.class_id,
        "prompt": cfg.prompt,
        "token_grid": det.grid,
        "probes": probes,
        "windows": {k: w.to_dict() for k, w in windows.items()},
        "symmetry_breaking_window": w_sb.to_dict() if w_sb else None,
        "nonlocality_window": w_nl.to_dict() if w_nl else None,
        "locality": cfg.locality,
        **({"nonlocality_window_strict": w_nl_strict.to_dict()} if w_nl_strict else {}),
        "primary": {**det.primary, "window": head["nonlocality"], "test": head,
                    "nonlocality_by_radius": nl_by_r.get(head["nonlocality"])},
        "verdict": head["verdict"],
        "concurrence": conc,
        "nonlocality_by_radius": nl_by_r,
        "forward_backward_excess": fb_excess,
        "critical_window": cw,
        "suggested_radius": radius,
        "suggested_radius_reason": radius_reason,
        "cost": {
            "model_evaluations": int(sum(u.forwards for u in units)),
            "model_evaluations_note": "network forwards summed over rows (one row = one sample at one time with one "
                                      "denoiser; guided = 2)",
            "units": len(units), "units_computed_this_run": counts[0], "units_loaded": counts[1],
            "wall_seconds_this_run": wall,
        },
        "outputs": {"report": "report.md", "figures": {k: str(Path(v).relative_to(out)) for k, v in figures.items()},
                    "arrays": sorted(str(p.relative_to(out)) for p in (out / "arrays").glob("*.npz")),
                    "units": "units/"},
    }


def config_record(det: Detection) -> dict:
    return {**asdict(det.cfg), "resolved": det.resolved()}


def write_outputs(det: Detection, summary: dict, outputs: dict[str, ProbeOutput], out: Path) -> dict:
    """summary.json, config.yaml, report.md and (when enabled) W&B; returns the summary as written."""
    summary = summary_io.jsonable(summary)
    summary_io.write(summary, out / "summary.json")
    atomic_write(out / "config.yaml", yaml.safe_dump(asdict(det.cfg), sort_keys=False))
    write_detect_report(summary, out)
    if det.cfg.wandb:
        figures = {k: v for o in outputs.values() for k, v in o.figures.items() if v is not None}
        curves = {k: v for o in outputs.values() for k, v in o.curves.items()}
        summary["wandb_dir"] = log_detect(summary, out, figures=figures, curves=curves, config=config_record(det))
    return summary
