"""Critical windows from probe curves, with uncertainties, and the concurrence test.

Every estimator works on the log-SNR axis (``Schedule.log_snr``: lambda = log(alpha^2 / sigma^2) in nats, decreasing
in t) and returns a :class:`Window` in log-SNR and in critsample time t (0 = clean, 1 = noise), so ``log_snr_start`` =
lambda(t_start) > ``log_snr_end``. Centers are log-SNR midpoints; t fields are the t of those log-SNR values.

Uncertainty comes from the whole estimator: the samples (rows of the per-sample arrays) are resampled ``n_boot`` times
with replacement, the rule is run again on each resample, and the one-sigma uncertainty of the center is the standard
deviation of the resampled centers, combined in quadrature with the grid resolution (log-SNR spacing / sqrt(12) at
the center). A window is **invalid** (``valid = False``, ``reason`` says why) when its peak, argmin or an edge touches
the probed grid's boundary (the true window may lie outside what was probed), when the curve has no contrast against
its noise, or when fewer than half of the bootstrap resamples find a window.

Rules:

* **Gap curves** (:func:`half_max_window`; conditioning gap eq. 6, locality gap eq. 7 of one radius): the full width
  at half maximum of the sample-mean curve, edges linearly interpolated in log-SNR between grid points; center = the
  log-SNR midpoint of the edges. Invalid if the peak is on the first or last grid point or the curve stays above half
  its maximum up to a grid end. ``min_z``: for curves that are zero in truth when there is no effect (differences of
  error rates), the peak must also lie ``min_z`` standard errors above zero.
* **Thresholds** (:func:`threshold_window`; forward-backward error vs t): an isotonic (non-decreasing) fit of the
  mean error; floor = its minimum, plateau = ``chance`` (1 - 1/K for K classes: a fully noised image is denoised into
  a random class) or, when K is unknown, the fitted maximum. The center is where the fit crosses floor + 50 % of the
  rise (interpolated in log-SNR), the window spans the 25 % and 75 % crossings. Invalid if the rise is below
  ``min_rise``, if the fit never reaches 75 %, or if the **floor is not seen** (:func:`floor_seen`): the isotonic fit's
  minimum is always its first point, so "the fit starts above the 25 % level" could never fire; instead the error
  must not rise significantly (one-sided paired z-test at 5 % on the per-sample outcomes) and materially (by more than
  10 % of the rise) between the first two noise levels, else the first point is already on the rise and the floor
  lies below the grid (a grid starting at t = 0.66 on an oracle biased the center by -0.76 nats and was valid 94 %
  of the time). The check runs on the full data, not per resample.
* **Windowed scans** (:func:`scan_minimum`): each scan position's window [t0, t0 + w] is placed at its log-SNR
  midpoint; the argmin (argmax for the complement scans) of the mean error over positions is refined by a parabola
  through it and its two neighbours in log-SNR; the window is that position's window. Invalid if the extremum is at
  the first or last position, if the positions' errors do not differ significantly (Friedman's test on the paired
  samples, Cochran's Q for 0/1 errors, p >= 0.05), if the minimum is **flat within noise up to an edge** (the positions
  not significantly worse than the extremum, by a one-sided paired z-test at 5 % on the per-sample differences,
  include the first or last position: the extremum's side is not determined), or if the metric **saturates** there
  (two or more positions tie exactly at the extremum, e.g. a classifier error of 0 over a stretch: ``argmin`` would
  pick the first of them by construction).
* **Combined windows** (:func:`combine`): center = median of the members' log-SNR centers; width = median of the
  widths of the members whose width is measured (a scan's width is its window width w, a hyperparameter, so scans only
  contribute their centers); uncertainty = sqrt(variance of the member centers + sampling variance + grid term): the
  spread of the probes is a systematic uncertainty and is not divided by sqrt(n); the sampling variance is that of the
  median over the **joint** bootstrap (resample b of every member uses the same row indices, see below, and the
  combined replicate is the median of the members' replicate centers), and the grid term (the members' median) enters
  once.
* **Concurrence** (:func:`concurrence`): a test with three outcomes on the difference d of the two centers in
  log-SNR against a tolerance Delta (nats): with the 95 % interval d +- 1.96 sigma_d, *concurrent* if the interval lies
  inside [-Delta, Delta], *not concurrent* if it lies outside, and *inconclusive* otherwise; *no window* when either
  side has no valid window. More noise widens the interval, so it can only make the verdict inconclusive. The overlap
  (intersection over union, in log-SNR) is reported beside it.

**Paired uncertainty of a difference.** Two windows measured on the same samples and noise are correlated (0.9 and
more on the oracles), so sigma_d is not hypot(sigma_A, sigma_B). Every rule resamples rows with the index sets of one
stream, ``numpy_seed(seed)`` and the number of rows n (:func:`_bootstrap`): windows with the same (seed, n, n_boot)
(``Window.stream``; every probe passes the detection's seed, and row i of every probe is sample i) saw the same
resampled rows in resample b, so d_b = c_A,b - c_B,b is the joint bootstrap of both rules, and

    sigma_d^2 = var_b(d_b) + g^2 + s_A^2 + s_B^2

with g the grid-resolution term counted **once** (the coarser side's spacing / sqrt(12) at its center; the old sum
put it in twice) and s^2 the part of a side's reported variance that is not sampling or grid (a combined window's
member spread; a caller's inflated uncertainty), so more reported noise still only widens the interval. Windows from
different streams (different numbers of rows) are resampled independently: var_b(c_A) + var_b(c_B) + g^2 + s^2 terms.
Windows without bootstrap replicates fall back to hypot(sigma_A, sigma_B). Single windows' numbers are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import stats

from ..noise import Schedule
from ..options import numpy_seed
from ..summary import jsonable

N_BOOT = 200
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
MIN_BOOT_FRACTION = 0.5
ALPHA = 0.05  # significance of a scan's contrast


@dataclass
class Window:
    """A critical-window estimate; all times in critsample t, log-SNR in nats (log alpha^2 / sigma^2)."""

    probe: str
    family: str  # "symmetry_breaking" | "nonlocality" | "combined"
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
    reason: str = ""  # why the window is invalid ("" when valid)
    extra: dict = field(default_factory=dict)
    # bootstrap replicate centers in log-SNR (NaN: no window in that resample), resample b of the stream below
    boot: np.ndarray | None = field(default=None, repr=False, compare=False)
    stream: tuple | None = None  # (seed, rows, n_boot) of the resample index sets: equal streams are paired

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("boot"), d.pop("stream")
        return jsonable(d)

    @property
    def resolution(self) -> float:
        """The grid-resolution term of the center (log-SNR), 0 when unknown."""
        return float(self.extra.get("grid_resolution_log_snr") or 0.0)

    def sampling_variance(self) -> float:
        """Variance of the finite bootstrap replicate centers (0 without replicates)."""
        b = self.boot[np.isfinite(self.boot)] if self.boot is not None else np.array([])
        return float(np.var(b)) if b.size > 1 else 0.0

    def systematic_variance(self) -> float:
        """The part of the reported variance that is neither sampling nor grid (module docstring)."""
        u = self.log_snr_uncertainty if math.isfinite(self.log_snr_uncertainty) else 0.0
        return max(0.0, u * u - self.sampling_variance() - self.resolution**2)


def _lam(schedule: Schedule, t) -> np.ndarray:
    """Continuous log-SNR of times ``t`` (``Schedule.log_snr``) as a float64 array."""
    return schedule.log_snr(torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()


def _t(schedule: Schedule, lam: float) -> float:
    return float(schedule.t_from_log_snr(torch.tensor(float(lam),
                                                      dtype=torch.float64))) if math.isfinite(lam) else math.nan


def _resolution(grid: np.ndarray, x: float) -> float:
    """Grid spacing near ``x`` / sqrt(12): the error of locating a point on that grid."""
    g = np.sort(np.asarray(grid, dtype=np.float64))
    if g.size < 2 or not math.isfinite(x):
        return 0.0
    i = int(np.clip(np.searchsorted(g, x), 1, g.size - 1))
    return float(g[i] - g[i - 1]) / math.sqrt(12)


def _window(
    probe: str, family: str, schedule: Schedule, lam_start: float, lam_end: float, lam_grid: np.ndarray,
    boot: np.ndarray,
    *, rule: str, reason: str = "", center: float | None = None, extra: dict | None = None,
    stream: tuple | None = None,
) -> Window:
    """A Window from log-SNR edges (and center: default their midpoint), bootstrap centers (all replicates, NaN where
    a resample found no window; ``stream`` their index sets) and the probed grid."""
    c = (lam_start + lam_end) / 2 if center is None else center
    replicates = np.asarray(boot, dtype=np.float64)
    boot = replicates[np.isfinite(replicates)] if replicates.size else replicates
    res = _resolution(lam_grid, c)
    unc = math.hypot(float(np.std(boot)) if boot.size > 1 else 0.0, res)
    t_start, t_end, t_c = _t(schedule, lam_start), _t(schedule, lam_end), _t(schedule, c)
    slope = schedule.log_snr_slope(t_c) if math.isfinite(t_c) else math.nan
    return Window(
        probe, family, t_start, t_end, t_c, t_end - t_start, unc / slope if slope and slope > 0 else math.nan,
        log_snr_start=lam_start, log_snr_end=lam_end, log_snr_center=c, log_snr_width=lam_start - lam_end,
        log_snr_uncertainty=unc, rule=rule, valid=not reason and math.isfinite(c),
        reason=reason or ("" if math.isfinite(c) else "no window found"),
        extra={**(extra or {}), "bootstrap_resamples": int(boot.size), "grid_resolution_log_snr": res},
        boot=replicates if stream is not None else None, stream=stream,
    )


def _stream(rows: np.ndarray, n_boot: int, seed: int) -> tuple | None:
    """The identity of :func:`_bootstrap`'s index sets for these rows (None when it draws none)."""
    n = rows.shape[0]
    return (int(seed), int(n), int(n_boot)) if n >= 2 and n_boot >= 1 else None


