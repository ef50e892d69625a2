"""Sampling a model to disk: plain, interval-guided or adaptive plans from options, resumable batches, and compute
accounting. The library behind ``critsample sample`` (``commands/sample.py`` parses argv and prints).

Writes ``grid.png``, ``samples.npz`` (``images`` in [0, 1], (N, H, W) or (N, C, H, W); ``labels``; -1 = unconditional)
and ``run.json`` (arguments, the plan, model evaluations, analytic FLOPs and wall time).

Sample i starts from noise drawn from a generator seeded by a hash of (seed, i) alone
(:mod:`critsample.seeded`, edm2's per-sample generators): ``--batch_size`` never changes which
noise a sample gets (the network's floating-point rounding may still differ slightly between batch sizes), the noise is
the same on every device, and different seeds never share a sample. Resuming is per batch: each finished batch is
stored under ``DIR/.batches`` (``.npz``, :class:`~critsample.store.Store`), keyed by the options, the plan and a
fingerprint of the model's weights; a run started again with the same options (``--num`` may grow) reuses every
finished batch. The batch in flight is checkpointed every ``CHECKPOINT_SECONDS`` (its state and next step) when the
integrator is single-step (DDIM, flow Euler: the default ``auto`` samplers), so a killed run, even one with
``--num <= --batch_size``, resumes mid-batch and ends bitwise as an uninterrupted one; with DPM-Solver++ (its history of
predictions is not stored) the batch in flight starts again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from . import outside as outside_kinds
from . import plans
from . import summary as summary_io
from .attention import check_radius
from .denoisers import NULL, Cond, Denoiser
from .errors import UserError
from .flops import plan_flops
from .models import load, shipped_summary
from .options import (
    GuidanceOptions,
    ModelOptions,
    OutputOptions,
    SeedOptions,
    StepsOptions,
    TimeWindow,
    WandbOptions,
    validate_sections,
)
from .report import image_grid, save_png
from .sampling import Plan, make_scheduler, sample
from .seeded import SeededBatch, decode, one_at_a_time, seeded_batches
from .store import CorruptUnit, Store, Unit, atomic_write, check_writable, model_fingerprint, save_npz
from .tracking import log_sample_run

log = logging.getLogger("critsample")
CHECKPOINT_SECONDS = 10.0  # how often the state of a batch in progress is stored (single-step integrators)
SINGLE_STEP = ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler")  # no history: a checkpointed state resumes exactly


@dataclass(kw_only=True)
class SampleConfig(WandbOptions, OutputOptions, StepsOptions, GuidanceOptions, SeedOptions, ModelOptions):
    """Options of ``critsample sample`` (the shared sections: :mod:`critsample.options`)."""

    classes: list[int] = field(default_factory=list)
    """Class ids to sample (``--class 3`` or ``--class 0 1 2``), cycled over --num; -1 = unconditional; empty = all
    classes."""
    prompt: list[str] = field(default_factory=list)
    """Text prompts for text models (cycled over --num)."""
    num: int = 16
    """Number of samples."""
    out: str = "out/sample"
    """Output folder."""
    adaptive: bool = False
    """Adaptive plan: guided global inside the critical window, cheaper denoiser outside."""
    summary: str | None = None
    """summary.json of ``critsample detect`` giving the adaptive plan: the plan certified by ``critsample tune`` when
    the summary holds one (used as measured: its steps, sampler and guidance must match --steps, --sampler, --guidance,
    else a warning and the window below), otherwise guided inside its critical window with its suggested radius outside.
    An explicit --window, --radius or --outside builds the plan from the window instead. Default for the bundled
    models (dit-digits, dit-fashion): the summary shipped with them (critsample/assets/windows/NAME), unless --window
    is given."""
    window: str | None = None
    """Explicit window t0:t1 (0 = clean, 1 = noise) for --adaptive."""
    radius: int | None = None
    """Attention radius of the local denoiser outside the window (token grid units)."""
    outside: str | None = None
    """Denoiser outside the window: local-cond (the default when no certified plan is used: measured, see
    ``critsample.plans``), local-uncond (the paper's) or global-uncond."""
    kinds: list[str] | None = None
    """Step kinds outside the window for --adaptive: one for both sides, or two (high-noise side, low-noise side):
    network (the model with its attention window), gaussian, local-linear (critsample.outside), student."""
    data: str | None = None
    """Data the gaussian and local-linear kinds are fitted on (an image folder or a .pt/.npz of latents or images,
    optional labels); default: the model's bundled training data (dit-digits, dit-fashion); text models need it."""
    interval: str | None = None
    """Limited-interval guidance (Kynkaanniemi et al. 2024) on t0:t1 instead of full guidance."""
    batch_invariant: bool = False
    """Evaluate the network (and the VAE) one sample at a time, so that every sample is bitwise the same whatever
    --batch_size, resume or sharding (slower: no batching). Off, samples agree across batch sizes to float rounding
    (~1e-6: matrix kernels round differently for different batch sizes)."""
    batch_size: int = 100
    """Samples per batch (a killed run keeps its finished batches and, with ddim / euler, the last checkpoint of the one
    in flight)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks that need no model; options that would be ignored are errors (one sentence each)."""
        validate_sections(self)
        for name in ("num", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"--{name} must be an integer >= 1; got {v!r}.")
        if self.outside is not None and self.outside not in plans.OUTSIDE:
            raise UserError(f"--outside must be one of {', '.join(plans.OUTSIDE)}; got {self.outside!r}.")
        if self.radius is not None:
            check_radius(self.radius, (0, 0))  # an integer >= 0; the model's token grid bounds it once loaded
        for name in ("window", "interval"):
            if getattr(self, name) is not None:
                TimeWindow.parse(getattr(self, name), f"--{name}")
        if self.kinds is not None:
            if len(self.kinds) not in (1, 2):
                raise UserError(f"--kinds takes one step kind (both sides) or two (high-noise, low-noise side); got "
                                f"{self.kinds!r}.")
            for k in self.kinds:
                outside_kinds.check_kind(k)
        if not self.adaptive:
            given = [f"--{n}" for n in ("summary", "window", "radius", "outside", "kinds")
                     if getattr(self, n) is not None]
            if given:
                raise UserError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to --adaptive "
                                f"plans; add --adaptive or drop {'it' if len(given) == 1 else 'them'}.")
        elif self.interval is not None:
            raise UserError("--interval (limited-interval guidance) and --adaptive are two different plans; choose "
                            "one.")


