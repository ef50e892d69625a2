"""Which detect sizes give the concurrence test its power: the verdict rates of ``bench/oracle_power.py``'s isotropic
cases at several sizes, from exact per-sample probe rows instead of detections (issue 22, item 4).

``IsotropicMixture.exact_probe_rows`` draws what the ``forward_backward`` (ODE reverse, Bayes readout) and
``locality_gap`` (train trajectory) probes record, row i of both from the same clean image, and the rows go through the
estimators ``detect`` uses (``threshold_window`` with chance 1/2, ``half_max_window``, ``concurrence``, 200 bootstrap
resamples), at the fb times ``linspace(t_min, t_max, num_t)`` and the gap times of the sampler's ``gap_steps`` steps.
A seed costs about 0.1 s instead of a detection's 7-30 s, so sizes can be swept; ``bench/oracle_power.py`` confirms the
chosen size end to end. Each size is ``fb_samples x num_t / gap_samples x gap_steps``. Prints one row per (case, size)
and ends with one JSON object.

    python bench/power_sizes.py --seeds 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import critsample
from critsample.detect import estimators
from critsample.sampling import step_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_power import CASES, RARE_RATE, WANT_RATE, rate  # noqa: E402
from oracle_validation import fb_theory, gap_theory  # noqa: E402

SIZES = ["16x10/6x20", "192x19/32x50", "384x19/32x50", "384x19/64x50", "576x19/64x50", "384x37/64x50"]
"""fast, paper (before this bench), then larger forward-backward samples, gap samples and fb grids."""
ISOTROPIC = [name for name, c in CASES.items() if c["model"].startswith("gmm-mixture:")]


def parse(size: str) -> tuple[int, int, int, int]:
    fb, gap = size.split("/")
    (n_fb, num_t), (n_gap, steps) = (map(int, fb.split("x")), map(int, gap.split("x")))
    return n_fb, num_t, n_gap, steps


def run(name: str, size: str, seeds: int, t_min: float = 0.05, t_max: float = 0.95) -> dict:
    case = CASES[name]
    model = critsample.load(case["model"])
    n_fb, num_t, n_gap, steps = parse(size)
    fb_t = np.linspace(t_min, t_max, num_t)
    gap_t = np.array(step_times(model, steps, "auto"))
    tol, r, sch = case.get("tolerance", 1.0), case["radius"], model.schedule
    outcomes, covered, sigmas = [], [], []
    truth = fb_theory(model, t_min) - gap_theory(model, r)
    begin = time.perf_counter()
    for seed in range(seeds):
        g = torch.Generator().manual_seed(20_000 + seed)
        errors, gaps = model.exact_probe_rows(max(n_fb, n_gap), fb_t, gap_t, r, g)
        a = estimators.threshold_window(
            "forward_backward", "symmetry_breaking", fb_t, errors[:n_fb], sch, chance=0.5, seed=seed
        )
        b = estimators.half_max_window("locality_gap", "nonlocality", gap_t, gaps[:n_gap], sch, seed=seed)
        c = estimators.concurrence(a, b, tol)
        outcomes.append(c["outcome"])
        if c["outcome"] != "no window":
            lo, hi = c["center_difference_ci95_log_snr"]
            covered.append(lo <= truth <= hi)
            sigmas.append(c["combined_uncertainty_log_snr"])
    want = rate(sum(o in case["want"] for o in outcomes), seeds)
    rare = rate(sum(o in case["rare"] for o in outcomes), seeds)
    return {
        "case": name,
        "model": case["model"],
        "radius": r,
        "tolerance_log_snr": tol,
        "size": size,
        "theory_difference_log_snr": truth,
        "seeds": seeds,
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "wanted_rate": want,
        "rare_rate": rare,
        "target_met": want["rate"] >= WANT_RATE and rare["rate"] <= RARE_RATE,
        "coverage95": rate(sum(covered), len(covered)) if covered else None,
        "median_sigma_log_snr": float(np.median(sigmas)) if sigmas else None,
        "seconds_per_seed": (time.perf_counter() - begin) / seeds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=ISOTROPIC, choices=ISOTROPIC)
    ap.add_argument("--sizes", nargs="+", default=SIZES, help="fb_samples x num_t / gap_samples x gap_steps")
    ap.add_argument("--seeds", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread is the fastest on a shared 2-core machine
    rows = []
    print(
        "| case | theory d (nats) | tolerance | size (fb samples x noise levels / gap samples x steps) | wanted rate "
        "[95 % CI] | rare rate [95 % CI] | coverage | median sigma_d | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        for size in args.sizes:
            r = run(name, size, args.seeds)
            rows.append(r)
            f = lambda x: f"{100 * x['rate']:.0f} % [{100 * x['ci95'][0]:.0f}, {100 * x['ci95'][1]:.0f}]"  # noqa: E731
            print(
                f"| {name} | {r['theory_difference_log_snr']:+.2f} | {r['tolerance_log_snr']:g} | {size} | "
                f"{f(r['wanted_rate'])} | {f(r['rare_rate'])} | {f(r['coverage95']) if r['coverage95'] else '-'} | "
                f"{r['median_sigma_log_snr'] or float('nan'):.2f} | {'met' if r['target_met'] else 'not met'} |",
                flush=True,
            )
    print(json.dumps({"seeds": args.seeds, "rows": rows}))


if __name__ == "__main__":
    main()
