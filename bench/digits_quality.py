"""Quality bars of the bundled dit-digits model (guided sampling at its default guidance and default sampler).

    python bench/digits_quality.py [--model dit-digits] [--per-class 100] [--uncond 1000] [--out runs/bench/digits]

Prints: conditional accuracy (100 samples per class), unconditional class fractions (1,000 samples), digits-FID of
the unconditional samples vs the test split next to the FID of the train split vs the test split (the floor), the
classifier's test accuracy, and writes a 10 x 10 PNG grid (rows = classes). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import critsample
from critsample.denoisers import NULL
from critsample.evaluate import digits_quality, generate
from critsample.finetune.data import digits_split
from critsample.metrics import digits_fid
from critsample.models.classifiers import load_classifier
from critsample.plans import full_guidance
from critsample.report import image_grid, save_png
from critsample.sampling import Plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-digits")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--uncond", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's own default guidance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/digits_quality")
    args = ap.parse_args()

    model = critsample.load(args.model)
    w = args.guidance if args.guidance is not None else model.default_guidance
    clf = load_classifier("digits")
    x_test, y_test = digits_split("test")
    with torch.no_grad():
        test_acc = (clf.predict_logits((x_test + 1) / 2).argmax(1) == y_test).double().mean().item()

    labels = torch.arange(10).repeat_interleave(args.per_class)
    cond = generate(model, full_guidance(model, args.steps, w), labels, seed=args.seed)
    q_cond = digits_quality(cond, clf)
    uncond = generate(model, Plan.guided(args.steps, 1.0), torch.full((args.uncond,), NULL), seed=args.seed + 10_000)
    q_unc = digits_quality(uncond, clf)
    x_train, _ = digits_split("train")
    floor = digits_fid((x_train + 1) / 2)

    out = Path(args.out)
    pick = torch.cat([torch.nonzero(cond.labels == c)[:10, 0] for c in range(10)])
    save_png(image_grid(cond.images[pick], nrow=10), out / "digits_grid.png", scale=8)

    print(f"model {args.model}: guidance w={w:g}, {args.steps} steps, sampler ddim")
    print(f"conditional accuracy      {q_cond.accuracy:.4f} +- {q_cond.accuracy_sigma:.4f} ({len(labels)} samples)")
    lo, hi = min(q_unc.class_fractions), max(q_unc.class_fractions)
    print(f"unconditional class range {lo:.3f} .. {hi:.3f} ({args.uncond} samples)")
    print(f"digits-FID uncond vs test {q_unc.fid:.3f} +- {q_unc.fid_sigma:.3f}   floor (train vs test) {floor:.3f}")
    print(f"classifier test accuracy  {test_acc:.4f}")
    print(f"grid: {out / 'digits_grid.png'}   sampling seconds: cond {cond.seconds:.1f}, uncond {uncond.seconds:.1f}")
    print(json.dumps({
        "cond_accuracy": q_cond.accuracy,
        "uncond_class_min": min(q_unc.class_fractions),
        "uncond_class_max": max(q_unc.class_fractions),
        "fid": q_unc.fid,
        "fid_floor": float(floor),
        "classifier_test_accuracy": test_acc,
    }))


if __name__ == "__main__":
    main()
