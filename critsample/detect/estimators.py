"""Critical windows from probe curves, with uncertainties, and the concurrence verdict.

Every estimator returns a :class:`Window` in critsample time t (0 = clean, 1 = noise) and in log-SNR
(lambda = log(alpha^2 / sigma^2); decreasing in t, so ``log_snr_start`` = lambda(t_start) > ``log_snr_end``).
Uncertainties are one-sigma: the standard deviation over ``n_boot`` bootstrap resamples of the samples (rows of the
per-sample arrays) combined in quadrature with the grid resolution (spacing / sqrt(12) at the estimate).

Rules (one per probe family):

* **Gap curves** (:func:`half_max_window`; conditioning gap eq. 6, locality gap eq. 7): the mean curve over samples
  is normalised by its maximum; the window is the contiguous t-range around the maximum where it is >= 1/2 (full
  width at half maximum, edges linearly interpolated between grid points); center = midpoint of that range.
  Several curves (the locality gap of each radius, the local-minus-global forward-backward error of each radius) are
  first normalised each by its own maximum and averaged, so every radius weighs the same.
* **Forward-backward threshold** (:func:`threshold_window`): the error-vs-t curve is made monotone by isotonic
  regression (pool adjacent violators); with floor = its minimum and plateau = its maximum, the threshold is where it
  crosses floor + 1/2 (plateau - floor) (50 % of the rise; = 50 % of the plateau when the floor is 0), by linear
  interpolation; the window spans the 25 % and 75 % crossings. No window (``valid = False``) if the rise is below
  ``min_rise``.
* **Windowed scans** (:func:`scan_minimum`): the position (window center) of the minimum of the mean error over
  the scan, refined by a parabola through the minimum and its two neighbours; the window is that position +- w / 2.
  The complement scans use the maximum instead (removing conditioning hurts most inside the critical window).
* **Concurrence** (:func:`concurrence`): a symmetry-breaking window A and a nonlocality window B concur if they overlap
  by at least half of the shorter one in log-SNR, or if their centers differ by at most 2 combined sigma
  (sqrt(sigma_A^2 + sigma_B^2), log-SNR). Both numbers are reported.
* **Combined critical window** (:func:`combine`): median of the member centers and of the member widths in log-SNR,
  uncertainty = sqrt((sample variance of the centers + median member variance) / n).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..noise import Schedule
from ..summary import jsonable

N_BOOT = 200


@dataclass
class Window:
    """A critical-window estimate; all times in critsample t, log-SNR in nats (log alpha^2 / sigma^2)."""

    probe: str
    family: str  # "symmetry_breaking" | "nonlocality"
    t_start: float
    t_end: float
    center: float
    width: float
    uncertainty: float
    log_snr_start: float = math.nan
    log_snr_end: float = math.nan
    log_snr_center: float = math.nan
    log_snr_width: float = math.nan
    log_snr_uncertainty: float = math.nan
    rule: str = ""
    valid: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def _lam(schedule: Schedule, t) -> np.ndarray:
    """Continuous log-SNR of times ``t`` (``Schedule.log_snr``) as a float64 array."""
    return schedule.log_snr(torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()


def _resolution(grid: np.ndarray, x: float) -> float:
    """Grid spacing near ``x`` / sqrt(12): the error of locating a point on that grid."""
    g = np.sort(np.asarray(grid, dtype=np.float64))
    if g.size < 2 or not math.isfinite(x):
        return 0.0
    i = int(np.clip(np.searchsorted(g, x), 1, g.size - 1))
    return float(g[i] - g[i - 1]) / math.sqrt(12)


def _finish(w: Window, schedule: Schedule, grid: np.ndarray, boot_centers: np.ndarray) -> Window:
    """Add grid resolution to the t uncertainty and fill the log-SNR fields (bootstrap in log-SNR too)."""
    res = _resolution(grid, w.center)
    w.uncertainty = float(math.hypot(w.uncertainty, res))
    lam = _lam(schedule, [w.t_start, w.t_end, w.center])
    w.log_snr_start, w.log_snr_end, w.log_snr_center = (float(v) for v in lam)
    w.log_snr_width = float(w.log_snr_start - w.log_snr_end)
    bc = boot_centers[np.isfinite(boot_centers)]
    lam_boot = float(np.std(_lam(schedule, bc))) if bc.size > 1 else 0.0
    slope = schedule.log_snr_slope(w.center)
    w.log_snr_uncertainty = float(math.hypot(lam_boot, slope * res))
    return w


# -- gap curves: full width at half maximum ---------------------------------------------------


def _fwhm(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(t_start, t_end, t_peak) of the region >= max / 2 around the maximum, edges interpolated; t ascending."""
    if not np.isfinite(y).any() or np.nanmax(y) <= 0:
        return math.nan, math.nan, math.nan
    y = np.nan_to_num(y, nan=-np.inf)
    k = int(np.argmax(y))
    half = y[k] / 2
    lo = k
    while lo > 0 and y[lo - 1] >= half:
        lo -= 1
    hi = k
    while hi < len(y) - 1 and y[hi + 1] >= half:
        hi += 1
    start = t[lo] if lo == 0 else t[lo - 1] + (half - y[lo - 1]) / (y[lo] - y[lo - 1]) * (t[lo] - t[lo - 1])
    end = t[hi] if hi == len(y) - 1 else t[hi] + (y[hi] - half) / (y[hi] - y[hi + 1]) * (t[hi + 1] - t[hi])
    return float(start), float(end), float(t[k])


