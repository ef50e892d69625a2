"""Probes ``cond_gap`` (eq. 6) and ``locality_gap`` (eq. 7): both read the same stored trajectories (unit kind
``gaps``: one batch of trajectories of one kind, every time and radius), so their units coincide and run once.

Window rule (``estimators.half_max_window``, peak at least ``MIN_Z`` standard errors above zero): full width at half
maximum of the mean gap curve of the primary trajectory (train, else the first sampled one), in the units of
``--gaps.kind``. The locality gap has one window per radius (``ProbeOutput.by_radius``); the probe's window is the one
at the declared primary radius (``--primary.radius``, always probed), so it does not depend on which other radii were
probed (``detect.primary``). When the primary rule asks for the strict denoiser and ``--locality`` is window, strict
units are computed at the primary radius alone (``locality_gap_strict``). Paired design: trajectory i starts from the
noise of sample i (``Detection.generators``), the same as scan sample i.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import report
from ..probes.gaps import rows_per_state, sampling_states, score_gaps, train_states, trajectory_plan
from ..sampling import step_times
from ..store import Unit, save_npz
from ..summary import T_CONVENTION
from . import estimators, primary
from .protocol import (
    Outputs,
    Probe,
    ProbeOutput,
    Results,
    batches,
    common_config,
    data_config,
    localities,
    locality_match,
    series_json,
    strict_copies,
)

if TYPE_CHECKING:
    from .context import Detection

KIND = "gaps"
MIN_Z = 3.0
"""The gap windows' peak must lie this many standard errors above zero (``estimators.half_max_window``): a norm of a
difference of scores is positive even where the difference is noise, so a peak within noise of zero is no window."""


class _Gaps(Probe):
    kinds = (KIND,)

    def data_samples(self, det: Detection) -> int:
        return det.cfg.gaps.samples if "train" in det.cfg.gaps.trajectories else 0

    def key_config(self, det: Detection) -> dict[str, dict]:
        c = det.cfg
        strict = ({"strict_radii": det.gap_strict_radii}
                  if det.gap_strict_radii and det.gap_strict_radii != det.gap_radii else {})
        return {KIND: {**common_config(det), **data_config(det), "steps": c.gaps.steps, "radii": det.gap_radii,
                       "batch": c.gaps.batch, **strict}}

    def units(self, det: Detection) -> list[Unit]:
        c = det.cfg
        out = []
        # window units always run: they carry the conditioning gap; strict units recompute the global rows (cheap)
        for loc in ("window", *(["strict"] if det.gap_strict_radii else [])):
            radii = gap_radii(det, loc)
            copies = strict_copies(det, radii) if loc == "strict" else [1] * len(radii)
            per_state = rows_per_state(radii, copies=copies)
            for traj in c.gaps.trajectories:
                gen = 0 if traj == "train" else c.gaps.steps * (2 if traj == "sample_cond" and det.guidance != 1.0
                                                                else 1)
                for lo, hi in batches(c.gaps.samples, c.gaps.batch):
                    n = hi - lo
                    params = {"traj": traj, "lo": lo, "hi": hi, **({"locality": loc} if loc == "strict" else {})}
                    out.append(det.store.unit(KIND, params, forwards=n * (c.gaps.steps * per_state + gen),
                                              local_forwards=n * c.gaps.steps * 2 * sum(copies)))
        return out

    def compute(self, det: Detection, unit: Unit, g: torch.Generator) -> dict:
        p, c, m = unit.params, det.cfg, det.model
        lo, hi = p["lo"], p["hi"]
        if p["traj"] == "train":
            x0, y = det.data(hi)
            x0, y = x0[lo:hi], (y[lo:hi] if y is not None else None)
            cond = det.cond_rows(hi - lo, lo, y if not det.text else None)
            times = step_times(m, c.gaps.steps, c.sampler)
            states = train_states(m, x0, times, det.generators(lo, hi, "train"))
        else:
            cond = det.cond_rows(hi - lo, lo)
            plan = trajectory_plan(m, p["traj"], c.gaps.steps, det.guidance, c.sampler)
            states, times, _ = sampling_states(m, plan, cond, det.generators(lo, hi))
        loc = p.get("locality", "window")
        out = score_gaps(m, states, times, cond, gap_radii(det, loc), max_batch=c.max_batch, locality=loc)
        return {k: v.cpu().numpy() for k, v in out.items()}


def gap_radii(det: Detection, locality: str) -> list[int]:
    """The radii of one local denoiser's gap units (``Detection.gap_strict_radii`` for strict)."""
    return det.gap_strict_radii if locality == "strict" else det.gap_radii


