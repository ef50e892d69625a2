"""Certifying a plan to disk: the library behind ``critsample tune`` (``commands/tune.py`` parses argv and prints).

Reads a ``summary.json`` of ``critsample detect``, searches plans around its windows
(:func:`critsample.certify.search`), measures them against full guidance on paired noise
(:func:`critsample.certify.certify`) and writes to ``--out``:
``frontier.json`` (every plan with its cost and quality, the chosen one and the rule), ``frontier.png`` (cost vs
accuracy and cost vs FD, :func:`critsample.report.plot_frontier`), and the chosen plan into the summary as its top-level
``plan`` object (:func:`critsample.summary.write_plan`), which ``critsample sample --adaptive --summary`` then uses.

Confirmation on fresh noise: the search's winner is flattered by the samples that chose it, so the chosen plan and full
guidance are sampled again on ``--fresh_seed`` (default ``seed + 1``; seeds never share noise,
:mod:`critsample.seeded`) and judged by the same rule (:func:`critsample.certify.confirm`). The record's ``quality`` is
that fresh measurement with its bounds; the search's numbers stay beside it as ``in_sample``. When the fresh bounds
fail the tolerance the plan is **not** certified (``certified: false``) and full guidance is written as the plan
(``confirmation.decision``): trying the next-cheapest candidate on the same fresh seed would make that seed a
selection set too, and its numbers would flatter again; rerun with more samples (``--num``) instead.

Resuming: each plan's samples are one unit of a :class:`~critsample.store.Store` under ``out/.units``, keyed by the
plan, the number of samples, the seed and a fingerprint of the model's weights; a rerun with the same options samples
nothing (the metrics, seconds of CPU, are computed again from the stored samples).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import judges, outside, plans
from . import prompts as prompt_lists
from . import summary as summary_io
from .attention import check_radius
from .certify import Certification, Grid, Tolerance, certify, confirm, distinct, search, summary_windows
from .errors import UserError
from .flops import plan_flops
from .models import load
from .options import GuidanceOptions, ModelOptions, OutputOptions, SeedOptions, StepsOptions, validate_sections
from .report import plot_frontier
from .store import Store, atomic_write, check_writable, model_fingerprint


@dataclass(kw_only=True)
class TuneConfig(OutputOptions, StepsOptions, GuidanceOptions, SeedOptions, ModelOptions):
    """Options of ``critsample tune`` (the shared sections: :mod:`critsample.options`)."""

    summary: str
    """summary.json of ``critsample detect`` (or its folder): the windows the search starts from; the certified plan is
    written into it."""
    model: str = "dit-digits"
    """Registry name or local folder of any family (dit-digits, dit-xl, sd3-medium, pixart-sigma, flux-dev, ...)."""
    judge: str = "auto"
    """Quality judge (critsample.judges): auto (the model's: digits / fashion-mnist for the bundled models, imagenet =
    ResNet-50 accuracy + Inception FD for 1000-class DiTs, clip = CLIP score + CLIP FD for text models), one of those
    names, or module.path:factory for your own."""
    judge_weights: str | None = None
    """Local folder of the judge's network instead of the Hugging Face cache (imagenet: a transformers image
    classifier folder; clip: a CLIPModel folder with its tokenizer and preprocessor_config.json)."""
    prompts: str | None = None
    """Text models: a file with one prompt per line (default: the bundled critsample/assets/prompts.txt); sample i
    has prompt i % P and the noise of (seed, i) under every plan."""
    dry_run: bool = False
    """Print the plans, network forwards and analytic FLOPs the run would spend, and stop (no judge, no sampling)."""
    num: int = 1000
    """Samples per plan (the same classes and noise for every plan); the bars shrink as 1 / sqrt(num)."""
    steps: int = 50
    """Integrator steps of every plan (``critsample sample --steps`` must match to use the certified plan)."""
    seed: int = 0
    """Seed of the paired noise: sample i of every plan starts from a hash of (seed, i)."""
    fresh_seed: int | None = None
    """Seed of the confirmation on fresh noise (default seed + 1; must differ from seed)."""
    accuracy_tolerance: float = 1.0
    """Largest accepted drop of the judge's score vs full guidance, in points (class accuracy: percentage points; CLIP
    score: torchmetrics' CLIP-score points, 100 x cosine)."""
    fd_tolerance: float = 0.10
    """Largest accepted relative excess of FD over full guidance's (0.1 = 10 %)."""
    shifts: list[float] = field(default_factory=lambda: [-0.25, 0.0, 0.25])
    """Moves of the guidance window's center, in units of its width."""
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.5])
    """Factors on the guidance window's width."""
    radii: list[int] = field(default_factory=list)
    """Local radii outside the window (empty: the summary's suggested radius, 1 and 2 when it suggests none)."""
    outside: list[str] = field(default_factory=lambda: list(plans.OUTSIDE))
    """Outside modes searched: local-uncond, local-cond, global-uncond."""
    interval: bool = True
    """Also measure limited-interval guidance at every window of the search."""
    kinds: list[str] = field(default_factory=lambda: ["network"])
    """Step kinds tried outside the window, every pair on the (high-noise, low-noise) sides: network (the model with
    its attention window), gaussian, local-linear, student (critsample.outside)."""
    data: str | None = None
    """Data the gaussian and local-linear kinds are fitted on (default: the model's bundled training data)."""
    measure: str = "all"
    """all: sample every candidate (the whole frontier); cheapest: sample in ascending cost and stop at the first
    certified plan (the same choice, a fraction of the work, a partial frontier)."""
    n_boot: int = 200
    """Bootstrap resamples of the error bars."""
    batch_size: int = 256
    """Samples per network batch."""
    out: str = "out/tune"
    """Output folder (frontier.json, frontier.png, .units/ of stored samples)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks that need no model (one sentence each)."""
        validate_sections(self)
        for name in ("num", "n_boot", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name in ("num", "n_boot") else 1):
                raise UserError(f"--{name} must be an integer >= {2 if name in ('num', 'n_boot') else 1}; got {v!r}.")
        bad = [m for m in self.outside if m not in plans.OUTSIDE]
        if bad or not (self.outside or self.interval):
            raise UserError(f"--outside takes modes among {', '.join(plans.OUTSIDE)} (or none with --interval); got "
                            f"{self.outside!r}.")
        if not self.shifts or not self.scales or any(s <= 0 for s in self.scales):
            raise UserError(f"--shifts needs at least one value and --scales positive values; got {self.shifts!r}, "
                            f"{self.scales!r}.")
        if not all(math.isfinite(v) for v in (*self.shifts, *self.scales)):
            raise UserError(f"--shifts and --scales take finite numbers; got {self.shifts!r}, {self.scales!r}.")
        if not self.kinds:
            raise UserError("--kinds needs at least one step kind (network: the model itself).")
        for k in self.kinds:
            outside.check_kind(k)
        for r in self.radii:
            check_radius(r, (0, 0))  # an integer >= 0; the model's token grid bounds it once loaded
        if self.measure not in ("all", "cheapest"):
            raise UserError(f"--measure is all or cheapest; got {self.measure!r}.")
        Tolerance(self.accuracy_tolerance, self.fd_tolerance)
        if not isinstance(self.judge, str) or not self.judge or (":" not in self.judge
                                                                 and self.judge not in judges.NAMES):
            raise UserError(f"--judge is one of {', '.join(judges.NAMES)} or module.path:factory; got {self.judge!r}.")
        if self.judge_weights is not None and not Path(self.judge_weights).is_dir():
            raise UserError(f"--judge_weights {self.judge_weights} is not a folder; give the local folder of the "
                            "judge's network.")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise UserError(f"--prompts {self.prompts} is not a file; give a file with one prompt per line.")
        if self.fresh_seed is not None and (isinstance(self.fresh_seed, bool) or not isinstance(self.fresh_seed, int)
                                            or self.fresh_seed == self.seed):
            raise UserError(f"--fresh_seed must be an integer other than --seed ({self.seed}); got "
                            f"{self.fresh_seed!r}.")


