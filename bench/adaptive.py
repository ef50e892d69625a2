"""The race: full guidance, the best certified interval plan, the certified plan with windowed attention outside and
the certified plan with cheap outside denoisers (critsample.outside), side by side in one run.

    python bench/adaptive.py --summary runs/detect-digits/summary.json --num 1000     # the full grid: hours on one core
    python bench/adaptive.py --summary runs/detect-digits/summary.json --num 600 --race-num 300 --shifts -0.25 \
        --scales 1.5 --radii 2 --outside local-cond --kinds gaussian --race-uncertified   # the reduced size (README)

Part 1, dit-digits, no hand-set window:
  1. Search (``critsample.certify``, as ``critsample tune --measure cheapest``): candidates around the summary's
     guidance and attention windows in three pools, each certified against full guidance on paired noise (seed
     ``--search-seed``), cheapest first, with the same tolerance (1 accuracy point, 10 % FD, one-sided 95 % bounds):
     limited-interval guidance (Kynkaanniemi et al. 2024), adaptive with the network's windowed attention outside,
     adaptive with cheap outside kinds (``--kinds``: gaussian, local-linear, student; every (high-noise, low-noise)
     pair with the network, at least one side cheap). Stored under ``--out``: a rerun resumes. A pool with no
     certified plan races full guidance, or with ``--race-uncertified`` its candidate closest to certification
     (flagged ``certified: false`` in the JSON).
  2. Race on fresh noise (seed ``--race-seed``, ``--race-num`` samples): the four arms, batches interleaved so that
     machine noise hits them alike; wall-time ratios, analytic FLOPs ratios, class accuracy and digits-FD with
     paired-bootstrap bars against full guidance.
Part 2, the cost on the real architectures with random weights (DiT-XL/2 256 and SD3-medium 1024 by default;
  ``--archs``): network steps time one slice of the network (one block) x depth, interleaved repeats, median; outside
  steps time the whole outside denoiser at the latent size with random statistics of that size (full covariance up to
  4,096 dimensions, else rank 256 + diagonal). Interval, windowed and cheap arms at the *same* guidance window, the
  cheap plan's (steps mapped by position): analytic FLOPs ratio and measured ratio vs interval.

One torch thread. Last line: one JSON object with speedup_vs_full, speedup_vs_interval (the cheap arm),
accuracy_{full,interval,windowed,cheap}, fd_*, flops_ratio, plan, certified, arch_speedup_vs_interval and
arch_flops_vs_interval (per architecture), plus the windowed arm's numbers and the setup.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import critsample
from critsample import certify, judges, outside, plans
from critsample import summary as summary_io
from critsample.flops import forward_flops, plan_flops, transformer_shape
from critsample.sampling import Plan
from critsample.seeded import sample_batch, seeded_batches
from critsample.store import Store, model_fingerprint

# -- part 1: dit-digits ---------------------------------------------------------------------------------------------


def search(model, summary: dict, args) -> dict:
    """The cheapest certified plan of each pool around the summary's windows (resumable): limited-interval guidance,
    adaptive with the network's windowed attention outside, adaptive with cheap outside kinds (any side not network)."""
    w = args.guidance if args.guidance is not None else model.default_guidance
    baseline = plans.full_guidance(model, args.steps, w)
    store = Store(Path(args.out) / ".units", model_fingerprint(model, model.name), args.search_seed)
    tol = certify.Tolerance(args.accuracy_tolerance, args.fd_tolerance)
    kinds = tuple(dict.fromkeys(["network", *args.kinds]))
    grid = certify.Grid(tuple(args.shifts), tuple(args.scales), tuple(args.radii), tuple(args.outside), interval=True,
                        kinds=kinds)
    candidates = certify.search(model, summary, args.steps, w, grid)
    pools = {
        "interval": [p for p in candidates if certify.kind(p) == "interval"],
        "windowed": [p for p in candidates if certify.kind(p) == "adaptive"
                     and all(s.kind == "network" for s in p.steps)],
        "cheap": [p for p in candidates if any(s.kind != "network" for s in p.steps)],
    }
    found = {}
    for kind, pool in pools.items():
        print(f"search: {len(pool)} {kind} candidates, cheapest first, {args.num} paired samples each", flush=True)
        res = certify.certify(model, baseline, pool, num=args.num, seed=args.search_seed, tolerance=tol,
                              n_boot=args.n_boot, store=store, measure="cheapest", progress=False,
                              on_plan=lambda p, c: print(f"  {'measured' if c else 'stored  '} {p.name}", flush=True))
        for e in res.candidates:
            q = e["quality"]
            print(f"    {e['name']}: drop {100 * q['accuracy_drop']:+.2f} +- {100 * q['accuracy_drop_sigma']:.2f} pt "
                  f"(bound {100 * q['accuracy_drop_upper']:.2f}), FD ratio {q['fd_ratio']:.3f} +- "
                  f"{q['fd_ratio_sigma']:.3f} (bound {q['fd_ratio_upper']:.3f}), FLOPs x{e['cost']['flops_ratio']:.3f} "
                  f"{'CERTIFIED' if e['certified'] else ''}", flush=True)
        found[kind] = res
    return {"baseline": baseline, **found, "guidance": w, "windows": certify.summary_windows(summary)}


