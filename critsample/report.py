"""Figures, image grids and the run report (side effects: the file system and W&B live here and in store.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange


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
    img.save(path)
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
    import numpy as np

    from .probes.critical import _t_of, log_snr

    top = ax.secondary_xaxis("top", functions=(lambda t: log_snr(schedule, np.clip(t, 0, 1)), lambda l: np.array([_t_of(schedule, v) for v in np.ravel(l)]).reshape(np.shape(l))))
    top.set_xticks([round(float(log_snr(schedule, t)), 1) for t in (0.1, 0.3, 0.5, 0.7, 0.9)])
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_curves(t, series: dict, path, *, title: str, ylabel: str, schedule=None, windows=None, logy: bool = False):
    """Curves vs t with one-sigma bands: ``series`` = {label: (mean (T,), err (T,))}."""
    import numpy as np

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


def plot_errorbars(x, series: dict, path, *, title: str, ylabel: str, xlabel: str = "t (0 = clean, 1 = noise)", schedule=None,
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
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _plt()
    v = np.asarray(values, dtype=float).T  # (R, T)
    fig, ax = plt.subplots(figsize=(6, 2.2 + 0.25 * len(radii)))
    pos = v[v > 0]
    norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size and pos.max() > pos.min() else None
    order = np.argsort(t)
    tt = np.asarray(t)[order]
    edges = np.concatenate([[tt[0] - (tt[1] - tt[0]) / 2 if len(tt) > 1 else tt[0] - 0.01], (tt[1:] + tt[:-1]) / 2,
                            [tt[-1] + (tt[-1] - tt[-2]) / 2 if len(tt) > 1 else tt[0] + 0.01]])
    mesh = ax.pcolormesh(edges, np.arange(len(radii) + 1) - 0.5, np.where(v[:, order] > 0, v[:, order], np.nan), norm=norm, cmap="viridis")
    ax.set_yticks(range(len(radii)), [str(r) for r in radii])
    ax.set_ylabel("radius r")
    fig.colorbar(mesh, ax=ax, label=label)
    return _finish(fig, ax, path, title)


def plot_strips(rows: dict, path, scale: int = 4):
    """One row of sample images per label (e.g. per window position), labels on the left:
    ``rows`` = {label: uint8 (N, C, H, W)}."""
    import numpy as np
    import torch

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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