def _setup(cfg: TuneConfig, model):
    """The summary, guidance, baseline and candidates of a run (the dry run stops here)."""
    summary = summary_io.read(cfg.summary, model.name, require_window=False)
    w = cfg.guidance if cfg.guidance is not None else model.default_guidance
    outside.use_data(model, cfg.data)
    grid = Grid(tuple(cfg.shifts), tuple(cfg.scales), tuple(cfg.radii), tuple(cfg.outside), cfg.interval,
                tuple(cfg.kinds))
    candidates = search(model, summary, cfg.steps, w, grid, cfg.sampler)
    baseline = plans.full_guidance(model, cfg.steps, w, cfg.sampler)
    if all((p.sampler, tuple(p.steps)) == (baseline.sampler, tuple(baseline.steps)) for p in candidates):
        window = summary_windows(summary)["guidance"][0]
        raise UserError(f"--shifts {cfg.shifts} and --scales {cfg.scales} leave no plan to certify around the guidance "
                        f"window {window} (every window moves outside [0, 1] or covers it whole, i.e. full guidance); "
                        "use shifts within +-1 and smaller scales.")
    return summary, w, baseline, distinct([p for p in candidates if (p.sampler, tuple(p.steps))
                                           != (baseline.sampler, tuple(baseline.steps))])


