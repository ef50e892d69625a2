"""How much the windows move with the definition choices, on the analytic oracles' exact theory (docs/oracles.md).

Two choices the paper leaves open are measured where theory is exact, side by side on the same exact samples:

* **norm vs squared norm of a gap** (eqs. 6-7): the full-width-at-half-maximum window of the mean per-token
  ||gap|| (what ``detect`` uses) against that of the mean per-token ||gap||^2, for the conditioning gap and the
  locality gap at r = 1, 2, 4 (eps units, the oracle's exact scores over exact samples of the noised data);
* **ODE vs SDE forward-backward**: the threshold (floor at t_min = 0.05 + 50 % of the rise to chance) of the exact
  error 1 - P_FB(t) with a deterministic (DDIM-like ODE) reverse against a stochastic (ancestral SDE) reverse, both
  read by the Bayes classifier (``oracles.forward_backward_agreement``).

Each row: both log-SNR centers (nats) and their difference; a difference beyond the 1-nat concurrence tolerance means
the definition alone can change a verdict. One torch thread; ends with one JSON line.

    python bench/definitions.py [--n 2048]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import critsample
from critsample import NULL
from critsample.detect import estimators

ORACLES = ("gmm-mixture", "gmm-mixture-field", "gmm-mixture:N=8,mu=1.0,s2=1", "gmm-mixture-field:N=8,mu=0.5,kappa=1.0")
RADII = (1, 2, 4)
T_MIN = 0.05


def _center(oracle, t, curves) -> float | None:
    if curves.mean(0).max() <= 1e-12:
        return None
    w = estimators.half_max_window("theory", "theory", t, curves, oracle.schedule, n_boot=0)
    return w.log_snr_center if w.valid else None


def gap_centers(oracle, radius: int | None, n: int) -> dict:
    """Log-SNR FWHM centers of the exact mean per-token gap, as a norm and as a squared norm."""
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(n) % 2
    x0 = oracle.sample_data(n, labels, generator=g).double()
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = np.linspace(0.02, 0.98, 97)
    norm, sq = [], []
    null = torch.full((n,), NULL)
    for ti in t:
        a, s = oracle.schedule.alpha_sigma(torch.tensor(ti))
        xt = (a * x0 + s * z).float()
        if radius is None:
            gap = oracle.predict(xt, ti, labels, kind="eps") - oracle.predict(xt, ti, null, kind="eps")
        else:
            gap = oracle.predict(xt, ti, null, radius=radius, kind="eps") - oracle.predict(xt, ti, null, kind="eps")
        nrm = gap.double().reshape(n, -1).norm(dim=1)
        norm.append((nrm / oracle.d).numpy())
        sq.append((nrm**2 / oracle.d).numpy())
    return {"norm": _center(oracle, t, np.stack(norm, 1)), "squared_norm": _center(oracle, t, np.stack(sq, 1))}


def fb_centers(oracle) -> dict:
    """Log-SNR thresholds of the exact forward-backward error with an ODE and an SDE reverse (Bayes readout)."""
    t = np.linspace(T_MIN, 0.98, 190)
    out = {}
    for reverse in ("ode", "sde"):
        err = 1 - oracle.forward_backward_agreement(torch.tensor(t), reverse=reverse, readout="classifier").numpy()
        w = estimators.threshold_window(
            "theory", "theory", t, np.stack([err, err]), oracle.schedule, chance=0.5, n_boot=0
        )
        out[reverse] = w.log_snr_center if w.valid else None
    return out


def _diff(a, b):
    return None if a is None or b is None else a - b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="exact samples per gap curve")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| oracle | quantity | definition A | definition B | A (nats) | B (nats) | B - A (nats) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in ORACLES:
        oracle = critsample.load(name)
        fb = fb_centers(oracle)
        rows.append(
            {
                "oracle": name,
                "quantity": "forward_backward threshold",
                "a": "ode",
                "b": "sde",
                "a_log_snr": fb["ode"],
                "b_log_snr": fb["sde"],
                "b_minus_a": _diff(fb["sde"], fb["ode"]),
            }
        )
        for r in (None, *RADII):
            c = gap_centers(oracle, r, args.n)
            q = "cond_gap" if r is None else f"locality_gap r={r}"
            rows.append(
                {
                    "oracle": name,
                    "quantity": q,
                    "a": "norm",
                    "b": "squared norm",
                    "a_log_snr": c["norm"],
                    "b_log_snr": c["squared_norm"],
                    "b_minus_a": _diff(c["squared_norm"], c["norm"]),
                }
            )
        for row in rows[-(2 + len(RADII)) :]:
            f = lambda v: "-" if v is None else f"{v:+.2f}"  # noqa: E731
            print(
                f"| {row['oracle']} | {row['quantity']} | {row['a']} | {row['b']} | {f(row['a_log_snr'])} | "
                f"{f(row['b_log_snr'])} | {f(row['b_minus_a'])} |",
                flush=True,
            )
    gaps = [abs(r["b_minus_a"]) for r in rows if r["a"] == "norm" and r["b_minus_a"] is not None]
    fbs = [abs(r["b_minus_a"]) for r in rows if r["a"] == "ode" and r["b_minus_a"] is not None]
    print(
        json.dumps(
            {
                "rows": rows,
                "max_abs_norm_vs_squared_nats": max(gaps) if gaps else None,
                "max_abs_ode_vs_sde_nats": max(fbs) if fbs else None,
                "n": args.n,
            }
        )
    )


if __name__ == "__main__":
    main()
