"""The one sampling loop, driven by a per-step plan (k-diffusion style: the loop knows nothing of probes).

A :class:`Plan` names, for every step, which denoiser to call: conditional, unconditional or guided(w), with global
or local(r) attention. The integrator is a diffusers scheduler: DDIM or DPM-Solver++ for DDPM models, flow-matching
Euler for flow models. A callback receives each step's tensors so probes and loggers hang off it. The loop can start
at any step (``start``: forward-backward noises a clean image to step ``start``'s time and integrates from there, as
SDEdit / diffusers' img2img do), and ``predict`` can replace the denoiser call (probes batch rows of several radii).
Every probe and command samples through :func:`sample`; there is no second loop.

Switching denoisers inside a multistep solver (DPM-Solver++) is handled deliberately: the solver's history holds
x0-predictions of *earlier* denoisers, and extrapolating across a switch mixes two different vector fields.
``on_switch="reset"`` (default) clears the history at a switch, so the first step after it is first order;
``on_switch="keep"`` keeps diffusers' behaviour. Single-step integrators (DDIM, Euler) are unaffected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from . import outside
from .denoisers import Cond, Denoiser, is_guided
from .errors import UserError
from .options import SAMPLER_CHOICES, SAMPLERS  # noqa: F401  (SAMPLERS: re-exported)
from .store import stable_hash, unit_generator

Mode = Literal["cond", "uncond", "guided"]


@dataclass(frozen=True)
class Step:
    """One step's denoiser: ``mode`` x attention ``radius`` (None = global); ``guidance`` is used by 'guided';
    ``kind`` names the denoiser: ``network`` (the model) or an outside kind of :mod:`critsample.outside` (gaussian,
    local-linear, student), which takes the same mode, radius and guidance."""

    mode: Mode = "guided"
    radius: int | None = None
    guidance: float = 1.0
    kind: str = "network"

    def __post_init__(self):
        if self.mode == "guided" and not is_guided(self.guidance):  # w = 1 is the conditional step: one forward
            object.__setattr__(self, "mode", "cond")

    @classmethod
    def conditional(cls, guidance: float, radius: int | None = None) -> "Step":
        """The conditioned step of guidance scale w: guided(w), or plain conditional (one forward) when w = 1."""
        return cls("guided", radius, float(guidance))

    @property
    def forwards(self) -> int:
        """Network evaluations per sample of this step (guided = conditional + unconditional rows)."""
        return 2 if self.mode == "guided" else 1

    def label(self) -> str:
        mode = f"{self.mode}(w={self.guidance:g})" if self.mode == "guided" else self.mode
        if self.kind != "network":  # an outside denoiser has no attention; its radius, if any, is its window's
            return f"{self.kind}:{mode}" + ("" if self.radius is None else f"(r={self.radius})")
        return f"{mode}/{'global' if self.radius is None else f'local(r={self.radius})'}"

    def to_dict(self) -> dict:
        """The step's fields; ``kind`` only when it is not the network (plans written before kinds read the same)."""
        d = asdict(self)
        if self.kind == "network":
            d.pop("kind")
        return d


