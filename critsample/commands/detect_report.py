"""Assembling a detection: stored units -> per-probe arrays -> windows, concurrence, summary, figures, report, W&B.

Rank 0 only; every number comes from the stored units, so a resumed run writes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..denoisers import NULL
from ..probes import critical
from ..probes.critical import Window

SCHEMA = "critsample.detect.summary/1"
T_CONVENTION = "t in [0, 1]: 0 = clean data, 1 = pure noise (DDPM: t = k / 1000; flow matching: t = sigma)"
LOG_SNR_CONVENTION = "log-SNR = log(alpha^2 / sigma^2) in nats with x_t = alpha x_0 + sigma eps; decreases as t grows"


def _cat(units, results, key):
    return np.concatenate([results[u.key][key] for u in units], axis=0)


def fid_from_features(real: np.ndarray, fake: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
    """FID between feature sets (metrics.frechet_distance: torchmetrics, float64) and its bootstrap one-sigma over
    resamples of the fake set, the always-conditioned baseline being the fixed reference (as metrics.fid_with_bootstrap).
    100 resamples for features of dimension <= 256, 20 above (each resample is an eigen-decomposition in d)."""
    from ..metrics import bootstrap, frechet_distance

    real_t, fake_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    n_boot = 100 if real_t.shape[1] <= 256 else 20
    return bootstrap(lambda f: frechet_distance(real_t, f), fake_t, n_boot=n_boot, generator=torch.Generator().manual_seed(seed))


def bernoulli(e: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Mean error and its Bernoulli one-sigma sqrt(p (1 - p) / n) (App. C.3)."""
    n = e.shape[axis]
    p = e.mean(axis)
    return p, np.sqrt(p * (1 - p) / max(n, 1))


