"""Certified plans: the cheapest plan whose samples are as good as full guidance's, measured with the sampler itself.

Every plan (the baseline and each candidate) samples the same ``num`` rows: sample i has class ``i % K`` (text
models: prompt ``i % P`` of ``prompts``, :mod:`critsample.prompts`) and starts from the noise of ``(seed, i)``
(:mod:`critsample.seeded`), so the plans are compared on *paired* noise and their differences carry no noise-to-noise
variance.

Quality (the model's judge, :mod:`critsample.judges`: for digits models the bundled digits classifier and digits-FD,
for ImageNet DiTs ResNet-50 and Inception FD, for text models CLIP score and CLIP FD, or the user's):

* accuracy ``a``: fraction of samples classified as their class (the judge's score: CLIP score / 100 for text
  models); FD ``F``: Frechet distance of the judge's features to its reference set (a judge without one gets full
  guidance's samples on reference noise: :mod:`critsample.judges`);
* drop ``d = a_B - a_P`` (baseline B minus plan P, in fractions) and ratio ``rho = F_P / F_B``, each with a
  **paired bootstrap** one-sigma bar (:func:`~critsample.judges.paired`): one index set resamples the rows of B and P
  together, so the bar is that of the difference on shared noise;
* their one-sided 95 % **upper confidence bounds** ``d_U`` (exact, from the discordant pairs:
  :func:`~critsample.judges.drop_upper_bound`; continuous scores: paired-bootstrap percentile) and ``rho_U``
  (paired-bootstrap percentile, re-centered on the estimate);
* beside them, not certified on: each plan's paired fidelity to full guidance on the same noise (SSIM, PSNR:
  :func:`~critsample.judges.fidelity`), which needs no weights.

Certification rule (tolerance ``tau_a`` in accuracy points, default 1; ``tau_F`` relative, default 0.10): a plan is
**certified** when its upper bounds are within tolerance,

    d_U <= tau_a / 100    and    rho_U <= 1 + tau_F

so a plan whose point estimates pass but whose bounds do not (too few samples to tell) is not certified. The
**chosen** plan is the certified plan with the fewest analytic FLOPs per sample (:func:`~critsample.flops.plan_flops`;
forwards per sample when the model has no FLOPs model), ties broken by fewer forwards, then by the order of the
candidates. The baseline is the reference and certified by definition (d = 0, rho = 1 exactly), so a search in which
no candidate passes falls back to it. The bounds need samples: with no discordant pair at all d_U is about 4.8 / num
(0.48 points at num = 1000; 1 point needs num >= ~500 even for a plan identical to the baseline).

Two ways to search, the same choice: ``measure="all"`` samples every candidate (the whole cost-quality frontier);
``measure="cheapest"`` samples them in ascending cost and stops at the first certified one, which is the plan "all"
would choose (cost is known before sampling), for a fraction of the work. Either way the chosen plan won a selection
on these samples, which flatter it: :func:`confirm` measures it again against the baseline on a fresh seed (noise that
the search never saw, :mod:`critsample.seeded`), and ``critsample tune`` keeps the plan only when the fresh bounds
pass too (else full guidance, :mod:`critsample.tune`).

Candidates (:func:`search`): the guidance window G is the windowed-conditioning scan's (``windows.window_cond``),
else the combined symmetry-breaking window, else the critical window; the attention window A is the windowed-
locality scan's (``windows.window_locality``), else local forward-backward's (``forward_backward_local``), else the
combined nonlocality window (invalid windows are skipped). Around G the grid (:class:`Grid`) moves the center by
``shifts`` x its width and scales the width by ``scales`` (clipped to [0, 1]); at each window it proposes
limited-interval guidance and the adaptive plans for each outside mode and radius, the local modes once with A
(global attention kept on A outside G) and once without it, and each of these with every pair of step kinds
(``kinds``: ``network``, ``gaussian``, ``local-linear``, ``student``; :mod:`critsample.outside`) on the high-noise and
the low-noise side of G. Plans with the same steps are measured once; certification is the same for every kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from rich.progress import Progress

from . import judges, outside, plans
from . import prompts as prompt_lists
from . import summary as summary_io
from .denoisers import Cond, Denoiser
from .errors import UserError
from .flops import plan_flops
from .options import TimeWindow, is_global
from .outside import NETWORK, takes_radius
from .sampling import Plan
from .seeded import sample_images
from .store import Store


@dataclass(frozen=True)
class Tolerance:
    accuracy_points: float = 1.0  # largest accepted accuracy drop vs the baseline, in percentage points
    fd_relative: float = 0.10  # largest accepted relative FD excess over the baseline's

    def __post_init__(self):
        if not (math.isfinite(self.accuracy_points) and self.accuracy_points >= 0):
            raise UserError(f"The accuracy tolerance is in points >= 0 (1 = one point); got {self.accuracy_points}.")
        if not (math.isfinite(self.fd_relative) and self.fd_relative >= 0):
            raise UserError(f"The FD tolerance is a fraction >= 0 (0.1 = 10 %); got {self.fd_relative}.")

    def passes(self, drop: float, ratio: float) -> bool:
        return drop <= self.accuracy_points / 100 + 1e-12 and ratio <= 1 + self.fd_relative + 1e-12

    def certifies(self, quality: dict) -> bool:
        """The rule on a quality record of :func:`critsample.judges.quality`: its upper bounds within tolerance."""
        return self.passes(quality["accuracy_drop_upper"], quality["fd_ratio_upper"])


# searched when the summary suggests no radius (dit-digits: r = 1 lost 14-27 points where r = 2 held)
DEFAULT_RADII = (1, 2)


@dataclass(frozen=True)
class Grid:
    """The search around the guidance window: centers moved by ``shifts`` x width, widths scaled by ``scales``."""

    shifts: tuple[float, ...] = (-0.25, 0.0, 0.25)
    scales: tuple[float, ...] = (0.75, 1.0, 1.5)
    radii: tuple[int, ...] = ()  # empty: the summary's suggested radius (1 and 2 when it suggests none)
    outside: tuple[str, ...] = plans.OUTSIDE
    interval: bool = True  # also limited-interval guidance at every window
    # step kinds outside the window (critsample.outside), tried on each side: every (high-noise, low-noise) pair
    kinds: tuple[str, ...] = (NETWORK,)


# -- candidate windows --------------------------------------------------------------------------------------------


def _window(summary: dict, *names: str) -> tuple[TimeWindow, str] | None:
    """The first valid window among ``names`` (keys of ``summary["windows"]`` or top-level windows) and its name."""
    for name in names:
        w = TimeWindow.from_record((summary.get("windows") or {}).get(name) or summary.get(name))
        if w is not None:
            return w, name
    return None


def summary_windows(summary: dict) -> dict:
    """``{"guidance": ((t0, t1), source), "attention": ((t0, t1), source) or None}`` by the rule of the module
    docstring."""
    guidance = _window(summary, "window_cond", "symmetry_breaking_window", "critical_window")
    if guidance is None:
        raise UserError("The summary has no valid guidance window (window_cond, symmetry-breaking or critical window); "
                        "run `critsample detect` with the window_cond probe, or at a larger preset.")
    attention = _window(summary, "window_locality", "forward_backward_local", "nonlocality_window")
    return {"guidance": guidance, "attention": attention}


def grid_windows(window: tuple[float, float], grid: Grid) -> list[tuple[float, float]]:
    """The guidance windows of the search, in grid order, clipped to [0, 1], duplicates dropped."""
    t0, t1 = window
    c, w = (t0 + t1) / 2, t1 - t0
    out = []
    for scale in grid.scales:
        for shift in grid.shifts:
            a, b = max(0.0, c + shift * w - scale * w / 2), min(1.0, c + shift * w + scale * w / 2)
            a, b = round(a, 4), round(b, 4)
            if a < b and (a, b) not in out:
                out.append((a, b))
    return out


def search(model: Denoiser, summary: dict, steps: int, guidance: float, grid: Grid = Grid(),
           sampler: str = "auto") -> list[Plan]:
    """Candidate plans around the summary's windows (module docstring), distinct by their steps."""
    wins = summary_windows(summary)
    attention = wins["attention"][0] if wins["attention"] else None
    suggested = summary_io.suggested_radius(summary)
    local = tuple(r for r in DEFAULT_RADII if not is_global(r, model.token_grid)) or DEFAULT_RADII[:1]
    radii = grid.radii or ((suggested,) if suggested else local)
    pairs = [(hi, lo) for hi in grid.kinds for lo in grid.kinds]
    out = []
    for window in grid_windows(wins["guidance"][0], grid):
        if grid.interval:
            out.append(plans.interval_guidance(model, steps, guidance, window, sampler))
        for mode in grid.outside:
            for kinds in pairs:
                if mode == "global-uncond":
                    if not any(k != NETWORK and takes_radius(k) for k in kinds):
                        out.append(plans.adaptive(model, steps, guidance, window, None, mode, sampler, kinds=kinds))
                    continue
                for r in radii:
                    out.append(plans.adaptive(model, steps, guidance, window, r, mode, sampler, kinds=kinds))
                    if attention is not None:
                        out.append(plans.adaptive(model, steps, guidance, window, r, mode, sampler,
                                                  attention=attention, kinds=kinds))
    return distinct(out)