def _normalised_mean(curves: np.ndarray) -> np.ndarray:
    """curves (n, T) or (n, T, R) per sample -> (T,) mean curve (each radius normalised by its own max, averaged)."""
    m = curves.mean(axis=0)
    if m.ndim == 1:
        return m
    peak = m.max(axis=0, keepdims=True)
    ok = (peak > 0).reshape(-1)
    if not ok.any():
        return np.zeros(m.shape[0])
    return (m[:, ok] / peak[:, ok]).mean(axis=1)


def _peak_z(curves: np.ndarray, k: int) -> float:
    """Mean over samples / its standard error, at time index k, of the per-sample normalised (radius-averaged) curve."""
    m = curves.mean(axis=0)
    per = curves[:, k] if curves.ndim == 2 else (curves[:, k, :] / np.where(m[k] > 0, m[k], np.inf)[None]).mean(axis=1)
    se = per.std(ddof=1) / math.sqrt(len(per)) if len(per) > 1 else 0.0
    return float(per.mean() / se) if se > 0 else (math.inf if per.mean() > 0 else 0.0)


def half_max_window(
    probe: str, family: str, t, curves, schedule: Schedule, *, n_boot: int = N_BOOT, seed: int = 0, min_z: float | None = None
) -> Window:
    """FWHM window of per-sample curves (n, T) or (n, T, R) over times ``t`` (T,); bootstrap over the n samples.

    ``min_z``: for curves that can be zero in truth (e.g. a difference of error rates), the window is only ``valid`` if
    the mean at the peak is at least ``min_z`` standard errors above zero."""
    t = np.asarray(t, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    order = np.argsort(t)
    t, curves = t[order], curves[:, order]
    start, end, peak = _fwhm(t, _normalised_mean(curves))
    rng = np.random.default_rng(seed)
    n = curves.shape[0]
    boot = np.array([_fwhm(t, _normalised_mean(curves[rng.integers(0, n, n)])) for _ in range(n_boot if n > 1 else 0)]).reshape(-1, 3)
    boot = boot[np.isfinite(boot[:, 0])]
    centers = (boot[:, 0] + boot[:, 1]) / 2
    center = (start + end) / 2
    z = _peak_z(curves, int(np.argmin(np.abs(t - peak)))) if math.isfinite(peak) else 0.0
    significant = min_z is None or z >= min_z
    w = Window(
        probe, family, start, end, center, end - start, float(np.std(centers)) if centers.size > 1 else 0.0,
        rule="full width at half maximum of the sample-mean curve (radii normalised and averaged); center = midpoint",
        valid=bool(math.isfinite(center) and significant),
        extra={"peak_t": peak, "peak_z": z, "min_z": min_z, "width_std": float(np.std(boot[:, 1] - boot[:, 0])) if centers.size > 1 else 0.0,
               "at_grid_edge": bool(math.isfinite(start) and (start <= t[0] or end >= t[-1])),
               "bootstrap_valid_fraction": len(boot) / n_boot if n > 1 else 0.0},
    )
    return _finish(w, schedule, t, centers)


# -- forward-backward thresholds --------------------------------------------------------------


def isotonic(y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y, w):
        vals.append(yi), wts.append(wi), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, s2 = vals.pop(), wts.pop(), sizes.pop()
            v1, w1, s1 = vals.pop(), wts.pop(), sizes.pop()
            vals.append((v1 * w1 + v2 * w2) / (w1 + w2)), wts.append(w1 + w2), sizes.append(s1 + s2)
    return np.repeat(vals, sizes)


def _crossing(t: np.ndarray, y: np.ndarray, level: float) -> float:
    """First t where a non-decreasing y reaches ``level`` (linear interpolation)."""
    above = np.nonzero(y >= level)[0]
    if above.size == 0:
        return math.nan
    k = int(above[0])
    if k == 0 or y[k] == y[k - 1]:
        return float(t[k])
    return float(t[k - 1] + (level - y[k - 1]) / (y[k] - y[k - 1]) * (t[k] - t[k - 1]))


def _threshold(t: np.ndarray, e: np.ndarray, min_rise: float) -> tuple[float, float, float, float, float]:
    fit = isotonic(e)
    floor, plateau = float(fit.min()), float(fit.max())
    if plateau - floor < min_rise:
        return math.nan, math.nan, math.nan, floor, plateau
    q = lambda f: _crossing(t, fit, floor + f * (plateau - floor))  # noqa: E731
    return q(0.25), q(0.5), q(0.75), floor, plateau


def threshold_window(
    probe: str, family: str, t, errors, schedule: Schedule, *, min_rise: float = 0.1, n_boot: int = N_BOOT, seed: int = 0
) -> Window:
    """Threshold of a rising error curve; ``errors`` (n, T) per-sample 0/1 outcomes at times ``t``."""
    t = np.asarray(t, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    order = np.argsort(t)
    t, errors = t[order], errors[:, order]
    e = errors.mean(0)
    lo, mid, hi, floor, plateau = _threshold(t, e, min_rise)
    rng = np.random.default_rng(seed)
    n = errors.shape[0]
    boot = np.array([_threshold(t, errors[rng.integers(0, n, n)].mean(0), min_rise)[:3] for _ in range(n_boot if n > 1 else 0)]).reshape(-1, 3)
    ok = boot[np.isfinite(boot[:, 1])] if boot.size else boot
    w = Window(
        probe, family, lo, hi, mid, hi - lo, float(np.std(ok[:, 1])) if len(ok) > 1 else 0.0,
        rule="isotonic fit of error vs t; center = crossing of floor + 50% of the rise, window = 25%..75% crossings",
        valid=bool(math.isfinite(mid)),
        extra={"floor": floor, "plateau": plateau, "bootstrap_valid_fraction": float(np.isfinite(boot[:, 1]).mean()) if boot.size else 0.0},
    )
    return _finish(w, schedule, t, boot[:, 1] if boot.size else np.array([]))


# -- windowed scans ----------------------------------------------------------------------------


def _extremum(x: np.ndarray, y: np.ndarray, sign: float) -> float:
    """Position of the minimum (sign = +1) or maximum (-1) of y(x), parabola-refined on the three nearest points."""
    y = sign * np.asarray(y, dtype=np.float64)
    k = int(np.nanargmin(y))
    if 0 < k < len(y) - 1:
        x0, x1, x2 = x[k - 1 : k + 2]
        y0, y1, y2 = y[k - 1 : k + 2]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den if den else 0.0
        b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / den if den else 0.0
        if a > 0:
            return float(np.clip(-b / (2 * a), x0, x2))
    return float(x[k])


def scan_minimum(
    probe: str, family: str, centers, errors, width: float, schedule: Schedule, *, maximum: bool = False,
    n_boot: int = N_BOOT, seed: int = 0,
) -> Window:
    """Argmin (or argmax) over scan positions. ``centers`` (P,) window centers in t; ``errors`` (n, P) per-sample
    outcomes (or (n, P, R): averaged over R radii first). The window is the argmin position +- width / 2, in [0, 1]."""
    x = np.asarray(centers, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim == 3:
        errors = errors.mean(axis=2)
    order = np.argsort(x)
    x, errors = x[order], errors[:, order]
    sign = -1.0 if maximum else 1.0
    c = _extremum(x, errors.mean(0), sign)
    rng = np.random.default_rng(seed)
    n = errors.shape[0]
    boot = np.array([_extremum(x, errors[rng.integers(0, n, n)].mean(0), sign) for _ in range(n_boot if n > 1 else 0)])
    w = Window(
        probe, family, max(0.0, c - width / 2), min(1.0, c + width / 2), c, width, float(np.std(boot)) if boot.size else 0.0,
        rule=("arg" + ("max" if maximum else "min")) + " of the mean error over window centers, parabola-refined; window = center +- w/2",
        extra={"scan_width": width},
    )
    w.width = w.t_end - w.t_start
    return _finish(w, schedule, x, boot)


def fid_minimum(probe: str, family: str, centers, fid, sigma, width: float, schedule: Schedule, *, n_boot: int = N_BOOT, seed: int = 0) -> Window:
    """Argmin of FID over scan positions; spread from a parametric bootstrap fid_i + sigma_i z."""
    x = np.asarray(centers, dtype=np.float64)
    fid, sigma = np.asarray(fid, dtype=np.float64), np.nan_to_num(np.asarray(sigma, dtype=np.float64))
    order = np.argsort(x)
    x, fid, sigma = x[order], fid[order], sigma[order]
    c = _extremum(x, fid, 1.0)
    rng = np.random.default_rng(seed)
    boot = np.array([_extremum(x, fid + sigma * rng.standard_normal(len(fid)), 1.0) for _ in range(n_boot)])
    w = Window(probe, family, max(0.0, c - width / 2), min(1.0, c + width / 2), c, width, float(np.std(boot)),
               rule="argmin of FID to the always-conditioned baseline, parabola-refined; spread from fid + sigma z")
    w.width = w.t_end - w.t_start
    return _finish(w, schedule, x, boot)


# -- concurrence and the combined window -------------------------------------------------------


def _interval(w: Window) -> tuple[float, float]:
    return min(w.log_snr_start, w.log_snr_end), max(w.log_snr_start, w.log_snr_end)


def concurrence(a: Window, b: Window) -> dict:
    """Overlap and center distance of two windows in log-SNR; ``concurrent`` by the rule in the module docstring."""
    (a0, a1), (b0, b1) = _interval(a), _interval(b)
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = max(a1, b1) - min(a0, b0)
    shorter = min(a1 - a0, b1 - b0)
    overlap = inter / shorter if shorter > 0 else float(inter > 0 or (a0 <= b0 <= a1) or (b0 <= a0 <= b1))
    dist = abs(a.log_snr_center - b.log_snr_center)
    sigma = math.hypot(a.log_snr_uncertainty, b.log_snr_uncertainty)
    z = dist / sigma if sigma > 0 else (0.0 if dist == 0 else math.inf)
    ok = bool(overlap >= 0.5 or z <= 2.0)
    return jsonable({
        "symmetry_breaking": a.probe, "nonlocality": b.probe,
        "overlap_fraction": overlap, "iou": inter / union if union > 0 else 0.0,
        "center_distance_log_snr": dist, "center_distance_t": abs(a.center - b.center),
        "combined_uncertainty_log_snr": sigma, "distance_in_sigma": z, "concurrent": ok,
        "verdict": (
            f"{'concurrent' if ok else 'not concurrent'}: {a.probe} and {b.probe} overlap {100 * overlap:.0f}% (of the shorter, "
            f"log-SNR); centers {dist:.2f} apart in log-SNR = {z:.1f} combined sigma"
        ),
    })


def combine(windows: list[Window], schedule: Schedule, name: str = "critical_window") -> Window | None:
    """Median of the valid windows' centers and widths in log-SNR; None if there are none.

    The median, not an inverse-variance mean: the members' bootstrap sigmas measure sampling noise only, while the
    probes differ systematically (the smooth gap curves have tiny bootstrap sigmas and would otherwise decide alone).
    Uncertainty: sqrt((sample variance of the centers + median member variance) / n) in log-SNR.
    """
    ws = [w for w in windows if w.valid and math.isfinite(w.log_snr_center)]
    if not ws:
        return None
    centers = np.array([w.log_snr_center for w in ws])
    sig = np.array([w.log_snr_uncertainty if math.isfinite(w.log_snr_uncertainty) else 0.0 for w in ws])
    n = len(ws)
    c = float(np.median(centers))
    spread = float(np.var(centers, ddof=1)) if n > 1 else 0.0
    unc = math.sqrt((spread + float(np.median(sig**2))) / n)
    width = float(np.median([w.log_snr_width for w in ws]))
    lam_hi, lam_lo = c + width / 2, c - width / 2
    t_start, t_end, t_c = (float(schedule.t_from_log_snr(v)) for v in (lam_hi, lam_lo, c))
    t_start, t_end = max(0.0, min(t_start, t_end)), min(1.0, max(t_start, t_end))
    slope = schedule.log_snr_slope(t_c)
    return Window(
        name, "combined", t_start, t_end, t_c, t_end - t_start, unc / slope if slope > 0 else math.nan,
        log_snr_start=lam_hi, log_snr_end=lam_lo, log_snr_center=c, log_snr_width=width, log_snr_uncertainty=unc,
        rule="median of member centers and widths in log-SNR; uncertainty sqrt((var of centers + median member var) / n)",
        extra={"members": [w.probe for w in ws], "member_centers_log_snr": centers.tolist()},
    )