def _bootstrap(rule: Callable[[np.ndarray], float], rows: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray,
                                                                                                       float]:
    """Centers of ``rule`` on ``n_boot`` resamples of the rows (NaN = no window in that resample) and the fraction
    valid. The index sets depend on (seed, number of rows) alone, so rules run on arrays whose row i is the same sample
    see the same resampled rows (module docstring: paired differences)."""
    n = rows.shape[0]
    if n < 2 or n_boot < 1:
        return np.array([]), 1.0
    rng = np.random.default_rng(numpy_seed(seed))
    centers = np.array([rule(rows[rng.integers(0, n, n)]) for _ in range(n_boot)], dtype=np.float64)
    return centers, float(np.isfinite(centers).mean())


def _unstable(fraction: float) -> str:
    return f"found in only {100 * fraction:.0f}% of the bootstrap resamples" if fraction < MIN_BOOT_FRACTION else ""


def _sorted(t, curves) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    order = np.argsort(t)
    return t[order], curves[:, order]


# -- gap curves: full width at half maximum ---------------------------------------------------


def _fwhm(lam: np.ndarray, y: np.ndarray) -> tuple[float, float, int, str]:
    """(lambda_start, lambda_end, peak index, reason) of the region >= max / 2 around the maximum of ``y`` on a grid
    ordered by t (so ``lam`` decreases); edges interpolated in log-SNR. ``reason`` is "" for a valid window."""
    if not np.isfinite(y).any() or np.nanmax(y) <= 0:
        return math.nan, math.nan, -1, "the curve is nowhere positive"
    y = np.nan_to_num(y, nan=-np.inf)
    k = int(np.argmax(y))
    half = y[k] / 2
    lo, hi = k, k
    while lo > 0 and y[lo - 1] >= half:
        lo -= 1
    while hi < len(y) - 1 and y[hi + 1] >= half:
        hi += 1
    start = lam[lo] if lo == 0 else lam[lo - 1] + (half - y[lo - 1]) / (y[lo] - y[lo - 1]) * (lam[lo] - lam[lo - 1])
    end = lam[hi] if hi == len(y) - 1 else lam[hi] + (y[hi] - half) / (y[hi] - y[hi + 1]) * (lam[hi + 1] - lam[hi])
    reason = ""
    if k in (0, len(y) - 1):
        reason = "the peak is on the edge of the probed grid"
    elif lo == 0 or hi == len(y) - 1:
        reason = "the curve stays above half its maximum up to the edge of the probed grid"
    return float(start), float(end), k, reason