@torch.no_grad()
def race(model, arms: dict[str, Plan], args) -> dict:
    """All arms on the same fresh noise, batches interleaved; quality vs full guidance with paired bars."""
    labels = torch.arange(args.race_num) % model.num_classes
    images = {k: [] for k in arms}
    seconds = {k: 0.0 for k in arms}
    batches = list(seeded_batches(args.race_num, args.batch_size, args.race_seed))
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
    outside.use_data(model, args.data)
    summary = summary_io.read(args.summary, model.name, require_window=False)
    found = search(model, summary, args)
    arms, certified = {"full": found["baseline"]}, {}
    for kind in ("interval", "windowed", "cheap"):
        res = found[kind]
        certified[kind] = res.chosen is not res.baseline
        if certified[kind] or not args.race_uncertified or not res.candidates:
            if not certified[kind]:
                print(f"no {kind} plan was certified: its arm is full guidance")
            arms[kind] = res.plan
            continue
        # not certified: the pool's candidate closest to it (lowest accuracy-drop bound, then FD bound, then cost)
        best = min(res.candidates, key=lambda e: (e["quality"]["accuracy_drop_upper"], e["quality"]["fd_ratio_upper"],
                                                  e["cost"]["flops"]))
        print(f"no {kind} plan was certified: racing its closest candidate {best['name']} (NOT certified)")
        arms[kind] = Plan.from_dict(best["plan"])
    print(f"race: {len(arms)} arms x {args.race_num} samples, {args.steps} steps, fresh noise (seed {args.race_seed})",
          flush=True)
    res = race(model, arms, args)
    print(f"\ndit-digits, {args.steps} steps, w={found['guidance']:g}, guidance window {found['windows']['guidance']}, "
          f"attention window {found['windows']['attention']}, {args.race_num} samples per arm")
    print(f"{'arm':10s} {'wall s':>7s} {'vs full':>8s} {'vs int':>7s} {'FLOPs':>6s} {'fwd':>4s} {'accuracy':>16s} "
          f"{'drop (pt)':>14s} {'digits-FD':>15s} {'FD ratio':>14s}")
    for name, r in res.items():
        q = r["quality"]
        speedup, flops = res["full"]["seconds"] / r["seconds"], r["flops"] / res["full"]["flops"]
        print(f"{name:10s} {r['seconds']:7.1f} {speedup:8.2f} {res['interval']['seconds'] / r['seconds']:7.2f} "
              f"{flops:6.3f} {r['forwards']:4d} {q['accuracy']:8.4f} +- {q['accuracy_sigma']:.4f} "
              f"{100 * q['accuracy_drop']:+6.2f} +- {100 * q['accuracy_drop_sigma']:.2f} {q['fd']:7.3f} +- "
              f"{q['fd_sigma']:.3f} {q['fd_ratio']:6.3f} +- {q['fd_ratio_sigma']:.3f}")
    for name, r in res.items():
        print(f"  {name}: {r['description']}")
    return {"res": res, "arms": arms, "certified": certified, "guidance": found["guidance"],
            "windows": found["windows"], "search": {k: found[k].to_dict() for k in ("interval", "windowed", "cheap")}}


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
    """Each step's kind for the timing table: guided, cond (global network), local (windowed network) or an outside
    kind's name."""
    return ["guided" if s.mode == "guided" else s.kind if s.kind != "network" else
            ("local" if s.radius is not None else "cond") for s in plan.steps]


