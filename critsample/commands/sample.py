"""``critsample sample``: plain, interval-guided or adaptive sampling, with compute accounting.

Writes ``grid.png``, ``samples.npz`` (``images`` in [0, 1], (N, H, W) or (N, C, H, W); ``labels``; -1 = unconditional)
and ``run.json`` (arguments, the plan, model evaluations, analytic FLOPs and wall time). Batches are stored as they
finish under ``DIR/.batches``; an interrupted run started again with the same arguments reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import plans
from ..denoisers import NULL, Denoiser, PromptCond
from ..errors import UserError
from ..flops import plan_flops
from ..sampling import SAMPLERS, Plan, sample


@dataclass
class SampleConfig:
    """Options of ``critsample sample``."""

    model: str = "dit-digits"
    """Registry name (dit-digits, dit-xl, dit-xl-512, sd3-medium, gmm-...) or a local diffusers folder."""
    classes: list[int] = field(default_factory=list)
    """Class ids to sample (``--class 3`` or ``--class 0 1 2``), cycled over --num; -1 = unconditional; empty = all classes."""
    prompt: list[str] = field(default_factory=list)
    """Text prompts for text models (cycled over --num)."""
    num: int = 16
    """Number of samples."""
    seed: int = 0
    """Seed of the initial noise (batch b uses seed + b)."""
    out: str = "out/sample"
    """Output folder."""
    steps: int = 50
    """Integrator steps."""
    sampler: str = "auto"
    """ddim or dpm (DDPM models), euler (flow models); auto picks ddim / euler."""
    guidance: float | None = None
    """Classifier-free guidance scale w (None: the model's default)."""
    adaptive: bool = False
    """Adaptive plan: guided global inside the critical window, cheaper denoiser outside."""
    summary: str | None = None
    """summary.json of ``critsample detect`` giving the window and radius of the adaptive plan."""
    window: str | None = None
    """Explicit window t0:t1 (0 = clean, 1 = noise) for --adaptive."""
    radius: int | None = None
    """Attention radius of the local denoiser outside the window (token grid units)."""
    outside: str = "local-uncond"
    """Denoiser outside the window: local-uncond, local-cond or global-uncond."""
    interval: str | None = None
    """Limited-interval guidance (Kynkaanniemi et al. 2024) on t0:t1 instead of full guidance."""
    batch_size: int = 100
    """Samples per batch."""
    device: str = "auto"
    """cpu, cuda, cuda:1 or auto."""
    wandb: bool = True
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from None


def build_plan(cfg: SampleConfig, model: Denoiser) -> Plan:
    """The plan the options describe (also used by bench/adaptive.py)."""
    if cfg.sampler not in ("auto", *SAMPLERS):
        raise UserError(f"Unknown sampler {cfg.sampler!r}; choose auto, {', '.join(SAMPLERS)}.")
    if cfg.steps < 1:
        raise UserError(f"--steps must be >= 1; got {cfg.steps}.")
    w = cfg.guidance if cfg.guidance is not None else model.default_guidance
    if cfg.adaptive:
        window, radius = cfg.window, cfg.radius
        if cfg.summary:
            summary = plans.read_summary(cfg.summary, model)
            cw = summary["critical_window"]
            window = window or (cw["t_start"], cw["t_end"])
            radius = radius if radius is not None else summary.get("suggested_radius", cw.get("radius"))
        if window is None:
            raise UserError("--adaptive needs a window: pass --summary DIR/summary.json or --window t0:t1.")
        if radius is None and cfg.outside != "global-uncond":
            raise UserError("--adaptive with a local outside denoiser needs --radius R (or a summary that suggests one).")
        return plans.adaptive(model, cfg.steps, w, window, radius, cfg.outside, cfg.sampler)
    if cfg.interval:
        return plans.interval_guidance(model, cfg.steps, w, cfg.interval, cfg.sampler)
    return plans.full_guidance(model, cfg.steps, w, cfg.sampler)


def conditioning(cfg: SampleConfig, model: Denoiser, device) -> tuple[torch.Tensor | PromptCond, np.ndarray]:
    """Per-sample conditioning and the labels stored with the samples."""
    if model.num_classes is None:
        if cfg.classes:
            raise UserError(f"{model.name} is text-conditional: use --prompt, not --class.")
        if not cfg.prompt:
            raise UserError(f"{model.name} needs --prompt TEXT.")
        prompts = [cfg.prompt[i % len(cfg.prompt)] for i in range(cfg.num)]
        return model.encode_prompt(prompts), np.array(prompts)
    if cfg.prompt:
        raise UserError(f"{model.name} is class-conditional: use --class N, not --prompt.")
    classes = cfg.classes or list(range(model.num_classes))
    for c in classes:
        if c != NULL and not 0 <= c < model.num_classes:
            raise UserError(f"Class {c} is outside {model.name}'s classes 0..{model.num_classes - 1} (-1 = unconditional).")
    labels = torch.tensor([classes[i % len(classes)] for i in range(cfg.num)], device=device)
    return labels, labels.cpu().numpy()


def _slice(cond, a: int, b: int):
    return PromptCond(cond.embeds[a:b], cond.pooled[a:b]) if isinstance(cond, PromptCond) else cond[a:b]


def _key(cfg: SampleConfig, plan: Plan) -> str:
    d = {k: v for k, v in vars(cfg).items() if k not in ("out", "wandb", "device")}
    return hashlib.sha256(json.dumps([d, plan.to_dict()], sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(cfg: SampleConfig, model: Denoiser | None = None) -> dict:
    """Sample as configured; returns the run record (also written to ``out/run.json``)."""
    from rich.progress import Progress

    from ..models import load
    from ..report import image_grid, save_png

    if cfg.num < 1 or cfg.batch_size < 1:
        raise UserError("--num and --batch_size must be >= 1.")
    device = pick_device(cfg.device)
    model = model if model is not None else load(cfg.model, device=device)
    if cfg.radius is not None:
        plans.check_plan_radius(model, cfg.radius)
    plan = build_plan(cfg, model)
    cond, labels = conditioning(cfg, model, device)
    out = Path(cfg.out)
    cache = out / ".batches"
    cache.mkdir(parents=True, exist_ok=True)
    key = _key(cfg, plan)
    chunks, seconds, computed = [], 0.0, 0
    n_batches = -(-cfg.num // cfg.batch_size)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"sampling {cfg.num} x {len(plan.steps)} steps", total=n_batches)
        for b in range(n_batches):
            path = cache / f"{key}-{b:05d}.pt"
            if path.exists():
                chunks.append(torch.load(path))
            else:
                lo, hi = b * cfg.batch_size, min(cfg.num, (b + 1) * cfg.batch_size)
                g = torch.Generator(device=device).manual_seed(cfg.seed + b)
                start = time.perf_counter()
                x = sample(model, plan, _slice(cond, lo, hi), generator=g)
                images = model.decode(x).cpu()
                seconds += time.perf_counter() - start
                computed += hi - lo
                torch.save({"images": images, "seconds": time.perf_counter() - start}, path.with_suffix(".tmp"))
                os.replace(path.with_suffix(".tmp"), path)
                chunks.append(torch.load(path))
            bar.advance(task)
    images = torch.cat([c["images"] for c in chunks])
    grid_rows = min(10, cfg.num) if model.num_classes is None or len(set(labels.tolist())) == 1 else max(1, min(10, len(cfg.classes) or model.num_classes))
    save_png(image_grid(images, nrow=grid_rows), out / "grid.png", scale=max(1, 64 // images.shape[-1]))
    arr = images.numpy().astype(np.float32)
    np.savez_compressed(out / "samples.npz", images=arr[:, 0] if arr.shape[1] == 1 else arr, labels=labels)
    grid = model.grid(torch.empty(1, *model.sample_shape))
    flops = plan_flops(model, plan, grid)
    record = {
        "model": model.name,
        "config": vars(cfg),
        "plan": plan.to_dict(),
        "plan_description": plan.describe(),
        "time_convention": "t in [0, 1]: 0 = clean data, 1 = pure noise; times_t are the integrator's steps",
        "cost": {
            "model_evaluations": plan.forwards * cfg.num,
            "model_evaluations_note": "network forwards summed over samples (a guided step counts two)",
            "flops_per_sample": flops,
            "wall_seconds": sum(float(c["seconds"]) for c in chunks),
            "wall_seconds_this_run": seconds,
            "samples_computed_this_run": computed,
        },
        "outputs": {"grid": "grid.png", "samples": "samples.npz (images in [0, 1], labels; -1 = unconditional)"},
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    if cfg.wandb:
        from ..tracking import log_sample_run

        log_sample_run(record, out)
    return record


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="critsample sample", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with these options (see configs/sample/).")
    p.add_class_arguments(SampleConfig, None, as_group=False)
    return p


def normalize_argv(argv: list[str], flags: tuple[str, ...], aliases: dict[str, str]) -> list[str]:
    """Shell habits -> jsonargparse: ``--flag`` alone means ``--flag=true``, ``--no-flag`` means ``--flag=false``,
    dashes in option names are accepted for underscores, and ``aliases`` rename options (``--class``)."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--") and "=" not in a:
            a = "--" + a[2:].replace("-", "_")
            a = aliases.get(a, a)
            name = a[2:]
            if name.startswith("no_") and name[3:] in flags:
                out.append(f"--{name[3:]}=false")
                continue
            if name in flags and (i + 1 == len(argv) or argv[i + 1].lower() not in ("true", "false")):
                out.append(f"--{name}=true")
                continue
        out.append(a)
    return out


def parse(parser, argv: list[str]):
    """Parse with jsonargparse, turning its errors into one-sentence UserErrors (exit code 2 in the CLI)."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        raise UserError(str(e).splitlines()[0]) from None


def run_sample(argv: list[str]) -> int:
    argv = normalize_argv(argv, ("adaptive", "wandb"), {"--class": "--classes"})
    p = parser()
    ns = parse(p, _expand_lists(argv))
    ns = {k: v for k, v in vars(ns).items() if k in SampleConfig.__dataclass_fields__}
    record = run(SampleConfig(**ns))
    c = record["cost"]
    print(f"{record['plan_description']}")
    print(
        f"wrote {record['config']['out']}: {record['config']['num']} samples, "
        f"{c['model_evaluations']} model evaluations, {c['flops_per_sample']['total'] / 1e9:.3g} GFLOPs/sample, "
        f"{c['wall_seconds']:.1f} s"
    )
    return 0


def _expand_lists(argv: list[str]) -> list[str]:
    """Let ``--classes 0 1 2`` and ``--prompt a b`` take several values, as users type them."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--classes", "--prompt"):
            vals = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") or (argv[i].startswith("-") and not argv[i][1:].isdigit())):
                vals.append(argv[i])
                i += 1
            out += [a, json.dumps([int(v) for v in vals] if a == "--classes" and all(v.lstrip("-").isdigit() for v in vals) else vals)]
            continue
        out.append(a)
        i += 1
    return out