def _peak_z(curves: np.ndarray, k: int) -> float:
    """Mean over samples / its standard error at time index k."""
    per = curves[:, k]
    se = per.std(ddof=1) / math.sqrt(len(per)) if len(per) > 1 else 0.0
    return float(per.mean() / se) if se > 0 else (math.inf if per.mean() > 0 else 0.0)


def half_max_window(
    probe: str, family: str, t, curves, schedule: Schedule, *, n_boot: int = N_BOOT, seed: int = 0,
    min_z: float | None = None
) -> Window:
    """FWHM window of per-sample curves (n, T) over times ``t`` (T,) (module docstring); bootstrap over the n
    samples."""
    t, curves = _sorted(t, curves)
    if curves.ndim != 2:
        raise ValueError(f"half_max_window takes per-sample curves (n, T); got shape {curves.shape}.")
    lam = _lam(schedule, t)
    start, end, k, reason = _fwhm(lam, curves.mean(0))
    z = _peak_z(curves, k) if k >= 0 else 0.0
    if not reason and min_z is not None and z < min_z:
        reason = f"the peak is {z:.1f} standard errors above zero, below the required {min_z:g}"

    def rule(rows: np.ndarray) -> float:
        s, e, _, why = _fwhm(lam, rows.mean(0))
        return (s + e) / 2 if not why else math.nan

    boot, fraction = _bootstrap(rule, curves, n_boot, seed)
    return _window(
        probe, family, schedule, start, end, lam, boot, reason=reason or _unstable(fraction),
        stream=_stream(curves, n_boot, seed),
        rule="full width at half maximum of the sample-mean curve, edges interpolated in log-SNR; center = log-SNR "
             "midpoint",
        extra={"peak_t": float(t[k]) if k >= 0 else None, "peak_z": z, "min_z": min_z,
               "bootstrap_valid_fraction": fraction},
    )


