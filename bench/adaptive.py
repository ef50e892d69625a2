"""Adaptive sampling vs full guidance vs limited-interval guidance, measured side by side in one run.

    python bench/adaptive.py [--summary runs/detect-digits/summary.json | --window 0.45:0.75 --radius 1]

Part 1, dit-digits with its detected window, the same number of steps for every plan:
  full guidance (guided global every step), limited-interval guidance (Kynkaanniemi et al. 2024: guided global inside
  the window, conditional global outside), adaptive (guided global inside, local unconditional outside: the default)
  and adaptive with local conditional steps outside (same cost: one forward per outside step).
  Batches of the three plans are interleaved so machine noise hits them alike; wall time ratios, analytic FLOPs
  ratios, class accuracy of the bundled classifier (Bernoulli one-sigma) and digits-FID to the test split (bootstrap
  one-sigma) are printed.
Part 2, the same plans on the real architectures with random weights (DiT-XL/2 at 256 and 512 px, SD3-medium at
  1024 px): one full-width transformer block is timed per step kind (guided global at batch 2, conditional global
  and local unconditional at batch 1) and multiplied by the depth; FLOPs are analytic for the whole network.

Last line: one JSON object with speedup_vs_full, speedup_vs_interval, accuracy_*, fid_*, flops_ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import critsample
from critsample import plans, summary
from critsample.evaluate import Generated, digits_quality
from critsample.flops import forward_flops, plan_flops, transformer_shape
from critsample.sampling import Step, sample


def digits_part(args) -> dict:
    model = critsample.load("dit-digits")
    w = args.guidance if args.guidance is not None else model.default_guidance
    if args.window:
        window, radius = plans.parse_window(args.window), args.radius
    else:
        s = summary.read(args.summary, model.name)
        window = summary.critical_window(s, args.summary)
        radius = args.radius if args.radius is not None else (summary.suggested_radius(s) or 1)
    arms = {
        "full": plans.full_guidance(model, args.steps, w),
        "interval": plans.interval_guidance(model, args.steps, w, window),
        "adaptive": plans.adaptive(model, args.steps, w, window, radius, "local-uncond"),
        "adaptive_local_cond": plans.adaptive(model, args.steps, w, window, radius, "local-cond"),
    }
    labels = torch.arange(10).repeat_interleave(args.per_class)
    batches = list(torch.split(labels, args.batch_size))
    images = {k: [] for k in arms}
    seconds = {k: 0.0 for k in arms}
    for b, lab in enumerate(batches):  # interleaved: every arm sees the same machine state and the same noise
        for name, plan in arms.items():
            g = torch.Generator().manual_seed(args.seed + b)
            start = time.perf_counter()
            x = sample(model, plan, lab, generator=g)
            images[name].append(model.images(x).cpu())
            seconds[name] += time.perf_counter() - start
        print(f"  batch {b + 1}/{len(batches)}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
    grid = model.grid(torch.empty(1, *model.sample_shape))
    res = {}
    for name, plan in arms.items():
        q = digits_quality(Generated(torch.cat(images[name]), labels, seconds[name]), n_boot=args.n_boot)
        res[name] = {"plan": plan.describe(), "seconds": seconds[name], "flops": plan_flops(model, plan, grid)["total"],
                     "forwards": plan.forwards, "quality": q}
    print(f"\ndit-digits, {args.steps} steps, w={w:g}, window t in [{window[0]:.3f}, {window[1]:.3f}], radius {radius}, "
          f"{len(labels)} samples per plan")
    print(f"{'plan':19s} {'wall s':>8s} {'speedup':>8s} {'FLOPs ratio':>11s} {'fwd/sample':>10s} {'accuracy':>16s} {'digits-FID':>16s}")
    for name, r in res.items():
        q = r["quality"]
        print(f"{name:19s} {r['seconds']:8.1f} {res['full']['seconds'] / r['seconds']:8.2f} "
              f"{r['flops'] / res['full']['flops']:11.3f} {r['forwards']:10d} "
              f"{q.accuracy:8.4f} +- {q.accuracy_sigma:.4f} {q.fid:8.3f} +- {q.fid_sigma:.3f}")
    for name, r in res.items():
        print(f"  {name}: {r['plan']}")
    return {"res": res, "window": window, "radius": radius, "w": w, "steps_plans": arms}


def _block(arch: str):
    """One full-width block of the real architecture (random weights) wrapped as a denoiser, and its depth."""
    from critsample.models.dit import DiTDenoiser
    from critsample.noise import Schedule

    if arch.startswith("dit"):
        from diffusers import DiTTransformer2DModel

        size = 32 if arch == "dit-xl-256" else 64
        tr = DiTTransformer2DModel(num_layers=1, sample_size=size, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
        return DiTDenoiser(tr, Schedule(), name=arch), 28
    from diffusers import SD3Transformer2DModel

    from critsample.models.sd3 import SD3Denoiser

    tr = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192,
    )
    return SD3Denoiser(tr, name=arch), 24


@torch.no_grad()
def architecture_part(digits: dict, repeats: int) -> list[dict]:
    """Plan cost on real architectures: per-step-kind block timings x depth, and analytic FLOPs of the full network."""
    from critsample.denoisers import PromptCond

    rows = []
    frac_window = None
    for arch, radius in (("dit-xl-256", 2), ("dit-xl-512", 4), ("sd3-medium-1024", 8)):
        model, depth = _block(arch)
        model.eval()
        x1 = torch.randn(1, *model.sample_shape)
        if model.num_classes is None:
            cond = PromptCond(torch.randn(1, 333, 4096), torch.randn(1, 2048))
            model.null_cond = PromptCond(torch.zeros(1, 333, 4096), torch.zeros(1, 2048))
        else:
            cond = torch.tensor([207])
        kinds = {"guided": Step("guided", None, 4.0), "cond": Step("cond", None, 1.0), "local": Step("uncond", radius, 1.0)}
        times = {k: [] for k in kinds}
        for _ in range(repeats):  # interleaved repeats; median
            for k, s in kinds.items():
                c = model.null(cond) if s.mode == "uncond" else cond
                start = time.perf_counter()
                model.predict(x1, 0.5, c, radius=s.radius, guidance=4.0 if s.mode == "guided" else None)
                times[k].append(time.perf_counter() - start)
        med = {k: sorted(v)[len(v) // 2] * depth for k, v in times.items()}
        # the step pattern of the digits plans, mapped by position (same fraction of steps inside the window)
        pattern = {n: [("guided" if s.mode == "guided" else ("local" if s.radius is not None else "cond")) for s in p.steps]
                   for n, p in digits["steps_plans"].items()}
        frac_window = sum(k == "guided" for k in pattern["adaptive"]) / len(pattern["adaptive"])
        cost = {n: sum(med[k] for k in pat) for n, pat in pattern.items()}
        shape = transformer_shape(model)
        shape["layers"] = depth
        grid = model.grid(x1)
        fl = {k: forward_flops(shape, grid, s.radius).total * s.forwards for k, s in kinds.items()}
        flops = {n: sum(fl[k] for k in pat) for n, pat in pattern.items()}
        rows.append({
            "arch": arch, "grid": f"{grid[0]}x{grid[1]}", "radius": radius,
            "step_seconds": med,
            "speedup_vs_full": {n: cost["full"] / cost[n] for n in cost},
            "flops_ratio_vs_full": {n: flops[n] / flops["full"] for n in flops},
            "local_attention_flops_share": forward_flops(shape, grid, radius).attention / forward_flops(shape, grid, None).attention,
        })
    print(f"\nReal architectures, random weights, batch 1; steps inside the window: {frac_window:.0%} (digits window)")
    print(f"{'arch':16s} {'grid':>6s} {'r':>3s} {'s/step guided':>13s} {'cond':>8s} {'local':>8s} "
          f"{'interval x':>10s} {'adaptive x':>10s} {'FLOPs adapt/full':>16s}")
    for r in rows:
        s = r["step_seconds"]
        print(f"{r['arch']:16s} {r['grid']:>6s} {r['radius']:3d} {s['guided']:13.3f} {s['cond']:8.3f} {s['local']:8.3f} "
              f"{r['speedup_vs_full']['interval']:10.2f} {r['speedup_vs_full']['adaptive']:10.2f} "
              f"{r['flops_ratio_vs_full']['adaptive']:16.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default="runs/detect-digits/summary.json")
    ap.add_argument("--window", default=None, help="t0:t1 instead of a summary")
    ap.add_argument("--radius", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats of the architecture table")
    ap.add_argument("--skip-architectures", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)  # random weights of the architecture table only; sampling uses explicit generators

    d = digits_part(args)
    rows = [] if args.skip_architectures else architecture_part(d, args.repeats)
    r = d["res"]
    print(json.dumps({
        "speedup_vs_full": r["full"]["seconds"] / r["adaptive"]["seconds"],
        "speedup_vs_interval": r["interval"]["seconds"] / r["adaptive"]["seconds"],
        "accuracy_full": r["full"]["quality"].accuracy,
        "accuracy_interval": r["interval"]["quality"].accuracy,
        "accuracy_adaptive": r["adaptive"]["quality"].accuracy,
        "fid_full": r["full"]["quality"].fid,
        "fid_interval": r["interval"]["quality"].fid,
        "fid_adaptive": r["adaptive"]["quality"].fid,
        "flops_ratio": r["adaptive"]["flops"] / r["full"]["flops"],
        "speedup_vs_full_adaptive_local_cond": r["full"]["seconds"] / r["adaptive_local_cond"]["seconds"],
        "accuracy_adaptive_local_cond": r["adaptive_local_cond"]["quality"].accuracy,
        "fid_adaptive_local_cond": r["adaptive_local_cond"]["quality"].fid,
        "architectures": {row["arch"]: {"speedup_adaptive_vs_full": row["speedup_vs_full"]["adaptive"],
                                        "flops_ratio": row["flops_ratio_vs_full"]["adaptive"]} for row in rows},
    }))


if __name__ == "__main__":
    main()
