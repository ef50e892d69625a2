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

from . import outside, plans
from . import summary as summary_io
from .attention import check_radius
from .certify import Certification, Grid, Tolerance, certify, confirm, search, summary_windows
from .errors import UserError
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
    """Registry name or local folder of a class model trained on a judged dataset (dit-digits, dit-fashion: quality is
    judged with the dataset's bundled classifier, critsample.judges.for_model)."""
    num: int = 1000
    """Samples per plan (the same classes and noise for every plan); the bars shrink as 1 / sqrt(num)."""
    steps: int = 50
    """Integrator steps of every plan (``critsample sample --steps`` must match to use the certified plan)."""
    seed: int = 0
    """Seed of the paired noise: sample i of every plan starts from a hash of (seed, i)."""
    fresh_seed: int | None = None
    """Seed of the confirmation on fresh noise (default seed + 1; must differ from seed)."""
    accuracy_tolerance: float = 1.0
    """Largest accepted drop of class accuracy vs full guidance, in percentage points."""
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
        if self.fresh_seed is not None and (isinstance(self.fresh_seed, bool) or not isinstance(self.fresh_seed, int)
                                            or self.fresh_seed == self.seed):
            raise UserError(f"--fresh_seed must be an integer other than --seed ({self.seed}); got "
                            f"{self.fresh_seed!r}.")


def run(cfg: TuneConfig, model=None, *, device: torch.device | str | None = None, on_plan=None,
        progress: bool = False) -> dict:
    """Certify as configured; returns ``frontier.json``'s record (also written, with the figure and the summary's
    plan)."""
    cfg.validate()  # a config may be changed after construction
    out = check_writable(cfg.out)
    model = model if model is not None else load(cfg.model, device=device or "cpu",
                                                 trust_pickled_weights=cfg.trust_pickled_weights)
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
    store = Store(out / ".units", model_fingerprint(model, model.name), cfg.seed)
    result: Certification = certify(model, baseline, candidates, num=cfg.num, seed=cfg.seed, n_boot=cfg.n_boot,
                                    store=store,
                                    tolerance=Tolerance(cfg.accuracy_tolerance, cfg.fd_tolerance),
                                    batch_size=cfg.batch_size, measure=cfg.measure,
                                    on_plan=on_plan, progress=progress)
    fresh_seed = cfg.seed + 1 if cfg.fresh_seed is None else cfg.fresh_seed
    fresh_store = Store(out / ".units", model_fingerprint(model, model.name), fresh_seed)
    confirmation = confirm(model, result, fresh_seed, n_boot=cfg.n_boot, store=fresh_store,
                           batch_size=cfg.batch_size, on_plan=on_plan, progress=progress)
    record = confirmed(result, confirmation)
    windows = {k: v and {"t": list(v[0]), "source": v[1]} for k, v in summary_windows(summary).items()}
    record["setup"].update(guidance=w, sampler=cfg.sampler, windows=windows,
                           grid={"shifts": cfg.shifts, "scales": cfg.scales, "radii": cfg.radii, "outside": cfg.outside,
                                 "interval": cfg.interval, "kinds": cfg.kinds, "data": cfg.data,
                                 "measure": cfg.measure},
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
                  confirmation={**confirmation, "candidate": result.chosen["name"], "decision": decision})
    if not passed:
        base = result.baseline
        record.update(plan=base["plan"], name=base["name"], cost=base["cost"], in_sample=base["quality"],
                      quality=confirmation["baseline_quality"])
    return record
