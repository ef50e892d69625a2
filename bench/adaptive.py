"""The race: the certified adaptive plan vs full guidance vs the best limited-interval plan, side by side in one run.

    python bench/adaptive.py --summary runs/detect-digits/summary.json --scales 1.0 1.5 --radii 2 \\
        --outside local-cond local-uncond
        # as measured in the README: ~40 min on one idle CPU core (search ~15, race 4, architectures ~17, FLUX 10)
    python bench/adaptive.py --summary ... --skip-architectures --num 300       # the dit-digits race alone, smaller
    The default grid (scales 0.5 to 1.5, radii 1 and 2, all three outside modes) searches further and takes longer.

Part 1, dit-digits, no hand-set window:
  1. Search (``critsample.certify``, as ``critsample tune --measure cheapest``): candidates around the summary's
     guidance and attention windows; the adaptive candidates and the limited-interval candidates (Kynkaanniemi et al.
     2024) are certified separately against full guidance on paired noise (seed ``--search-seed``), cheapest first,
     with the same tolerance (1 accuracy point, 10 % FD). The cheapest certified adaptive plan and the cheapest
     certified interval plan (the strongest fair baseline: same search, same tolerance) go on. Stored under ``--out``:
     a rerun resumes.
  2. Race on fresh noise (seed ``--race-seed``: the winners' quality is not the quality that selected them): full
     guidance, the best interval plan, the certified adaptive plan, and the adaptive plan with the other local outside
     mode (local-cond <-> local-uncond) at the same window and radius: the measurement behind the default outside mode.
     Batches of all arms are interleaved so that machine noise hits them alike; wall-time ratios, analytic FLOPs ratios,
     class accuracy and digits-FD with paired-bootstrap bars against full guidance.
Part 2, the cost on the real architectures with random weights (DiT-XL/2 256 and 512 px, SD3-medium, PixArt-Sigma and
  FLUX.1-dev at 1024 px): per step kind (guided global = two forwards as one batch of 2, conditional global, local
  conditional at radius r) one slice of the network is timed (one block; FLUX: one double- and two single-stream
  blocks) and multiplied by the depth, interleaved repeats (a warm-up round and up to 15 rounds for slices under a
  minute a round), median. The interval and adaptive arms use the *same* guidance window, the certified plan's (steps
  mapped by position): interval runs global conditional steps outside it, adaptive local ones (the paper's sampler).
  The analytic FLOPs bound of adaptive vs interval (whole network) is printed beside the measured ratio, and both
  again for a third arm that also keeps dit-digits' certified attention window global (what an attention window costs;
  each model's own comes from its own ``critsample tune``).

One torch thread (a busy 2-core machine makes a second one erratic). Last line: one JSON object with speedup_vs_full,
speedup_vs_interval, accuracy_{full,interval,adaptive}, fid_{full,interval,adaptive}, flops_ratio and
arch_speedup_vs_interval (per architecture), plus the details.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import critsample
from critsample import certify, judges, plans
from critsample import summary as summary_io
from critsample.flops import forward_flops, plan_flops, transformer_shape
from critsample.sampling import Plan, Step
from critsample.seeded import sample_batch, seeded_batches
from critsample.store import Store, model_fingerprint

# -- part 1: dit-digits ---------------------------------------------------------------------------------------------


def search(model, summary: dict, args) -> dict:
    """The cheapest certified adaptive and interval plans around the summary's windows (resumable)."""
    w = args.guidance if args.guidance is not None else model.default_guidance
    grid = certify.Grid(tuple(args.shifts), tuple(args.scales), tuple(args.radii), tuple(args.outside), interval=True)
    candidates = certify.search(model, summary, args.steps, w, grid)
    baseline = plans.full_guidance(model, args.steps, w)
    store = Store(Path(args.out) / ".units", model_fingerprint(model, model.name), args.search_seed)
    tol = certify.Tolerance(args.accuracy_tolerance, args.fd_tolerance)
    found = {}
    for kind in ("adaptive", "interval"):
        pool = [p for p in candidates if certify.kind(p) == kind]
        print(f"search: {len(pool)} {kind} candidates, cheapest first, {args.num} paired samples each", flush=True)
        res = certify.certify(model, baseline, pool, num=args.num, seed=args.search_seed, tolerance=tol,
                              n_boot=args.n_boot,
                              store=store, measure="cheapest", progress=True,
                              on_plan=lambda p, c: print(f"  {'measured' if c else 'stored  '} {p.name}", flush=True))
        for e in res.candidates:
            q = e["quality"]
            print(f"    {e['name']}: drop {100 * q['accuracy_drop']:+.2f} +- {100 * q['accuracy_drop_sigma']:.2f} pt, "
                  f"FD ratio {q['fd_ratio']:.3f} +- {q['fd_ratio_sigma']:.3f}, FLOPs x{e['cost']['flops_ratio']:.3f} "
                  f"{'CERTIFIED' if e['certified'] else ''}")
        found[kind] = res
    return {"baseline": baseline, "adaptive": found["adaptive"], "interval": found["interval"], "guidance": w,
            "windows": certify.summary_windows(summary)}