def build_plan(cfg: SampleConfig, model: Denoiser) -> Plan:
    """The plan the options describe (also used by bench/adaptive.py)."""
    cfg.validate()
    w = cfg.guidance if cfg.guidance is not None else model.default_guidance
    if cfg.adaptive:
        window, radius = cfg.window, cfg.radius
        outside = cfg.outside or plans.DEFAULT_OUTSIDE
        source = cfg.summary or (_shipped(model) if window is None else None)
        if source and window is None and radius is None and cfg.outside is None and cfg.kinds is None:
            certified = _certified(cfg, model, w, source)
            if certified is not None:
                return certified
        if source:  # explicit --window / --radius take precedence over the summary's: documented, and said
            summary = summary_io.read(source, model.name, require_window=window is None)
            suggested = summary_io.suggested_radius(summary)
            if window is None:
                window = summary_io.critical_window(summary, source)
            elif summary.get("critical_window") is not None:  # a summary without a window only lends its radius
                t0, t1 = summary_io.critical_window(summary, source)
                log.warning(f"--window {window} replaces the critical window {t0:g}:{t1:g} of {source}.")
            if radius is not None and suggested is not None and radius != suggested:
                log.warning(f"--radius {radius} replaces the suggested radius {suggested} of {source}.")
            radius = radius if radius is not None else suggested
        if window is None:
            raise UserError(f"--adaptive needs a window and {model.name} ships none: pass --summary DIR/summary.json "
                            "(from `critsample detect`) or --window t0:t1.")
        kinds = tuple(cfg.kinds or [outside_kinds.NETWORK]) * (2 if len(cfg.kinds or [1]) == 1 else 1)
        local = [k for k in kinds if outside_kinds.takes_radius(k)]
        if radius is None and outside != "global-uncond" and local:
            raise UserError("--adaptive with a local outside denoiser needs --radius R (or a summary that suggests "
                            "one).")
        return plans.adaptive(model, cfg.steps, w, window, radius, outside, cfg.sampler, kinds=kinds)
    if cfg.interval:
        return plans.interval_guidance(model, cfg.steps, w, cfg.interval, cfg.sampler)
    return plans.full_guidance(model, cfg.steps, w, cfg.sampler)