def distinct(candidates: list[Plan]) -> list[Plan]:
    """The plans with distinct steps (and sampler), first name kept."""
    seen, out = set(), []
    for p in candidates:
        key = (p.sampler, tuple(p.steps))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def kind(plan: Plan) -> str:
    """``full`` (guided global every step), ``interval`` (guided or conditional, global attention: limited-interval
    guidance), or ``adaptive`` (anything with unconditional, local or outside-kind steps), read from the steps."""
    network = all(s.kind == NETWORK for s in plan.steps)
    if network and all(s.mode == "guided" and s.radius is None for s in plan.steps):
        return "full"
    if network and all(s.mode in ("guided", "cond") and s.radius is None for s in plan.steps):
        return "interval"
    return "adaptive"


def outside_kinds(plan: Plan) -> str:
    """The step kinds of a plan's outside steps, high-noise side first (``network``, ``gaussian/local-linear``, ...):
    the frontier figure's groups."""
    guided = [i for i, s in enumerate(plan.steps) if s.mode == "guided"]
    if not guided:
        return NETWORK
    hi = {s.kind for s in plan.steps[: guided[0]]} or {NETWORK}
    lo = {s.kind for s in plan.steps[guided[-1] + 1:]} or {NETWORK}
    side = ["+".join(sorted(k)) for k in (hi, lo)]
    return side[0] if side[0] == side[1] else "/".join(side)


