"""Probe ``forward_backward`` (sec. 3.3): noise clean images to t, denoise unconditionally (globally and with each
radius), classify. Unit kinds: ``fb_generate`` (stage 0: the clean images, when ``--fb.source generated``) and
``forward_backward`` (one noise level x one batch, every radius; stage 1 when it reads generated images).

Windows: ``forward_backward`` (symmetry breaking; ``estimators.threshold_window`` of the global error, plateau anchored
at chance 1 - 1/K) and ``forward_backward_local`` (family ``local_threshold``: the same threshold rule on the error of
the smallest probed radius r >= 1, kept for readers that want a local threshold, e.g. ``certify``). Local
forward-backward is **not** a nonlocality window (``detect.primary``): a local denoiser's threshold equals the global
one at a covering radius by construction, so it never joins the nonlocality family or a concurrence pair; it enters as
its excess over the global threshold, lambda_local(r) - lambda_global with a paired interval, at every probed radius
(``summary["forward_backward_excess"]``, from ``ProbeOutput.by_radius``). ``--locality strict|both``: units keyed
``locality: strict`` denoise with the strictly local denoiser (``Denoiser.predict``); with both, the window
``forward_backward_local_strict`` and the record's ``strict`` part sit beside the window ones. Paired design: clean
image i is noised with the same eps at every t and radius (``Detection.generators``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import report
from ..denoisers import NULL
from ..probes.forward_backward import forward_backward, start_index
from ..probes.windows import baseline_plan
from ..sampling import sample
from ..store import Unit, save_npz
from ..summary import T_CONVENTION
from . import estimators
from .protocol import (
    Outputs,
    Probe,
    ProbeOutput,
    Results,
    batches,
    bernoulli,
    common_config,
    data_config,
    localities,
    locality_match,
    series_json,
    strict_copies,
    window_name,
)

if TYPE_CHECKING:
    from .context import Detection

GENERATE, KIND = "fb_generate", "forward_backward"
LOCAL_FAMILY = "local_threshold"  # neither symmetry breaking nor nonlocality: its excess over the global one counts


class ForwardBackward(Probe):
    """Forward-backward classifier error vs t, global and local (Bernoulli one-sigma bars)."""

    name = "forward_backward"
    family = "symmetry_breaking"
    kinds = (GENERATE, KIND)

    def data_samples(self, det: Detection) -> int:
        return det.cfg.fb.samples if det.cfg.fb.source == "data" else 0

    def key_config(self, det: Detection) -> dict[str, dict]:
        c, common = det.cfg, common_config(det)
        return {
            GENERATE: {**common, "steps": c.fb.steps, "batch": c.fb.batch},
            KIND: {**common, **data_config(det), "classifier": det.classifier_name, "steps": c.fb.steps,
                   "radii": det.fb_radii,
                   "batch": c.fb.batch, "source": c.fb.source},
        }

    def units(self, det: Detection) -> list[Unit]:
        c, m, store = det.cfg, det.model, det.store
        generated = c.fb.source == "generated"
        out = []
        if generated:
            for lo, hi in batches(c.fb.samples, c.fb.batch):
                out.append(store.unit(GENERATE, {"lo": lo, "hi": hi},
                                      forwards=(hi - lo) * c.fb.steps * (2 if det.guidance != 1.0 else 1)))
        for loc in localities(det):
            # local forwards per step
            copies = sum(strict_copies(det, det.fb_radii)) if loc == "strict" else len(det.fb_radii)
            for t in det.fb_times:
                i0, _ = start_index(m, t, c.fb.steps, c.sampler)
                n_steps = c.fb.steps - i0
                for lo, hi in batches(c.fb.samples, c.fb.batch):
                    params = {"t": round(float(t), 10), "lo": lo, "hi": hi,
                              **({"locality": loc} if loc == "strict" else {})}
                    out.append(store.unit(KIND, params, forwards=(hi - lo) * (1 + copies) * n_steps,
                                          local_forwards=(hi - lo) * copies * n_steps, stage=1 if generated else 0))
        return out

    def compute(self, det: Detection, unit: Unit, g: torch.Generator) -> dict:
        p, c, m = unit.params, det.cfg, det.model
        lo, hi = p["lo"], p["hi"]
        if unit.probe == GENERATE:
            cond = det.cond_rows(hi - lo, lo)
            plan = baseline_plan(m, c.fb.steps, guidance=det.guidance, sampler=c.sampler)
            x = sample(m, plan, cond, generator=det.generators(lo, hi, "fb_clean"))
            labels = cond.cpu().numpy() if not det.text else np.full(hi - lo, NULL)
            return {"x0": x.cpu().numpy(), "labels": labels}
        x0, ref = self.clean(det, lo, hi)
        out = forward_backward(
            m, x0, ref, p["t"], [None, *det.fb_radii], det.classify, det.null_rows(hi - lo),
            steps=c.fb.steps, generator=det.generators(lo, hi, "fb"), sampler=c.sampler, max_batch=c.max_batch,
            locality=p.get("locality", "window"),
        )
        return {k: v.cpu().numpy() for k, v in out.items()}

    def clean(self, det: Detection, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean images of a batch and their reference labels (true / conditioned class, else the classifier's label
        of the clean image). Generated images are read from the store (stage 0 has finished on every rank)."""
        if det.cfg.fb.source == "generated":
            gen = det.memo("fb_generated", lambda: _read_generated(det))
            x0 = torch.as_tensor(gen["x0"][lo:hi], device=det.device)
            y = torch.as_tensor(gen["labels"][lo:hi])
        else:
            x0, y = det.data(hi)
            x0, y = x0[lo:hi], (y[lo:hi].cpu() if y is not None else None)
        if y is None or bool((y == NULL).any()):
            y = det.classify(det.model.images(x0)).argmax(-1).cpu()
        return x0, y

    def arrays(self, det: Detection, results: Results, out: Outputs, loc: str):
        """(error, flip, mse) (radius, sample, t), the snapped and requested times of one local denoiser's units,
        written to ``arrays/forward_backward.npz`` (``forward_backward_strict.npz``)."""
        us = results.units(KIND, **locality_match(loc))
        ts = sorted({u.params["t"] for u in us})
        per_t = {tv: results.units(KIND, t=tv, **locality_match(loc)) for tv in ts}
        err = np.stack([results.cat(per_t[tv], "error", axis=1) for tv in ts], axis=-1)  # (R+1, n, T)
        mse = np.stack([results.cat(per_t[tv], "mse", axis=1) for tv in ts], axis=-1)
        flip = np.stack([results.cat(per_t[tv], "flip", axis=1) for tv in ts], axis=-1)
        t_used = np.array([float(results[per_t[tv][0]]["t"]) for tv in ts])
        sfx = "" if loc == "window" else f"_{loc}"
        save_npz(out.arrays / f"forward_backward{sfx}.npz", t=t_used, t_requested=np.asarray(ts),
                 radii=np.asarray([-1, *det.fb_radii]),
                 error=err, flip=flip, mse=mse, error_mean=err.mean(1),
                 error_sigma=np.sqrt(err.mean(1) * (1 - err.mean(1)) / err.shape[1]),
                 mse_mean=mse.mean(1), mse_std=mse.std(1), note=np.asarray(
                     f"{T_CONVENTION}. error/flip/mse are (radius, sample, t); radius -1 = global. error: classifier "
                     "label of the denoised image != reference label; flip: != label of the clean image; mse: "
                     "per-pixel MSE in [0, 1] pixels; error_mean / error_sigma (Bernoulli), mse_mean / mse_std: "
                     f"(radius, t). Local denoiser: {loc} (window = truncated attention, strict = strictly local)."))
        return err, flip, mse, t_used, ts

    def local_window(self, det: Detection, per_window: list, loc: str) -> estimators.Window | None:
        """The local threshold window: the threshold of the smallest probed radius r >= 1 (module docstring)."""
        if not det.fb_radii:
            return None
        r_loc = next((r for r in det.fb_radii if r >= 1), det.fb_radii[0])
        w_loc = per_window[1 + det.fb_radii.index(r_loc)]
        w_loc.probe = window_name("forward_backward_local", det, loc)
        w_loc.rule += f"; error of the most local denoiser that sees its neighbours (r = {r_loc}); {loc} local denoiser"
        w_loc.extra["locality"] = loc
        return w_loc

    def summarize(self, det: Detection, results: Results, out: Outputs) -> ProbeOutput:
        model, sch, seed = det.model, det.model.schedule, int(det.cfg.seed)
        loc = localities(det)[0]
        err, flip, mse, t_used, ts = self.arrays(det, results, out, loc)
        labels = ["global"] + [f"r={r}" for r in det.fb_radii]
        res = ProbeOutput()
        chance = det.chance
        per_window = [estimators.threshold_window(f"forward_backward[{lab}]",
                                                  "symmetry_breaking" if i == 0 else LOCAL_FAMILY,
                                                  t_used, err[i], sch, chance=chance, seed=seed) for i,
                                                  lab in enumerate(labels)]
        per_r = {lab: w.to_dict() for lab, w in zip(labels, per_window, strict=True)}
        w_sb = per_window[0]
        w_sb.probe = "forward_backward"
        res.windows["forward_backward"] = w_sb
        w_loc = self.local_window(det, per_window, loc)
        if w_loc is not None:
            res.windows[w_loc.probe] = w_loc
            res.by_radius[w_loc.probe] = dict(zip(det.fb_radii, per_window[1:], strict=True))
        series = {lab: bernoulli(err[i]) for i, lab in enumerate(labels)}
        theory, marks, theory_record = oracle_theory(model, t_used, seed)
        res.figures["forward_backward"] = report.plot_errorbars(
            t_used, series, out.figures / "forward_backward.png",
            title=f"{model.name}: forward-backward classifier error (Bernoulli 1-sigma)",
            ylabel="classifier error", schedule=sch, theory=theory, marks=marks,
            windows={"threshold": w_sb.to_dict(), **({"local excess": w_loc.to_dict()} if w_loc else {})})
        mseries = {lab: (mse[i].mean(0), mse[i].std(0) / math.sqrt(mse.shape[1])) for i, lab in enumerate(labels)}
        res.figures["forward_backward_mse"] = report.plot_errorbars(
            t_used, mseries, out.figures / "forward_backward_mse.png",
            title="forward-backward per-pixel MSE (mean +- s.e.)",
            ylabel="per-pixel MSE", schedule=sch)
        res.curves["forward_backward_error"] = series_json(t_used, series)
        res.curves["forward_backward_mse"] = series_json(t_used, mseries)
        res.record = {
            "window": w_sb.to_dict(),
            "local_window": w_loc.to_dict() if w_loc else None,
            "thresholds": {lab: {"t": d["center"], "uncertainty": d["uncertainty"], "log_snr": d["log_snr_center"],
                                 "log_snr_uncertainty": d["log_snr_uncertainty"], "valid": d["valid"],
                                 "reason": d["reason"],
                                 "minus_global_log_snr": (d["log_snr_center"] - per_r["global"]["log_snr_center"])
                                 if d["log_snr_center"] is not None and per_r["global"]["log_snr_center"] is not None
                                 else None}
                           for lab, d in per_r.items()},
            "chance": chance,
            "per_radius": per_r, "radii": det.fb_radii, "source": det.cfg.fb.source,
            "arrays": f"arrays/forward_backward{'' if loc == 'window' else '_' + loc}.npz",
            "theory": theory_record, "locality": det.cfg.locality, "local_denoiser": loc,
        }
        if len(localities(det)) > 1 and det.fb_radii:
            res.record["strict"] = self.strict_part(det, results, out, res, per_r["global"])
        return res

    def strict_part(self, det: Detection, results: Results, out: Outputs, res: ProbeOutput,
                    global_window: dict) -> dict:
        """With ``--locality both``: the strictly local radii's thresholds, window and figure beside the window ones
        (the global curve of the strict units is the same computation and is not read again)."""
        model, sch, seed = det.model, det.model.schedule, int(det.cfg.seed)
        err, _, _, t_used, _ = self.arrays(det, results, out, "strict")
        labels = [f"r={r}" for r in det.fb_radii]
        per_window = [None] + [estimators.threshold_window(f"forward_backward_strict[{lab}]", LOCAL_FAMILY, t_used,
                                                           err[1 + i], sch,
                                                           chance=det.chance, seed=seed) for i,
                                                           lab in enumerate(labels)]
        per_r = {lab: w.to_dict() for lab, w in zip(labels, per_window[1:], strict=True)}
        w_loc = self.local_window(det, per_window, "strict")
        res.windows[w_loc.probe] = w_loc
        res.by_radius[w_loc.probe] = dict(zip(det.fb_radii, per_window[1:], strict=True))
        series = {"global": bernoulli(err[0]),
                  **{f"strict {lab}": bernoulli(err[1 + i]) for i, lab in enumerate(labels)}}
        res.figures["forward_backward_strict"] = report.plot_errorbars(
            t_used, series, out.figures / "forward_backward_strict.png",
            title=f"{model.name}: forward-backward error, strictly local denoisers (Bernoulli 1-sigma)",
            ylabel="classifier error",
            schedule=sch, windows={"strict local": w_loc.to_dict()})
        res.curves["forward_backward_error_strict"] = series_json(t_used, series)
        g = global_window["log_snr_center"]
        return {"local_window": w_loc.to_dict(), "per_radius": per_r, "arrays": "arrays/forward_backward_strict.npz",
                "thresholds": {lab: {"t": d["center"], "uncertainty": d["uncertainty"], "log_snr": d["log_snr_center"],
                                     "log_snr_uncertainty": d["log_snr_uncertainty"], "valid": d["valid"],
                                     "reason": d["reason"],
                                     "minus_global_log_snr": d["log_snr_center"] - g
                                     if d["log_snr_center"] is not None and g is not None else None}
                               for lab, d in per_r.items()}}


