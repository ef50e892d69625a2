"""``critsample detect``: run the paper's probes on a model and estimate its critical window.

Probes (paper sec. 3): ``cond_gap`` (eq. 6) and ``locality_gap`` (eq. 7) along training and sampling trajectories,
``forward_backward`` (sec. 3.3), ``window_cond`` (sec. 3.4) and ``window_locality`` (sec. 3.5). Every unit of work
is stored as it finishes (``store.py``): a killed run started again with the same options recomputes nothing and ends
with the same numbers. Outputs in ``--out``: ``summary.json`` (schema: docs/summary-schema.md), ``report.md`` with
the figures, ``arrays/*.npz`` and ``config.yaml``; W&B (offline unless WANDB_MODE is set) under ``--out/wandb``.

Time convention: t in [0, 1], 0 = clean data, 1 = pure noise; every window is also given in log-SNR
(log alpha^2 / sigma^2, nats), which decreases with t.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..denoisers import Denoiser
from ..errors import UserError
from ..store import Ranks, Store, Unit, run_units
from .detect_units import (  # noqa: F401  (re-exported: the data, classifier and radius rules of detect)
    Detection,
    OracleClassifier,
    auto_radii,
    auto_window_radii,
    classifier_name,
    load_classifier_for,
    load_data,
)

PROBES = ("cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality")


# -- options -------------------------------------------------------------------------------------


@dataclass
class GapArgs:
    """Instantaneous probes: conditioning gap (eq. 6) and locality gap (eq. 7)."""

    steps: int = 20
    """Sampler steps of the sampling trajectories; the training trajectory is probed at the same times."""
    samples: int = 8
    """Trajectories of each kind; every one is probed at every time."""
    radii: Optional[list[int]] = None
    """Local radii (Chebyshev, token grid). None: 1, 2, 4, ... below grid - 1 (fast); 0 and those (paper), or 0..4 on grids <= 8."""
    trajectories: list[str] = field(default_factory=lambda: ["train", "sample_cond", "sample_uncond"])
    """train (data noised forward), sample_cond (guided sampler), sample_uncond (unconditional sampler)."""
    kind: str = "eps"
    """Units of the gaps the window is read from: eps (= sigma(t) x score; default) or score (paper eqs. 6-7, which
    carries a 1/sigma(t) factor that diverges at the clean end); both are saved and plotted."""
    batch: int = 8
    """Trajectories per stored unit."""


@dataclass
class ForwardBackwardArgs:
    """Forward-backward error correction (sec. 3.3)."""

    t_min: float = 0.05
    """Smallest noise level t."""
    t_max: float = 0.95
    """Largest noise level t."""
    num_t: int = 10
    """Linearly spaced noise levels in [t_min, t_max] (snapped to the integrator's steps)."""
    samples: int = 32
    """Clean images per noise level."""
    radii: Optional[list[int]] = None
    """Local radii denoised besides the global model (None: 1, 2, 4, ... below grid - 1)."""
    steps: int = 20
    """Integrator steps over [0, 1]; denoising from t runs the steps below t."""
    source: str = "data"
    """Clean images: data (the model's dataset / --data) or generated (guided samples of --class / --prompt)."""
    batch: int = 32
    """Images per stored unit."""


@dataclass
class WindowArgs:
    """Windowed conditioning (sec. 3.4) and windowed locality (sec. 3.5) scans."""

    steps: int = 20
    """Sampler steps of every scan sample."""
    width: float = 0.2
    """Width w of the conditioning window [t0, t0 + w] (truncated at 1)."""
    locality_width: float = 0.2
    """Width of the global-denoising window of the locality scan."""
    t0_step: float = 0.1
    """Scan t0 = 0, t0_step, 2 t0_step, ... < 1."""
    samples: int = 16
    """Samples per window position (and of the always-conditioned baseline)."""
    radii: Optional[list[int]] = None
    """Radii of the local denoiser outside the window (None: the middle auto radius (fast) or the two smallest (paper))."""
    complement: bool = True
    """Also scan the complement: conditioning only outside the window / local inside the window."""
    batch: int = 16
    """Samples per stored unit."""


@dataclass
class DetectConfig:
    """Options of ``critsample detect``."""

    model: str = "dit-digits"
    """Registry name (dit-digits, dit-xl, dit-xl-512, sd3-medium, gmm-...) or a local diffusers folder."""
    preset: str = "fast"
    """Named sizes: fast (a first look, minutes on CPU for dit-digits) or paper (App. C-like grids)."""
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    """Subset of cond_gap, locality_gap, forward_backward, window_cond, window_locality."""
    seed: int = 0
    """Run seed; every unit derives its generator from (seed, unit key)."""
    out: str = "runs/detect"
    """Output folder (also holds the stored units: rerun the same command to resume)."""
    dry_run: bool = False
    """Print the number of model evaluations and a time estimate, then exit."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    devices: int = 1
    """Processes to shard the units over (Lightning Fabric, DDP); 1 = this process."""
    threads: Optional[int] = None
    """CPU intra-op threads (None: torch's default). On a busy shared CPU, 1 is often several times faster than 2."""
    classifier: Optional[str] = None
    """digits, resnet-50, or module.path:callable (None: digits for 8x8 digit models, resnet-50 for DiT-XL, the Bayes classifier for oracles)."""
    data: Optional[str] = None
    """Clean data: an image folder or .pt/.npz (keys latents or images, optional labels). Default: the digits test split for dit-digits, exact samples for oracles."""
    prompt: Optional[str] = None
    """Prompt of text models (SD3)."""
    class_id: Optional[int] = None
    """Class of class models (--class); None: each data image's own label, generated samples cycle through the classes (DiT-XL: 207)."""
    guidance: Optional[float] = None
    """Classifier-free guidance w of conditioned steps (None: the model's default)."""
    sampler: str = "auto"
    """Integrator: ddim or dpm (DDPM models), euler (flow models); auto = ddim / euler."""
    max_batch: int = 128
    """Rows per network forward."""
    wandb: bool = True
    """Log to Weights & Biases (offline unless WANDB_MODE is set); --no-wandb switches it off."""
    gaps: GapArgs = field(default_factory=GapArgs)
    """Conditioning and locality gaps."""
    fb: ForwardBackwardArgs = field(default_factory=ForwardBackwardArgs)
    """Forward-backward."""
    windows: WindowArgs = field(default_factory=WindowArgs)
    """Windowed scans."""


# Sizes chosen for dit-digits on a 2-core CPU (bench/detect.py): fast < 5 min, paper < 60 min.
PRESETS: dict[str, dict] = {
    # A first look: ~16k model evaluations (about 1 min on dit-digits with a free CPU core).
    "fast": {
        "gaps": {"steps": 20, "samples": 6, "batch": 6, "trajectories": ["train", "sample_cond", "sample_uncond"]},
        "fb": {"t_min": 0.05, "t_max": 0.95, "num_t": 10, "samples": 16, "steps": 20, "batch": 16},
        "windows": {"steps": 20, "width": 0.2, "locality_width": 0.2, "t0_step": 0.1, "samples": 12, "batch": 12, "complement": False},
    },
    # App. C-like grids: 50-step trajectories, 19 noise levels in [0.05, 0.95], windows w = 0.2 scanned by 0.1 with
    # their complements; ~250k model evaluations (about 8 min on dit-digits with a free CPU core).
    "paper": {
        "gaps": {"steps": 50, "samples": 32, "batch": 16, "trajectories": ["train", "sample_cond", "sample_uncond"]},
        "fb": {"t_min": 0.05, "t_max": 0.95, "num_t": 19, "samples": 64, "steps": 40, "batch": 32},
        "windows": {"steps": 25, "width": 0.2, "locality_width": 0.2, "t0_step": 0.1, "samples": 48, "batch": 24, "complement": True},
    },
}


# -- parsing -------------------------------------------------------------------------------------


def _peek(argv: list[str], name: str) -> str | None:
    """The last value given to ``--name`` (argparse semantics: the last one wins)."""
    found = None
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(f"--{name}="):
            found = a.split("=", 1)[1]
    return found


def _preset_of(argv: list[str]) -> str:
    preset = _peek(argv, "preset")
    config = _peek(argv, "config")
    if preset is None and config and Path(config).exists():
        import yaml

        preset = (yaml.safe_load(Path(config).read_text()) or {}).get("preset")
    preset = preset or "fast"
    if preset not in PRESETS:
        raise UserError(f"Unknown preset {preset!r}; choose {' or '.join(PRESETS)}.")
    return preset


def parser(preset: str = "fast"):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = ArgumentParser(
        prog="critsample detect", exit_on_error=False,
        description=__doc__.splitlines()[0] + " Flags: --dry-run, --no-wandb, --class N. Presets fill every size not given.",
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML of these options (configs/detect/*.yaml; make one with --print_config).")
    p.add_class_arguments(DetectConfig, None, as_group=False)
    p.set_defaults({f"{sec}.{k}": v for sec, d in PRESETS[preset].items() for k, v in d.items()})
    p.set_defaults({"preset": preset})
    return p


def parse_config(argv: list[str]) -> DetectConfig:
    from jsonargparse import ArgumentError

    from .sample import normalize_argv

    argv = normalize_argv(list(argv), ("dry_run", "wandb", "windows.complement"), {"--class": "--class_id"})
    preset = _preset_of(argv)
    p = parser(preset)
    try:
        ns = p.parse_args(argv)
    except ArgumentError as e:  # jsonargparse's message spans lines: one sentence for the CLI
        raise UserError(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None
    cfg = p.instantiate(ns)
    d = {k: getattr(cfg, k) for k in DetectConfig.__dataclass_fields__}
    return DetectConfig(**d)


def check_config(cfg: DetectConfig) -> None:
    """Input checks that need no model (one sentence each, raised as UserError)."""
    if cfg.preset not in PRESETS:
        raise UserError(f"Unknown preset {cfg.preset!r}; choose {' or '.join(PRESETS)}.")
    bad = [p for p in cfg.probes if p not in PROBES]
    if bad:
        raise UserError(f"Unknown probe {bad[0]!r}; choose from {', '.join(PROBES)}.")
    if not cfg.probes:
        raise UserError(f"--probes is empty; choose from {', '.join(PROBES)}.")
    bad = [t for t in cfg.gaps.trajectories if t not in ("train", "sample_cond", "sample_uncond")]
    if bad:
        raise UserError(f"Unknown trajectory {bad[0]!r}; choose from train, sample_cond, sample_uncond.")
    if cfg.gaps.kind not in ("score", "eps"):
        raise UserError(f"--gaps.kind must be score or eps; got {cfg.gaps.kind!r}.")
    if cfg.fb.source not in ("data", "generated"):
        raise UserError(f"--fb.source must be data or generated; got {cfg.fb.source!r}.")
    for name, v in (("gaps.steps", cfg.gaps.steps), ("gaps.samples", cfg.gaps.samples), ("gaps.batch", cfg.gaps.batch),
                    ("fb.num_t", cfg.fb.num_t), ("fb.samples", cfg.fb.samples), ("fb.steps", cfg.fb.steps), ("fb.batch", cfg.fb.batch),
                    ("windows.steps", cfg.windows.steps), ("windows.samples", cfg.windows.samples), ("windows.batch", cfg.windows.batch),
                    ("max_batch", cfg.max_batch), ("devices", cfg.devices)):
        if v < 1:
            raise UserError(f"--{name} must be >= 1; got {v}.")
    if not (0.0 <= cfg.fb.t_min <= cfg.fb.t_max <= 1.0):
        raise UserError(f"Forward-backward noise levels need 0 <= t_min <= t_max <= 1 (t: 0 = clean, 1 = noise); got [{cfg.fb.t_min}, {cfg.fb.t_max}].")
    from ..probes.windows import check_window

    for w in (cfg.windows.width, cfg.windows.locality_width):
        check_window(0.0, w)
    if not (0.0 < cfg.windows.t0_step < 1.0):
        raise UserError(f"--windows.t0_step must lie in (0, 1); got {cfg.windows.t0_step}.")
    if cfg.sampler not in ("auto", "ddim", "dpm", "euler"):
        raise UserError(f"Unknown sampler {cfg.sampler!r}; choose auto, ddim, dpm or euler.")


def pick_device(device: str) -> torch.device:
    from .sample import pick_device as pick

    return pick(device)


# -- orchestration -------------------------------------------------------------------------------


def time_forward(model: Denoiser, device, rows: int, radius: int | None, repeats: int = 3) -> float:
    """Seconds per row of one batched forward of ``rows`` rows (after one warm-up)."""
    from ..probes.common import null_like

    x = torch.randn(rows, *model.sample_shape, device=device)
    cond = null_like(model, model.encode_prompt([""] * rows) if model.num_classes is None else torch.zeros(rows, dtype=torch.long, device=device))
    model.predict(x, 0.5, cond, radius=radius)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(x, 0.5, cond, radius=radius)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / rows


def estimate(det: Detection, units: list[Unit], store: Store) -> dict:
    """Model evaluations per probe, how many are already stored, and a time estimate from a timed forward."""
    rows = min(det.cfg.max_batch, 64)
    radius = (det.gap_radii or det.fb_radii or det.win_radii or [None])[0]
    per_global = time_forward(det.model, det.device, rows, None)
    per_local = time_forward(det.model, det.device, rows, radius) if radius is not None else per_global
    by_probe: dict[str, dict] = {}
    for u in units:
        d = by_probe.setdefault(u.probe, {"units": 0, "evaluations": 0, "local_evaluations": 0, "stored_units": 0, "remaining_evaluations": 0})
        d["units"] += 1
        d["evaluations"] += u.forwards
        d["local_evaluations"] += u.local_forwards
        done = store.has(u)
        d["stored_units"] += int(done)
        if not done:
            d["remaining_evaluations"] += u.forwards
            d.setdefault("_rem", []).append(u)
    total_sec = 0.0
    for d in by_probe.values():
        rem = d.pop("_rem", [])
        sec = sum((u.forwards - u.local_forwards) * per_global + u.local_forwards * per_local for u in rem)
        d["estimated_seconds"] = sec
        total_sec += sec
    return {
        "probes": by_probe,
        "evaluations": sum(d["evaluations"] for d in by_probe.values()),
        "remaining_evaluations": sum(d["remaining_evaluations"] for d in by_probe.values()),
        "seconds_per_evaluation": {"global": per_global, "local": per_local, "timed_rows": rows},
        "estimated_seconds": total_sec,
    }


def print_estimate(est: dict, cfg: DetectConfig, model: Denoiser, file=None) -> None:
    file = file or sys.stdout
    print(f"critsample detect --dry-run: {model.name}, preset {cfg.preset}, probes {', '.join(cfg.probes)}", file=file)
    for name, d in est["probes"].items():
        print(f"  {name:18s} {d['units']:5d} units  {d['evaluations']:9d} model evaluations "
              f"({d['local_evaluations']} local)  {d['stored_units']} units stored  ~{_fmt_s(d['estimated_seconds'])}", file=file)
    spe = est["seconds_per_evaluation"]
    print(f"  total: {est['evaluations']} model evaluations, {est['remaining_evaluations']} still to run; "
          f"{1 / spe['global']:.0f} global / {1 / spe['local']:.0f} local evaluations per second "
          f"(timed on {spe['timed_rows']} rows) -> about {_fmt_s(est['estimated_seconds'])}", file=file)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def run(cfg: DetectConfig, model: Denoiser | None = None, *, classifier=None, on_unit=None, fabric=None) -> dict | None:
    """Run (or resume) a detection; returns the summary on rank 0 (None elsewhere; the estimate for --dry-run).

    ``model`` / ``classifier`` may be given directly (tests, benchmarks); ``on_unit(unit, computed)`` is called after
    every unit of this rank.
    """
    from ..models import load

    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = fabric.device if fabric is not None else pick_device(cfg.device)
    model = model if model is not None else load(cfg.model, device=device)
    det = Detection(cfg, model, device, classifier=classifier)
    out = Path(cfg.out)
    store = Store(out, det.model_id, cfg.seed, config=det.probe_configs())
    stages = det.stages(store)
    units = [u for s in stages for u in s]
    if cfg.dry_run:
        est = estimate(det, units, store)
        print_estimate(est, cfg, model)
        return est
    ranks = Ranks(fabric)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    total = sum(u.forwards for stage in stages for i, u in enumerate(stage) if i % ranks.world == ranks.rank)  # this rank's share
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  disable=not ranks.is_main or not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task(f"detect {model.name} (model evaluations)", total=total)

        def advance(u: Unit, computed: bool) -> None:
            bar.update(task, advance=u.forwards, description=f"{u.probe} {'computed' if computed else 'stored'}")
            if on_unit is not None:
                on_unit(u, computed)

        for k, stage in enumerate(stages):
            if k == 1:  # forward-backward on generated clean images: every rank reads them from the store
                det.use_generated(store, stages[0])
            got = run_units(store, stage, det.compute, ranks=ranks, device=device, on_unit=advance)
            if got is not None:
                results.update(got)
    ranks.close()
    if not ranks.is_main:
        return None
    from .detect_report import assemble

    return assemble(det, units, results, store, out, wall=time.perf_counter() - start)


def run_detect(argv: list[str]) -> int:
    """CLI entry (``critsample detect``). Exit 0 on success; user errors raise UserError (exit 2 in cli.py)."""
    import os

    cfg = parse_config(argv)
    check_config(cfg)
    fabric = None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (cfg.devices > 1 or world > 1) and not cfg.dry_run:  # Fabric launches the extra processes, or joins torchrun's
        from lightning.fabric import Fabric

        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else cfg.devices
        accelerator = "cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "cuda"
        fabric = Fabric(accelerator=accelerator, devices=local, num_nodes=max(1, world // local) if world > 1 else 1, strategy="ddp")
        fabric.launch()
    summary = run(cfg, fabric=fabric)
    if summary is None or cfg.dry_run:
        return 0
    cw = summary.get("critical_window") or {}
    if cw:
        print(f"critical window of {summary['model']}: t in [{cw['t_start']:.3f}, {cw['t_end']:.3f}] (center {cw['center']:.3f} "
              f"+- {cw['uncertainty']:.3f}; log-SNR {cw['log_snr_start']:.2f} .. {cw['log_snr_end']:.2f})")
    else:
        print(f"no critical window could be estimated for {summary['model']} (see {cfg.out}/report.md)")
    v = summary.get("concurrence", {}).get("overall")
    if v:
        print(v["verdict"])
    print(f"wrote {cfg.out}/summary.json, {cfg.out}/report.md")
    return 0
