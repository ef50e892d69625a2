"""Benchmark of ``critsample detect`` on dit-digits: wall time of the fast and paper presets, and model evaluations
per second of the batched probe path against a plain loop of single forwards, measured side by side in one run.

    python bench/detect.py [--skip-paper] [--threads 1] [--model dit-digits]

Each preset runs from an empty output folder (no stored units), W&B off. The last line is one JSON object:
{"fast_seconds": ..., "paper_seconds": ..., "batched_over_plain": ...} (paper_seconds is null with --skip-paper).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def batched_over_plain(model, repeats: int = 3) -> dict:
    """The gap probe on one batch of states (8 samples x 6 times x cond/null x global + 3 radii = 384 rows):
    ``predict_rows`` in chunks of 128 rows versus one row per forward; same numbers, evaluations per second."""
    from critsample.datasets import digits_split
    from critsample.probes.gaps import score_gaps, train_states

    x, y = digits_split("test")
    x0, cond = x[:8], y[:8]
    times = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1]
    states = train_states(model, x0, times, torch.Generator().manual_seed(0))
    radii = [1, 2, 4]
    rows = states.shape[0] * states.shape[1] * 2 * (1 + len(radii))
    score_gaps(model, states[:1], times[:1], cond, radii, max_batch=128)  # warm-up
    best = {"batched": float("inf"), "plain": float("inf")}
    out = {}
    for _ in range(repeats):  # interleaved, best of `repeats`: both paths see the same machine load
        for name, mb in (("plain", 1), ("batched", 128)):
            start = time.perf_counter()
            out[name] = score_gaps(model, states, times, cond, radii, max_batch=mb)
            best[name] = min(best[name], time.perf_counter() - start)
    diff = max(float((out["batched"][k] - out["plain"][k]).abs().max() / out["plain"][k].abs().max().clamp_min(1e-12))
               for k in out["plain"])
    return {
        "rows": rows,
        "batched_evals_per_s": rows / best["batched"],
        "plain_evals_per_s": rows / best["plain"],
        "ratio": best["plain"] / best["batched"],
        "max_relative_difference": diff,
    }


def time_preset(preset: str, model_name: str, threads: int, out: Path) -> tuple[float, dict]:
    from critsample import detect

    cfg = detect.DetectConfig.from_preset(preset, model=model_name, out=str(out), threads=threads, wandb=False)
    start = time.perf_counter()
    summary = detect.run(cfg)
    return time.perf_counter() - start, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-paper", action="store_true", help="time only the fast preset")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: best on a shared 2-core machine)")
    ap.add_argument("--model", default="dit-digits")
    ap.add_argument("--keep", default=None, help="keep the runs in this folder instead of a temporary one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import critsample

    model = critsample.load(args.model)
    ratio = batched_over_plain(model)
    print(f"gap probe, {ratio['rows']} rows: batched {ratio['batched_evals_per_s']:.0f} evals/s, plain loop "
          f"{ratio['plain_evals_per_s']:.0f} evals/s -> {ratio['ratio']:.2f}x "
          f"(max relative difference {ratio['max_relative_difference']:.1e})")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-detect-"))
    result = {"fast_seconds": None, "paper_seconds": None, "batched_over_plain": round(ratio["ratio"], 3)}
    for preset in ("fast",) if args.skip_paper else ("fast", "paper"):
        seconds, summary = time_preset(preset, args.model, args.threads, root / preset)
        result[f"{preset}_seconds"] = round(seconds, 1)
        cw = summary.get("critical_window") or {}
        print(f"{preset}: {seconds:.1f} s, {summary['cost']['model_evaluations']} model evaluations "
              f"({summary['cost']['model_evaluations'] / seconds:.0f}/s); critical window t in "
              f"[{cw.get('t_start', float('nan')):.3f}, {cw.get('t_end', float('nan')):.3f}]; "
              f"{(summary.get('concurrence', {}).get('overall') or {}).get('verdict', 'no verdict')}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