# -- measurement --------------------------------------------------------------------------------------------------


def conditioning(model: Denoiser, num: int, prompts: list[str] | None = None) -> tuple[Cond, list, torch.Tensor]:
    """The rows of the paired design: (conditioning, the judge's targets, row index). Class models: sample i has class
    ``i % K`` (targets: the class ids); text models: prompt ``i % P`` of ``prompts`` (default: the bundled list), each
    prompt encoded once (targets: the prompt strings, index: i % P)."""
    targets, index, prompts = _rows(model, num, prompts)
    return (model.encode_prompt(prompts)[index] if prompts is not None else index), targets, index


def _rows(model: Denoiser, num: int, prompts: list[str] | None) -> tuple[list | torch.Tensor, torch.Tensor,
                                                                        list | None]:
    """(targets, row index, the prompt list or None) of :func:`conditioning`, without encoding anything."""
    if model.num_classes is None:
        prompts = list(prompts) if prompts else prompt_lists.read()
        index = torch.arange(num) % len(prompts)
        return [prompts[i] for i in index.tolist()], index, prompts
    if prompts:
        raise UserError(f"{model.name} is class-conditional: --prompts applies to text models only.")
    labels = torch.arange(num) % model.num_classes
    return labels, labels, None


@torch.no_grad()
def paired_samples(model: Denoiser, plan: Plan, num: int, seed: int = 0, batch_size: int = 256, on_batch=None, *,
                   prompts: list[str] | None = None, stream: str = "") -> dict:
    """``num`` images of ``plan`` (sample i: class i % K or prompt i % P, noise from (seed, i):
    :mod:`critsample.seeded`; ``stream``: an independent draw of that noise) and the seconds taken. ``labels`` are the
    class ids, or the prompt indices of text models. ``on_batch(n)`` runs after each batch of n samples (progress)."""
    cond, _, labels = conditioning(model, num, prompts)
    out = sample_images(model, plan, cond, seed, batch_size, stream=stream,
                        on_batch=None if on_batch is None else lambda b: on_batch(len(b)))
    return {"images": out.images, "labels": labels, "seconds": out.seconds}