def gap_localities(det: Detection) -> list[str]:
    """The local denoisers of the locality gap: ``--locality``'s, and strict at the primary radius when the primary
    rule asks for it (``detect.primary``)."""
    return ["window", "strict"] if det.cfg.locality == "window" and det.gap_strict_radii else localities(det)


def gap_arrays(det: Detection, results: Results, out: Outputs, locality: str = "window") -> dict:
    """Per trajectory, the concatenated gap arrays (samples first), written once to ``arrays/gaps.npz``
    (``arrays/gaps_strict.npz`` for the strict units)."""
    suffix = "" if locality == "window" else f"_{locality}"

    def make():
        arrays = {}
        for traj in det.cfg.gaps.trajectories:
            us = results.units(KIND, traj=traj, **locality_match(locality))
            if not us:
                continue
            for name in results[us[0]]:
                if name != "t":
                    v = results.cat(us, name)
                    arrays[f"{traj}__{name}"] = v
                    arrays[f"{traj}__{name}__mean"], arrays[f"{traj}__{name}__std"] = v.mean(0), v.std(0)
            arrays["t"] = results[us[0]]["t"]
        radii = np.asarray(gap_radii(det, locality))
        save_npz(out.arrays / f"gaps{suffix}.npz", **arrays, radii=radii, note=np.asarray(
            f"{T_CONVENTION}. Arrays TRAJ__NAME: cond_gap_* (samples, T) eq. 6; loc_gap_{{cond,uncond}}_* (samples, T, "
            "radii) eq. 7; *_score = score units, *_eps = eps units (= sigma x score); norms per image token, model "
            "(latent) space; NAME__mean / NAME__std: mean and standard deviation over samples. "
            f"Local denoiser: {locality} (window = truncated attention, strict = strictly local)."))
        return arrays

    return det.memo(f"gap_arrays{suffix}", make)


def _primary(windows: dict, order: tuple[str, ...], name: str) -> estimators.Window | None:
    first = next((tr for tr in order if tr in windows), None)
    if first is None:
        return None
    w = windows[first]
    w.probe = name
    w.extra["trajectory"] = first
    return w


class CondGap(_Gaps):
    """Conditioning gap ||s(x_t, t | c) - s(x_t, t | null)|| per image token (eq. 6)."""

    name = "cond_gap"
    family = "symmetry_breaking"

    def summarize(self, det: Detection, results: Results, out: Outputs) -> ProbeOutput:
        k, seed, sch, model = det.cfg.gaps.kind, int(det.cfg.seed), det.model.schedule, det.model
        other = "score" if k == "eps" else "eps"
        arrays = gap_arrays(det, results, out)
        t = arrays["t"]
        per_traj, series, other_series = {}, {}, {}
        for traj in det.cfg.gaps.trajectories:
            if f"{traj}__cond_gap_{k}" not in arrays:
                continue
            cg = arrays[f"{traj}__cond_gap_{k}"]
            series[traj] = (cg.mean(0), cg.std(0))
            cg_other = arrays[f"{traj}__cond_gap_{other}"]
            other_series[traj] = (cg_other.mean(0), cg_other.std(0))
            per_traj[traj] = estimators.half_max_window(f"cond_gap[{traj}]", "symmetry_breaking", t, cg, sch, seed=seed,
                                                        min_z=MIN_Z)
        res = ProbeOutput()
        w = _primary(per_traj, ("train", "sample_cond", "sample_uncond"), self.name)
        if w is not None:
            res.windows[self.name] = w
        res.figures["cond_gap"] = report.plot_curves(
            t, series, out.figures / "cond_gap.png", title=f"{model.name}: conditioning gap (eq. 6) per token",
            ylabel=f"gap per token ({k}), mean +- std", schedule=sch, windows={"cond gap": w.to_dict()} if w else None,
            logy=True)
        res.curves["cond_gap"] = series_json(t, series)
        res.figures[f"cond_gap_{other}"] = report.plot_curves(
            t, other_series, out.figures / f"cond_gap_{other}.png",
            title=f"{model.name}: conditioning gap (eq. 6) in {other} units",
            ylabel=f"gap per token ({other}), mean +- std", schedule=sch, logy=True)
        res.record = {"window": w.to_dict() if w else None,
                      "per_trajectory": {tr: v.to_dict() for tr, v in per_traj.items()},
                      "arrays": "arrays/gaps.npz", "units": k, "radii": det.gap_radii}
        return res