def _cheap_denoisers(model, kinds: set[str], radius: int) -> dict:
    """Outside denoisers of the architecture's latent size: Gaussian statistics with random factors (timing and FLOPs
    only: full covariance up to critsample.gaussian.FULL_MAX dimensions, else rank 256 plus the diagonal)."""
    from critsample.gaussian import DEFAULT_RANK, FULL_MAX, GaussianDenoiser, GaussianStats, LocalLinearDenoiser

    shape = tuple(model.sample_shape)
    D = int(torch.tensor(shape).prod())
    R = D if D <= FULL_MAX else DEFAULT_RANK
    g = torch.Generator().manual_seed(0)
    K = model.num_classes or 1
    stats = GaussianStats(shape, torch.full((K,), 1.0 / K, dtype=torch.float64),
                          torch.randn(K, D, generator=g, dtype=torch.float64) * 0.1,
                          torch.randn(D, R, generator=g, dtype=torch.float64) / D**0.5,
                          torch.rand(R, generator=g, dtype=torch.float64) + 0.1,
                          None if R == D else torch.rand(D, generator=g, dtype=torch.float64) + 0.1)
    out = {}
    if "gaussian" in kinds:
        out["gaussian"] = GaussianDenoiser(model, stats)
    if "local-linear" in kinds:
        out["local-linear"] = LocalLinearDenoiser(model, stats)
    return out


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
def architecture_part(cheap: Plan, windowed: Plan, repeats: int, only: list[str] | None) -> list[dict]:
    """Per-step-kind timings and analytic whole-network FLOPs: interval vs the cheap-outside plan vs windowed attention,
    at the same guidance window (the certified cheap plan's steps mapped by position).

    Network steps: one slice of the network timed and multiplied by the depth; outside steps: the whole outside
    denoiser at the latent size (critsample.gaussian with random statistics: the cost does not depend on the values).
    The interval arm runs global conditional steps where the cheap plan runs outside kinds or local steps; the windowed
    arm runs the network with local attention there (the paper's sampler)."""
    pat_cheap = _pattern(cheap)
    pat_interval = ["guided" if k == "guided" else "cond" for k in pat_cheap]
    pat_windowed = ["guided" if k == "guided" else "local" for k in pat_cheap]
    pat_full = ["guided"] * len(pat_cheap)
    patterns = (("full", pat_full), ("interval", pat_interval), ("windowed", pat_windowed), ("cheap", pat_cheap))
    rows = []
    for arch, (radius, depth) in ARCHS.items():
        if arch not in (only or ["dit-xl-256", "sd3-medium-1024"]):
            continue
        model, cond = _slice(arch)
        model.eval()
        x1 = torch.randn(1, *model.sample_shape)
        outside_kinds = {k for k in pat_cheap if k not in ("guided", "cond", "local")}
        cheap_dens = _cheap_denoisers(model, outside_kinds, radius)
        missing = outside_kinds - set(cheap_dens)
        if missing:
            print(f"{arch}: no timing for outside kinds {sorted(missing)} (not built here); skipped")
            continue
        r_cheap = next((s.radius for s in cheap.steps if s.kind == "local-linear"), None)
        kinds = {"guided": (None, 4.0), "cond": (None, None), "local": (radius, None)}
        med = {k: s * depth for k, s in _time_kinds(model, x1, cond, kinds, repeats).items()}
        for k, den in cheap_dens.items():
            r = r_cheap if k == "local-linear" else None
            den.predict(x1, 0.5, cond, radius=r)  # filters of this time solved once (cached, as in a run)
            ts = []
            for _ in range(max(repeats, 5)):
                t0 = time.perf_counter()
                den.predict(x1, 0.5, cond, radius=r)
                ts.append(time.perf_counter() - t0)
            med[k] = sorted(ts)[len(ts) // 2]
        shape = transformer_shape(model)
        shape["layers"] = shape["layers"] * depth
        grid = model.grid(x1)
        fl = {"guided": 2 * forward_flops(shape, grid, None).total, "cond": forward_flops(shape, grid, None).total,
              "local": forward_flops(shape, grid, radius).total}
        for k, den in cheap_dens.items():
            fl[k] = den.flops(grid, r_cheap if k == "local-linear" else None, unconditional=False)
        sec = {n: sum(med[k] for k in pat) for n, pat in patterns}
        flo = {n: sum(fl[k] for k in pat) for n, pat in patterns}
        rows.append({
            "arch": arch, "grid": f"{grid[0]}x{grid[1]}", "radius": radius, "seconds_per_step": med,
            "flops_per_step": fl,
            "speedup_cheap_vs_interval": sec["interval"] / sec["cheap"],
            "flops_cheap_vs_interval": flo["interval"] / flo["cheap"],
            "speedup_windowed_vs_interval": sec["interval"] / sec["windowed"],
            "flops_windowed_vs_interval": flo["interval"] / flo["windowed"],
            "speedup_cheap_vs_full": sec["full"] / sec["cheap"],
        })
        r = rows[-1]
        print(f"{arch:16s} {r['grid']:>6s} {radius:3d} " + " ".join(f"{k} {v:.3g}s" for k, v in med.items())
              + f" | cheap/int x{r['speedup_cheap_vs_interval']:.3f} (FLOPs x{r['flops_cheap_vs_interval']:.3f}), "
              f"windowed/int x{r['speedup_windowed_vs_interval']:.3f} (FLOPs x{r['flops_windowed_vs_interval']:.3f}),"
              f" cheap/full x{r['speedup_cheap_vs_full']:.3f}", flush=True)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default="runs/detect-digits/summary.json",
                    help="summary.json of critsample detect on dit-digits")
    ap.add_argument("--out", default="runs/bench-adaptive", help="stored samples of the search (a rerun resumes)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--num", type=int, default=600, help="samples per plan in the search (>= ~500 to certify at all)")
    ap.add_argument("--race-num", type=int, default=None, help="samples per arm in the race (default --num)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--accuracy-tolerance", type=float, default=1.0, help="points")
    ap.add_argument("--fd-tolerance", type=float, default=0.10, help="relative")
    ap.add_argument("--shifts", type=float, nargs="+", default=[-0.25, 0.0, 0.25])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5])
    ap.add_argument("--radii", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--outside", nargs="+", default=list(plans.OUTSIDE))
    ap.add_argument("--kinds", nargs="+", default=["gaussian", "local-linear"],
                    help="cheap outside kinds searched on each side (with network)")
    ap.add_argument("--data", default=None, help="data of the gaussian / local-linear statistics (default: bundled)")
    ap.add_argument("--race-uncertified", action="store_true",
                    help="a pool without a certified plan races its closest candidate (flagged) instead of full "
                         "guidance")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--race-seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3,
                    help="least timing rounds of the architecture table (median); cheap slices get more")
    ap.add_argument("--archs", nargs="*", default=None, help=f"subset of {', '.join(ARCHS)} (default: DiT-XL/2 256, "
                    "SD3-medium 1024)")
    ap.add_argument("--skip-architectures", action="store_true")
    args = ap.parse_args()
    args.race_num = args.race_num or args.num
    torch.set_num_threads(1)
    torch.manual_seed(0)  # random weights of the architecture table only; sampling uses per-sample generators

    d = digits_part(args)
    rows = []
    if not args.skip_architectures:
        print("\nReal architectures, random weights, batch 1, one thread; the cheap plan's steps: "
              f"{d['arms']['cheap'].name}", flush=True)
        rows = architecture_part(d["arms"]["cheap"], d["arms"]["windowed"], args.repeats, args.archs)
    r = d["res"]
    q = {k: r[k]["quality"] for k in r}
    print(json.dumps(summary_io.jsonable({
        "speedup_vs_full": r["full"]["seconds"] / r["cheap"]["seconds"],
        "speedup_vs_interval": r["interval"]["seconds"] / r["cheap"]["seconds"],
        "speedup_windowed_vs_full": r["full"]["seconds"] / r["windowed"]["seconds"],
        "speedup_windowed_vs_interval": r["interval"]["seconds"] / r["windowed"]["seconds"],
        **{f"accuracy_{k}": q[k]["accuracy"] for k in r},
        **{f"accuracy_drop_{k}_points": 100 * q[k]["accuracy_drop"] for k in r if k != "full"},
        **{f"accuracy_drop_{k}_sigma_points": 100 * q[k]["accuracy_drop_sigma"] for k in r if k != "full"},
        **{f"fd_{k}": q[k]["fd"] for k in r},
        **{f"fd_ratio_{k}": q[k]["fd_ratio"] for k in r if k != "full"},
        **{f"fd_ratio_{k}_sigma": q[k]["fd_ratio_sigma"] for k in r if k != "full"},
        "flops_ratio": r["cheap"]["flops"] / r["full"]["flops"],
        "flops_ratio_vs_interval": r["cheap"]["flops"] / r["interval"]["flops"],
        "plan": r["cheap"]["plan"], "plan_interval": r["interval"]["plan"], "plan_windowed": r["windowed"]["plan"],
        "certified": d["certified"],
        "arch_speedup_vs_interval": {row["arch"]: row["speedup_cheap_vs_interval"] for row in rows},
        "arch_flops_vs_interval": {row["arch"]: row["flops_cheap_vs_interval"] for row in rows},
        "arch_windowed_speedup_vs_interval": {row["arch"]: row["speedup_windowed_vs_interval"] for row in rows},
        "arch_windowed_flops_vs_interval": {row["arch"]: row["flops_windowed_vs_interval"] for row in rows},
        "setup": {"steps": args.steps, "num_search": args.num, "num_race": args.race_num, "kinds": args.kinds,
                  "search_seed": args.search_seed, "race_seed": args.race_seed, "threads": 1,
                  "grid": {"shifts": args.shifts, "scales": args.scales, "radii": args.radii, "outside": args.outside},
                  "fd": "digits-FD: Frechet distance of the digits classifier's penultimate features to the test "
                        "split"},
    })))


if __name__ == "__main__":
    main()