@dataclass
class Plan:
    """A list of steps (first = noisiest) and the integrator that runs them."""

    steps: list[Step]
    sampler: str = "auto"
    on_switch: Literal["reset", "keep"] = "reset"
    name: str = "custom"
    times: list[float] = field(default_factory=list)  # t of each step, filled when the plan is built for a model

    def __post_init__(self):
        if not self.steps:
            raise ValueError("A plan needs at least one step.")
        if self.sampler not in SAMPLER_CHOICES:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of {SAMPLER_CHOICES}.")
        for s in self.steps:
            if s.mode not in ("cond", "uncond", "guided"):
                raise ValueError(f"Unknown step mode {s.mode!r}; use cond, uncond or guided.")
        for s in self.steps:
            outside.check_kind(s.kind, "A plan step's kind")

    @classmethod
    def guided(cls, num_steps: int, guidance: float, radius: int | None = None, sampler: str = "auto") -> "Plan":
        """Classifier-free guidance with the same denoiser at every step (w = 1 is plain conditional)."""
        return cls([Step.conditional(guidance, radius)] * num_steps, sampler=sampler, name=f"guided(w={guidance:g})")

    @classmethod
    def from_rule(cls, denoiser: Denoiser, num_steps: int, rule: Callable[[float], Step], sampler: str = "auto",
                  name: str = "custom") -> "Plan":
        """A plan whose step at time t is ``rule(t)``, with t read off the integrator's own timesteps."""
        times = step_times(denoiser, num_steps, sampler)
        return cls([rule(t) for t in times], sampler=sampler, name=name, times=times)

    @property
    def forwards(self) -> int:
        return sum(s.forwards for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "sampler": self.sampler,
            "on_switch": self.on_switch,
            "steps": [s.to_dict() for s in self.steps],
            "times_t": self.times,
            "forwards_per_sample": self.forwards,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(
            [Step(**s) for s in d["steps"]], sampler=d.get("sampler", "auto"), on_switch=d.get("on_switch", "reset"),
            name=d.get("name", "custom"), times=list(d.get("times_t", [])),
        )

    def describe(self) -> str:
        """Runs of equal steps, e.g. ``steps 0-11 guided(w=4)/global; 12-49 uncond/local(r=1)``."""
        runs, start = [], 0
        for i in range(1, len(self.steps) + 1):
            if i == len(self.steps) or self.steps[i] != self.steps[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                if self.times:
                    span += f" (t {self.times[start]:.3f}..{self.times[i - 1]:.3f})"
                runs.append(f"{span} {self.steps[start].label()}")
                start = i
        return f"{self.name} [{self.sampler}]: " + "; ".join(runs)


def make_scheduler(denoiser: Denoiser, sampler: str = "auto"):
    """The diffusers integrator for ``sampler`` built from the model's own scheduler config."""
    config = dict(getattr(denoiser, "scheduler_config", {}) or {})
    flow = denoiser.schedule.kind == "flow"
    if sampler == "auto":
        sampler = "euler" if flow else "ddim"
    if flow != (sampler == "euler"):
        kind = "flow-matching" if flow else "DDPM"
        raise UserError(f"Sampler {sampler!r} does not fit the {kind} model {denoiser.name}; use "
                        f"{'euler' if flow else 'ddim or dpm'}.")
    if flow:
        return FlowMatchEulerDiscreteScheduler.from_config(config) if config else FlowMatchEulerDiscreteScheduler()
    s = denoiser.schedule
    base = dict(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                beta_schedule=s.beta_schedule)
    config = {**base, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    # The denoiser returns eps only; the learned-variance channels never reach the solver.
    return DPMSolverMultistepScheduler.from_config({**config, "variance_type": None, "algorithm_type": "dpmsolver++"})


def step_times(denoiser: Denoiser, num_steps: int, sampler: str = "auto") -> list[float]:
    """critsample time t of each step of ``sampler`` with ``num_steps`` steps."""
    sch = make_scheduler(denoiser, sampler)
    set_timesteps(denoiser, sch, num_steps)
    return [_time_of(denoiser, sch, i) for i in range(len(sch.timesteps))]


def check_steps(denoiser: Denoiser, num_steps: int, option: str = "--steps") -> None:
    """A DDPM model's integrator takes at most its training timesteps (``num_train_timesteps``, 1000 for DiT): more is
    one sentence naming ``option``, raised before any sampling (diffusers' schedulers raise a ValueError deep
    inside)."""
    if denoiser.schedule.kind == "flow":
        return
    top = int(denoiser.schedule.num_train_timesteps)
    if num_steps > top:
        raise UserError(f"{option} {num_steps} is more than the {top} training timesteps of {denoiser.name}; use at "
                        f"most {top}.")


def set_timesteps(denoiser: Denoiser, scheduler, num_steps: int, device=None, x: torch.Tensor | None = None) -> None:
    """``scheduler.set_timesteps`` as the model's own pipeline calls it. A model whose pipeline passes more than the
    step count (FLUX: its own sigmas and the resolution shift ``mu``) says so through ``denoiser.timestep_kwargs(
    num_steps, grid)``, ``grid`` being the (h, w) token grid of the state ``x`` sampled (default: the model's own)."""
    check_steps(denoiser, num_steps)
    extra = getattr(denoiser, "timestep_kwargs", None)
    kwargs = extra(num_steps, denoiser.token_grid if x is None else denoiser.grid(x)) if extra is not None else {}
    scheduler.set_timesteps(num_steps, device=device, **kwargs)


def _time_of(denoiser: Denoiser, scheduler, i: int) -> float:
    if denoiser.schedule.kind == "flow":
        return float(scheduler.sigmas[i])
    return float(scheduler.timesteps[i]) / denoiser.schedule.num_train_timesteps


def _reset_history(scheduler) -> None:
    if hasattr(scheduler, "model_outputs"):
        scheduler.model_outputs = [None] * len(scheduler.model_outputs)
        scheduler.lower_order_nums = 0


def sample_generator(seed: int, index: int, stream: str = "") -> torch.Generator:
    """The generator of sample ``index`` of a run seeded ``seed``, seeded from a hash of (seed, index) alone (edm2's
    per-sample generators): a sample never depends on the batch it is drawn in, and runs of different seeds never share
    noise. It lives on the CPU, so the noise is also the same on every device. ``stream`` names an independent draw of
    the same sample (detect: forward-backward's forward noise, a training trajectory's eps); "" is the initial noise."""
    if stream:
        return unit_generator(stable_hash({"seed": int(seed), "sample": int(index), "stream": stream}))
    return unit_generator(stable_hash({"seed": int(seed), "sample": int(index)}))


def sample_generators(seed: int, lo: int, hi: int, stream: str = "") -> list[torch.Generator]:
    """One :func:`sample_generator` per sample index in [lo, hi)."""
    return [sample_generator(seed, i, stream) for i in range(lo, hi)]


def noise(denoiser: Denoiser, generator: torch.Generator | list[torch.Generator] | None, batch: int | None = None,
          sampler: str = "auto") -> torch.Tensor:
    """Initial state (B, *sample_shape), float32 on the denoiser's device: diffusers' ``randn_tensor`` from one
    ``generator`` for ``batch`` rows, or from a list of generators, row i drawn alone from ``generator[i]``; scaled by
    the integrator's ``init_noise_sigma``."""
    device = next(denoiser.parameters(), torch.empty(0)).device
    batch = len(generator) if isinstance(generator, list) else batch
    x = randn_tensor((batch, *denoiser.sample_shape), generator=generator, device=device, dtype=torch.float32)
    # FlowMatchEuler has none (its sigma_max is 1)
    return x * getattr(make_scheduler(denoiser, sampler), "init_noise_sigma", 1.0)


StepCallback = Callable[[dict], None]
Predict = Callable[[torch.Tensor, float, Step, Cond], torch.Tensor]


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    plan: Plan,
    cond: Cond,
    *,
    x: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    start: int = 0,
    callback: StepCallback | None = None,
    predict: Predict | None = None,
) -> torch.Tensor:
    """Run ``plan`` from step ``start`` and return the final sample in the model's space, float32.

    ``cond`` holds one row per sample (class ids, NULL rows, or prompt embeddings). Without ``x`` the initial noise is
    drawn by :func:`noise` from ``generator`` (diffusers' ``randn_tensor``, as diffusers' pipelines draw it, so equal
    seeds give equal noise; a list gives one generator per row); with ``x`` the loop starts from that state, which must
    lie at the time of step ``start``. ``predict(x, t, step, cond)`` replaces ``denoiser.predict`` (it gets the rows of
    ``step.mode``: ``cond`` or their null rows). ``callback`` receives ``{"i", "t", "timestep", "x_in", "x",
    "prediction", "step"}`` after each step.
    """
    device = next(denoiser.parameters(), torch.empty(0)).device
    batch = len(cond)
    scheduler = make_scheduler(denoiser, plan.sampler)
    set_timesteps(denoiser, scheduler, len(plan.steps), device=device, x=x)
    if len(scheduler.timesteps) != len(plan.steps):
        raise ValueError(f"The integrator made {len(scheduler.timesteps)} steps for a plan of {len(plan.steps)}.")
    if not 0 <= start < len(plan.steps):
        raise ValueError(f"start must index a step of the plan (0..{len(plan.steps) - 1}); got {start}.")
    if x is None:
        if start:
            raise ValueError("Starting mid-way needs the state x at that step.")
        x = noise(denoiser, generator, batch, plan.sampler)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    null = None
    for i in range(start, len(plan.steps)):
        ts, step = scheduler.timesteps[i], plan.steps[i]
        if i > start and step != plan.steps[i - 1] and plan.on_switch == "reset":
            _reset_history(scheduler)
        t = _time_of(denoiser, scheduler, i)
        # not on FlowMatchEuler
        xin = scheduler.scale_model_input(x, ts) if hasattr(scheduler, "scale_model_input") else x
        if step.mode == "uncond":
            null = denoiser.null(cond) if null is None else null
            c = null
        else:
            c = cond
        if step.kind != "network":  # an outside kind: exact per row, so ``predict`` (batching) does not apply
            pred = outside.denoiser_for(denoiser, step.kind).predict(
                xin, t, c, radius=step.radius, guidance=step.guidance if step.mode == "guided" else None)
        elif predict is not None:
            pred = predict(xin, t, step, c)
        else:
            pred = denoiser.predict(xin, t, c, radius=step.radius,
                                    guidance=step.guidance if step.mode == "guided" else None)
        x_in, x = x, scheduler.step(pred, ts, x).prev_sample
        if callback is not None:
            callback({"i": i, "t": t, "timestep": ts, "x_in": x_in, "x": x, "prediction": pred, "step": step})
    return x