def _read_generated(det: Detection) -> dict[str, np.ndarray]:
    arrays = [det.store.load(u) for u in ForwardBackward().units(det) if u.probe == GENERATE]
    return {"x0": np.concatenate([a["x0"] for a in arrays]), "labels": np.concatenate([a["labels"] for a in arrays])}


def oracle_theory(model, t_used: np.ndarray, seed: int):
    """Exact forward-backward error and speciation time of an analytic oracle (None for neural models).

    The probe denoises with a deterministic integrator (DDIM / DPM-Solver++), so the matching closed form is the
    ODE readout by the Bayes classifier, 1 - Phi(K(t)) (``oracles.forward_backward_agreement``)."""
    if not hasattr(model, "forward_backward_agreement"):
        return None, None, None
    sch = model.schedule
    t_fine = np.linspace(float(t_used.min()), float(t_used.max()), 200)
    exact = 1 - model.forward_backward_agreement(torch.tensor(t_fine), reverse="ode", readout="classifier").numpy()
    exact_on_grid = 1 - model.forward_backward_agreement(torch.tensor(t_used), reverse="ode",
                                                         readout="classifier").numpy()
    w = estimators.threshold_window("forward_backward_theory", "symmetry_breaking", t_used,
                                    np.stack([exact_on_grid] * 2), sch,
                                    chance=0.5, seed=seed)
    spec = model.speciation() if hasattr(model, "speciation") else {"t": float("nan")}
    marks = {"speciation t_S": spec["t"]} if np.isfinite(spec["t"]) else {}
    record = {"curve": "1 - P_FB(t), ODE reverse, Bayes readout (exact)", "t": t_fine.tolist(), "error": exact.tolist(),
              "window": w.to_dict(), "speciation": spec}
    return {"theory (exact)": (t_fine, exact)}, marks, record
