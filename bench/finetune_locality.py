"""Does training for locality outside the critical window make the cheap (adaptive) sampler better?

    python bench/finetune_locality.py [--steps 1500] [--samples 500] [--window 0.3:0.7 | --summary S] [--radius 1] \\
        [--control]

1. Snapshots the bundled dit-digits into ``OUT/base`` (the bundled weights may be replaced while this runs).
2. Fine-tunes it with ``configs/fit/dit-digits-locality.yaml`` (radius ``--radius`` outside the window on a share of
   the samples, global inside, loss weighted toward the window) into ``OUT/fit``; resumes from its last checkpoint
   when interrupted and reuses a finished fine-tune.
3. Samples ``--samples`` images (equal numbers per class, the same seeds) from the model before and after, with the
   same adaptive plan (guided global inside the window, local unconditional outside) and with full guidance, and
   reports class accuracy (bundled digits classifier, Bernoulli one-sigma) and digits-FID against the test split
   (bootstrap one-sigma). Each arm is cached in ``OUT/arms.json``.
4. ``--control``: the same fine-tune without the schedules (``OUT/control``), so that the effect of training for
   locality can be told from that of training longer.

Last line: one JSON object with the before / after numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def snapshot_base(out: Path, model: str) -> Path:
    from critsample.models import bundled_path

    base = out / "base"
    if not (base / "critsample.json").exists():
        src = bundled_path(model) if model == "dit-digits" else Path(model)
        tmp = out / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(base)
    return base


def finetune(out: Path, base: Path, steps: int, window: tuple[float, float], summary: str | None, radius: int,
             control: bool = False) -> Path:
    """Run (or resume, or reuse) the locality fine-tune; returns its exported model folder. ``control``: the same
    fine-tune without radius schedule and loss weighting (global attention, uniform loss)."""
    from critsample.cli import main

    name = "control" if control else "fit"
    export = out / name / "export"
    meta = export / "critsample.json"
    if meta.exists() and json.loads(meta.read_text()).get("global_step") == steps:
        print(f"reusing the fine-tuned model in {export}", flush=True)
        return export
    import yaml

    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "configs/fit/dit-digits-locality.yaml").read_text())
    t = cfg["trainer"]
    t.update(max_steps=steps, default_root_dir=str(root), enable_progress_bar=False)
    t["logger"]["init_args"]["save_dir"] = str(root)
    for cb in t["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(root / "checkpoints")
        if cb["class_path"].endswith("TrainingEvaluation"):  # evaluate the bench's adaptive plan, schedule or not
            cb["init_args"].update(window=list(window), radius=radius)
    m = cfg["model"]
    m.update(init_from=str(base), export_dir=str(export))
    m["radius_schedule"]["radius"] = radius
    for sched in ("radius_schedule", "loss_weighting"):
        if control:
            m[sched] = None
        elif summary:
            m[sched].pop("window", None)
            m[sched]["summary"] = str(summary)
        else:
            m[sched]["window"] = list(window)
    (root / "fit.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["fit", "--config", str(root / "fit.yaml")]
    start = time.perf_counter()
    code = main(args)
    if code != 0:
        raise SystemExit(code)
    print(f"fine-tune: {steps} steps in {time.perf_counter() - start:.0f} s (wall, including resumed parts only)",
          flush=True)
    return export


def evaluate_arm(model_dir: Path, plan_kind: str, window, radius: int, guidance: float, samples: int, steps: int,
                 seed: int) -> dict:
    import critsample
    from critsample.evaluate import digits_quality, generate
    from critsample.flops import plan_flops
    from critsample.plans import adaptive, full_guidance

    model = critsample.load(str(model_dir))
    if plan_kind == "adaptive":
        plan = adaptive(model, steps, guidance, window, radius, "local-uncond")
    else:
        plan = full_guidance(model, steps, guidance)
    per_class = samples // 10
    labels = torch.arange(10).repeat_interleave(per_class)
    gen = generate(model, plan, labels, seed=seed, batch_size=250, progress=False)
    q = digits_quality(gen)
    grid = model.sample_shape[-2] // model.patch_size, model.sample_shape[-1] // model.patch_size
    return {
        "accuracy": q.accuracy, "accuracy_sigma": q.accuracy_sigma, "fid": q.fid, "fid_sigma": q.fid_sigma,
        "forwards": plan.forwards, "gflops": plan_flops(model, plan, grid)["total"] / 1e9, "seconds": gen.seconds,
        "plan": plan.describe(), "samples": len(labels),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dit-digits", help="the model to fine-tune (dit-digits or a folder)")
    ap.add_argument("--out", default="runs/bench/finetune_locality")
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps (batch 64)")
    ap.add_argument("--samples", type=int, default=500, help="samples per arm (a multiple of 10)")
    ap.add_argument("--window", default="0.3:0.7", help="critical window t0:t1 (ignored with --summary)")
    ap.add_argument("--summary", default=None, help="summary.json of `critsample detect` on this model")
    ap.add_argument("--radius", type=int, default=1, help="local radius outside the window (training and sampling)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's own default guidance")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true",
                    help="also fine-tune without radius schedule and loss weighting (same steps, data, optimizer) and "
                         "evaluate it: separates the effect of locality training from that of more training")
    args = ap.parse_args()

    from critsample import summary
    from critsample.errors import UserError
    from critsample.options import TimeWindow

    torch.set_num_threads(1)  # one thread is much faster than two on a shared 2-core machine
    try:
        if args.summary:
            window = summary.critical_window(summary.read(args.summary), args.summary)
        else:
            window = TimeWindow.parse(args.window, "--window")
    except UserError as e:
        print(f"finetune_locality: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = snapshot_base(out, args.model)
    base_meta = json.loads((base / "critsample.json").read_text())
    guidance = args.guidance if args.guidance is not None else float(base_meta.get("default_guidance", 2.0))
    settings = {"window": list(window), "radius": args.radius, "guidance": guidance, "samples": args.samples,
                "sample_steps": args.sample_steps, "seed": args.seed, "steps": args.steps,
                "base_global_step": base_meta.get("global_step")}
    cache_path = out / "arms.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if cache.get("settings") != settings:
        cache = {"settings": settings}

    def arm(name: str, model_dir: Path, kind: str) -> dict:
        if name not in cache:
            cache[name] = evaluate_arm(model_dir, kind, window, args.radius, guidance, args.samples, args.sample_steps,
                                       args.seed)
            cache_path.write_text(json.dumps(cache, indent=2))
            r = cache[name]
            print(f"{name:16s} accuracy {r['accuracy']:.4f} +- {r['accuracy_sigma']:.4f}  "
                  f"FID {r['fid']:.3f} +- {r['fid_sigma']:.3f}  "
                  f"({r['forwards']} forwards, {r['seconds']:.0f} s)", flush=True)
        return cache[name]

    before = {k: arm(f"{k}_before", base, k) for k in ("adaptive", "full")}
    tuned = finetune(out, base, args.steps, window, args.summary, args.radius)
    after = {k: arm(f"{k}_after", tuned, k) for k in ("adaptive", "full")}
    control = {}
    if args.control:
        plain = finetune(out, base, args.steps, window, args.summary, args.radius, control=True)
        control = {k: arm(f"{k}_control", plain, k) for k in ("adaptive", "full")}

    print()
    print(f"base: dit-digits at step {base_meta.get('global_step')}; fine-tune: {args.steps} steps; window t in "
          f"[{window[0]:g}, {window[1]:g}], radius {args.radius}, guidance {guidance:g}, "
          f"{args.sample_steps} DDIM steps, "
          f"{args.samples} samples per arm (same seeds before and after)")
    print(f"adaptive plan: {before['adaptive']['plan']}")
    print(f"cost per sample: adaptive {before['adaptive']['forwards']} forwards / "
          f"{before['adaptive']['gflops']:.3f} GFLOP, "
          f"full guidance {before['full']['forwards']} forwards / {before['full']['gflops']:.3f} GFLOP "
          f"(ratio {before['adaptive']['gflops'] / before['full']['gflops']:.2f})")
    print(f"{'arm':10s} {'accuracy before':>20s} {'accuracy after':>20s} {'FID before':>18s} {'FID after':>18s}")
    for k in ("adaptive", "full"):
        b, a = before[k], after[k]
        print(f"{k:10s} {b['accuracy']:>12.4f} +- {b['accuracy_sigma']:.4f} "
              f"{a['accuracy']:>12.4f} +- {a['accuracy_sigma']:.4f} "
              f"{b['fid']:>10.3f} +- {b['fid_sigma']:.3f} {a['fid']:>10.3f} +- {a['fid_sigma']:.3f}")
    for k, c in control.items():
        print(f"control ({k}, fine-tuned {args.steps} steps without schedules): accuracy {c['accuracy']:.4f} +- "
              f"{c['accuracy_sigma']:.4f}, FID {c['fid']:.3f} +- {c['fid_sigma']:.3f}")
    drop = (before["full"]["accuracy"] - after["full"]["accuracy"]) * 100
    print(f"full-guidance accuracy change: {-drop:+.2f} points (limit: a drop of at most 1 point) -> "
          f"{'ok' if drop <= 1.0 else 'EXCEEDED'}")
    print(json.dumps({
        "adaptive_accuracy_before": before["adaptive"]["accuracy"],
        "adaptive_accuracy_after": after["adaptive"]["accuracy"],
        "adaptive_fid_before": before["adaptive"]["fid"],
        "adaptive_fid_after": after["adaptive"]["fid"],
        "full_accuracy_before": before["full"]["accuracy"],
        "full_accuracy_after": after["full"]["accuracy"],
    }))


if __name__ == "__main__":
    main()
