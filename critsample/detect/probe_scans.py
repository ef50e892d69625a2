"""Probes ``window_cond`` (sec. 3.4) and ``window_locality`` (sec. 3.5): sample with a plan that conditions (or
attends globally) only inside a window [t0, t0 + w], slide t0, and score the samples by classifier error and FD to
the always-conditioned baseline. Unit kinds: ``window_baseline`` (shared by both), ``window_cond``,
``window_locality`` (one scan position x one batch).

Window rule (``estimators.scan_minimum``): the argmin of the mean error over the windows' log-SNR midpoints (argmax
for the complement scans), parabola-refined; the window is that position's window. ``window_locality``'s window comes
from the conditioning-fixed scan (``loccond_in``: global conditional inside, local conditional outside), so it measures
attention alone; the paper's scan (``loc_in``, local unconditional outside) is reported beside it, with the locality
excess ``loc_in`` minus ``cond_in`` at the same position and noise when both were run. ``window_locality`` is read at
the primary radius (``--primary.radius``, always scanned); every scanned radius's window is in ``per_radius`` (and
``ProbeOutput.by_radius``). Beside the 0/1 error, every scan carries the classifier's negative log-likelihood of the
requested class (``nll``, nats), which does not saturate where the error is 0 over a stretch: the same rule on it is
each window's ``extra.score_window``, and ``suggested_radius`` is decided on it (``estimators.best_of_radii``: null,
with the reason, when the radii show no contrast). Paired design: sample i starts from the same noise at every
position, radius and arm (``Detection.generators``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import report
from ..denoisers import NULL
from ..judges import fd_bootstrap
from ..probes.windows import baseline_plan, window_plan
from ..sampling import Plan, sample
from ..store import Unit, save_npz
from ..summary import T_CONVENTION
from . import estimators, primary
from .protocol import Outputs, Probe, ProbeOutput, Results, batches, bernoulli, common_config, series_json

if TYPE_CHECKING:
    from .context import Detection

BASELINE = "window_baseline"
STRIP = 8  # samples per window position kept as images for the sample strips


def fid_from_features(real: np.ndarray, fake: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
    """FID between feature sets and its bootstrap one-sigma over resamples of the fake set, the always-conditioned
    baseline being the fixed reference (``judges.fd_bootstrap``: torchmetrics, float64). 100 resamples for features
    of dimension <= 256, 20 above (each resample is an eigen-decomposition in d)."""
    return fd_bootstrap(real, fake, n_boot=100 if np.shape(real)[1] <= 256 else 20, seed=seed)


class _Scan(Probe):
    """A windowed scan; subclasses name the scans (inside / complement), the width and the radii."""

    scans: tuple[str, ...]  # the "inside" scans; the first gives the probe's window
    complements: dict[str, str]  # inside scan -> its complement

    def width(self, det: Detection) -> float:
        raise NotImplementedError

    def radii(self, det: Detection) -> list[int | None]:
        return [None]

    def key_config(self, det: Detection) -> dict[str, dict]:
        c = det.cfg
        base = {**common_config(det), "classifier": det.classifier_name}
        base["outputs"] = "logprob"  # units store the classifier's log-probabilities (the scans' non-saturating score)
        return {BASELINE: {**base, "steps": c.windows.steps, "batch": c.windows.batch},
                self.name: {**base, "steps": c.windows.steps, "width": self.width(det), "batch": c.windows.batch}}

    def plan(self, det: Detection, scan: str, t0: float | None, radius: int | None) -> Plan:
        c, m = det.cfg, det.model
        if scan == "baseline":
            return det.memo(f"plan:{scan}",
                            lambda: baseline_plan(m, c.windows.steps, guidance=det.guidance, sampler=c.sampler))
        return det.memo(f"plan:{scan}:{t0}:{radius}", lambda: window_plan(
            m, c.windows.steps, scan, t0, self.width(det), guidance=det.guidance, radius=radius, sampler=c.sampler))

    def units(self, det: Detection) -> list[Unit]:
        c = det.cfg
        scans = [(BASELINE, "baseline", None, None)]
        for r in self.radii(det):
            for inside in self.scans:
                for scan in (inside, self.complements[inside]) if c.windows.complement else (inside,):
                    scans += [(self.name, scan, t0, r) for t0 in det.t0s]
        out = []
        for kind, scan, t0, r in scans:
            plan = self.plan(det, scan, t0, r)
            local = sum(s.forwards for s in plan.steps if s.radius is not None)
            for lo, hi in batches(c.windows.samples, c.windows.batch):
                out.append(det.store.unit(kind, {"scan": scan, "t0": t0, "radius": r, "lo": lo, "hi": hi},
                                          forwards=(hi - lo) * plan.forwards, local_forwards=(hi - lo) * local))
        return out

    def compute(self, det: Detection, unit: Unit, g: torch.Generator) -> dict:
        p, m = unit.params, det.model
        lo, hi = p["lo"], p["hi"]
        cond = det.cond_rows(hi - lo, lo)
        x = sample(m, self.plan(det, p["scan"], p["t0"], p["radius"]), cond, generator=det.generators(lo, hi))
        images = m.images(x)
        with torch.no_grad():
            logits = det.classifier.predict_logits(images.to(det.device))
            feats = det.classifier.features(images.to(det.device))
        keep = images[: max(0, STRIP - lo)]
        return {
            "pred": logits.argmax(-1).cpu().numpy(),
            "logprob": torch.log_softmax(logits.double(), -1).cpu().numpy(),
            "target": cond.cpu().numpy() if not det.text else np.full(hi - lo, NULL),
            "features": feats.double().cpu().numpy(),
            "images": (keep.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(),
        }

    def summarize(self, det: Detection, results: Results, out: Outputs) -> ProbeOutput:
        model, sch, seed, width = det.model, det.model.schedule, int(det.cfg.seed), self.width(det)
        base = baseline(det, results)
        us = results.units(self.name)
        radii = sorted({u.params["radius"] for u in us}, key=lambda r: -1 if r is None else r)
        res_by: dict[tuple[str, int | None], dict] = {}
        for scan in sorted({u.params["scan"] for u in us}):
            for r in radii:
                t0s = sorted({u.params["t0"] for u in us if u.params["scan"] == scan and u.params["radius"] == r})
                if not t0s:
                    continue
                errs, nlls, fids, sig, centers, strips = [], [], [], [], [], {}
                for t0 in t0s:
                    g = results.units(self.name, scan=scan, radius=r, t0=t0)
                    target = base["target_of"](results.cat(g, "target"))
                    errs.append((results.cat(g, "pred") != target).astype(np.float64))
                    nlls.append(nll(results.cat(g, "logprob"), target))
                    f, s = fid_from_features(base["features"], results.cat(g, "features"), seed=seed)
                    fids.append(f), sig.append(s)
                    lo, hi = t0, min(t0 + width, 1.0)
                    # log-SNR midpoint
                    centers.append(float(sch.t_from_log_snr(estimators.scan_positions(sch, [t0], width)[2][0])))
                    strips[f"[{lo:.2f},{hi:.2f}]"] = results[g[0]]["images"]
                res_by[(scan, r)] = {"t0": np.asarray(t0s), "centers": np.asarray(centers), "errors": np.stack(errs, 1),
                                     "nll": np.stack(nlls, 1),
                                     "fid": np.asarray(fids), "fid_sigma": np.asarray(sig), "strips": strips}
        r_w = self.window_radius(det, [r for (s, r) in res_by if s == self.scans[0]])
        windows = {}
        for inside in self.scans:
            v = res_by.get((inside, r_w))
            if v is None:
                continue
            name = self.name if inside == self.scans[0] else f"{self.name}[{inside}]"
            w = estimators.scan_minimum(name, self.family, v["t0"], v["errors"], width, sch, seed=seed, score=_score(v))
            w.extra["scan"], w.extra["radius"] = inside, r_w
            w.extra["fid_window"] = estimators.fid_minimum(
                f"{name}[fid]", self.family, v["t0"], v["fid"], v["fid_sigma"], width, sch, seed=seed).to_dict()
            vo = res_by.get((self.complements[inside], r_w))
            if vo is not None:
                wo = estimators.scan_minimum(f"{name}[{self.complements[inside]}]", self.family, vo["t0"],
                                             vo["errors"], width, sch, maximum=True, seed=seed)
                w.extra["complement_window"] = wo.to_dict()
            windows[inside] = w
        w = windows[self.scans[0]]
        if r_w is not None:
            w.rule += f"; read at the primary radius r = {r_w} (--primary.radius)"
        w.extra["other_scans"] = {k: v.to_dict() for k, v in windows.items() if k != self.scans[0]}
        first = res_by[(self.scans[0], r_w)]
        centers = first["centers"]
        per_radius = self.per_radius(det, res_by, width)
        excess = self.excess(det, results, res_by)
        res = ProbeOutput(windows={self.name: w})
        if per_radius:
            res.by_radius[self.name] = per_radius
        series, fseries = {}, {}
        for (s, r), v in res_by.items():
            lab = s + ("" if r is None else f" r={r}")
            series[lab] = bernoulli(v["errors"])
            fseries[lab] = (v["fid"], v["fid_sigma"])
        be, bs = bernoulli(base["errors"])
        series["always conditioned"] = (np.full(len(centers), be), np.full(len(centers), bs))
        res.figures[self.name] = report.plot_errorbars(
            centers, series, out.figures / f"{self.name}.png",
            title=f"{model.name}: {self.name} (w = {width:g}), classifier error (Bernoulli 1-sigma)",
            ylabel="classifier error", xlabel="window center t (0 = clean, 1 = noise)", schedule=sch,
            windows={self.name: w.to_dict()})
        res.figures[f"{self.name}_fid"] = report.plot_errorbars(
            centers, fseries, out.figures / f"{self.name}_fid.png",
            title=f"{self.name}: FID to the always-conditioned baseline (bootstrap 1-sigma)",
            ylabel="FID (classifier features)", xlabel="window center t", schedule=sch,
            windows={self.name: w.to_dict()})
        res.curves[f"{self.name}_error"] = {**series_json(centers, series), "x_label": "window_center_t"}
        res.curves[f"{self.name}_fid"] = {**series_json(centers, fseries), "x_label": "window_center_t"}
        strip_rows = {"always conditioned": base["strips"], **first["strips"]}
        res.figures[f"{self.name}_strips"] = report.plot_strips(strip_rows, out.figures / f"{self.name}_strips.png",
                                                                scale=max(1, 32 // max(1, base["strips"].shape[-1])))
        res.record = {
            "window": w.to_dict(), "per_radius": {str(r): v.to_dict() for r, v in per_radius.items()} or None,
            "width": width, "radius": r_w, **self.radius_choice(det, res_by),
            "scan": {f"{s}" + ("" if r is None else f"[r={r}]"): {
                "t0": v["t0"].tolist(), "window_center": v["centers"].tolist(), "error": v["errors"].mean(0).tolist(),
                "error_sigma": bernoulli(v["errors"])[1].tolist(), "nll": v["nll"].mean(0).tolist(),
                "nll_se": (v["nll"].std(0, ddof=1) / np.sqrt(v["nll"].shape[0])).tolist()
                if v["nll"].shape[0] > 1 else None, "fid": v["fid"].tolist(),
                "fid_sigma": v["fid_sigma"].tolist()}
                for (s, r), v in res_by.items()},
            "baseline_error": float(be), "baseline_error_sigma": float(bs), "excess": excess,
            "strip_rows": list(strip_rows), "arrays": f"arrays/{self.name}.npz",
        }
        save_npz(out.arrays / f"{self.name}.npz", **{
            f"{s}{'' if r is None else f'_r{r}'}__{name}": v[name] for (s, r),
            v in res_by.items() for name in ("t0", "centers", "errors", "nll", "fid", "fid_sigma")},
            baseline_errors=base["errors"], note=np.asarray(
                f"{T_CONVENTION}. SCAN__errors (samples, positions) 0/1 classifier errors; SCAN__nll (samples, "
                "positions) the classifier's negative log-likelihood of the requested class in nats; centers = window "
                "centers; "
                "fid, fid_sigma: FID (classifier features) to the always-conditioned baseline and its bootstrap "
                "one-sigma."))
        return res

    def window_radius(self, det: Detection, radii: list) -> int | None:
        """The radius the probe's window is read at (None for scans without a radius)."""
        return radii[0]

    def per_radius(self, det: Detection, res_by: dict, width: float) -> dict:
        return {}

    def radius_choice(self, det: Detection, res_by: dict) -> dict:
        return {}

    def excess(self, det: Detection, results: Results, res_by: dict) -> dict | None:
        return None


