"""Cost of exact local-window attention (impl="auto") relative to dense SDPA, measured in one run.

    python bench/attention.py [--repeats 7] [--batch 1] [--heads 24] [--dim 64] [--threads 1] [--no-extra]
                              [--text 333] [--candidates]

For 16x16, 32x32, 64x64 token grids and radii 1, 2, 4, 8 (B=1, H=24, d=64: SD3-like heads) it prints
time(local) / time(dense SDPA) and the ideal ratio (mean window keys per query / all keys, borders truncated).
Every repeat times dense and all four radii of a grid in a shuffled order and the table shows the median of the
per-repeat ratios, so a shared, loaded machine shifts both sides alike. Unless --no-extra, a second table gives
64x64, r=4 with realistic batches: SD3 (B=2, H=24, d=64, with and without its 333 text tokens) and DiT-XL heads
(B=2, H=16, d=72). --text N adds N dense text tokens to every grid of the first table. --candidates also times
every CPU implementation (masked, bands1..bands8, tiled) side by side: the measurements behind the dispatch table
(critsample.local_attention._CPU_RULE). Last line: one JSON object {"local_over_dense": {...}, "ideal": {...},
"impl": {...}} (plus "candidates" with --candidates).

Times are the CPU time of this thread (time.thread_time), not wall time: at one torch thread all the work runs on
the calling thread, and on a shared machine another process's load then changes the ratios far less than it changes
wall time (it still competes for caches and memory bandwidth, hence repeats and medians).

Threads default to 1: on the shared 2-core development machine another process often holds one core, and then every
intra-op parallel region waits milliseconds for its second thread (the "machine check" line measures this). Dense
SDPA is one big region and barely notices; the tiled path runs ~150 small ones and would be timed as the machine's
scheduling latency. --threads 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from critsample.local_attention import _choose, local_attention
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from critsample.local_attention import _choose, local_attention

GRIDS = (16, 32, 64)
RADII = (1, 2, 4, 8)


def ideal_ratio(h: int, w: int, r: int, num_extra: int = 0) -> float:
    """Mean keys a query may see over all keys: truncated window for image queries, everything for extra ones."""
    rows = torch.arange(h)
    cols = torch.arange(w)
    span_i = ((rows + r).clamp(max=h - 1) - (rows - r).clamp(min=0) + 1).double()  # (h,)
    span_j = ((cols + r).clamp(max=w - 1) - (cols - r).clamp(min=0) + 1).double()  # (w,)
    n, total = h * w, h * w + num_extra
    image_keys = span_i.sum() * span_j.sum() + n * num_extra
    return float((image_keys + num_extra * total) / (total * total))


def _timer(fn, min_seconds: float = 0.02):
    """A timed call of fn, looped so one sample lasts at least ``min_seconds`` (tiny grids run in microseconds)."""
    t0 = time.thread_time()
    fn()
    once = time.thread_time() - t0
    loops = max(1, int(min_seconds / max(once, 1e-6)))

    def run() -> float:
        t0 = time.thread_time()
        for _ in range(loops):
            fn()
        return (time.thread_time() - t0) / loops

    return run


def parallel_op_latency() -> float:
    """Microseconds per small intra-op-parallel op: shows whether a busy core stalls every parallel region."""
    x = torch.zeros(1 << 17)  # above ATen's grain size, so the op is split across threads
    for _ in range(20):
        x.add_(1)
    t0 = time.perf_counter()
    for _ in range(200):
        x.add_(1)
    return (time.perf_counter() - t0) / 200 * 1e6


def compare(fns: dict, repeats: int, rng: random.Random) -> dict:
    """Median over repeats of time(name) / time("dense"), every repeat running all entries in a shuffled order."""
    timers = {name: _timer(fn) for name, fn in fns.items()}  # also the warm-up
    ratios = {name: [] for name in fns}
    for _ in range(repeats):
        order = list(fns)
        rng.shuffle(order)
        times = {name: timers[name]() for name in order}
        for name in fns:
            ratios[name].append(times[name] / times["dense"])
    return {name: statistics.median(v) for name, v in ratios.items()}


def qkv(b: int, heads: int, length: int, dim: int, gen: torch.Generator):
    return [torch.randn(b, heads, length, dim, generator=gen) for _ in range(3)]  # (B, H, L, d) each


CANDIDATES = ("masked", "bands1", "bands2", "bands4", "bands8", "tiled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per grid (median of per-repeat ratios)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--text", type=int, default=0, help="dense text tokens after every grid of the first table")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default); see below")
    ap.add_argument("--no-extra", action="store_true", help="skip the realistic-batch table at 64x64, r=4")
    ap.add_argument("--candidates", action="store_true", help="also time every CPU implementation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lag = parallel_op_latency()
    gen, rng = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    ne = args.text
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch} H={args.heads} d={args.dim}, "
          f"text={ne}, {args.repeats} repeats; ratio = median thread-CPU time(local, impl=auto) / time(dense SDPA)")
    print(f"machine check: one small parallel op takes {lag:.0f} us at {torch.get_num_threads()} threads "
          f"(~10 us on an idle core; ms means another process holds a core and many-op paths stall)")
    extra_cols = "".join(f" {c:>7}" for c in CANDIDATES) if args.candidates else ""
    print(f"{'grid':>6} {'r':>2} {'impl':>7} {'dense ms':>9} {'ratio':>7} {'ideal':>7}{extra_cols}")
    ratio, ideal, chosen, cands = {}, {}, {}, {}
    with torch.no_grad():
        for g in GRIDS:
            q, k, v = qkv(args.batch, args.heads, g * g + ne, args.dim, gen)
            fns = {"dense": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
            for r in RADII:
                fns[r] = lambda q=q, k=k, v=v, g=g, r=r: local_attention(q, k, v, (g, g), r, num_extra=ne)
                if args.candidates:
                    for c in CANDIDATES:
                        fns[(r, c)] = lambda q=q, k=k, v=v, g=g, r=r, c=c: local_attention(
                            q, k, v, (g, g), r, num_extra=ne, impl=c)
            dense_ms = 1e3 * statistics.median(_timer(fns["dense"])() for _ in range(3))
            got = compare(fns, args.repeats, rng)
            for r in RADII:
                key = f"{g}x{g}_r{r}"
                ratio[key], ideal[key] = round(got[r], 4), round(ideal_ratio(g, g, r, ne), 4)
                chosen[key] = _choose(g, g, r, ne)
                row = f"{g:>3}x{g:<2} {r:>2} {chosen[key]:>7} {dense_ms:>9.1f} {got[r]:>7.3f} {ideal[key]:>7.3f}"
                if args.candidates:
                    cands[key] = {c: round(got[(r, c)], 4) for c in CANDIDATES}
                    row += "".join(f" {got[(r, c)]:>7.3f}" for c in CANDIDATES)
                print(row, flush=True)
        if not args.no_extra:
            print("64x64, r=4, realistic batches (repeats halved):")
            realistic = (("SD3", 2, 24, 64, 0), ("SD3+text", 2, 24, 64, 333), ("DiT-XL", 2, 16, 72, 0))
            for name, b, heads, dim, extra in realistic:
                q, k, v = qkv(b, heads, 64 * 64 + extra, dim, gen)
                fns = {
                    "dense": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                    "local": lambda q=q, k=k, v=v, e=extra: local_attention(q, k, v, (64, 64), 4, num_extra=e),
                }
                got = compare(fns, max(3, args.repeats // 2), rng)
                impl = _choose(64, 64, 4, extra)
                key = f"{name}_64x64_r4"
                ratio[key], chosen[key] = round(got["local"], 4), impl
                ideal[key] = round(ideal_ratio(64, 64, 4, extra), 4)
                print(f"  {name:>8} B={b} H={heads} d={dim} text={extra:<3} impl={impl:>7} "
                      f"ratio {got['local']:.3f} ideal {ideal[key]:.3f}", flush=True)
    out = {"local_over_dense": ratio, "ideal": ideal, "impl": chosen}
    if args.candidates:
        out["candidates"] = cands
    print(json.dumps(out))


if __name__ == "__main__":
    main()