def other_outside(plan: Plan) -> Plan | None:
    """The same plan with the other local outside mode (cond <-> uncond on the local steps), None if it has none."""
    swap = {"cond": "uncond", "uncond": "cond"}
    if not any(s.radius is not None for s in plan.steps):
        return None
    steps = [Step(swap[s.mode], s.radius, s.guidance) if s.mode in swap else s for s in plan.steps]
    mode = "local-uncond" if any(s.mode == "uncond" for s in steps) else "local-cond"
    return Plan(steps, sampler=plan.sampler, name=f"{plan.name} with outside={mode}", times=plan.times)


@torch.no_grad()
def race(model, arms: dict[str, Plan], args) -> dict:
    """All arms on the same fresh noise, batches interleaved; quality vs full guidance with paired bars."""
    labels = torch.arange(args.num) % model.num_classes
    images = {k: [] for k in arms}
    seconds = {k: 0.0 for k in arms}
    batches = list(seeded_batches(args.num, args.batch_size, args.race_seed))
    for b, batch in enumerate(batches):
        for name, plan in arms.items():
            t0 = time.perf_counter()
            images[name].append(sample_batch(model, plan, labels[batch.lo : batch.hi], batch))
            seconds[name] += time.perf_counter() - t0
        print(f"  race batch {b + 1}/{len(batches)}: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()),
              flush=True)
    judge = judges.for_model(model)
    scores = {k: judge.score(torch.cat(v), labels) for k, v in images.items()}
    grid = model.grid(torch.empty(1, *model.sample_shape))
    out = {}
    for name, plan in arms.items():
        out[name] = {"plan": plan.name, "description": plan.describe(), "seconds": seconds[name],
                     "forwards": plan.forwards,
                     "flops": plan_flops(model, plan, grid)["total"],
                     "quality": judges.quality(judge, scores[name], scores["full"], args.n_boot, args.race_seed)}
    return out


def digits_part(args) -> dict:
    model = critsample.load("dit-digits")
    summary = summary_io.read(args.summary, model.name, require_window=False)
    found = search(model, summary, args)
    adaptive, interval = found["adaptive"], found["interval"]
    if adaptive.chosen is adaptive.baseline:
        print("no adaptive plan was certified: the race runs full guidance as the 'adaptive' arm (speedup 1)")
    if interval.chosen is interval.baseline:
        print("no interval plan was certified: the best interval plan is full guidance")
    arms = {"full": found["baseline"], "interval": interval.plan, "adaptive": adaptive.plan}
    swapped = other_outside(adaptive.plan)
    if swapped is not None:
        arms["adaptive_other_outside"] = swapped
    print(f"race: {len(arms)} arms x {args.num} samples, {args.steps} steps, fresh noise (seed {args.race_seed})",
          flush=True)
    res = race(model, arms, args)
    print(f"\ndit-digits, {args.steps} steps, w={found['guidance']:g}, guidance window {found['windows']['guidance']}, "
          f"attention window {found['windows']['attention']}, {args.num} samples per arm")
    print(f"{'arm':24s} {'wall s':>7s} {'speedup':>8s} {'FLOPs':>6s} {'fwd':>4s} {'accuracy':>16s} {'drop (pt)':>14s} "
          f"{'digits-FD':>15s} {'FD ratio':>14s}")
    for name, r in res.items():
        q = r["quality"]
        speedup, flops = res["full"]["seconds"] / r["seconds"], r["flops"] / res["full"]["flops"]
        print(f"{name:24s} {r['seconds']:7.1f} {speedup:8.2f} {flops:6.3f} "
              f"{r['forwards']:4d} {q['accuracy']:8.4f} +- {q['accuracy_sigma']:.4f} "
              f"{100 * q['accuracy_drop']:+6.2f} +- "
              f"{100 * q['accuracy_drop_sigma']:.2f} {q['fd']:7.3f} +- {q['fd_sigma']:.3f} "
              f"{q['fd_ratio']:6.3f} +- {q['fd_ratio_sigma']:.3f}")
    for name, r in res.items():
        print(f"  {name}: {r['description']}")
    return {"res": res, "arms": arms, "guidance": found["guidance"], "windows": found["windows"],
            "search": {k: found[k].to_dict() for k in ("adaptive", "interval")}}