REFERENCE_STREAM = "fd-reference"  # the noise of full guidance's FD reference samples (judges without a data set)


@dataclass
class Certification:
    """The chosen plan, the baseline and every candidate, each with quality (one-sigma bars) and cost."""

    chosen: dict  # the entry of the chosen plan (a candidate's or the baseline's)
    baseline: dict
    candidates: list[dict]
    tolerance: Tolerance
    setup: dict = field(default_factory=dict)  # model id, samples, seed, steps, bootstrap resamples

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.chosen["plan"])

    def to_dict(self) -> dict:
        tol = {**asdict(self.tolerance),
               "rule": "one-sided 95 % upper bounds: score drop (exact from the discordant pairs for 0 / 1 scores, "
               "re-centered paired-bootstrap percentile for continuous ones) <= accuracy_points / 100 "
               "and FD / FD_baseline (re-centered paired-bootstrap percentile) <= 1 + fd_relative; cheapest certified "
               "plan by analytic FLOPs (forwards when none)"}
        judge = self.setup.get("judge") or {}
        criteria = {"score": judge.get("score", "accuracy"),
                    "drop": "accuracy_drop_upper <= accuracy_points / 100 (one-sided 95 % bound of the judge's score "
                            "drop vs full guidance, paired)",
                    "fd": f"fd_ratio_upper <= 1 + fd_relative (FD on {judge.get('fd_features', 'features')})",
                    "reported": "fidelity: SSIM and PSNR to full guidance on the same noise (not certified on)"}
        return {"plan": self.chosen["plan"], "name": self.chosen["name"], "quality": self.chosen["quality"],
                "fidelity": self.chosen.get("fidelity"), "cost": self.chosen["cost"], "judge": judge,
                "criteria": criteria, "tolerance": tol, "baseline": self.baseline, "candidates": self.candidates,
                "setup": self.setup}