def _shipped(model: Denoiser) -> Path | None:
    """The summary shipped with a bundled model (:func:`critsample.models.shipped_summary`), checked to be measured on
    the weights just loaded; None when the model ships none."""
    path = shipped_summary(model.name)
    if path is None:
        return None
    measured_on = summary_io.read(path, model.name, require_window=False).get("model_id")
    if measured_on != model_fingerprint(model, model.name):
        raise UserError(f"The windows shipped with {model.name} ({path}) were measured on other weights "
                        f"({measured_on}) than the ones loaded; reinstall critsample, or pass --summary or --window.")
    log.info(f"Adaptive plan from the windows shipped with {model.name}: {path}")
    return path


def _certified(cfg: SampleConfig, model: Denoiser, guidance: float, source: str | Path) -> Plan | None:
    """The summary's certified plan when it was measured for these options (steps, sampler, guidance), else None."""
    found = summary_io.certified_plan(summary_io.read(source, model.name, require_window=False))
    if found is None:
        return None
    plan = Plan.from_dict(found["plan"])
    scales = {s.guidance for s in plan.steps if s.mode == "guided"}
    if len(plan.steps) == cfg.steps and cfg.sampler in ("auto", plan.sampler) and scales <= {guidance}:
        if all(s.mode == "guided" and s.radius is None and s.kind == "network" for s in plan.steps):
            log.warning(f"The plan of {source} is full guidance: `critsample tune` certified no cheaper plan "
                        f"({found.get('confirmation', {}).get('decision') or 'see its frontier.json'}), so --adaptive "
                        "samples full guidance; pass --window to sample an uncertified adaptive plan.")
        return plan
    log.warning(f"The certified plan of {source} was measured at {len(plan.steps)} steps, sampler {plan.sampler}, "
                f"guidance {', '.join(f'{g:g}' for g in sorted(scales)) or '-'}; these options differ, so the plan is "
                "built from the window (not certified). Run `critsample tune` with these options to certify one.")
    return None


def conditioning(cfg: SampleConfig, model: Denoiser, device) -> tuple[Cond, np.ndarray]:
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
            raise UserError(f"Class {c} is outside {model.name}'s classes 0..{model.num_classes - 1} (-1 = "
                            "unconditional).")
    labels = torch.tensor([classes[i % len(classes)] for i in range(cfg.num)], device=device)
    return labels, labels.cpu().numpy()


def _batches(cfg: SampleConfig, plan: Plan, model: Denoiser, out: Path) -> Store:
    """The store of finished batches. Their keys hold every option a sample depends on (not ``--num``: sample i is the
    same in a longer run), the plan, and the model's weights (a retrained model of the same name never reuses them)."""
    options = {k: v for k, v in vars(cfg).items() if k not in ("out", "wandb", "device", "num")}
    for k in ("kinds", "data"):  # options of the outside kinds: absent from the keys of plans without them
        if options.get(k) is None:
            options.pop(k, None)
    config = {"options": options, "plan": plan.to_dict()}
    ident = outside_kinds.identity(model, plan)
    if ident:
        config["outside"] = ident
    return Store(out / ".batches", model_fingerprint(model, model.name), cfg.seed, {"sample": config})