# -- thresholds -------------------------------------------------------------------------------


def isotonic(y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y, w, strict=True):
        vals.append(yi), wts.append(wi), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, s2 = vals.pop(), wts.pop(), sizes.pop()
            v1, w1, s1 = vals.pop(), wts.pop(), sizes.pop()
            vals.append((v1 * w1 + v2 * w2) / (w1 + w2)), wts.append(w1 + w2), sizes.append(s1 + s2)
    return np.repeat(vals, sizes)


def _crossing(lam: np.ndarray, y: np.ndarray, level: float) -> float:
    """Log-SNR where a non-decreasing y (on a grid ordered by t) first reaches ``level`` (linear interpolation)."""
    above = np.nonzero(y >= level)[0]
    if above.size == 0:
        return math.nan
    k = int(above[0])
    if k == 0 or y[k] == y[k - 1]:
        return float(lam[k])
    return float(lam[k - 1] + (level - y[k - 1]) / (y[k] - y[k - 1]) * (lam[k] - lam[k - 1]))


def _threshold(lam: np.ndarray, e: np.ndarray, min_rise: float, chance: float | None) -> tuple[float, float, float,
                                                                                               float, float, str]:
    fit = isotonic(e)
    floor = float(fit.min())
    plateau = float(chance) if chance is not None else float(fit.max())
    if plateau - floor < min_rise:
        return math.nan, math.nan, math.nan, floor, plateau, f"the error rises by less than {min_rise:g} over the grid"
    level = lambda f: floor + f * (plateau - floor)  # noqa: E731
    lo, mid, hi = (_crossing(lam, fit, level(f)) for f in (0.25, 0.5, 0.75))
    reason = ""
    if not math.isfinite(hi):
        reason = "the error never reaches 75% of its rise toward chance within the probed grid"
    return lo, mid, hi, floor, plateau, reason


def threshold_window(
    probe: str, family: str, t, errors, schedule: Schedule, *, chance: float | None = None, min_rise: float = 0.1,
    n_boot: int = N_BOOT, seed: int = 0,
) -> Window:
    """Threshold of a rising error curve; ``errors`` (n, T) per-sample 0/1 outcomes at times ``t``; ``chance`` the
    plateau (1 - 1/K), None = the fitted maximum."""
    t, errors = _sorted(t, errors)
    lam = _lam(schedule, t)
    lo, mid, hi, floor, plateau, reason = _threshold(lam, errors.mean(0), min_rise, chance)
    seen, floor_z, floor_step = floor_seen(errors, plateau - floor)
    if not reason and not seen:
        reason = (f"the error already rises between the first two noise levels (by {floor_step:.3g}, z = "
                  f"{floor_z:.1f}): the floor lies below the probed grid")

    def rule(rows: np.ndarray) -> float:
        out = _threshold(lam, rows.mean(0), min_rise, chance)
        return out[1] if not out[5] else math.nan

    boot, fraction = _bootstrap(rule, errors, n_boot, seed)
    w = _window(
        probe, family, schedule, lo, hi, lam, boot, center=mid, reason=reason or _unstable(fraction),
        stream=_stream(errors, n_boot, seed),
        rule=("isotonic fit of error vs t; center = crossing of floor + 50% of the rise toward "
              + ("chance (1 - 1/K)" if chance is not None else "the fitted plateau")
              + ", window = 25%..75% crossings (log-SNR)"),
        extra={"floor": floor, "plateau": plateau, "chance": chance, "bootstrap_valid_fraction": fraction,
               "floor_step": floor_step, "floor_step_z": floor_z},
    )
    return w


