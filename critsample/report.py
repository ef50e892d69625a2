"""Figures, image grids and the run report (side effects: the file system lives here, in store.py and summary.py; W&B in
tracking.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .store import atomic_write


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> one uint8 grid (rows of ``nrow``), HWC or HW for one channel."""
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    x = torch.cat([x, torch.ones(rows * nrow - n, c, h, w)]) if rows * nrow > n else x
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=1.0)
    grid = rearrange(x, "(r q) c h w -> (r h) (q w) c", q=nrow)
    grid = (grid.numpy() * 255).round().astype(np.uint8)
    return grid[..., 0] if c == 1 else grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a uint8 HW / HWC array as PNG, upscaled by ``scale`` with nearest neighbour (tiny digits stay crisp)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
    return path


# -- detect figures (matplotlib, Agg) -------------------------------------------------------------
# Every x axis is critsample time t (0 = clean, 1 = noise); a secondary axis on top gives log-SNR where a schedule
# is passed. Windows are drawn as shaded spans with their label.


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _log_snr_axis(ax, schedule) -> None:
    if schedule is None:
        return
    def forward(t):
        return schedule.log_snr(torch.as_tensor(np.clip(t, 0, 1), dtype=torch.float64)).numpy()

    def inverse(lam):
        return schedule.t_from_log_snr(torch.as_tensor(np.asarray(lam, dtype=np.float64))).numpy()

    top = ax.secondary_xaxis("top", functions=(forward, inverse))
    top.set_xticks([round(float(schedule.log_snr(t)), 1) for t in (0.1, 0.3, 0.5, 0.7, 0.9)])
    top.set_xlabel("log-SNR  log(alpha^2/sigma^2)")


def _spans(ax, windows) -> None:
    colors = ["tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for i, (label, w) in enumerate((windows or {}).items()):
        if w is None or w.get("t_start") is None or w.get("t_end") is None:
            continue
        ax.axvspan(w["t_start"], w["t_end"], color=colors[i % len(colors)], alpha=0.15, label=f"{label} window")


def _finish(fig, ax, path, title, xlabel="t (0 = clean, 1 = noise)"):
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format=path.suffix.lstrip(".") or "png"))
    _plt().close(fig)
    return path


def plot_curves(t, series: dict, path, *, title: str, ylabel: str, schedule=None, windows=None, logy: bool = False):
    """Curves vs t with one-sigma bands: ``series`` = {label: (mean (T,), err (T,))}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (mean, err) in series.items():
        mean, err = np.asarray(mean, dtype=float), np.asarray(err, dtype=float)
        ax.plot(t, mean, marker=".", label=label)
        ax.fill_between(t, mean - err, mean + err, alpha=0.2)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _spans(ax, windows)
    _log_snr_axis(ax, schedule)
    return _finish(fig, ax, path, title)


def plot_errorbars(x, series: dict, path, *, title: str, ylabel: str, xlabel: str = "t (0 = clean, 1 = noise)",
                   schedule=None,
                   windows=None, theory: dict | None = None, marks: dict | None = None):
    """Points with one-sigma error bars: ``series`` = {label: (mean, err)}; ``theory`` = {label: (x, y)} exact curves
    drawn as lines over them (analytic oracles); ``marks`` = {label: t} vertical lines (e.g. the speciation time)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (mean, err) in series.items():
        ax.errorbar(x, mean, yerr=err, marker="o", ms=3, capsize=2, label=label)
    for label, (tx, ty) in (theory or {}).items():
        ax.plot(tx, ty, "k-", lw=1.2, label=label)
    for label, tv in (marks or {}).items():
        ax.axvline(tv, color="k", ls=":", lw=1, label=label)
    ax.set_ylabel(ylabel)
    _spans(ax, windows)
    _log_snr_axis(ax, schedule)
    return _finish(fig, ax, path, title, xlabel)


def plot_heatmap(t, radii, values, path, *, title: str, label: str = "locality gap"):
    """Heatmap of values (T, R) over t (x) and radius (y), log colour scale."""
    return plot_heatmaps(t, radii, {title: values}, path, label=label)


def shared_log_range(panels) -> tuple[float, float] | None:
    """(vmin, vmax) of one log colour scale over every panel: the smallest positive and the largest value; None when
    no two positive values differ."""
    pos = np.concatenate([np.asarray(v, dtype=float).ravel() for v in panels])
    pos = pos[pos > 0]
    return (float(pos.min()), float(pos.max())) if pos.size and pos.max() > pos.min() else None


