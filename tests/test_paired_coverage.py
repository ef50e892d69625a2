"""Coverage of the 95 % interval of a window difference against exact theory (issue 22, item 1).

The pair is the forward-backward threshold against the locality gap on the isotropic mixture ``gmm-mixture:N=8,
mu=0.5,s2=1`` (theory: ``test_controls.sb_theory`` / ``nl_theory``, independent of the estimator code). Fifty
detections are too slow for a non-slow test, so the per-sample data are simulated exactly, as the probes would record
them, and fed through the project's own estimator functions (``threshold_window``, ``half_max_window``,
``concurrence``); one small end-to-end detection checks the same on real probe output. The >= 50-seed end-to-end table
is ``bench/oracle_power.py``'s (docs/oracles.md).

Exact simulation: with the ODE reverse process and the Bayes readout, forward-backward of clean x0 of class c noised
to t errs iff c (a y0 + sigma z) < 0, y0 = 1.x0 / sqrt(d) and z ~ N(0, 1) the projection of the forward noise (one
per sample for every t, as ``Detection.generators`` draws it; the odd, monotone flow along 1 keeps the sign at any
discretisation). The locality gap of a sample is the oracle's exact ||eps_r - eps|| / d along its forward trajectory
(one eps per sample for every t, as ``probes.gaps.train_states``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_controls import nl_theory, sb_theory

import critsample
from critsample import NULL, detect
from critsample.detect import estimators

NAME, RADIUS, T_MIN = "gmm-mixture:N=8,mu=0.5,s2=1", 2, 0.05
FB_T = np.linspace(T_MIN, 0.95, 19)  # the paper preset's forward-backward grid
GAP_T = np.linspace(0.02, 0.98, 40)


SEEDS = 50
PAIRED = 192  # rows of both sides in the paired test (the paper preset's forward-backward images)
N_BOOT = 100  # bootstrap resamples per window (detect: 200); halves the test's time


@pytest.fixture(scope="module")
def oracle():
    o = critsample.load(NAME)
    return o, sb_theory(o, T_MIN) - nl_theory(o, RADIUS)


@pytest.fixture(scope="module")
def population(oracle):
    """Exact per-sample data of SEEDS x PAIRED samples, row i of both arrays from the same clean x0 (as in
    ``detect``: row i of every probe reads data image i)."""
    model, _ = oracle
    return simulate(model, SEEDS * PAIRED, 0)


def simulate(oracle, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fb errors (n, 19), locality-gap curves (n, 40)) of n exact samples, row i of both from one clean x0."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2, (n,), generator=g)
    x0 = oracle.sample_data(n, c, generator=g).double()
    sign = 1.0 - 2.0 * c.double()  # class 0 is +mu
    y0 = x0.reshape(n, -1).sum(1) / math.sqrt(oracle.d)
    z_fb = torch.randn(n, generator=g, dtype=torch.float64)
    a_fb = oracle.schedule.alpha_bar(torch.tensor(FB_T)).sqrt()
    y_t = a_fb[None, :] * y0[:, None] + (1 - a_fb[None, :] ** 2).sqrt() * z_fb[:, None]
    errors = (sign[:, None] * y_t < 0).double().numpy()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sums = [(box_sum(v, RADIUS), v.sum((1, 2, 3))[:, None, None]) for v in (x0, eps)]  # x_t is linear in both
    return errors, np.stack([gap_norm(oracle, *sums, t) for t in GAP_T], 1)


def box_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """(n, N, N) sums of x (n, 1, N, N) over each pixel's Chebyshev window of radius r, truncated at the borders."""
    x, n = x[:, 0], x.shape[-1]
    c = F.pad(x.cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # c[i, j] = sum of x[:i, :j]
    lo, hi = (torch.arange(n) - r).clamp(0, n), (torch.arange(n) + r + 1).clamp(0, n)
    return c[:, hi][:, :, hi] - c[:, lo][:, :, hi] - c[:, hi][:, :, lo] + c[:, lo][:, :, lo]


def gap_norm(oracle, x0_sums, eps_sums, t: float) -> np.ndarray:
    """(n,) ||eps_r(x_t) - eps(x_t)|| / d of the isotropic mixture in closed form, from the window and total sums of
    x0 and eps: the scores differ only in the tanh term, so per pixel A the gap is sigma m / Gamma (tanh(m S_W(A) /
    Gamma) - tanh(m S / Gamma)), S the sum of x_t over all pixels and S_W(A) over A's truncated window (oracles.py,
    eq. U)."""
    abar = float(oracle.schedule.alpha_bar(torch.tensor(t)))
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    gamma, m = abar * oracle.s2 + 1 - abar, a * oracle.mu
    window, total = (a * u + s * v for u, v in zip(x0_sums, eps_sums, strict=True))
    gap = s * m / gamma * (torch.tanh(m * window / gamma) - torch.tanh(m * total / gamma))
    return (gap.reshape(len(gap), -1).norm(dim=1) / oracle.d).numpy()


def test_the_closed_form_gap_is_the_oracles(oracle):
    """The simulation's closed-form gap equals the oracle's own eps predictions (float32 tolerance)."""
    model, _ = oracle
    g = torch.Generator().manual_seed(0)
    x0, eps = model.sample_data(16, None, generator=g).double(), torch.randn(16, 1, 8, 8, generator=g).double()
    t = float(GAP_T[20])
    a, s = model.schedule.alpha_sigma(torch.tensor(t))
    xt, null = (a * x0 + s * eps).float(), torch.full((16,), NULL)
    ref = model.predict(xt, t, null, radius=RADIUS, kind="eps") - model.predict(xt, t, null, kind="eps")
    ref = (ref.double().reshape(16, -1).norm(dim=1) / model.d).numpy()
    sums = [(box_sum(v, RADIUS), v.sum((1, 2, 3))[:, None, None]) for v in (x0, eps)]
    np.testing.assert_allclose(gap_norm(model, *sums, t), ref, rtol=1e-3, atol=1e-6)


def pair_interval(oracle, errors: np.ndarray, gaps: np.ndarray, seed: int) -> dict:
    """The concurrence entry of the pair, computed as ``detect`` does from these per-sample arrays."""
    sch = oracle.schedule
    a = estimators.threshold_window(
        "forward_backward", "symmetry_breaking", FB_T, errors, sch, chance=0.5, seed=seed, n_boot=N_BOOT
    )
    b = estimators.half_max_window("locality_gap", "nonlocality", GAP_T, gaps, sch, seed=seed, n_boot=N_BOOT)
    return estimators.concurrence(a, b, 1.0)


def coverage(oracle, truth: float, arrays) -> tuple[float, set[str]]:
    hits, pairing = [], set()
    for seed, (errors, gaps) in enumerate(arrays):
        c = pair_interval(oracle, errors, gaps, seed)
        if c["outcome"] == "no window":  # a window the seed did not find counts as a miss
            hits.append(False)
            continue
        lo, hi = c["center_difference_ci95_log_snr"]
        hits.append(lo <= truth <= hi)
        pairing.add(c["uncertainty"]["pairing"].split(":")[0])
    assert len(hits) == SEEDS
    return float(np.mean(hits)), pairing


def test_the_95_percent_interval_of_the_difference_covers_theory_on_independent_streams(oracle, population):
    """As ``detect`` runs the pair at the paper preset's sizes (192 forward-backward images, 32 trajectories: different
    resample streams): over 50 seeds the 95 % interval of the difference covers the exact theory value in >= 90 % of
    them (tolerance: 45 of 50; at a true 95 % the chance of fewer is 4 %)."""
    model, truth = oracle
    errors, gaps = population
    rate, pairing = coverage(
        model,
        truth,
        [(errors[PAIRED * k : PAIRED * (k + 1)], gaps[PAIRED * k : PAIRED * k + 32]) for k in range(SEEDS)],
    )
    assert pairing == {"independent"}
    assert rate >= 0.90, rate


def test_the_95_percent_interval_of_the_difference_covers_theory_when_paired(oracle, population):
    """The same with 192 rows on both sides (same seed and rows: one resample stream): the difference is bootstrapped
    jointly and its interval still covers theory in >= 45 of 50 seeds."""
    model, truth = oracle
    errors, gaps = population
    rate, pairing = coverage(
        model,
        truth,
        [(errors[PAIRED * k : PAIRED * (k + 1)], gaps[PAIRED * k : PAIRED * (k + 1)]) for k in range(SEEDS)],
    )
    assert pairing == {"paired"}
    assert rate >= 0.90, rate


def test_one_detection_end_to_end_covers_theory(oracle, tmp_path):
    """One small detection of the pair (real probes, seed 0): its 95 % interval of the difference contains theory."""
    model, truth = oracle
    cfg = detect.DetectConfig.from_preset(
        "fast",
        model=NAME,
        out=str(tmp_path),
        wandb=False,
        probes=["forward_backward", "locality_gap"],
        fb={"num_t": 13, "t_min": T_MIN, "t_max": 0.95, "samples": 96, "steps": 20, "batch": 96, "radii": []},
        gaps={"steps": 30, "samples": 32, "batch": 32, "radii": [RADIUS], "trajectories": ["train"]},
    )
    c = detect.run(cfg, model)["concurrence"]["overall"]
    lo, hi = c["center_difference_ci95_log_snr"]
    assert lo <= truth <= hi, (c["verdict"], truth)