def nll(logprob: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample negative log-likelihood (nats) of the requested class under the classifier; NaN where the class is
    not one of the classifier's (a classifier of other classes than the model's)."""
    logprob, target = np.asarray(logprob, dtype=np.float64), np.asarray(target, dtype=np.int64)
    ok = (target >= 0) & (target < logprob.shape[1])
    picked = np.take_along_axis(logprob, np.where(ok, target, 0)[:, None], 1)[:, 0]
    return np.where(ok, -picked, np.nan)


def _score(v: dict) -> np.ndarray | None:
    """The scan's per-sample nll when every sample has one (else None: the classifier does not know the class)."""
    return v["nll"] if np.isfinite(v["nll"]).all() else None


def baseline(det: Detection, results: Results) -> dict:
    """The always-conditioned samples: features (the FID reference), errors, strips and the target rule."""

    def make():
        base = results.units(BASELINE)
        pred, target = results.cat(base, "pred"), results.cat(base, "target")
        text_target = None
        if bool((target == NULL).all()):  # text models: the majority label of the always-conditioned samples
            text_target = int(np.bincount(pred.astype(np.int64)).argmax())
        target_of = (lambda tg: np.where(tg == NULL, text_target, tg)) if text_target is not None else (lambda tg: tg)
        return {"features": results.cat(base, "features"), "errors": (pred != target_of(target)).astype(np.float64),
                "strips": results[base[0]]["images"], "target_of": target_of}

    return det.memo("scan_baseline", make)