def _pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Points (cost, goodness) not dominated: no other point as cheap and as good, and better in one."""
    return [not any(c2 <= c and g2 >= g and (c2 < c or g2 > g) for c2, g2 in points) for c, g in points]


def certify(
    model: Denoiser,
    baseline: Plan,
    candidates: list[Plan],
    *,
    num: int = 1000,
    seed: int = 0,
    tolerance: Tolerance = Tolerance(),
    n_boot: int = 200,
    store: Store | None = None,
    batch_size: int = 256,
    measure: str = "all",
    on_plan=None,
    progress: bool = False,
    judge=None,
    prompts: list[str] | None = None,
) -> Certification:
    """Measure the baseline and the candidates on paired noise and choose by the rule of the module docstring.

    ``measure``: ``all`` samples every candidate; ``cheapest`` samples them in ascending cost and stops at the first
    certified one (the same choice; ``Certification.candidates`` then holds only the measured ones).
    ``store``: each plan's samples are a unit (``certify`` / {plan, num, batch_size}; the store's key adds the model
    and seed), so a rerun samples nothing. ``on_plan(plan, computed)`` runs after each plan; ``progress`` draws a
    bar. ``judge``: default :func:`critsample.judges.for_model`; one without an FD reference gets full guidance's
    samples on the noise stream :data:`REFERENCE_STREAM` of ``seed`` (kept on the judge: a later call reuses them).
    ``prompts`` (text models): the prompt list, default the bundled one."""
    judge = judge if judge is not None else judges.for_model(model)
    if num < 2:
        raise UserError(f"Certification needs at least 2 samples per plan; got {num}.")
    if measure not in ("all", "cheapest"):
        raise UserError("measure is 'all' (every candidate) or 'cheapest' (ascending cost, stop at the first "
                        f"certified); got {measure!r}.")
    targets, _, prompts = _rows(model, num, prompts)
    needs_reference = getattr(judge, "reference", True) is None
    grid = model.grid(torch.empty(1, *model.sample_shape))
    others = [p for p in distinct(candidates) if (p.sampler, tuple(p.steps)) != (baseline.sampler,
                                                                                 tuple(baseline.steps))]
    costs = [_cost(model, p, grid) for p in [baseline] + others]
    # candidates, cheapest first
    order = sorted(range(1, len(costs)), key=lambda i: (_price(costs[i]), costs[i]["forwards"], i))

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"certifying {len(others)} plans + full guidance, {num} samples each",
                            total=num * (1 + len(others) + needs_reference))

        def measured(plan: Plan, stream: str = "") -> tuple[dict, bool]:
            def compute(_g=None):
                return paired_samples(model, plan, num, seed, batch_size, on_batch=lambda n: bar.advance(task, n),
                                      prompts=prompts, stream=stream)

            if store is None:
                return compute(), True
            key = {"plan": plan.to_dict(), "num": num, "batch_size": batch_size}
            if prompts is not None:
                key["prompts"] = prompts
            if stream:
                key["stream"] = stream
            ident = outside.identity(model, plan)  # the outside denoisers' statistics or weights
            if ident:
                key["outside"] = ident
            unit = store.unit("certify", key, forwards=num * plan.forwards)
            before = store.computed
            out = {k: torch.as_tensor(v) for k, v in store.get_or_compute(unit, compute).items()}
            if store.computed == before:
                bar.advance(task, num)
            return out, store.computed > before

        def entry(plan: Plan, cost: dict, base: dict | None) -> dict:
            out, computed = measured(plan)
            scores = judge.score(out["images"], targets)
            cost = {**cost, "seconds_per_sample": float(out["seconds"]) / num}
            if on_plan is not None:
                on_plan(plan, computed)
            q = judges.quality(judge, scores, scores if base is None else base["scores"], n_boot, seed)
            if base is not None:
                bc = base["entry"]["cost"]
                cost["flops_ratio"] = cost["flops"] / bc["flops"] if math.isfinite(bc["flops"]) else float("nan")
                cost["forwards_ratio"] = cost["forwards"] / bc["forwards"]
                cost["speedup_seconds"] = bc["seconds_per_sample"] / cost["seconds_per_sample"]
            else:
                cost.update(flops_ratio=1.0 if math.isfinite(cost["flops"]) else float("nan"), forwards_ratio=1.0,
                            speedup_seconds=1.0)
            e = {"name": plan.name, "kind": kind(plan), "outside_kinds": outside_kinds(plan), "plan": plan.to_dict(),
                 "description": plan.describe(),
                 "quality": q,
                 "fidelity": judges.fidelity(out["images"] if base is None else base["images"], out["images"]),
                 "cost": cost, "certified": base is None or tolerance.certifies(q)}
            return {"entry": e, "scores": scores, "images": out["images"]}

        if needs_reference:
            ref, _ = measured(baseline, REFERENCE_STREAM)
            features = judge.score(ref["images"], targets).features
            if hasattr(judge, "set_reference"):
                judge.set_reference(features)
            else:
                raise UserError(f"The judge {judges.describe(judge)['name']} has reference None but no "
                                "set_reference(features) method to receive full guidance's samples.")
        base = entry(baseline, costs[0], None)
        measured_ids, entries = [], {}
        for i in order:
            entries[i] = entry(others[i - 1], costs[i], base)["entry"]
            measured_ids.append(i)
            if measure == "cheapest" and entries[i]["certified"]:
                break
    listed = [base["entry"]] + [entries[i] for i in sorted(measured_ids)]  # candidates in the caller's order
    for key, good in (("pareto_accuracy", lambda e: e["quality"]["accuracy"]),
                      ("pareto_fd", lambda e: -e["quality"]["fd"])):
        for e, on in zip(listed, _pareto([(_price(e["cost"]), good(e)) for e in listed]), strict=True):
            e[key] = on
    chosen = next((entries[i] for i in order if i in entries and entries[i]["certified"]), base["entry"])
    for e in listed:
        e["chosen"] = e is chosen
    setup = {"num_samples": num, "seed": seed, "steps": len(baseline.steps), "n_boot": n_boot, "measure": measure,
             "candidates_proposed": len(others), "candidates_measured": len(measured_ids),
             "model": model.name, "model_id": store.model_id if store is not None else None,
             "judge": judges.describe(judge), "prompts": prompts,
             "fd_reference": (f"full guidance, {num} samples on noise stream {REFERENCE_STREAM!r} of seed {seed}"
                              if needs_reference else "the judge's own"),
             "noise": f"sample i: {'class i % K' if prompts is None else 'prompt i % P'}, noise from "
                      "critsample.sampling.sample_generator(seed, i), the same for every plan"}
    return Certification(chosen, listed[0], listed[1:], tolerance, setup)


def confirm(model: Denoiser, certification: Certification, seed: int, *, num: int | None = None, n_boot: int = 200,
            store: Store | None = None, batch_size: int = 256, progress: bool = False, on_plan=None, judge=None,
            prompts: list[str] | None = None) -> dict:
    """The chosen plan measured again against the baseline on the fresh ``seed`` (which must differ from the search's:
    seeds never share noise), by the same rule: ``{"seed", "num_samples", "quality"`` (the chosen plan's, paired
    against the fresh baseline), ``"baseline_quality", "cost", "passed"}``. A chosen baseline is measured alone and
    passes by definition. ``store`` must be keyed by ``seed``; ``judge`` and ``prompts`` as the search's (pass the
    search's judge: its FD reference is kept)."""
    setup = certification.setup
    if seed == setup.get("seed"):
        raise UserError(f"The confirmation seed must differ from the search's ({seed}): the search's noise "
                        "flatters the plan it chose.")
    num = num or setup["num_samples"]
    baseline = Plan.from_dict(certification.baseline["plan"])
    chosen_is_base = certification.chosen is certification.baseline
    fresh = certify(model, baseline, [] if chosen_is_base else [certification.plan], num=num, seed=seed,
                    tolerance=certification.tolerance, n_boot=n_boot, store=store, batch_size=batch_size,
                    on_plan=on_plan, progress=progress, judge=judge, prompts=prompts)
    entry = fresh.baseline if chosen_is_base else fresh.candidates[0]
    return {"seed": seed, "num_samples": num, "quality": entry["quality"], "fidelity": entry["fidelity"],
            "cost": entry["cost"],
            "baseline_quality": fresh.baseline["quality"], "passed": bool(entry["certified"])}


def _cost(model: Denoiser, plan: Plan, grid) -> dict:
    flops = plan_flops(model, plan, grid)
    return {"forwards": plan.forwards, "flops": flops["total"], "flops_detail": flops}


def _price(cost: dict) -> float:
    """What the rule minimizes: analytic FLOPs per sample, forwards when the model has no FLOPs model."""
    return cost["flops"] if math.isfinite(cost["flops"]) else float(cost["forwards"])
