"""Quality bars of the bundled dit-fashion model (issue 25: guided sampling at its default guidance, DDIM).

    python bench/fashion_quality.py [--model dit-fashion] [--per-class 50] [--uncond 500] [--steps 50]
                                    [--out runs/bench/fashion_quality]

Bars: conditional samples classified as the requested class >= 80 %; unconditional class fractions each in 5-15 %; FD
of the unconditional samples to the 2,000 bundled test images (the judge's reference set) next to its floor, the FD
of as many real train images (seeded draw; needs Debian's full set, else skipped) to the same reference: FD has a
finite-sample bias, so the floor is measured at the generated set's size. The floor of the whole train split vs the
whole test split (0.154) is reused from the classifier's config.json, not recomputed. Samples come from the seeded
iterator (sample i from (seed, i)) through critsample.evaluate.generate; the judge is critsample.judges.for_model.
One torch thread. Prints a table and a 10 x 10 PNG grid (rows = classes); last line: one JSON object.

Sizes: on one thread of the shared 2-core machine, with dit-fashion training beside it, a guided 50-step DDIM sample
took 1.3 s and an unguided one 0.55 s (20 of each, 15:02 UTC); the defaults (50 per class + 500 unconditional) took
16 min on the final weights beside `critsample detect` on the other core (use --per-class 30 --uncond 300 for ~9).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import critsample
from critsample import judges
from critsample.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from critsample.denoisers import NULL
from critsample.errors import UserError
from critsample.evaluate import generate, judged_quality
from critsample.metrics import extract_features
from critsample.models import bundled_path
from critsample.options import torch_seed
from critsample.plans import full_guidance
from critsample.report import image_grid, save_png
from critsample.sampling import Plan

BARS = {"cond_accuracy_min": 0.80, "uncond_class_min": 0.05, "uncond_class_max": 0.15}


def train_floor(judge: judges.ClassifierJudge, n: int, seed: int) -> float | None:
    """FD of ``n`` seeded train images to the judge's reference set, or None without Debian's full set."""
    try:
        x, _ = fashion_mnist("train")
    except UserError:
        return None
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(torch_seed(seed)))[:n]
    return judge.fd(extract_features((x[idx] + 1) / 2, judge.features))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-fashion")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--uncond", type=int, default=500)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's own default guidance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/fashion_quality")
    args = ap.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    model = critsample.load(args.model)
    judge = judges.for_model(model)
    w = args.guidance if args.guidance is not None else model.default_guidance

    labels = torch.arange(10).repeat_interleave(args.per_class)
    cond = generate(model, full_guidance(model, args.steps, w), labels, seed=args.seed, progress=False)
    q_cond = judged_quality(cond, judge, seed=args.seed)
    per_class = [float(judge.score(cond.images[labels == c], labels[labels == c]).rows.mean()) for c in range(10)]
    uncond = generate(model, Plan.guided(args.steps, 1.0), torch.full((args.uncond,), NULL), seed=args.seed + 10_000,
                      progress=False)
    q_unc = judged_quality(uncond, judge, seed=args.seed)
    floor = train_floor(judge, args.uncond, args.seed)
    recorded = json.loads((bundled_path("fashion-classifier") / "config.json").read_text())["fid_train_vs_test"]

    out = Path(args.out)
    pick = torch.cat([torch.nonzero(cond.labels == c)[:10, 0] for c in range(10)])
    save_png(image_grid(cond.images[pick], nrow=10), out / "fashion_grid.png", scale=4)

    lo, hi = min(q_unc.class_fractions), max(q_unc.class_fractions)
    print(f"model {args.model}: guidance w={w:g}, {args.steps} DDIM steps, seed {args.seed}, 1 torch thread")
    print(f"{'class':<14}{'cond acc':>10}{'uncond frac':>13}")
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        print(f"{name:<14}{per_class[c]:>10.3f}{q_unc.class_fractions[c]:>13.3f}")
    print(f"conditional accuracy      {q_cond.accuracy:.4f} +- {q_cond.accuracy_sigma:.4f} ({len(labels)} samples; "
          f"bar >= {BARS['cond_accuracy_min']})")
    print(f"unconditional class range {lo:.3f} .. {hi:.3f} ({args.uncond} samples; bar 0.05 .. 0.15)")
    floor_text = "n/a (no Debian train split)" if floor is None else f"{floor:.3f}"
    print(f"FD uncond vs test-2000    {q_unc.fid:.3f} +- {q_unc.fid_sigma:.3f}   floor ({args.uncond} train images vs "
          f"test-2000) {floor_text}   recorded floor (train vs test, all) {recorded:.3f}")
    print(f"grid: {out / 'fashion_grid.png'}   sampling seconds: cond {cond.seconds:.1f}, uncond {uncond.seconds:.1f}"
          f", total {time.perf_counter() - start:.1f}")
    print(json.dumps({
        "model": args.model,
        "global_step": getattr(model, "meta", {}).get("global_step"),
        "guidance": w,
        "steps": args.steps,
        "per_class": args.per_class,
        "uncond": args.uncond,
        "cond_accuracy": q_cond.accuracy,
        "cond_accuracy_sigma": q_cond.accuracy_sigma,
        "cond_accuracy_per_class": per_class,
        "uncond_class_fractions": q_unc.class_fractions,
        "uncond_class_min": lo,
        "uncond_class_max": hi,
        "fd": q_unc.fid,
        "fd_sigma": q_unc.fid_sigma,
        "fd_floor_same_size": floor,
        "fd_floor_recorded_all": recorded,
        "pass_cond": q_cond.accuracy >= BARS["cond_accuracy_min"],
        "pass_uncond": lo >= BARS["uncond_class_min"] and hi <= BARS["uncond_class_max"],
        "seconds": time.perf_counter() - start,
    }))


if __name__ == "__main__":
    main()