class LocalityGap(_Gaps):
    """Locality gap ||s_r(x_t, t) - s(x_t, t)|| per image token over t x r (eq. 7)."""

    name = "locality_gap"
    family = "nonlocality"

    def summarize(self, det: Detection, results: Results, out: Outputs) -> ProbeOutput:
        res = ProbeOutput()
        records = {}
        for loc in gap_localities(det):
            records[loc] = self._summarize(det, results, out, loc, res)
        res.record = records[gap_localities(det)[0]]
        res.record["locality"] = det.cfg.locality
        if len(records) > 1:
            res.record["strict"] = records["strict"]
            if det.gap_strict_radii == det.gap_radii:
                self._heatmaps_both(det, results, out, res)
        return res

    def _heatmaps_both(self, det: Detection, results: Results, out: Outputs, res: ProbeOutput) -> None:
        """Per trajectory, the window and strict heatmaps side by side under one log colour scale (``--locality
        both``)."""
        k, model = det.cfg.gaps.kind, det.model
        window, strict = gap_arrays(det, results, out, "window"), gap_arrays(det, results, out, "strict")
        for traj in det.cfg.gaps.trajectories if det.gap_radii else ():
            variant = "cond" if traj == "sample_cond" else "uncond"
            key = f"{traj}__loc_gap_{variant}_{k}__mean"
            if key not in window or key not in strict:
                continue
            panels = {"window (truncated attention, L x r tokens)": window[key],
                      "strict (radius-r receptive field)": strict[key]}
            res.figures[f"locality_heatmap_both_{traj}"] = report.plot_heatmaps(
                window["t"], det.gap_radii, panels, out.figures / f"locality_heatmap_both_{traj}.png",
                title=f"{model.name}: {variant} locality gap (eq. 7, {k}) per token, {traj} trajectory, one colour "
                      "scale", label=f"gap ({k})")

    def _summarize(self, det: Detection, results: Results, out: Outputs, loc: str, res: ProbeOutput) -> dict:
        """Windows, figures and curves of one local denoiser into ``res``; returns its record."""
        k, seed, sch, model = det.cfg.gaps.kind, int(det.cfg.seed), det.model.schedule, det.model
        arrays = gap_arrays(det, results, out, loc)
        t = arrays["t"]
        name = f"{self.name}_strict" if loc == "strict" and len(gap_localities(det)) > 1 else self.name
        radii, r0 = gap_radii(det, loc), det.cfg.primary.radius
        sfx, label = ("_strict", "strictly local, ") if loc == "strict" else ("", "")
        per_traj, per_radius = {}, {}
        for traj in det.cfg.gaps.trajectories if radii else ():
            variant = "cond" if traj == "sample_cond" else "uncond"
            if f"{traj}__loc_gap_{variant}_{k}" not in arrays:
                continue
            lg = arrays[f"{traj}__loc_gap_{variant}_{k}"]  # (n, T, R)
            per_radius[traj] = {r: estimators.half_max_window(f"{name}[{traj},{variant},r={r}]", "nonlocality", t,
                                                              lg[:, :, i], sch, seed=seed, min_z=MIN_Z)
                                for i, r in enumerate(radii)}
            per_traj[traj] = per_radius[traj][primary.probed(r0, radii)]
            res.figures[f"locality_heatmap{sfx}_{traj}"] = report.plot_heatmap(
                t, radii, lg.mean(0), out.figures / f"locality_heatmap{sfx}_{traj}.png",
                title=f"{model.name}: {label}{variant} locality gap (eq. 7, {k}) per token, {traj} trajectory",
                label=f"gap ({k})")
            series = {f"r={r}": (lg[:, :, i].mean(0), lg[:, :, i].std(0)) for i, r in enumerate(radii)}
            res.figures[f"locality_curves{sfx}_{traj}"] = report.plot_curves(
                t, series, out.figures / f"locality_curves{sfx}_{traj}.png",
                title=f"{label}{variant} locality gap (eq. 7), {traj}",
                ylabel=f"gap per token ({k}), mean +- std", schedule=sch,
                windows={"locality": per_traj[traj].to_dict()}, logy=True)
            res.curves[f"locality_gap{sfx}_{traj}"] = series_json(t, series)
        w = _primary(per_traj, ("train", "sample_uncond", "sample_cond"), name)
        if w is not None:
            r_w = primary.probed(r0, radii)
            w.rule += f"; read at the primary radius r = {r_w} (--primary.radius); {loc} local denoiser"
            w.extra["locality"], w.extra["radius"] = loc, r_w
            res.windows[name] = w
            res.by_radius[name] = per_radius[w.extra["trajectory"]]
        return {"window": w.to_dict() if w else None, "local_denoiser": loc,
                "radius": primary.probed(r0, radii) if radii else None,
                "per_trajectory": {tr: v.to_dict() for tr, v in per_traj.items()},
                "per_radius": {tr: {str(r): v.to_dict() for r, v in ws.items()} for tr, ws in per_radius.items()},
                "arrays": f"arrays/gaps{sfx}.npz", "units": k, "radii": radii}