def dry_run(cfg: TuneConfig, model=None, *, device: torch.device | str | None = None) -> dict:
    """What ``run`` would spend, without a judge or a sample: the plans and the network forwards (``forwards``; the
    evaluations of outside kinds apart, ``outside_steps``) and analytic FLOPs of
    the search (``measure=all``: every candidate; ``cheapest``: at most that), the FD reference (full guidance once
    more when the judge has no reference data: imagenet, clip; counted for a module:factory judge) and the fresh-seed
    confirmation (full guidance and the
    chosen plan: at most the dearest candidate). FLOPs are NaN for a model without a FLOPs model (the oracles)."""
    cfg.validate()
    model = model if model is not None else load(cfg.model, device=device or "cpu",
                                                 trust_pickled_weights=cfg.trust_pickled_weights)
    _, w, baseline, candidates = _setup(cfg, model)
    grid = model.grid(torch.empty(1, *model.sample_shape))
    cost = {p.name: plan_flops(model, p, grid) for p in [baseline, *candidates]}
    judge = judges.default_judge(model) if cfg.judge == "auto" else cfg.judge
    reference = judge not in judges.JUDGES  # imagenet, clip; a module:factory judge counted with one (upper bound)
    n, base = cfg.num, cost[baseline.name]
    dearest = max(cost[p.name]["total"] for p in candidates)
    # network forwards and outside-kind evaluations (critsample.outside) per sample, counted apart
    net = {p.name: sum(s.forwards for s in p.steps if s.kind == outside.NETWORK) for p in [baseline, *candidates]}
    out = {p.name: p.forwards - net[p.name] for p in [baseline, *candidates]}

    def spent(per: dict) -> int:  # search of every plan, the FD reference, the confirmation (dearest candidate)
        dear = max(per[p.name] for p in candidates)
        b = per[baseline.name]
        return n * (b + sum(per[p.name] for p in candidates)) + reference * n * b + n * (b + dear)

    search_fl = n * (base["total"] + sum(cost[p.name]["total"] for p in candidates))
    fl = search_fl + reference * n * base["total"] + n * (base["total"] + dearest)
    return {"model": model.name, "judge": judge, "num": n, "steps": cfg.steps, "guidance": w,
            "plans": 1 + len(candidates), "fd_reference_samples": reference * n,
            "forwards_per_sample": net, "outside_steps_per_sample": out,
            "flops_per_sample": {p.name: cost[p.name]["total"] for p in [baseline, *candidates]},
            "forwards": spent(net), "outside_steps": spent(out), "flops": fl, "measure": cfg.measure,
            "note": ("upper bound: cheapest stops at the first certified plan" if cfg.measure == "cheapest" else
                     "search of every candidate, FD reference, confirmation (dearest candidate counted)")}


