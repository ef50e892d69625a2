"""The GPU path measured in one run, on the device it is given: window vs dense attention, the local vs global step of
a DiT-XL/2-size and an SD3-medium-size network at 1024 px, ``critsample detect --model dit-digits --preset fast``, and
the peak memory of each.

    timeout 480 python bench/gpu.py --device cuda --out runs/bench-gpu 2>&1 | tee runs/bench-gpu.log   # the GPU check
    python bench/gpu.py --device cpu --tiny                                                            # CPU smoke run

On a lent device machine (one H200, 15 minutes of device time for everything, 10 a command) the same check is
``python bench/gpu.py --device cuda --out $OUT`` with ``timeout_s=480``: estimated at 4-5 minutes from its parts
(not yet measured: no GPU was lent), most of it torch.compile of FlexAttention (per grid and head size, forward and
backward; one compiled kernel serves every radius); that leaves a rerun with ``--skip sparsity detect --repeats 10``
inside the budget. After every part the results so far are written to ``OUT/bench-gpu.partial.json``, so a run cut
by its timeout still returns what it finished. ``--tiny`` (tests/test_gpu_bench.py) shrinks every part (16x16 and
32x32 grids, narrow one-layer networks at 128 px, a detect run of a few units): ~25 s of CPU on one core (a minute
of wall time on the loaded 2-core machine); its numbers only show that every part runs.

Parts:
1. Block sparsity of the window in flex's 128-token blocks (fraction of (query block, kv block) pairs skipped) at
   32x32 and 64x64 for r = 2, 4, 8: row-major order (what critsample uses) and tokens permuted into 8 x 16 tiles.
2. Attention (B=2, H=24, d=64: SD3's heads; bf16): dense SDPA, masked SDPA, flex, tiled; forward, and on CUDA also
   forward + backward of flex and dense. Ratios to dense SDPA in the same run; ``auto`` names the impl it picks.
3. Local (radius r, one forward) vs global (one forward) step of random-weight DiT-XL/2 (28 blocks, 1152 wide,
   16 heads x 72) and SD3-medium (24 joint blocks, 24 heads x 64, 333 text tokens) at 1024 px (64 x 64 tokens), in
   the package's autocast (bf16 on CUDA), architectures as in bench/adaptive.py.
4. ``critsample detect --model dit-digits --preset fast`` wall time, in this process (after imports), fresh output.

Timings: warm-up calls first (compiles, caches), CUDA synchronized, median of interleaved repeats. Peak memory of one
call of each item (after its warm-up): on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before
it; on CPU the peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) above the resident set before it,
else the process's monotone ru_maxrss. ``memory_measure`` in the JSON says which.

Targets (issue 26): window / dense <= 0.25 at 64x64, r = 4, bf16 (flex, no text tokens); the SD3-medium-size local
step (r = 4) <= 0.85 of the global one. ``targets_met`` is null unless the run is on CUDA and not --tiny.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from critsample import local_attention as la  # noqa: E402

TARGET_WINDOW_OVER_DENSE = 0.25  # 64x64, r = 4, bf16
TARGET_LOCAL_OVER_GLOBAL = 0.85  # SD3-medium size, 1024 px, r = 4
RADII = (2, 4, 8)


class Clock:
    """Wall time and peak memory of calls on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def median(self, fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
        """Median seconds per callable, the callables interleaved round by round after ``warmup`` untimed rounds."""
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        rounds = [{k: self.once(fn) for k, fn in fns.items()} for _ in range(repeats)]
        return {k: statistics.median(r[k] for r in rounds) for k in fns}

    def peak_mb(self, fn) -> float:
        if self.cuda:
            self.sync()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            self.sync()
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self.resettable_rss:
            base = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            fn()
            return (_status_kib("VmHWM") - base) / 1024
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @property
    def resettable_rss(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    @property
    def memory_measure(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated above the allocation before the item (MiB)"
        if self.resettable_rss:
            return ("CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs) above the RSS before the item "
                    "(MiB)")
        return "CPU: process resident high-water mark after the item (resource ru_maxrss, MiB; monotone)"


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


# -- 1. block sparsity ------------------------------------------------------------------------------------------------


def tile_sparsity(h: int, w: int, r: int, device, th: int = 8, tw: int = 16) -> float:
    """Block sparsity of the window with tokens permuted into th x tw tiles (one 128-token block per tile)."""
    from torch.nn.attention.flex_attention import create_block_mask

    perm = torch.arange(h * w, device=device).view(h // th, th, w // tw, tw).permute(0, 2, 1, 3).reshape(-1)
    i, j = perm // w, perm % w

    def window(b, head, q, k):
        return ((i[q] - i[k]).abs() <= r) & ((j[q] - j[k]).abs() <= r)

    bm = create_block_mask(window, None, None, h * w, h * w, device=device)
    return 1.0 - visited_fraction(bm)


def visited_fraction(bm) -> float:
    """Fraction of (query block, kv block) pairs a BlockMask visits (partial or full)."""
    nq = bm.kv_num_blocks.shape[-1]
    nk = -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
    return float((bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item()) / (nq * nk)


def block_sparsity(device) -> dict:
    out = {}
    for g in (32, 64):
        for r in RADII:
            raster = 1.0 - visited_fraction(la._flex_block_mask(g, g, r, 0, device))
            out[f"{g}x{g}_r{r}"] = {"row_major": round(raster, 4),
                                    "tiles_8x16": round(tile_sparsity(g, g, r, device), 4)}
    return out


# -- 2. attention ------------------------------------------------------------------------------------------------------


def attention_part(clock: Clock, grids, batch: int, heads: int, dim: int, dtype, repeats: int, backward: bool) -> dict:
    dev = clock.device
    ratios, seconds, memory, auto = {}, {}, {}, {}
    g = torch.Generator(device=dev).manual_seed(0)
    for s in grids:
        L = s * s
        q, k, v = (torch.randn(batch, heads, L, dim, device=dev, dtype=dtype, generator=g) for _ in range(3))
        for r in RADII:
            key = f"{s}x{s}_r{r}"
            fns = {"dense": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
            auto[key] = la._choose(s, s, r, 0, dev.type)
            impls = tuple(dict.fromkeys(("masked", "flex", "tiled", auto[key])))  # auto may pick a bands path on CPU
            for impl in impls:
                fns[impl] = lambda impl=impl, r=r, q=q, k=k, v=v, s=s: la.local_attention(q, k, v, (s, s), r, impl=impl)
            with torch.inference_mode():
                med = clock.median(fns, repeats)
                memory[key] = {name: round(clock.peak_mb(fn), 1) for name, fn in fns.items()}
            ratios[key] = {name: med[name] / med["dense"] for name in impls}
            ratios[key]["auto"] = ratios[key][auto[key]]
            seconds[key] = med
            if backward:  # fine-tunes train through the window: forward + backward, flex vs dense
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                train = {
                    "dense": lambda leaves=leaves: F.scaled_dot_product_attention(*leaves).sum().backward(),
                    "flex": lambda r=r, leaves=leaves, s=s: (
                        la.local_attention(*leaves, (s, s), r, impl="flex").sum().backward()),
                }
                med_b = clock.median(train, repeats)
                ratios[key]["flex_fwd_bwd"] = med_b["flex"] / med_b["dense"]
            print(f"attention {key:9s} " + " ".join(f"{n}={v:.3f}" for n, v in ratios[key].items())
                  + f"  dense {med['dense'] * 1e3:.2f} ms  auto={auto[key]}", flush=True)
    return {"ratio_to_dense": ratios, "seconds": seconds, "peak_memory_mb": memory, "auto_impl": auto,
            "shape": {"batch": batch, "heads": heads, "dim": dim, "dtype": str(dtype).removeprefix("torch.")}}


# -- 3. full networks: local vs global step ----------------------------------------------------------------------------


# Widths of the real networks (diffusers configs, as bench/adaptive.py) and of the --tiny stand-ins.
WIDTHS = {
    "dit-xl": {"full": dict(num_attention_heads=16, attention_head_dim=72),
               "tiny": dict(num_attention_heads=4, attention_head_dim=16)},
    "sd3-medium": {
        "full": dict(num_attention_heads=24, attention_head_dim=64, joint_attention_dim=4096,
                     caption_projection_dim=1536,
                     pooled_projection_dim=2048, pos_embed_max_size=192, text_tokens=333),
        "tiny": dict(num_attention_heads=4, attention_head_dim=16, joint_attention_dim=32, caption_projection_dim=64,
                     pooled_projection_dim=16, pos_embed_max_size=16, text_tokens=13),
    },
}


def build(arch: str, sample_size: int, layers: int, device, tiny: bool = False):
    """Random-weight DiT-XL/2 or SD3-medium behind its denoiser; the weights are initialized on the device (seconds
    for SD3-medium's 2 B parameters on a GPU)."""
    from critsample.denoisers import PromptCond

    width = dict(WIDTHS[arch]["tiny" if tiny else "full"])
    if arch == "dit-xl":
        from diffusers import DiTTransformer2DModel

        from critsample.models.dit import DiTDenoiser
        from critsample.noise import Schedule

        with torch.device(device):
            tr = DiTTransformer2DModel(num_layers=layers, sample_size=sample_size, in_channels=4, out_channels=8,
                                       num_embeds_ada_norm=1000, **width)
        return DiTDenoiser(tr, Schedule(), name=arch).to(device).eval(), torch.tensor([207], device=device)
    from diffusers import SD3Transformer2DModel

    from critsample.models.sd3 import SD3Denoiser

    n = width.pop("text_tokens")
    with torch.device(device):
        tr = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, num_layers=layers,
                                   out_channels=16, **width)
    model = SD3Denoiser(tr, name=arch).to(device).eval()
    d, p = width["joint_attention_dim"], width["pooled_projection_dim"]
    model.null_cond = PromptCond(torch.zeros(1, n, d), torch.zeros(1, p))
    return model, PromptCond(torch.randn(1, n, d, device=device), torch.randn(1, p, device=device))


def step_part(clock: Clock, sample_size: int, layers: dict, radii, repeats: int, tiny: bool = False) -> dict:
    out = {}
    for arch, depth in layers.items():
        model, cond = build(arch, sample_size, depth, clock.device, tiny)
        x = torch.randn(1, *model.sample_shape, device=clock.device)
        grid = model.grid(x)
        fns = {"global": lambda m=model, x=x, cond=cond: m.predict(x, 0.5, cond, radius=None)}
        for r in radii:
            fns[f"r{r}"] = lambda r=r, m=model, x=x, cond=cond: m.predict(x, 0.5, cond, radius=r)
        with torch.inference_mode():
            med = clock.median(fns, repeats)
            memory = {k: round(clock.peak_mb(fn), 1) for k, fn in fns.items()}
        out[arch] = {"grid": f"{grid[0]}x{grid[1]}", "layers": depth, "seconds": med, "peak_memory_mb": memory,
                     "local_over_global": {k: med[k] / med["global"] for k in fns if k != "global"}}
        print(f"step {arch:7s} {grid[0]}x{grid[1]} x{depth} global {med['global'] * 1e3:.1f} ms  "
              + " ".join(f"{k}={v:.3f}" for k, v in out[arch]["local_over_global"].items()), flush=True)
        del model
        if clock.cuda:
            torch.cuda.empty_cache()
    return out


# -- 4. detect ---------------------------------------------------------------------------------------------------------

TINY_DETECT = ["--gaps.samples", "2", "--gaps.batch", "2", "--gaps.steps", "3", "--fb.num_t", "2", "--fb.samples", "2",
               "--fb.batch", "2", "--fb.steps", "3", "--windows.steps", "3", "--windows.samples", "2",
               "--windows.batch", "2", "--windows.t0_step", "0.5"]


def detect_part(clock: Clock, tiny: bool, out: Path | None) -> dict:
    from critsample.cli import main

    folder = Path(tempfile.mkdtemp(prefix="detect-fast-", dir=out))  # fresh: a stored run would be loaded, not computed
    argv = ["detect", "--model", "dit-digits", "--preset", "fast", "--out", str(folder), "--device", str(clock.device),
            "--no-wandb", *(TINY_DETECT if tiny else [])]
    rc = []
    t0 = time.perf_counter()
    peak = clock.peak_mb(lambda: rc.append(main(argv)))
    seconds = time.perf_counter() - t0
    if rc[0] != 0:
        raise SystemExit(f"critsample {' '.join(argv)} exited with {rc[0]}")
    print(f"detect {'(tiny sizes) ' if tiny else ''}{seconds:.1f} s", flush=True)
    return {"seconds": seconds, "peak_memory_mb": round(peak, 1), "command": "critsample " + " ".join(argv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run: every part, small sizes")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--out", default=None, help="folder of the detect run (default: a temporary folder)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sparsity", "attention", "steps", "detect"])
    ap.add_argument("--attention-shape", type=int, nargs=3, default=None, metavar=("B", "H", "D"),
                    help="batch, heads, head dim of the attention part (default 2 24 64; --tiny 1 2 16)")
    ap.add_argument("--attention-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; run with --device cpu --tiny here.")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the shared 2-core machine: see bench/attention.py
    clock = Clock(device)
    repeats = args.repeats or (20 if clock.cuda else 3)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if clock.cuda else "cpu"
    res: dict = {"device": name, "tiny": args.tiny, "torch": torch.__version__, "memory_measure": clock.memory_measure}

    part_s: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(part: str) -> None:  # a run killed by its timeout still leaves the parts it finished in --out
        nonlocal mark
        part_s[part] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()
        if out:
            (out / "bench-gpu.partial.json").write_text(json.dumps({**res, "part_s": part_s}, indent=1))

    if "sparsity" not in args.skip:
        res["block_sparsity"] = block_sparsity(device)
        lap("sparsity")
        print("block sparsity (row-major | 8x16 tiles): " + ", ".join(
            f"{k} {v['row_major']:.3f}|{v['tiles_8x16']:.3f}" for k, v in res["block_sparsity"].items()), flush=True)
    if "attention" not in args.skip:
        shape = args.attention_shape or ((1, 2, 16) if args.tiny else (2, 24, 64))
        grids, dtype = ((16, 32) if args.tiny else (32, 64)), getattr(torch, args.attention_dtype)
        att = attention_part(clock, grids, *shape, dtype, repeats, backward=clock.cuda and not args.tiny)
        res["attention"] = att
        res["window_over_dense"] = {k: round(v["auto"], 4) for k, v in att["ratio_to_dense"].items()}
        res["flex_over_dense"] = {k: round(v["flex"], 4) for k, v in att["ratio_to_dense"].items()}
        lap("attention")
    if "steps" not in args.skip:
        if args.tiny:
            steps = step_part(clock, 16, {"dit-xl": 1, "sd3-medium": 1}, (1,), repeats, tiny=True)
        else:
            steps = step_part(clock, 128, {"dit-xl": 28, "sd3-medium": 24}, (4, 8), repeats)
        res["steps"] = steps
        res["local_over_global_step"] = {a: {k: round(v, 4) for k, v in s["local_over_global"].items()} for a,
                                         s in steps.items()}
        lap("steps")
    if "detect" not in args.skip:
        det = detect_part(clock, args.tiny, out)
        res["detect_fast_s"], res["detect"] = round(det["seconds"], 2), det
        lap("detect")

    res["peak_memory_mb"] = {
        **({f"attention_{k}": v for k, v in res["attention"]["peak_memory_mb"].items()} if "attention" in res else {}),
        **({f"step_{a}": s["peak_memory_mb"] for a, s in res["steps"].items()} if "steps" in res else {}),
        **({"detect_fast": res["detect"]["peak_memory_mb"]} if "detect" in res else {}),
    }
    full_gpu = clock.cuda and not args.tiny
    met = None
    if full_gpu and "attention" in res and "steps" in res and args.attention_dtype == "bfloat16":
        w = res["flex_over_dense"]["64x64_r4"]
        s = res["local_over_global_step"]["sd3-medium"]["r4"]
        met = {"window_over_dense_64x64_r4": w <= TARGET_WINDOW_OVER_DENSE,
               "sd3_local_over_global_r4": s <= TARGET_LOCAL_OVER_GLOBAL}
    res["targets"] = {"window_over_dense_64x64_r4": TARGET_WINDOW_OVER_DENSE,
                      "sd3_local_over_global_r4": TARGET_LOCAL_OVER_GLOBAL}
    res["targets_met"] = met
    res["part_s"], res["wall_s"] = part_s, round(time.perf_counter() - t_start, 1)
    if out:
        (out / "bench-gpu.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