def floor_seen(errors: np.ndarray, rise: float, z: float = 1.6448536269514722,
               material: float = 0.1) -> tuple[bool, float, float]:
    """(seen, z, step): whether the floor of a rising error curve (n, T) ordered by t is observed on the grid: the
    step from the first to the second noise level is not both significant (one-sided paired z > ``z``) and material
    (> ``material`` x ``rise``)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or errors.shape[1] < 2:
        return True, 0.0, 0.0
    d = errors[:, 1] - errors[:, 0]
    step = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    zz = step / se if se > 0 else (math.inf if step > 0 else 0.0)
    significant = zz > z
    return not (significant and math.isfinite(rise) and step > material * rise), zz, step


# -- windowed scans ----------------------------------------------------------------------------


def _extremum(x: np.ndarray, y: np.ndarray, sign: float) -> tuple[float, int]:
    """Position of the minimum (sign = +1) or maximum (-1) of y(x), parabola-refined on the three nearest points, and
    the index of the grid extremum."""
    y = sign * np.asarray(y, dtype=np.float64)
    k = int(np.nanargmin(y))
    if 0 < k < len(y) - 1:
        x0, x1, x2 = x[k - 1 : k + 2]
        y0, y1, y2 = y[k - 1 : k + 2]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den if den else 0.0
        b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / den if den else 0.0
        if a > 0:
            lo, hi = min(x0, x2), max(x0, x2)
            return float(np.clip(-b / (2 * a), lo, hi)), k
    return float(x[k]), k


def positions_differ(errors: np.ndarray) -> float:
    """p-value of "every scan position has the same error" for paired outcomes (n samples x P positions): Friedman's
    test, which on 0/1 outcomes is Cochran's Q (the samples are paired across positions by their shared noise)."""
    if errors.shape[0] < 2 or errors.shape[1] < 3 or np.all(errors == errors[:, :1]):
        return 1.0
    with np.errstate(all="ignore"):
        p = float(stats.friedmanchisquare(*errors.T).pvalue)
    return p if math.isfinite(p) else 1.0


def near_extremum(errors: np.ndarray, sign: float = 1.0, z: float = 1.6448536269514722) -> np.ndarray:
    """(P,) bool: the scan positions not significantly worse than the best one (argmin of ``sign`` x mean), by a
    one-sided paired z-test on the per-sample differences (samples share noise across positions); the best is
    included. A difference with zero standard error counts as significant unless it is zero."""
    e = sign * np.asarray(errors, dtype=np.float64)
    k = int(np.argmin(e.mean(0)))
    diff = e - e[:, k : k + 1]  # (n, P) >= 0 on average
    n = e.shape[0]
    se = diff.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(e.shape[1])
    m = diff.mean(0)
    return np.where(se > 0, m <= z * se, m <= 0)


def best_of_radii(per_radius: dict[int, np.ndarray], sign: float = 1.0) -> dict:
    """Which radius is good enough, from paired per-sample outcomes (or scores; lower = better) of each radius's scan
    ``(n, P)``: each radius is represented by its best position; the radii must differ (Friedman's test over >= 3
    radii, a two-sided paired z-test for 2; alpha 5 %) and not tie at the best value, else there is no contrast and
    no radius is suggested. ``radius``: the smallest radius not significantly worse than the best (one-sided paired
    z-test, :func:`near_extremum`); ``reason`` says why when None."""
    radii = sorted(per_radius)
    if len(radii) < 2:
        return {"radius": None, "reason": "fewer than two radii were scanned, so no radius can be compared"}
    cols = []
    for r in radii:
        e = sign * np.asarray(per_radius[r], dtype=np.float64)
        cols.append(e[:, int(np.argmin(e.mean(0)))])
    m = np.stack(cols, 1)  # (n, R): each radius at its best position
    means = m.mean(0)
    if len(radii) == 2:
        d = m[:, 1] - m[:, 0]
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        p = float(2 * stats.norm.sf(abs(d.mean()) / se)) if se > 0 else (0.0 if d.mean() != 0 else 1.0)
    else:
        p = positions_differ(m)
    ties = int(np.sum(means == means.min()))
    out = {"radii": radii, "best_means": (sign * means).tolist(), "contrast_p_value": p}
    if not p < ALPHA:
        return {**out, "radius": None, "reason": f"the radii's best scan positions do not differ (p = {p:.2f} >= "
                                                 f"{ALPHA:g}): the scan shows no contrast between radii"}
    if ties > 1:
        return {**out, "radius": None, "reason": f"the metric saturates: {ties} radii tie exactly at the best value"}
    near = near_extremum(m)
    return {**out, "radius": int(radii[int(np.nonzero(near)[0][0])]), "reason": "",
            "near_best": [int(r) for r, k in zip(radii, near, strict=True) if k]}