def run(cfg: TuneConfig, model=None, *, device: torch.device | str | None = None, on_plan=None,
        progress: bool = False, judge=None) -> dict:
    """Certify as configured; returns ``frontier.json``'s record (also written, with the figure and the summary's
    plan). ``judge``: a judge object instead of ``cfg.judge``."""
    cfg.validate()  # a config may be changed after construction
    out = check_writable(cfg.out)
    model = model if model is not None else load(cfg.model, device=device or "cpu",
                                                 trust_pickled_weights=cfg.trust_pickled_weights)
    summary, w, baseline, candidates = _setup(cfg, model)
    if cfg.prompts is not None and model.num_classes is not None:
        raise UserError(f"--prompts applies to text models; {model.name} is class-conditional.")
    prompts = prompt_lists.read(cfg.prompts) if model.num_classes is None else None
    judge = judge if judge is not None else judges.for_model(model, cfg.judge, cfg.judge_weights)
    store = Store(out / ".units", model_fingerprint(model, model.name), cfg.seed)
    result: Certification = certify(model, baseline, candidates, num=cfg.num, seed=cfg.seed, n_boot=cfg.n_boot,
                                    store=store,
                                    tolerance=Tolerance(cfg.accuracy_tolerance, cfg.fd_tolerance),
                                    batch_size=cfg.batch_size, measure=cfg.measure,
                                    on_plan=on_plan, progress=progress, judge=judge, prompts=prompts)
    fresh_seed = cfg.seed + 1 if cfg.fresh_seed is None else cfg.fresh_seed
    fresh_store = Store(out / ".units", model_fingerprint(model, model.name), fresh_seed)
    confirmation = confirm(model, result, fresh_seed, n_boot=cfg.n_boot, store=fresh_store,
                           batch_size=cfg.batch_size, on_plan=on_plan, progress=progress, judge=judge,
                           prompts=prompts)
    record = confirmed(result, confirmation)
    windows = {k: v and {"t": list(v[0]), "source": v[1]} for k, v in summary_windows(summary).items()}
    record["setup"].update(guidance=w, sampler=cfg.sampler, windows=windows,
                           grid={"shifts": cfg.shifts, "scales": cfg.scales, "radii": cfg.radii, "outside": cfg.outside,
                                 "interval": cfg.interval, "kinds": cfg.kinds, "data": cfg.data,
                                 "measure": cfg.measure},
                           prompts_file=cfg.prompts if prompts is not None and cfg.prompts else
                           (str(prompt_lists.DEFAULT.name) if prompts is not None else None),
                           units_computed_this_run=store.computed, units_loaded=store.loaded,
                           confirmation_units_computed=fresh_store.computed,
                           confirmation_units_loaded=fresh_store.loaded)
    atomic_write(out / "frontier.json", json.dumps(summary_io.jsonable(record), indent=1))
    plot_frontier(summary_io.jsonable(record), out / "frontier.png")
    summary_path = Path(cfg.summary)
    summary_io.write_plan(summary_path,
                          {**{k: v for k, v in record.items() if k != "candidates"},
                           "frontier": str(out / "frontier.json")})
    return record


def confirmed(result: Certification, confirmation: dict) -> dict:
    """The record of a search and its fresh confirmation (module docstring): ``quality`` fresh with its bounds,
    ``in_sample`` the search's; the chosen plan when it passed again, else full guidance with ``certified: false``."""
    record = result.to_dict()
    chosen_is_base = result.chosen is result.baseline
    passed = confirmation["passed"]
    decision = ("full guidance chosen in the search (no candidate certified); measured again on fresh noise"
                if chosen_is_base else "kept: the fresh bounds are within tolerance" if passed else
                "full guidance kept: the chosen plan's fresh bounds exceed the tolerance")
    record.update(in_sample=record["quality"], quality=confirmation["quality"], certified=bool(passed),
                  fidelity=confirmation.get("fidelity"), in_sample_fidelity=record.get("fidelity"),
                  confirmation={**confirmation, "candidate": result.chosen["name"], "decision": decision})
    if not passed:
        base = result.baseline
        record.update(plan=base["plan"], name=base["name"], cost=base["cost"], in_sample=base["quality"],
                      quality=confirmation["baseline_quality"], fidelity=base.get("fidelity"),
                      in_sample_fidelity=base.get("fidelity"))
    return record