def assemble(det, units, results, store, out: Path, wall: float) -> dict:
    cfg, model = det.cfg, det.model
    sch = model.schedule
    out = Path(out)
    figs_dir, arr_dir = out / "figures", out / "arrays"
    figs_dir.mkdir(parents=True, exist_ok=True)
    arr_dir.mkdir(parents=True, exist_ok=True)
    by = {}
    for u in units:
        by.setdefault(u.probe, []).append(u)
    windows: dict[str, Window] = {}
    probes: dict[str, dict] = {}
    figures: dict[str, Path] = {}
    curves: dict[str, dict] = {}
    seed = int(cfg.seed)
    from .. import report

    # -- instantaneous probes ------------------------------------------------------------------
    if "gaps" in by:
        k = cfg.gaps.kind
        arrays, per_traj_c, per_traj_l = {}, {}, {}
        cond_series, other_series, t = {}, {}, None
        for traj in cfg.gaps.trajectories:
            us = sorted([u for u in by["gaps"] if u.params["traj"] == traj], key=lambda u: u.params["lo"])
            if not us:
                continue
            t = results[us[0].key]["t"]
            for name in results[us[0].key]:
                if name != "t":
                    v = _cat(us, results, name)
                    arrays[f"{traj}__{name}"] = v
                    arrays[f"{traj}__{name}__mean"], arrays[f"{traj}__{name}__std"] = v.mean(0), v.std(0)
            arrays["t"] = t
            cg = arrays[f"{traj}__cond_gap_{k}"]
            cond_series[traj] = (cg.mean(0), cg.std(0))
            other = "score" if k == "eps" else "eps"
            cg_other = arrays[f"{traj}__cond_gap_{other}"]
            other_series[traj] = (cg_other.mean(0), cg_other.std(0))
            if "cond_gap" in cfg.probes:
                per_traj_c[traj] = critical.half_max_window(f"cond_gap[{traj}]", "symmetry_breaking", t, cg, sch, seed=seed)
            if "locality_gap" in cfg.probes and det.gap_radii:
                variant = "cond" if traj == "sample_cond" else "uncond"
                lg = arrays[f"{traj}__loc_gap_{variant}_{k}"]
                per_traj_l[traj] = critical.half_max_window(f"locality_gap[{traj},{variant}]", "nonlocality", t, lg, sch, seed=seed)
                figures[f"locality_heatmap_{traj}"] = report.plot_heatmap(
                    t, det.gap_radii, lg.mean(0), figs_dir / f"locality_heatmap_{traj}.png",
                    title=f"{model.name}: {variant} locality gap (eq. 7, {k}) per token, {traj} trajectory", label=f"gap ({k})")
                series = {f"r={r}": (lg[:, :, i].mean(0), lg[:, :, i].std(0)) for i, r in enumerate(det.gap_radii)}
                figures[f"locality_curves_{traj}"] = report.plot_curves(
                    t, series, figs_dir / f"locality_curves_{traj}.png", title=f"{variant} locality gap (eq. 7), {traj}",
                    ylabel=f"gap per token ({k}), mean +- std", schedule=sch, windows={"locality": per_traj_l[traj].to_dict()}, logy=True)
                curves[f"locality_gap_{traj}"] = {"x": t.tolist(), "series": {s: (m.tolist(), e.tolist()) for s, (m, e) in series.items()}}
        np.savez(arr_dir / "gaps.npz", **arrays, radii=np.asarray(det.gap_radii), note=np.asarray(
            f"{T_CONVENTION}. Arrays TRAJ__NAME: cond_gap_* (samples, T) eq. 6; loc_gap_{{cond,uncond}}_* (samples, T, radii) eq. 7; "
            "*_score = score units, *_eps = eps units (= sigma x score); norms per image token, model (latent) space; "
            "NAME__mean / NAME__std: mean and standard deviation over samples."))
        primary = next((tr for tr in ("train", "sample_cond", "sample_uncond") if tr in per_traj_c), None)
        if primary:
            windows["cond_gap"] = per_traj_c[primary]
            windows["cond_gap"].probe = "cond_gap"
            windows["cond_gap"].extra["trajectory"] = primary
        lprimary = next((tr for tr in ("train", "sample_uncond", "sample_cond") if tr in per_traj_l), None)
        if lprimary:
            windows["locality_gap"] = per_traj_l[lprimary]
            windows["locality_gap"].probe = "locality_gap"
            windows["locality_gap"].extra["trajectory"] = lprimary
        if cond_series:
            figures["cond_gap"] = report.plot_curves(
                t, cond_series, figs_dir / "cond_gap.png", title=f"{model.name}: conditioning gap (eq. 6) per token",
                ylabel=f"gap per token ({k}), mean +- std", schedule=sch,
                windows={"cond gap": windows["cond_gap"].to_dict()} if "cond_gap" in windows else None, logy=True)
            curves["cond_gap"] = {"x": t.tolist(), "series": {s: (m.tolist(), e.tolist()) for s, (m, e) in cond_series.items()}}
            other = "score" if k == "eps" else "eps"
            figures[f"cond_gap_{other}"] = report.plot_curves(
                t, other_series, figs_dir / f"cond_gap_{other}.png", title=f"{model.name}: conditioning gap (eq. 6) in {other} units",
                ylabel=f"gap per token ({other}), mean +- std", schedule=sch, logy=True)
        for name, ws in (("cond_gap", per_traj_c), ("locality_gap", per_traj_l)):
            if name in cfg.probes:
                probes[name] = {"window": windows[name].to_dict() if name in windows else None,
                                "per_trajectory": {tr: w.to_dict() for tr, w in ws.items()},
                                "arrays": "arrays/gaps.npz", "units": k, "radii": det.gap_radii}

    # -- forward-backward ----------------------------------------------------------------------
    if "forward_backward" in by:
        us = by["forward_backward"]
        ts = sorted({u.params["t"] for u in us})
        per_t = {tv: sorted([u for u in us if u.params["t"] == tv], key=lambda u: u.params["lo"]) for tv in ts}
        err = np.stack([_cat_axis1(per_t[tv], results, "error") for tv in ts], axis=-1)  # (R+1, n, T)
        mse = np.stack([_cat_axis1(per_t[tv], results, "mse") for tv in ts], axis=-1)
        flip = np.stack([_cat_axis1(per_t[tv], results, "flip") for tv in ts], axis=-1)
        t_used = np.array([float(results[per_t[tv][0].key]["t"]) for tv in ts])
        labels = ["global"] + [f"r={r}" for r in det.fb_radii]
        np.savez(arr_dir / "forward_backward.npz", t=t_used, t_requested=np.asarray(ts), radii=np.asarray([-1, *det.fb_radii]),
                 error=err, flip=flip, mse=mse, error_mean=err.mean(1), error_sigma=np.sqrt(err.mean(1) * (1 - err.mean(1)) / err.shape[1]),
                 mse_mean=mse.mean(1), mse_std=mse.std(1), note=np.asarray(
                     f"{T_CONVENTION}. error/flip/mse are (radius, sample, t); radius -1 = global. error: classifier label of the "
                     "denoised image != reference label; flip: != label of the clean image; mse: per-pixel MSE in [0, 1] pixels; "
                     "error_mean / error_sigma (Bernoulli), mse_mean / mse_std: (radius, t)."))
        w_sb = critical.threshold_window("forward_backward", "symmetry_breaking", t_used, err[0], sch, seed=seed)
        per_r = {lab: critical.threshold_window(f"forward_backward[{lab}]", "symmetry_breaking", t_used, err[i], sch, seed=seed).to_dict()
                 for i, lab in enumerate(labels)}
        windows["forward_backward"] = w_sb
        if det.fb_radii:
            excess = np.moveaxis(err[1:] - err[:1], 0, -1)  # (n, T, R)
            windows["forward_backward_local"] = critical.half_max_window("forward_backward_local", "nonlocality", t_used, excess, sch, seed=seed, min_z=2.0)
            windows["forward_backward_local"].rule = ("FWHM of the local-minus-global error (radii normalised and averaged): where local denoising "
                                                      "fails but global does not; valid only if the peak excess is >= 2 standard errors")
        series = {lab: bernoulli(err[i]) for i, lab in enumerate(labels)}
        theory, marks, theory_record = _oracle_theory(model, t_used, sch, seed)
        figures["forward_backward"] = report.plot_errorbars(
            t_used, series, figs_dir / "forward_backward.png", title=f"{model.name}: forward-backward classifier error (Bernoulli 1-sigma)",
            ylabel="classifier error", schedule=sch, theory=theory, marks=marks,
            windows={"threshold": w_sb.to_dict(), **({"local excess": windows["forward_backward_local"].to_dict()} if det.fb_radii else {})})
        mseries = {lab: (mse[i].mean(0), mse[i].std(0) / math.sqrt(mse.shape[1])) for i, lab in enumerate(labels)}
        figures["forward_backward_mse"] = report.plot_errorbars(
            t_used, mseries, figs_dir / "forward_backward_mse.png", title="forward-backward per-pixel MSE (mean +- s.e.)",
            ylabel="per-pixel MSE", schedule=sch)
        curves["forward_backward_error"] = {"x": t_used.tolist(), "series": {s: (m.tolist(), e.tolist()) for s, (m, e) in series.items()}}
        curves["forward_backward_mse"] = {"x": t_used.tolist(), "series": {s: (m.tolist(), e.tolist()) for s, (m, e) in mseries.items()}}
        probes["forward_backward"] = {
            "window": w_sb.to_dict(),
            "local_window": windows["forward_backward_local"].to_dict() if det.fb_radii else None,
            "thresholds": {lab: {"t": d["center"], "uncertainty": d["uncertainty"], "log_snr": d["log_snr_center"]} for lab, d in per_r.items()},
            "per_radius": per_r, "radii": det.fb_radii, "source": cfg.fb.source, "arrays": "arrays/forward_backward.npz",
            "theory": theory_record,
        }

    # -- windowed scans --------------------------------------------------------------------------
    scans_out = {}
    if "window_baseline" in by:
        base = sorted(by["window_baseline"], key=lambda u: u.params["lo"])
        base_feats = _cat(base, results, "features")
        base_pred, base_target = _cat(base, results, "pred"), _cat(base, results, "target")
        text_target = None
        if bool((base_target == NULL).all()):  # text models: the majority label of the always-conditioned samples
            text_target = int(np.bincount(base_pred.astype(np.int64)).argmax())
        target_of = (lambda tg: np.where(tg == NULL, text_target, tg)) if text_target is not None else (lambda tg: tg)
        base_err = (base_pred != target_of(base_target)).astype(np.float64)
        strips_base = results[base[0].key]["images"]
        for probe, width in (("window_cond", cfg.windows.width), ("window_locality", cfg.windows.locality_width)):
            if probe not in by:
                continue
            us = by[probe]
            radii = sorted({u.params["radius"] for u in us}, key=lambda r: -1 if r is None else r)
            scans = sorted({u.params["scan"] for u in us})
            res = {}
            for scan in scans:
                for r in radii:
                    t0s = sorted({u.params["t0"] for u in us if u.params["scan"] == scan and u.params["radius"] == r})
                    if not t0s:
                        continue
                    errs, fids, sig, centers, strips = [], [], [], [], {}
                    for t0 in t0s:
                        g = sorted([u for u in us if u.params["scan"] == scan and u.params["radius"] == r and u.params["t0"] == t0], key=lambda u: u.params["lo"])
                        pred, target = _cat(g, results, "pred"), _cat(g, results, "target")
                        errs.append((pred != target_of(target)).astype(np.float64))
                        f, s = fid_from_features(base_feats, _cat(g, results, "features"), seed=seed)
                        fids.append(f), sig.append(s)
                        lo, hi = t0, min(t0 + width, 1.0)
                        centers.append((lo + hi) / 2)
                        strips[f"[{lo:.2f},{hi:.2f}]"] = results[g[0].key]["images"]
                    res[(scan, r)] = {"t0": np.asarray(t0s), "centers": np.asarray(centers), "errors": np.stack(errs, 1),
                                      "fid": np.asarray(fids), "fid_sigma": np.asarray(sig), "strips": strips}
            scans_out[probe] = res
            family = "symmetry_breaking" if probe == "window_cond" else "nonlocality"
            inside = "cond_in" if probe == "window_cond" else "loc_in"
            outside = "cond_out" if probe == "window_cond" else "loc_out"
            ins = [v for (s, r), v in res.items() if s == inside]
            centers = ins[0]["centers"]
            errors = np.stack([v["errors"] for v in ins], axis=-1)  # (n, P, R)
            w = critical.scan_minimum(probe, family, centers, errors, width, sch, seed=seed)
            w.extra["fid_window"] = critical.fid_minimum(f"{probe}[fid]", family, centers, np.mean([v["fid"] for v in ins], 0),
                                                         np.sqrt(np.mean([v["fid_sigma"] ** 2 for v in ins], 0)), width, sch, seed=seed).to_dict()
            per_radius = {}
            if probe == "window_locality":
                for (s, r), v in res.items():
                    if s == inside:
                        per_radius[str(r)] = critical.scan_minimum(f"{probe}[r={r}]", family, v["centers"], v["errors"], width, sch, seed=seed).to_dict()
            outs = [v for (s, r), v in res.items() if s == outside]
            if outs:
                wo = critical.scan_minimum(f"{probe}[{outside}]", family, outs[0]["centers"], np.stack([v["errors"] for v in outs], -1), width, sch, maximum=True, seed=seed)
                w.extra["complement_window"] = wo.to_dict()
            windows[probe] = w
            series, fseries = {}, {}
            for (s, r), v in res.items():
                lab = s + ("" if r is None else f" r={r}")
                series[lab] = bernoulli(v["errors"])
                fseries[lab] = (v["fid"], v["fid_sigma"])
            be, bs = bernoulli(base_err)
            series["always conditioned"] = (np.full(len(centers), be), np.full(len(centers), bs))
            figures[probe] = report.plot_errorbars(
                centers, series, figs_dir / f"{probe}.png", title=f"{model.name}: {probe} (w = {width:g}), classifier error (Bernoulli 1-sigma)",
                ylabel="classifier error", xlabel="window center t (0 = clean, 1 = noise)", schedule=sch, windows={probe: w.to_dict()})
            figures[f"{probe}_fid"] = report.plot_errorbars(
                centers, fseries, figs_dir / f"{probe}_fid.png", title=f"{probe}: FID to the always-conditioned baseline (bootstrap 1-sigma)",
                ylabel="FID (classifier features)", xlabel="window center t", schedule=sch, windows={probe: w.to_dict()})
            curves[f"{probe}_error"] = {"x": list(map(float, centers)), "x_label": "window_center_t", "series": {s: (list(map(float, m)), list(map(float, e))) for s, (m, e) in series.items()}}
            curves[f"{probe}_fid"] = {"x": list(map(float, centers)), "x_label": "window_center_t", "series": {s: (list(map(float, m)), list(map(float, e))) for s, (m, e) in fseries.items()}}
            first = ins[0]
            strip_rows = {"always conditioned": strips_base, **first["strips"]}
            figures[f"{probe}_strips"] = report.plot_strips(strip_rows, figs_dir / f"{probe}_strips.png", scale=max(1, 32 // max(1, strips_base.shape[-1])))
            probes[probe] = {
                "window": w.to_dict(), "per_radius": per_radius or None, "width": width,
                "scan": {f"{s}" + ("" if r is None else f"[r={r}]"): {
                    "t0": v["t0"].tolist(), "window_center": v["centers"].tolist(), "error": v["errors"].mean(0).tolist(),
                    "error_sigma": bernoulli(v["errors"])[1].tolist(), "fid": v["fid"].tolist(), "fid_sigma": v["fid_sigma"].tolist()}
                    for (s, r), v in res.items()},
                "baseline_error": float(be), "baseline_error_sigma": float(bs),
                "strip_rows": list(strip_rows), "arrays": f"arrays/{probe}.npz",
            }
            np.savez(arr_dir / f"{probe}.npz", **{
                f"{s}{'' if r is None else f'_r{r}'}__{name}": v[name] for (s, r), v in res.items() for name in ("t0", "centers", "errors", "fid", "fid_sigma")},
                baseline_errors=base_err, note=np.asarray(
                    f"{T_CONVENTION}. SCAN__errors (samples, positions) 0/1 classifier errors; centers = window centers; "
                    "fid, fid_sigma: FID (classifier features) to the always-conditioned baseline and its bootstrap one-sigma."))

    # -- windows, concurrence, combined window ----------------------------------------------------
    sb = [windows[k] for k in ("cond_gap", "forward_backward", "window_cond") if k in windows]
    nl = [windows[k] for k in ("locality_gap", "forward_backward_local", "window_locality") if k in windows]
    conc = {}
    for pair, a, b in (("instantaneous", "cond_gap", "locality_gap"), ("forward_backward", "forward_backward", "forward_backward_local"),
                       ("windowed", "window_cond", "window_locality")):
        if a in windows and b in windows and windows[a].valid and windows[b].valid:
            conc[pair] = critical.concurrence(windows[a], windows[b])
    w_sb, w_nl = critical.combine(sb, sch, "symmetry_breaking"), critical.combine(nl, sch, "nonlocality")
    if w_sb is not None and w_nl is not None:
        conc["overall"] = critical.concurrence(w_sb, w_nl)
    combined = critical.combine(sb + nl, sch)
    cw = None
    if combined is not None:
        cw = combined.to_dict()
        cw["members"] = combined.extra["members"]
    summary = {
        "schema": SCHEMA,
        "model": model.name,
        "model_id": det.model_id,
        "schedule": {
            "kind": sch.kind, "num_train_timesteps": sch.num_train_timesteps, "beta_start": sch.beta_start, "beta_end": sch.beta_end,
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
        "concurrence": conc,
        "critical_window": cw,
        "suggested_radius": suggested_radius(det, probes, windows, cw),
        "cost": {
            "model_evaluations": int(sum(u.forwards for u in units)),
            "model_evaluations_note": "network forwards summed over rows (one row = one sample at one time with one denoiser; guided = 2)",
            "units": len(units), "units_computed_this_run": store.computed, "units_loaded": store.loaded,
            "wall_seconds_this_run": wall,
        },
        "outputs": {"report": "report.md", "figures": {k: str(Path(v).relative_to(out)) for k, v in figures.items() if v is not None},
                    "arrays": sorted(str(p.relative_to(out)) for p in arr_dir.glob("*.npz")), "units": "units/"},
    }
    summary = critical._finite(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _write_config(det, out)
    write_report(summary, out)
    if cfg.wandb:
        from ..tracking import log_detect

        summary_path = log_detect(summary, out, figures=figures, curves=curves, config=_config_dict(det))
        summary["wandb_dir"] = summary_path
    return summary


def _cat_axis1(units, results, key):
    return np.concatenate([results[u.key][key] for u in units], axis=1)


def suggested_radius(det, probes: dict, windows: dict, cw: dict | None) -> int | None:
    """The smallest radius that is good enough outside the critical window, for ``critsample sample --adaptive``.

    With a windowed-locality scan: the smallest radius whose best position's error is within 2 Bernoulli sigma of the
    best radius's. Else with a locality gap: the smallest radius whose gap, averaged over the times outside the
    critical window, is at most half that of the smallest radius. Else the median radius probed.
    """
    scan = (probes.get("window_locality") or {}).get("scan") or {}
    best = {}
    for name, v in scan.items():
        if name.startswith("loc_in[r="):
            r = int(name[len("loc_in[r="):-1])
            k = int(np.argmin(v["error"]))
            best[r] = (v["error"][k], v["error_sigma"][k])
    if best:
        e_min = min(e for e, _ in best.values())
        return min(r for r, (e, s) in best.items() if e <= e_min + 2 * max(s, 1e-9) + 1e-12)
    radii = det.gap_radii or det.fb_radii or det.win_radii
    return int(radii[len(radii) // 2]) if radii else None


def _config_dict(det) -> dict:
    from dataclasses import asdict

    d = asdict(det.cfg)
    d["resolved"] = {"guidance": det.guidance, "gap_radii": det.gap_radii, "fb_radii": det.fb_radii, "window_radii": det.win_radii,
                     "t0s": det.t0s, "fb_times": det.fb_times, "class_id": det.class_id, "model_id": det.model_id}
    return d


def _write_config(det, out: Path) -> None:
    import yaml
    from dataclasses import asdict

    (out / "config.yaml").write_text(yaml.safe_dump(asdict(det.cfg), sort_keys=False))


def _fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_report(summary: dict, out: Path) -> Path:
    """One-page Markdown report embedding the figures."""
    s = summary
    lines = [f"# Critical windows of `{s['model']}`", ""]
    lines += [f"Preset `{s['preset']}`, seed {s['seed']}, guidance w = {s['guidance']}, token grid {s['token_grid']}x{s['token_grid']}. "
              f"{s['schedule']['t_convention']}; {s['schedule']['log_snr_convention']}.", ""]
    cw = s.get("critical_window")
    if cw:
        lines += [f"**Combined critical window**: t in [{_fmt(cw['t_start'])}, {_fmt(cw['t_end'])}], center {_fmt(cw['center'])} "
                  f"+- {_fmt(cw['uncertainty'])} (log-SNR {_fmt(cw['log_snr_start'], 2)} .. {_fmt(cw['log_snr_end'], 2)}, "
                  f"center {_fmt(cw['log_snr_center'], 2)} +- {_fmt(cw['log_snr_uncertainty'], 2)}); members: {', '.join(cw.get('members', []))}. "
                  f"Suggested local radius outside it: {s.get('suggested_radius')}.", ""]
    lines += ["| probe | family | t_start | t_end | center +- 1 sigma | log-SNR start .. end | rule |", "|---|---|---|---|---|---|---|"]
    for name, w in s["windows"].items():
        lines.append(f"| {name} | {w['family']} | {_fmt(w['t_start'])} | {_fmt(w['t_end'])} | {_fmt(w['center'])} +- {_fmt(w['uncertainty'])} | "
                     f"{_fmt(w['log_snr_start'], 2)} .. {_fmt(w['log_snr_end'], 2)} | {w['rule']} |")
    lines.append("")
    if s["concurrence"]:
        lines += ["## Concurrence", ""]
        for pair, v in s["concurrence"].items():
            lines.append(f"- **{pair}**: {v['verdict']}.")
        lines.append("")
    captions = {
        "cond_gap": "Conditioning gap (eq. 6) per image token along each trajectory (mean +- std over samples), in the units the window uses.",
        "cond_gap_score": "Conditioning gap in score units (= eps units / sigma(t); diverges as sigma -> 0 at the clean end).",
        "cond_gap_eps": "Conditioning gap in eps units (= sigma(t) x score units).",
        "forward_backward": "Forward-backward: classifier error of unconditionally denoised images, global and local (Bernoulli 1-sigma).",
        "forward_backward_mse": "Forward-backward per-pixel MSE.",
        "window_cond": "Windowed conditioning: error vs window position (cond_in: conditioning only inside; cond_out: only outside).",
        "window_cond_fid": "Windowed conditioning: FID to the always-conditioned baseline.",
        "window_cond_strips": "Samples per window position (first row: always conditioned; then one row per window, cond_in).",
        "window_locality": "Windowed locality: global conditional inside / local unconditional outside (loc_in) and the reverse (loc_out).",
        "window_locality_fid": "Windowed locality: FID to the always-conditioned baseline.",
        "window_locality_strips": "Samples per window position (first row: always conditioned; then one row per window, loc_in, first radius).",
    }
    lines += ["## Figures", ""]
    for name, path in s["outputs"]["figures"].items():
        cap = captions.get(name) or ("Locality gap (eq. 7): " + name.replace("_", " "))
        lines += [f"**{name}** — {cap}", "", f"![{name}]({path})", ""]
    c = s["cost"]
    lines += [f"Cost: {c['model_evaluations']} model evaluations in {c['units']} stored units "
              f"({c['units_computed_this_run']} computed in this run, {c['units_loaded']} loaded). Raw arrays: {', '.join(s['outputs']['arrays'])}.", ""]
    path = Path(out) / "report.md"
    path.write_text("\n".join(lines))
    return path


def _oracle_theory(model, t_used: np.ndarray, sch, seed: int):
    """Exact forward-backward error and speciation time of an analytic oracle (None for neural models).

    The probe denoises with a deterministic integrator (DDIM / DPM-Solver++), so the matching closed form is the
    ODE readout by the Bayes classifier, 1 - Phi(K(t)) (``oracles.forward_backward_agreement``)."""
    if not hasattr(model, "forward_backward_agreement"):
        return None, None, None
    import torch

    t_fine = np.linspace(float(t_used.min()), float(t_used.max()), 200)
    exact = 1 - model.forward_backward_agreement(torch.tensor(t_fine), reverse="ode", readout="classifier").numpy()
    exact_on_grid = 1 - model.forward_backward_agreement(torch.tensor(t_used), reverse="ode", readout="classifier").numpy()
    w = critical.threshold_window("forward_backward_theory", "symmetry_breaking", t_used, np.stack([exact_on_grid] * 2), sch, seed=seed)
    spec = model.speciation() if hasattr(model, "speciation") else {"t": float("nan")}
    marks = {"speciation t_S": spec["t"]} if np.isfinite(spec["t"]) else {}
    record = {"curve": "1 - P_FB(t), ODE reverse, Bayes readout (exact)", "t": t_fine.tolist(), "error": exact.tolist(),
              "window": w.to_dict(), "speciation": spec}
    return {"theory (exact)": (t_fine, exact)}, marks, record

