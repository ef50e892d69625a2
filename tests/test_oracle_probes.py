"""The probes of `detect` on the analytic oracles, against what theory says they must find (issue: oracle models)."""

from __future__ import annotations

import numpy as np
import torch

import critsample
from critsample.detect import DetectConfig, ForwardBackwardArgs, run
from critsample.probes.gaps import score_gaps, train_states

TIMES = [round(v, 3) for v in np.linspace(0.05, 0.95, 19)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaps(name: str, radii: list[int], n: int = 16):
    oracle = critsample.load(name)
    labels = torch.arange(n) % 2
    x0 = oracle.sample_data(n, labels, generator=_gen(0))
    states = train_states(oracle, x0, TIMES, _gen(1))
    return score_gaps(oracle, states, TIMES, labels, radii)


def test_field_has_zero_conditioning_gap_and_locality_peaks_move_to_larger_t_with_r():
    """GMRF (no class information): the conditioning gap vanishes exactly; the locality gap (eps units, eq. 7) is
    positive and its peak over t moves to noisier times as the window grows (a larger window captures the short-range
    correlations, so what is left is longer-range and matters later; cf. the CMI peaks of the theory curve)."""
    out = _gaps("gmm-field:N=8", [1, 2, 3])
    assert out["cond_gap_eps"].abs().max() < 1e-9
    curve = out["loc_gap_uncond_eps"].mean(dim=0)  # (T, R)
    assert (curve > 0).all()
    peaks = [TIMES[int(curve[:, i].argmax())] for i in range(3)]
    assert peaks[0] < peaks[1] < peaks[2], peaks


def test_mixture_forward_backward_window_contains_the_speciation_time(tmp_path):
    """Isotropic two-class mixture: the symmetry-breaking window reported by the forward-backward probe contains the
    speciation time t_S of Biroli et al. (2024), s_S = 1/2 log(Lambda)."""
    oracle = critsample.load("gmm-mixture")
    lam = float(torch.linalg.eigvalsh(oracle.covariance().double()).max())  # independent of the oracle's closed form
    s_s = 0.5 * np.log(lam)
    assert abs(oracle.speciation()["s"] - s_s) < 1e-6
    t_grid = torch.arange(1000, dtype=torch.float64) / 1000
    t_s = float(t_grid[(oracle.schedule.ou_time(t_grid) - s_s).abs().argmin()])
    cfg = DetectConfig(model=oracle.name, out=str(tmp_path), wandb=False, probes=["forward_backward"],
                       fb=ForwardBackwardArgs(num_t=13, t_min=0.2, t_max=0.8, samples=200, steps=20, batch=200,
                                              radii=[1]))
    w = run(cfg, oracle)["windows"]["forward_backward"]
    assert w["t_start"] <= t_s <= w["t_end"], (w["t_start"], t_s, w["t_end"])


def test_mixture_field_nonlocality_lies_at_or_before_speciation():
    """Mixture with GMRF within-class covariance (both effects): the unconditional locality gap for r = 1 peaks no later
    than the speciation time (nonlocality precedes or coincides with symmetry breaking, Liu et al. 2026), and the
    conditioning gap is non-zero there."""
    oracle = critsample.load("gmm-mixture-field")
    lam = float(torch.linalg.eigvalsh(oracle.covariance().double()).max())
    t_grid = torch.arange(1000, dtype=torch.float64) / 1000
    t_s = float(t_grid[(oracle.schedule.ou_time(t_grid) - 0.5 * np.log(lam)).abs().argmin()])
    out = _gaps("gmm-mixture-field", [1])
    loc = out["loc_gap_uncond_eps"].mean(dim=0)[:, 0]
    t_peak = TIMES[int(loc.argmax())]
    assert t_peak <= t_s + 0.05, (t_peak, t_s)
    assert out["cond_gap_eps"].mean() > 0