def run(cfg: SampleConfig, model: Denoiser | None = None, *, device: torch.device | str | None = None,
        progress: bool = False) -> dict:
    """Sample as configured; returns the run record (also written to ``out/run.json``). ``model`` defaults to
    ``load(cfg.model)`` on ``device`` (default: CPU); ``progress`` shows a progress bar over batches."""
    cfg.validate()
    check_writable(cfg.out)
    model = model if model is not None else load(cfg.model, device=device or "cpu",
                                                 trust_pickled_weights=cfg.trust_pickled_weights)
    device = next(model.parameters(), torch.empty(0)).device
    if cfg.radius is not None:
        check_radius(cfg.radius, model.token_grid, bound="grid", model=model.name)
    outside_kinds.use_data(model, cfg.data)
    plan = build_plan(cfg, model)
    for kind in {st.kind for st in plan.steps}:  # fitted (or a missing --data said) before any sampling
        outside_kinds.denoiser_for(model, kind)
    cond, labels = conditioning(cfg, model, device)
    out = Path(cfg.out)
    store = _batches(cfg, plan, model, out)
    chunks, seconds, computed, skipped = [], 0.0, 0, 0
    single_step = type(make_scheduler(model, plan.sampler)).__name__ in SINGLE_STEP

    def compute(unit: Unit, batch: SeededBatch) -> dict:
        """One batch; with a single-step integrator its state is checkpointed every CHECKPOINT_SECONDS, so a batch
        killed midway resumes from its last checkpoint (bitwise the same as an uninterrupted run). The checkpoint is
        keyed by the batch's key (every option, the plan, the weights, the seed, the range): no other command resumes
        it."""
        nonlocal seconds, computed, skipped
        lo, hi = batch.lo, batch.hi
        start = time.perf_counter()
        ckpt = store.unit("sample_state", {"batch": unit.key, "lo": lo, "hi": hi})
        x, first = None, 0
        if single_step and store.has(ckpt):
            try:
                state = store.load(ckpt)
                x, first = torch.from_numpy(state["x"]).to(device), int(state["next_step"])
            except CorruptUnit as e:
                log.warning(f"{e}; sampling the batch from the start.")
        last = time.perf_counter()

        def checkpoint(d: dict) -> None:
            nonlocal last
            if single_step and d["i"] + 1 < len(plan.steps) and time.perf_counter() - last >= CHECKPOINT_SECONDS:
                store.save(ckpt, {"x": d["x"].detach().cpu(), "next_step": d["i"] + 1})
                last = time.perf_counter()

        x = sample(model, plan, cond[lo:hi], x=x, generator=None if x is not None else batch.generators(), start=first,
                   callback=checkpoint,
                   predict=one_at_a_time(model) if cfg.batch_invariant else None)
        images = decode(model, x, cfg.batch_invariant)
        store.discard(ckpt)
        seconds += time.perf_counter() - start
        computed += hi - lo
        skipped += (hi - lo) * sum(s.forwards for s in plan.steps[:first])  # done before the checkpoint
        return {"images": images, "seconds": time.perf_counter() - start}

    n_batches = -(-cfg.num // cfg.batch_size)
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"sampling {cfg.num} x {len(plan.steps)} steps", total=n_batches)
        for batch in seeded_batches(cfg.num, cfg.batch_size, cfg.seed):
            unit = store.unit("sample", {"lo": batch.lo, "hi": batch.hi}, forwards=len(batch) * plan.forwards)
            chunks.append(store.get_or_compute(unit, lambda _g, unit=unit, batch=batch: compute(unit, batch)))
            bar.advance(task)
    images = torch.from_numpy(np.concatenate([c["images"] for c in chunks]))
    grid_rows = min(10, cfg.num) if model.num_classes is None or len(set(labels.tolist())) == 1 else max(
        1, min(10, len(cfg.classes) or model.num_classes))
    arr = images.numpy().astype(np.float32)
    save_npz(out / "samples.npz", compressed=True, images=arr[:, 0] if arr.shape[1] == 1 else arr, labels=labels)
    save_png(image_grid(images, nrow=grid_rows), out / "grid.png", scale=max(1, 64 // images.shape[-1]))
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
            "model_evaluations_this_run": plan.forwards * computed - skipped,
            "flops_per_sample": flops,
            "wall_seconds": sum(float(c["seconds"]) for c in chunks),
            "wall_seconds_this_run": seconds,
            "samples_computed_this_run": computed,
        },
        "outputs": {"grid": "grid.png", "samples": "samples.npz (images in [0, 1], labels; -1 = unconditional)"},
    }
    atomic_write(out / "run.json", json.dumps(record, indent=2, default=str))
    if cfg.wandb:
        log_sample_run(record, out)
    return record