class WindowCond(_Scan):
    """Windowed conditioning: conditioning only inside the window (cond_in) or only outside it (cond_out)."""

    name = "window_cond"
    family = "symmetry_breaking"
    kinds = (BASELINE, "window_cond")
    scans = ("cond_in",)
    complements = {"cond_in": "cond_out"}

    def width(self, det: Detection) -> float:
        return det.cfg.windows.width


class WindowLocality(_Scan):
    """Windowed locality: global conditional inside the window, local(r) unconditional outside (loc_in), and the
    reverse (loc_out), for each radius."""

    name = "window_locality"
    family = "nonlocality"
    kinds = (BASELINE, "window_locality")
    scans = ("loccond_in", "loc_in")
    complements = {"loccond_in": "loccond_out", "loc_in": "loc_out"}

    def width(self, det: Detection) -> float:
        return det.cfg.windows.locality_width

    def radii(self, det: Detection) -> list[int | None]:
        return list(det.win_radii)

    def window_radius(self, det: Detection, radii: list) -> int | None:
        return primary.probed(det.cfg.primary.radius, radii)

    def per_radius(self, det: Detection, res_by: dict, width: float) -> dict:
        sch, seed = det.model.schedule, int(det.cfg.seed)
        return {r: estimators.scan_minimum(f"{self.name}[r={r}]", self.family, v["t0"], v["errors"], width, sch,
                                           seed=seed, score=_score(v))
                for (s, r), v in res_by.items() if s == self.scans[0]}

    def radius_choice(self, det: Detection, res_by: dict) -> dict:
        """``suggested_radius`` (:func:`estimators.best_of_radii`) from the conditioning-fixed scan's per-sample
        negative log-likelihood (it does not saturate where the 0/1 error does), and the same rule on the error."""
        per = {r: v for (s, r), v in res_by.items() if s == self.scans[0]}
        scored = all(_score(v) is not None for v in per.values())
        by_score = estimators.best_of_radii({r: v["nll" if scored else "errors"] for r, v in per.items()})
        return {"suggested_radius": {**by_score, "metric": "nll" if scored else "error (no nll: the classifier does "
                                                                                 "not know the class)"},
                "suggested_radius_by_error": estimators.best_of_radii({r: v["errors"] for r, v in per.items()})}

    def excess(self, det: Detection, results: Results, res_by: dict) -> dict | None:
        """Locality excess of the paper's scan: loc_in minus cond_in error at the same position and noise (paired), per
        radius, with its paired standard error; None unless window_cond ran with the same width."""
        if det.cfg.windows.width != det.cfg.windows.locality_width or not results.units("window_cond", scan="cond_in"):
            return None
        out = {}
        for (s, r), v in res_by.items():
            if s != "loc_in":
                continue
            diffs = []
            for t0 in v["t0"]:
                ref = results.units("window_cond", scan="cond_in", t0=float(t0))
                loc = results.units(self.name, scan="loc_in", radius=r, t0=float(t0))
                base = baseline(det, results)["target_of"]
                e_ref = (results.cat(ref, "pred") != base(results.cat(ref, "target"))).astype(np.float64)
                e_loc = (results.cat(loc, "pred") != base(results.cat(loc, "target"))).astype(np.float64)
                diffs.append(e_loc - e_ref)
            d = np.stack(diffs, 1)  # (n, P) paired differences
            out[f"r={r}"] = {"t0": v["t0"].tolist(), "excess": d.mean(0).tolist(),
                             "excess_se": (d.std(0, ddof=1) / np.sqrt(d.shape[0])).tolist() if d.shape[0] > 1 else None}
        return out