# -- part 2: real architectures --------------------------------------------------------------------------------------

ARCHS = {  # name: (radius outside, depth multiplier of the timed slice)
    "dit-xl-256": (2, 28),
    "dit-xl-512": (4, 28),
    "sd3-medium-1024": (8, 24),
    "pixart-sigma-1024": (8, 28),
    "flux-dev-1024": (8, 19),  # the slice: 1 double- + 2 single-stream blocks; FLUX.1 has 19 + 38
}


def _slice(arch: str):
    """A one-slice network of the real architecture (random weights) behind its denoiser, its conditioning."""
    from critsample.denoisers import PromptCond

    if arch.startswith("dit"):
        from diffusers import DiTTransformer2DModel

        from critsample.models.dit import DiTDenoiser
        from critsample.noise import Schedule

        tr = DiTTransformer2DModel(num_layers=1, sample_size=32 if arch == "dit-xl-256" else 64, in_channels=4,
                                   out_channels=8,
                                   num_embeds_ada_norm=1000)
        return DiTDenoiser(tr, Schedule(), name=arch), torch.tensor([207])
    if arch.startswith("sd3"):
        from diffusers import SD3Transformer2DModel

        from critsample.models.sd3 import SD3Denoiser

        tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64,
                                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        model, text = SD3Denoiser(tr, name=arch), (333, 4096, 2048)
    elif arch.startswith("pixart"):
        from diffusers import PixArtTransformer2DModel

        from critsample.models.pixart import PixArtDenoiser

        tr = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                      num_layers=1,
                                      sample_size=128, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                                      norm_type="ada_norm_single", use_additional_conditions=False)
        model, text = PixArtDenoiser(tr, max_sequence_length=300, name=arch), (300, 4096, 0)
    else:
        from diffusers import FluxTransformer2DModel

        from critsample.models.flux import FluxDenoiser

        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                    attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        model, text = FluxDenoiser(tr, sample_size=128, name=arch), (512, 4096, 768)
    n, d, p = text
    model.null_cond = PromptCond(torch.zeros(1, n, d), torch.zeros(1, p))
    return model, PromptCond(torch.randn(1, n, d), torch.randn(1, p))


def _pattern(plan: Plan) -> list[str]:
    return ["guided" if s.mode == "guided" else ("local" if s.radius is not None else "cond") for s in plan.steps]