def plot_heatmaps(t, radii, panels: dict, path, *, title: str | None = None, label: str = "locality gap"):
    """Heatmaps of ``panels`` = {panel title: values (T, R)} side by side over t (x) and radius (y), under one log
    colour scale (:func:`shared_log_range`) and one colour bar; ``title`` above them all."""
    from matplotlib.colors import LogNorm

    plt = _plt()
    lim = shared_log_range(panels.values())
    norm = LogNorm(*lim) if lim else None
    n = len(panels)
    fig, axes = plt.subplots(1, n + 1, figsize=(0.3 + 5.7 * n, 2.2 + 0.25 * len(radii) + (0.3 if title else 0)),
                             gridspec_kw={"width_ratios": [1] * n + [0.04 / n]})
    order = np.argsort(t)
    tt = np.asarray(t)[order]
    edges = np.concatenate([[tt[0] - (tt[1] - tt[0]) / 2 if len(tt) > 1 else tt[0] - 0.01], (tt[1:] + tt[:-1]) / 2,
                            [tt[-1] + (tt[-1] - tt[-2]) / 2 if len(tt) > 1 else tt[0] + 0.01]])
    for ax, (name, values) in zip(axes, panels.items(), strict=False):  # the last axis holds the colour bar
        v = np.asarray(values, dtype=float).T[:, order]  # (R, T)
        mesh = ax.pcolormesh(edges, np.arange(len(radii) + 1) - 0.5, np.where(v > 0, v, np.nan), norm=norm,
                             cmap="viridis")
        ax.set_yticks(range(len(radii)), [str(r) for r in radii])
        ax.set_xlabel("t (0 = clean, 1 = noise)")
        ax.set_title(name, fontsize=10)
    axes[0].set_ylabel("radius r")
    fig.colorbar(mesh, cax=axes[-1], label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_frontier(certification: dict, path):
    """Cost vs accuracy and cost vs FD of a certification (:meth:`critsample.certify.Certification.to_dict`): every
    plan with its one-sigma bar and its one-sided 95 % bound (a small triangle: baseline accuracy minus the drop's
    upper bound, baseline FD times the ratio's upper bound; certification compares these with the dashed tolerance),
    the Pareto front of each panel as a step line, the baseline as a square and the chosen plan as a star, all in
    sample; with a ``confirmation`` (``critsample tune``), the chosen plan and the baseline measured again on the
    fresh seed (diamond, hollow square) with the fresh bound. Cost = analytic GFLOPs per sample (forwards when
    unknown)."""
    plt = _plt()
    entries = [certification["baseline"], *certification["candidates"]]
    flops = np.array([e["cost"]["flops"] if e["cost"]["flops"] is not None else np.nan for e in entries], dtype=float)
    use_flops = bool(np.isfinite(flops).all())
    cost = flops / 1e9 if use_flops else np.array([e["cost"]["forwards"] for e in entries], dtype=float)
    base, tol = certification["baseline"]["quality"], certification["tolerance"]
    colors = {"full": "k", "interval": "tab:blue", "adaptive": "tab:orange"}
    # adaptive plans one group per outside step kinds (network, gaussian, gaussian/local-linear, ...)
    names = list(dict.fromkeys(_group(e) for e in entries))
    extra = [n for n in names if n not in colors]
    palette = ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    groups = [(k, c, "o") for k, c in colors.items() if k != "adaptive"] + [
        (n, palette[i % len(palette)], "os^vD<>p"[(i // len(palette)) % 8]) for i, n in enumerate(extra)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    score = {"accuracy": "class accuracy", "clip_score": "CLIP score / 100"}.get(base.get("score", "accuracy"),
                                                                                 base.get("score", "score"))
    panels = (("accuracy", score, "pareto_accuracy", base["accuracy"] - tol["accuracy_points"] / 100),
              ("fd", "FD to the judge's reference", "pareto_fd", base["fd"] * (1 + tol["fd_relative"])))
    conf = certification.get("confirmation")

    def bound_of(q: dict, b: dict, key: str) -> float:
        return b["accuracy"] - q["accuracy_drop_upper"] if key == "accuracy" else b["fd"] * q["fd_ratio_upper"]

    for ax, (key, label, front, bound) in zip(axes, panels, strict=True):
        if all("accuracy_drop_upper" in e["quality"] for e in entries):
            ax.plot(cost, [bound_of(e["quality"], base, key) for e in entries], "^" if key == "fd" else "v", ms=4,
                    color="tab:red", alpha=0.6, ls="none", label="95 % bound (in sample)")
        for kind, color, marker in groups:
            idx = [i for i, e in enumerate(entries) if _group(e) == kind]
            if idx:
                ax.errorbar(cost[idx], [entries[i]["quality"][key] for i in idx],
                            yerr=[entries[i]["quality"][f"{key}_sigma"] for i in idx],
                            fmt=marker, ms=4, capsize=2, color=color, alpha=0.7, label=kind)
        on = sorted((cost[i], e["quality"][key]) for i, e in enumerate(entries) if e.get(front))
        if on:
            ax.step(*zip(*on, strict=True), where="post", color="tab:green", lw=1, marker="o", ms=10, mfc="none",
                    label="Pareto front")
        ax.axhline(bound, color="tab:red", ls="--", lw=1, label="tolerance bound")
        ax.plot(cost[0], base[key], "s", ms=9, mfc="none", color="k", label="baseline")
        chosen = next(i for i, e in enumerate(entries) if e.get("chosen"))
        ax.plot(cost[chosen], entries[chosen]["quality"][key], "*", ms=16, color="gold", mec="k", label="chosen")
        if conf is not None:
            q, b = conf["quality"], conf["baseline_quality"]
            ax.errorbar(cost[chosen], q[key], yerr=q[f"{key}_sigma"], fmt="D", ms=7, capsize=2, color="tab:purple",
                        mec="k", label=f"chosen, fresh seed {conf['seed']}")
            ax.plot(cost[0], b[key], "s", ms=9, mfc="none", color="tab:purple", label="baseline, fresh seed")
            ax.plot(cost[chosen], bound_of(q, b, key), "^" if key == "fd" else "v", ms=7, color="tab:purple",
                    label="95 % bound (fresh)")
        ax.set_xlabel("GFLOPs per sample" if use_flops else "forwards per sample")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    verdict = "" if conf is None else (" (confirmed on fresh noise)" if conf["passed"] else
                                        " (NOT confirmed on fresh noise: full guidance kept)")
    fig.suptitle(f"cost-quality frontier ({certification['setup'].get('num_samples')} paired samples): chosen "
                 f"{conf['candidate'] if conf else certification['name']}{verdict}",
                 fontsize=9)
    return _save(fig, path)


def _group(entry: dict) -> str:
    """A frontier entry's group: full, interval, or ``adaptive`` with its outside step kinds."""
    kind = entry.get("kind") or next((k for k in ("full", "interval") if entry["name"].startswith(k)), "adaptive")
    return kind if kind != "adaptive" else f"adaptive: {entry.get('outside_kinds', 'network')}"


def plot_strips(rows: dict, path, scale: int = 4):
    """One row of sample images per label (e.g. per window position), labels on the left:
    ``rows`` = {label: uint8 (N, C, H, W)}."""
    n = max((len(v) for v in rows.values()), default=0)
    if n == 0:
        return None
    imgs = []
    for v in rows.values():
        v = torch.as_tensor(np.asarray(v)).float() / 255.0
        if len(v) < n:
            v = torch.cat([v, torch.ones(n - len(v), *v.shape[1:])])
        imgs.append(v)
    grid = image_grid(torch.cat(imgs), nrow=n)
    plt = _plt()
    h, w = grid.shape[:2]
    k = min(1.0, 14.0 / (0.012 * w * scale))  # at most ~16 inches wide for large images
    fig, ax = plt.subplots(figsize=(2.0 + 0.012 * w * scale * k, 0.3 + 0.012 * h * scale * k))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    cell = h / len(rows)
    ax.set_yticks([cell * (i + 0.5) for i in range(len(rows))], list(rows))
    ax.set_xticks([])
    ax.tick_params(axis="y", labelsize=7, length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


# -- the detection report -------------------------------------------------------------------------


def _fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_detect_report(summary: dict, out: Path) -> Path:
    """The one-page Markdown report of a detection (``report.md``), embedding its figures."""
    s = summary
    lines = [f"# Critical windows of `{s['model']}`", ""]
    lines += [f"Preset `{s['preset']}`, seed {s['seed']}, guidance w = {s['guidance']}, token grid "
              f"{s['token_grid']}x{s['token_grid']}. {s['schedule']['t_convention']}; "
              f"{s['schedule']['log_snr_convention']}.", ""]
    cw = s.get("critical_window")
    if cw:
        lines += [f"**Combined critical window**: t in [{_fmt(cw['t_start'])}, {_fmt(cw['t_end'])}], center "
                  f"{_fmt(cw['center'])} +- {_fmt(cw['uncertainty'])} (log-SNR {_fmt(cw['log_snr_start'], 2)} .. "
                  f"{_fmt(cw['log_snr_end'], 2)}, center {_fmt(cw['log_snr_center'], 2)} +- "
                  f"{_fmt(cw['log_snr_uncertainty'], 2)}); members: {', '.join(cw.get('members', []))}. Suggested "
                  f"local radius outside it: {s.get('suggested_radius')}"
                  + (f" ({s['suggested_radius_reason']})" if s.get("suggested_radius_reason") else "") + ".", ""]
    lines += ["| probe | family | valid | t_start | t_end | center +- 1 sigma | log-SNR center +- 1 sigma "
              "| log-SNR start .. end | rule |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, w in s["windows"].items():
        valid = "yes" if w.get("valid", True) else f"no: {w.get('reason') or 'invalid'}"
        lines.append(f"| {name} | {w['family']} | {valid} | {_fmt(w['t_start'])} | {_fmt(w['t_end'])} | "
                     f"{_fmt(w['center'])} +- {_fmt(w['uncertainty'])} | {_fmt(w['log_snr_center'], 2)} +- "
                     f"{_fmt(w['log_snr_uncertainty'], 2)} | {_fmt(w['log_snr_start'], 2)} .. "
                     f"{_fmt(w['log_snr_end'], 2)} | {w['rule']} |")
    lines.append("")
    pm = s.get("primary")
    if pm:
        lines += ["## Primary test (declared in the config)", "",
                  f"**{pm['symmetry_breaking']} vs {pm['window']}** at radius r = {pm['radius']}, {pm['locality']} "
                  f"local denoiser ({pm['rule']}): {pm['test']['verdict']}.", ""]
        rows = pm.get("nonlocality_by_radius") or []
        if rows:
            lines += [f"d(r) = {pm['symmetry_breaking']} minus {pm['window']} at every probed radius (log-SNR, nats; "
                      "paired 95 % interval):", "", "| r | d(r) | 95 % interval | outcome |", "|---|---|---|---|"]
            for row in rows:
                ci = row.get("d_ci95_log_snr")
                lines.append(f"| {row['radius']} | {_fmt(row.get('d_log_snr'), 2)} | "
                             + (f"[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]" if ci else "-") + f" | {row['outcome']} |")
            lines.append("")
    secondary = {k: v for k, v in (s.get("concurrence") or {}).items() if k != "primary"}
    if secondary:
        lines += ["## Secondary concurrence tests", ""]
        for pair, v in secondary.items():
            lines.append(f"- **{pair}**: {v['verdict']}.")
        lines.append("")
    captions = {
        "cond_gap": "Conditioning gap (eq. 6) per image token along each trajectory (mean +- std over samples), in the "
                    "units the window uses.",
        "cond_gap_score": "Conditioning gap in score units (= eps units / sigma(t); diverges as sigma -> 0 at the "
                          "clean end).",
        "cond_gap_eps": "Conditioning gap in eps units (= sigma(t) x score units).",
        "forward_backward": "Forward-backward: classifier error of unconditionally denoised images, global and local "
                            "(Bernoulli 1-sigma).",
        "forward_backward_mse": "Forward-backward per-pixel MSE.",
        "window_cond": "Windowed conditioning: error vs window position (cond_in: conditioning only inside; cond_out: "
                       "only outside).",
        "window_cond_fid": "Windowed conditioning: FID to the always-conditioned baseline.",
        "window_cond_strips": "Samples per window position (first row: always conditioned; then one row per window, "
                              "cond_in).",
        "window_locality": "Windowed locality: global conditional inside / local unconditional outside (loc_in) and "
                           "the reverse (loc_out).",
        "window_locality_fid": "Windowed locality: FID to the always-conditioned baseline.",
        "window_locality_strips": "Samples per window position (first row: always conditioned; then one row per "
                                  "window, loc_in, first radius).",
    }
    lines += ["## Figures", ""]
    for name, path in s["outputs"]["figures"].items():
        cap = captions.get(name) or ("Locality gap (eq. 7): " + name.replace("_", " "))
        lines += [f"**{name}** — {cap}", "", f"![{name}]({path})", ""]
    c = s["cost"]
    lines += [f"Cost: {c['model_evaluations']} model evaluations in {c['units']} stored units "
              f"({c['units_computed_this_run']} computed in this run, {c['units_loaded']} loaded). Raw arrays: "
              f"{', '.join(s['outputs']['arrays'])}.", ""]
    return atomic_write(Path(out) / "report.md", "\n".join(lines))