def scan_positions(schedule: Schedule, t0s, width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-SNR (start, end, midpoint) of the scan windows [t0, min(t0 + w, 1)]."""
    t0s = np.asarray(t0s, dtype=np.float64)
    start, end = _lam(schedule, t0s), _lam(schedule, np.minimum(t0s + width, 1.0))
    return start, end, (start + end) / 2


def scan_minimum(
    probe: str, family: str, t0s, errors, width: float, schedule: Schedule, *, maximum: bool = False,
    n_boot: int = N_BOOT, seed: int = 0, score=None,
) -> Window:
    """Argmin (or argmax) over scan positions (module docstring). ``t0s`` (P,) window starts in t; ``errors`` (n, P)
    per-sample outcomes (or (n, P, R): averaged over R radii first); ``width`` the scan's window width in t.
    ``score`` (n, P), optional: a per-sample score that does not saturate (the classifier's negative log-likelihood of
    the requested class), lower = better like the error; the same rule on it is ``extra["score_window"]``."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim == 3:
        errors = errors.mean(axis=2)
    if score is not None:
        score = _sorted(t0s, score)[1]
    t0s, errors = _sorted(t0s, errors)
    lam_start, lam_end, lam_mid = scan_positions(schedule, t0s, width)
    sign = -1.0 if maximum else 1.0
    mean = errors.mean(0)
    c, k = _extremum(lam_mid, mean, sign)
    p_value = positions_differ(errors)
    near = near_extremum(errors, sign)
    ties = int(np.sum(sign * mean == np.min(sign * mean)))
    reason = ""
    if k in (0, len(mean) - 1):
        reason = f"the arg{'max' if maximum else 'min'} is on the edge of the scan"
    elif not p_value < ALPHA:
        reason = ("the scan has no contrast: the positions' errors do not differ (Friedman / Cochran's Q p = "
                  f"{p_value:.2f} >= {ALPHA:g})")
    elif ties > 1:
        reason = (f"the metric saturates: {ties} positions tie exactly at the scan's "
                  f"{'maximum' if maximum else 'minimum'} ({float(mean[k]):.3g}), so its position is not determined")
    elif near[0] or near[-1]:
        reason = ("the extremum is flat within noise up to the edge of the scan: positions "
                  f"{', '.join(str(i) for i in np.nonzero(near)[0])} of {len(mean)} are not significantly worse")

    def rule(rows: np.ndarray) -> float:
        cb, kb = _extremum(lam_mid, rows.mean(0), sign)
        return cb if 0 < kb < len(mean) - 1 else math.nan

    boot, fraction = _bootstrap(rule, errors, n_boot, seed)
    half = float(np.interp(-c, -lam_mid, (lam_start - lam_end) / 2))  # half width of the window placed at c
    return _window(
        probe, family, schedule, c + half, c - half, lam_mid, boot, center=c, reason=reason or _unstable(fraction),
        stream=_stream(errors, n_boot, seed),
        rule=("arg" + ("max" if maximum else "min")) + " of the mean error over window log-SNR midpoints, "
             "parabola-refined; window = that position's window",
        extra={"scan_width": width, "contrast_p_value": p_value, "bootstrap_valid_fraction": fraction,
               "near_extremum_positions": np.nonzero(near)[0].tolist(), "tied_at_extremum": ties,
               **({"score_window": scan_minimum(f"{probe}[nll]", family, t0s, score, width, schedule, maximum=maximum,
                                                n_boot=n_boot, seed=seed).to_dict()} if score is not None else {})},
    )


def fid_minimum(probe: str, family: str, t0s, fid, sigma, width: float, schedule: Schedule, *, n_boot: int = N_BOOT,
                seed: int = 0) -> Window:
    """Argmin of FID over scan positions; spread from a parametric bootstrap fid_i + sigma_i z."""
    t0s = np.asarray(t0s, dtype=np.float64)
    order = np.argsort(t0s)
    t0s, fid, sigma = t0s[order], np.asarray(fid,
                                             dtype=np.float64)[order], np.nan_to_num(np.asarray(
                                                 sigma, dtype=np.float64))[order]
    lam_start, lam_end, lam_mid = scan_positions(schedule, t0s, width)
    c, k = _extremum(lam_mid, fid, 1.0)
    rng = np.random.default_rng(numpy_seed(seed))
    boot = np.array([_extremum(lam_mid, fid + sigma * rng.standard_normal(len(fid)), 1.0)[0] for _ in range(n_boot)])
    half = float(np.interp(-c, -lam_mid, (lam_start - lam_end) / 2))
    reason = "the argmin is on the edge of the scan" if k in (0, len(fid) - 1) else ""
    return _window(probe, family, schedule, c + half, c - half, lam_mid, boot, center=c, reason=reason,
                   rule="argmin of FID to the always-conditioned baseline over window log-SNR midpoints, "
                        "parabola-refined; spread from fid + sigma z", extra={"scan_width": width})


# -- the combined window and the concurrence test ------------------------------------------------


def combine(windows: list[Window], schedule: Schedule, name: str = "critical_window") -> Window | None:
    """The valid members' combined window (module docstring); None if no member is valid."""
    ws = [w for w in windows if w.valid and math.isfinite(w.log_snr_center)]
    if not ws:
        return None
    centers = np.array([w.log_snr_center for w in ws])
    sig = np.array([w.log_snr_uncertainty if math.isfinite(w.log_snr_uncertainty) else 0.0 for w in ws])
    c = float(np.median(centers))
    spread = float(np.var(centers, ddof=1)) if len(ws) > 1 else 0.0
    boot, stream = _joint_median(ws)
    if boot is None:  # members without replicates: the median member variance stands for sampling and grid
        res, unc = 0.0, math.sqrt(spread + float(np.median(sig**2)))
    else:
        finite = boot[np.isfinite(boot)]
        res = float(np.median([w.resolution for w in ws]))
        extra_sys = float(np.median([w.systematic_variance() for w in ws]))
        unc = math.sqrt(spread + extra_sys + (float(np.var(finite)) if finite.size > 1 else 0.0) + res**2)
    measured = [w.log_snr_width for w in ws if "scan_width" not in w.extra and math.isfinite(w.log_snr_width)]
    widths = measured or [w.log_snr_width for w in ws]  # scans only: their window width is all there is
    width = float(np.median(widths))
    lam_hi, lam_lo = c + width / 2, c - width / 2
    t_start, t_end, t_c = _t(schedule, lam_hi), _t(schedule, lam_lo), _t(schedule, c)
    slope = schedule.log_snr_slope(t_c)
    return Window(
        name, "combined", t_start, t_end, t_c, t_end - t_start, unc / slope if slope > 0 else math.nan,
        log_snr_start=lam_hi, log_snr_end=lam_lo, log_snr_center=c, log_snr_width=width, log_snr_uncertainty=unc,
        rule="median of member log-SNR centers; median width of the members with a measured width (scans contribute "
             "centers only); uncertainty sqrt(var of member centers + var of the median over the joint bootstrap + "
             "grid term once)",
        extra={"members": [w.probe for w in ws], "member_centers_log_snr": centers.tolist(),
               "width_from": "measured widths" if measured else "scan widths (no member with a measured width)",
               "grid_resolution_log_snr": res, "member_spread_variance": spread,
               "joint_bootstrap": stream is not None},
        boot=boot, stream=stream,
    )


def _joint_median(ws: list[Window]) -> tuple[np.ndarray | None, tuple | None]:
    """Replicate b of the combined center: the median of the members' finite replicate centers of resample b (NaN
    when none), and the common stream (None when the members' streams differ: their resamples are then independent).
    (None, None) when a member has no replicates."""
    if any(w.boot is None for w in ws) or len({len(w.boot) for w in ws}) != 1:
        return None, None
    reps = np.stack([w.boot for w in ws])  # (members, n_boot)
    ok = np.isfinite(reps)
    with np.errstate(all="ignore"):
        med = np.array([np.median(reps[ok[:, b], b]) if ok[:, b].any() else math.nan for b in range(reps.shape[1])])
    streams = {w.stream for w in ws}
    return med, (streams.pop() if len(streams) == 1 else None)


def _interval(w: Window) -> tuple[float, float]:
    return min(w.log_snr_start, w.log_snr_end), max(w.log_snr_start, w.log_snr_end)


def concurrence(a: Window | None, b: Window | None, tolerance: float = 1.0) -> dict:
    """The three-outcome concurrence test of a symmetry-breaking window ``a`` and a nonlocality window ``b`` with
    tolerance ``tolerance`` nats (module docstring); "no window" when either is missing or invalid."""
    names = {"symmetry_breaking": a.probe if a else None, "nonlocality": b.probe if b else None,
             "tolerance_log_snr": tolerance}
    missing = [w.probe if w else side for w,
               side in ((a, "symmetry_breaking"), (b, "nonlocality")) if w is None or not w.valid]
    if missing:
        return jsonable({**names, "outcome": "no window", "concurrent": False,
                         "verdict": f"no window: {' and '.join(missing)} gave no valid window, so concurrence cannot "
                                    "be tested"})
    (a0, a1), (b0, b1) = _interval(a), _interval(b)
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = max(a1, b1) - min(a0, b0)
    diff = difference(a, b)
    d, sigma, (lo, hi) = diff["d"], diff["sigma"], diff["ci95"]
    if -tolerance <= lo and hi <= tolerance:
        outcome = "concurrent"
    elif lo > tolerance or hi < -tolerance:
        outcome = "not concurrent"
    else:
        outcome = "inconclusive"
    return jsonable({
        **names, "outcome": outcome, "concurrent": outcome == "concurrent",
        "center_difference_log_snr": d, "center_difference_ci95_log_snr": [lo, hi],
        "combined_uncertainty_log_snr": sigma, "uncertainty": diff["parts"],
        "center_distance_t": abs(a.center - b.center), "iou": inter / union if union > 0 else 0.0,
        "verdict": (f"{outcome}: {a.probe} minus {b.probe} = {d:+.2f} nats of log-SNR, 95% interval [{lo:+.2f}, "
                    f"{hi:+.2f}] against a tolerance of +-{tolerance:g}; windows overlap "
                    f"{100 * (inter / union if union > 0 else 0):.0f}% (IoU)"),
    })


def difference(a: Window, b: Window) -> dict:
    """d = a - b of two window centers (log-SNR) with its paired one-sigma and 95 % interval (:func:`difference_sigma`,
    whose parts are under ``parts``)."""
    d = a.log_snr_center - b.log_snr_center
    parts = difference_sigma(a, b)
    s = parts["sigma"]
    return {"d": d, "sigma": s, "ci95": [d - Z95 * s, d + Z95 * s],
            "parts": {k: v for k, v in parts.items() if k != "sigma"}}


def difference_sigma(a: Window, b: Window) -> dict:
    """One-sigma of the difference of two window centers (log-SNR) by the paired rule of the module docstring, and its
    parts: ``pairing`` (paired / independent / no replicates), sampling and grid terms, the replicate correlation and
    the unpaired hypot(sigma_A, sigma_B) for comparison."""
    unpaired = math.hypot(a.log_snr_uncertainty, b.log_snr_uncertainty)
    if a.boot is None or b.boot is None:
        return {"sigma": unpaired, "pairing": "none (no bootstrap replicates): hypot(sigma_A, sigma_B)",
                "unpaired_sigma": unpaired}
    grid = max(a.resolution, b.resolution)
    systematic = a.systematic_variance() + b.systematic_variance()
    out = {"unpaired_sigma": unpaired, "grid_sigma": grid, "systematic_sigma": math.sqrt(systematic)}
    if a.stream is not None and a.stream == b.stream:
        both = np.isfinite(a.boot) & np.isfinite(b.boot)
        diff = (a.boot - b.boot)[both]
        sampling = float(np.var(diff)) if diff.size > 1 else a.sampling_variance() + b.sampling_variance()
        corr = float(np.corrcoef(a.boot[both], b.boot[both])[0, 1]) if diff.size > 2 and np.std(
            a.boot[both]) > 0 and np.std(b.boot[both]) > 0 else math.nan
        out.update(pairing="paired: both rules on the same resampled rows", replicates=int(diff.size),
                   correlation=corr)
    else:
        sampling = a.sampling_variance() + b.sampling_variance()
        out.update(pairing="independent: different resample streams (numbers of rows)")
    out.update(sampling_sigma=math.sqrt(sampling), sigma=math.sqrt(sampling + grid**2 + systematic))
    return out