def _time_kinds(model, x1, cond, kinds: dict, repeats: int, budget_s: float = 120.0) -> dict[str, float]:
    """Median seconds of one slice call per step kind, the kinds interleaved round by round.

    A slice whose round takes under a minute gets an untimed warm-up round (first calls build caches and tile plans)
    and as many rounds as fit ``budget_s`` (at least ``repeats``, at most 15): with 3 rounds, one disturbed call moved
    DiT-XL 256's local/cond ratio by 15 %. Slow slices (FLUX: minutes a round) keep ``repeats`` rounds.
    """

    def one_round() -> dict[str, float]:
        out = {}
        for k, (r, g) in kinds.items():
            t0 = time.perf_counter()
            model.predict(x1, 0.5, cond, radius=r, guidance=g)
            out[k] = time.perf_counter() - t0
        return out

    first = one_round()
    round_s = sum(first.values())
    rounds, n = [first], repeats
    if round_s < 60:  # the first round was the warm-up
        rounds, n = [], max(repeats, min(15, int(budget_s / round_s)))
    while len(rounds) < n:
        rounds.append(one_round())
    return {k: sorted(r[k] for r in rounds)[len(rounds) // 2] for k in kinds}


@torch.no_grad()
def architecture_part(adaptive: Plan, repeats: int, only: list[str] | None) -> list[dict]:
    """Per-step-kind slice timings x depth and analytic whole-network FLOPs, interval vs adaptive at the same window.

    The adaptive arm is the certified plan's guidance window with local attention at every step outside it (the
    paper's sampler; the interval arm runs global conditional steps there). An attention window is a property of the
    model it was certified on, so the dit-digits one is only a second arm here (``attention_window``: the certified
    plan's steps mapped by position, global conditional inside its attention window): what such a window costs.
    """
    pat_certified = _pattern(adaptive)
    pat_interval = ["guided" if k == "guided" else "cond" for k in pat_certified]  # limited-interval at the same window
    pat_adaptive = ["guided" if k == "guided" else "local" for k in pat_certified]  # local at every step outside it
    pat_full = ["guided"] * len(pat_certified)
    patterns = (("full", pat_full), ("interval", pat_interval), ("adaptive", pat_adaptive),
                ("attention_window", pat_certified))
    rows = []
    for arch, (radius, depth) in ARCHS.items():
        if only and arch not in only:
            continue
        model, cond = _slice(arch)
        model.eval()
        x1 = torch.randn(1, *model.sample_shape)
        # local-cond outside: one forward
        kinds = {"guided": (None, 4.0), "cond": (None, None), "local": (radius, None)}
        med = {k: s * depth for k, s in _time_kinds(model, x1, cond, kinds, repeats).items()}
        shape = transformer_shape(model)
        shape["layers"] = shape["layers"] * depth
        grid = model.grid(x1)
        fl = {"guided": 2 * forward_flops(shape, grid, None).total, "cond": forward_flops(shape, grid, None).total,
              "local": forward_flops(shape, grid, radius).total}
        sec = {n: sum(med[k] for k in pat) for n, pat in patterns}
        flo = {n: sum(fl[k] for k in pat) for n, pat in patterns}
        rows.append({
            "arch": arch, "grid": f"{grid[0]}x{grid[1]}", "radius": radius, "seconds_per_step": med,
            "speedup_adaptive_vs_interval": sec["interval"] / sec["adaptive"],
            "flops_bound_adaptive_vs_interval": flo["interval"] / flo["adaptive"],
            "speedup_interval_vs_full": sec["full"] / sec["interval"],
            "speedup_adaptive_vs_full": sec["full"] / sec["adaptive"],
            "flops_ratio_adaptive_vs_full": flo["adaptive"] / flo["full"],
            # the same guidance window with dit-digits' certified attention window: global conditional steps inside it
            "speedup_attention_window_vs_interval": sec["interval"] / sec["attention_window"],
            "flops_bound_attention_window_vs_interval": flo["interval"] / flo["attention_window"],
        })
        r = rows[-1]
        print(f"{arch:18s} {r['grid']:>6s} {radius:3d} {med['guided']:9.2f} {med['cond']:8.2f} {med['local']:8.2f} "
              f"{r['speedup_interval_vs_full']:9.2f} {r['speedup_adaptive_vs_full']:9.2f} "
              f"{r['speedup_adaptive_vs_interval']:9.3f} "
              f"{r['flops_bound_adaptive_vs_interval']:9.3f} {r['speedup_attention_window_vs_interval']:9.3f} "
              f"{r['flops_bound_attention_window_vs_interval']:9.3f}", flush=True)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default="runs/detect-digits/summary.json",
                    help="summary.json of critsample detect on dit-digits")
    ap.add_argument("--out", default="runs/bench-adaptive", help="stored samples of the search (a rerun resumes)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--num", type=int, default=600, help="samples per plan, in the search and in the race")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--accuracy-tolerance", type=float, default=1.0, help="points")
    ap.add_argument("--fd-tolerance", type=float, default=0.10, help="relative")
    ap.add_argument("--shifts", type=float, nargs="+", default=[-0.25, 0.0, 0.25])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5])
    ap.add_argument("--radii", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--outside", nargs="+", default=list(plans.OUTSIDE))
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--race-seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3,
                    help="least timing rounds of the architecture table (median); cheap slices get more")
    ap.add_argument("--archs", nargs="*", default=None, help=f"subset of {', '.join(ARCHS)}")
    ap.add_argument("--skip-architectures", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # random weights of the architecture table only; sampling uses per-sample generators

    d = digits_part(args)
    rows = []
    if not args.skip_architectures:
        print("\nReal architectures, random weights, batch 1, one thread; the certified plan's steps: "
              f"{d['arms']['adaptive'].name}")
        print(f"{'arch':18s} {'grid':>6s} {'r':>3s} {'s guided':>9s} {'s cond':>8s} {'s local':>8s} {'int/full':>9s} "
              f"{'ada/full':>9s} {'ada/int':>9s} {'FLOPs bnd':>9s} {'aw/int':>9s} {'FLOPs bnd':>9s}")
        print("  (seconds per step of the whole network; ada: local attention at every step outside the guidance"
              " window; aw: global inside dit-digits' certified attention window)")
        rows = architecture_part(d["arms"]["adaptive"], args.repeats, args.archs)
    r = d["res"]
    other = r.get("adaptive_other_outside")
    print(json.dumps(summary_io.jsonable({
        "speedup_vs_full": r["full"]["seconds"] / r["adaptive"]["seconds"],
        "speedup_vs_interval": r["interval"]["seconds"] / r["adaptive"]["seconds"],
        "accuracy_full": r["full"]["quality"]["accuracy"],
        "accuracy_interval": r["interval"]["quality"]["accuracy"],
        "accuracy_adaptive": r["adaptive"]["quality"]["accuracy"],
        "fid_full": r["full"]["quality"]["fd"],
        "fid_interval": r["interval"]["quality"]["fd"],
        "fid_adaptive": r["adaptive"]["quality"]["fd"],
        "flops_ratio": r["adaptive"]["flops"] / r["full"]["flops"],
        "arch_speedup_vs_interval": {row["arch"]: row["speedup_adaptive_vs_interval"] for row in rows},
        "arch_flops_bound_vs_interval": {row["arch"]: row["flops_bound_adaptive_vs_interval"] for row in rows},
        "arch_speedup_attention_window_vs_interval":
            {row["arch"]: row["speedup_attention_window_vs_interval"] for row in rows},
        "arch_flops_bound_attention_window_vs_interval":
            {row["arch"]: row["flops_bound_attention_window_vs_interval"] for row in rows},
        "accuracy_drop_adaptive_points": 100 * r["adaptive"]["quality"]["accuracy_drop"],
        "accuracy_drop_adaptive_sigma_points": 100 * r["adaptive"]["quality"]["accuracy_drop_sigma"],
        "fd_ratio_adaptive": r["adaptive"]["quality"]["fd_ratio"],
        "fd_ratio_adaptive_sigma": r["adaptive"]["quality"]["fd_ratio_sigma"],
        "plan_adaptive": r["adaptive"]["plan"], "plan_interval": r["interval"]["plan"],
        "other_outside": other and {"plan": other["plan"], "accuracy": other["quality"]["accuracy"],
                                    "accuracy_drop_points": 100 * other["quality"]["accuracy_drop"],
                                    "fd": other["quality"]["fd"],
                                    "speedup_vs_full": r["full"]["seconds"] / other["seconds"]},
        "setup": {"steps": args.steps, "num": args.num, "search_seed": args.search_seed, "race_seed": args.race_seed,
                  "threads": 1,
                  "fd": "digits-FD: Frechet distance of the digits classifier's penultimate features to the test "
                        "split"},
    })))


if __name__ == "__main__":
    main()
