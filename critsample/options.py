"""The option sections every command shares, declared and validated once (no torch, no model: instant to check).

``critsample sample`` (:class:`~critsample.generate.SampleConfig`), ``tune`` (:class:`~critsample.tune.TuneConfig`) and
``detect`` (:class:`~critsample.detect.DetectConfig`) are dataclasses that inherit the sections they take:

* :class:`ModelOptions`: ``--model``, ``--device``, ``--trust_pickled_weights`` (all three commands);
* :class:`SeedOptions`: ``--seed`` (all three);
* :class:`GuidanceOptions`: ``--sampler``, ``--guidance`` (all three);
* :class:`StepsOptions`: ``--steps`` (sample, tune; detect's steps live in its probe sections);
* :class:`OutputOptions`: ``--out`` (all three; each command sets its own default folder);
* :class:`WandbOptions`: ``--wandb`` / ``--no-wandb`` (sample, detect).

A section's attribute docstrings are the CLI help (litgpt style; a command may redefine a field to change its default
and help, as each does for ``--out``) and its ``check_<section>`` method its validation; :func:`validate_sections`
runs every section a config inherits, in a fixed order, from the config's ``validate()``, i.e. when the config is
built: before any model is loaded. Sections and configs are keyword-only dataclasses, and a config lists its sections
last-first (``class SampleConfig(WandbOptions, ..., ModelOptions)``: fields follow the reversed MRO), so the help
starts with ``--model``.

Values that need the model (a radius against its token grid, ``--steps`` against its scheduler, a class against its
classes) are checked where the model is known, by the one owner of each rule (``attention.check_radius``,
``sampling.set_timesteps``, the conditioning helpers).

Also here, for the option values that are more than a type: :class:`TimeWindow` (``--window t0:t1``, ``--interval``)
and :func:`is_global` (the one rule for "this radius is global attention").
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from dataclasses import dataclass
from typing import NamedTuple

from .errors import UserError

SAMPLERS = ("ddim", "dpm", "euler")
"""Integrators: ddim and dpm (DPM-Solver++) for DDPM models, euler for flow-matching models."""
SAMPLER_CHOICES = ("auto", *SAMPLERS)
"""What ``--sampler`` accepts: auto picks ddim (DDPM) or euler (flow)."""
DEVICES = "cpu, cuda, cuda:N or auto"


def _integer(name: str, v, at_least: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or (at_least is not None and v < at_least):
        raise UserError(f"--{name} must be an integer{f' >= {at_least}' if at_least is not None else ''}; got {v!r}.")


def check_device(device: str) -> None:
    """``--device`` spelled as critsample runs it (availability is checked by ``commands.args.pick_device``)."""
    text = str(device).strip()
    if text == "auto" or text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return
    if text.startswith("mps"):
        raise UserError(f"--device {device}: Apple MPS is not supported by critsample; use --device cpu (or auto).")
    raise UserError(f"--device {device} is not a device critsample runs on; use {DEVICES}.")


# -- sections -----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelOptions:
    """Which model, where it runs, and which weight files may be read."""

    model: str = "dit-digits"
    """Registry name (dit-digits, dit-xl, dit-xl-512, sd3-medium, gmm-...) or a local diffusers folder."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (CUDA when available, else CPU)."""
    trust_pickled_weights: bool = False
    """Also load a model folder whose weights are only pickled (.bin): only for files you trust, since unpickling can
    run code (the default reads safetensors only)."""

    def check_model(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("--model is empty; give a registry name (dit-digits, dit-xl, sd3-medium, gmm-...) or a "
                            "model folder.")
        check_device(self.device)


@dataclass(kw_only=True)
class SeedOptions:
    """The seed every random draw of a run derives from."""

    seed: int = 0
    """Seed (any integer): sample i of a run starts from noise drawn from a hash of (seed, i), whatever the batch
    size."""

    def check_seed(self) -> None:
        _integer("seed", self.seed)


@dataclass(kw_only=True)
class GuidanceOptions:
    """The integrator and the classifier-free guidance of conditioned steps."""

    sampler: str = "auto"
    """ddim or dpm (DDPM models), euler (flow models); auto picks ddim / euler."""
    guidance: float | None = None
    """Classifier-free guidance scale w of conditioned steps (1 = plain conditional; None: the model's default)."""

    def check_guidance(self) -> None:
        if self.sampler not in SAMPLER_CHOICES:
            raise UserError(f"Unknown sampler {self.sampler!r}; choose {', '.join(SAMPLER_CHOICES)}.")
        g = self.guidance
        if g is not None and (isinstance(g, bool) or not isinstance(g,
                                                                    (int, float)) or not (math.isfinite(g) and g >= 0)):
            raise UserError(f"--guidance must be a finite number >= 0 (1 = plain conditional); got {g}.")


@dataclass(kw_only=True)
class StepsOptions:
    """The number of integrator steps (at most the model's training timesteps, checked once the model is known)."""

    steps: int = 50
    """Integrator steps."""

    def check_steps(self) -> None:
        _integer("steps", self.steps, 1)


@dataclass(kw_only=True)
class OutputOptions:
    """Where a run writes (and keeps the stored work it resumes from)."""

    out: str = "out"
    """Output folder."""

    def check_output(self) -> None:
        if not str(self.out).strip():
            raise UserError("--out is empty; give an output folder.")


@dataclass(kw_only=True)
class WandbOptions:
    """Weights & Biases logging."""

    wandb: bool = True
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise); --no-wandb switches it off."""

    def check_wandb(self) -> None:
        if not isinstance(self.wandb, bool):
            raise UserError(f"--wandb is true or false; got {self.wandb!r}.")


SECTIONS = (
    (ModelOptions, "check_model"), (SeedOptions, "check_seed"), (GuidanceOptions, "check_guidance"),
    (StepsOptions, "check_steps"), (OutputOptions, "check_output"), (WandbOptions, "check_wandb"),
)


def validate_sections(cfg) -> None:
    """Run the checks of every shared section ``cfg`` inherits (one sentence each, raised as UserError)."""
    for section, check in SECTIONS:
        if isinstance(cfg, section):
            getattr(cfg, check)()


def numpy_seed(seed: int) -> int:
    """``seed`` as numpy's generators take it (non-negative): itself when >= 0, so no result changes, and a 64-bit
    hash of it when negative (numpy refuses negative seeds; torch's generators and critsample's per-sample noise take
    any integer)."""
    if seed >= 0:
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"critsample-negative-seed:{seed}".encode()).digest()[:8], "big")


def torch_seed(seed: int) -> int:
    """``seed`` as ``torch.Generator.manual_seed`` takes it (-2**63 .. 2**64 - 1): itself in that range, so no result
    changes, and a 63-bit hash of it outside (critsample's per-sample noise takes any integer)."""
    if -(2**63) <= seed < 2**64:
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"critsample-large-seed:{seed}".encode()).digest()[:8], "big") >> 1


# -- values that are more than a type -----------------------------------------------------------------------------


def is_global(radius, grid) -> bool:
    """The one rule: an attention radius is global when it is None or at least max(h, w) - 1 on the (h, w) token grid
    (a Chebyshev window that wide covers every token from every position). ``grid`` may be an int (the side)."""
    if radius is None or grid is None:
        return True
    side = grid if isinstance(grid, int) else max(grid)
    if hasattr(radius, "tolist"):  # a tensor or array: one radius per row
        radius = radius.tolist()
    if isinstance(radius, (list, tuple)):
        return all(is_global(r, side) for r in radius)
    return radius >= side - 1


def parse_radius(r) -> int | None:
    """One attention radius as critsample takes it: None (global) or an integer >= 0 (a Python / numpy integer, an
    integral float or a one-element tensor); anything else is one sentence. Bounds against a grid: ``check_radius``."""
    if r is None:
        return None
    if hasattr(r, "numel") and hasattr(r, "item"):
        if r.numel() != 1:
            raise UserError(f"A radius must be a single integer here; got a tensor of shape {tuple(r.shape)}.")
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, (numbers.Integral, float)) or not float(r).is_integer():
        raise UserError(f"An attention radius must be a non-negative integer or None (global); got {r!r}.")
    if r < 0:
        raise UserError(f"Radius {int(r)} is out of range: an attention radius is a non-negative integer (None = "
                        "global).")
    return int(r)


def global_radius(grid) -> int:
    """The smallest global radius on ``grid`` (h, w) or a side: max(h, w) - 1."""
    return (grid if isinstance(grid, int) else max(grid)) - 1


class _Pair(NamedTuple):
    start: float
    end: float


class TimeWindow(_Pair):
    """A window [start, end] of critsample time t (0 = clean, 1 = noise), with 0 <= start < end <= 1.

    ``TimeWindow.parse("0.3:0.6")`` (the CLI form, also a pair or a TimeWindow), ``t in window`` (ends included),
    ``str(window) == "0.3:0.6"``. It is a (start, end) tuple: it unpacks as ``t0, t1 = window``, compares equal to the
    pair and is written to JSON as ``[t0, t1]``.
    """

    __slots__ = ()

    def __new__(cls, start: float, end: float):
        t0, t1 = float(start), float(end)
        if not (math.isfinite(t0) and math.isfinite(t1) and 0.0 <= t0 < t1 <= 1.0):
            raise UserError(f"A window [t0, t1] needs 0 <= t0 < t1 <= 1 (t: 0 = clean, 1 = noise); got [{start}, "
                            f"{end}].")
        return super().__new__(cls, t0, t1)

    @classmethod
    def parse(cls, value, option: str | None = None) -> TimeWindow:
        """'t0:t1', a (t0, t1) pair or a TimeWindow -> a checked TimeWindow; ``option`` names the option in errors."""
        if isinstance(value, TimeWindow):
            return value
        try:
            parts = value.split(":") if isinstance(value, str) else list(value)
            if len(parts) != 2:
                raise ValueError
            t0, t1 = (float(v) for v in parts)
        except (ValueError, TypeError):
            where = f"{option} " if option else "A window "
            raise UserError(f"{where}is written t0:t1 with numbers in [0, 1], e.g. 0.3:0.6; got {value!r}.") from None
        try:
            return cls(t0, t1)
        except UserError:
            if option is None:
                raise
            raise UserError(f"{option} {value} needs 0 <= t0 < t1 <= 1 (t: 0 = clean, 1 = noise).") from None

    @classmethod
    def from_record(cls, record) -> TimeWindow | None:
        """The window of a summary record ({"t_start", "t_end"}, optionally "valid"), or None when it has none."""
        if not isinstance(record, dict) or not record.get("valid", True):
            return None
        try:
            return cls(float(record["t_start"]), float(record["t_end"]))
        except (KeyError, TypeError, ValueError):
            return None

    def __contains__(self, t: float) -> bool:
        return bool(self.start <= t <= self.end)

    def contains(self, t):
        """``start <= t <= end`` for a float (a bool) or elementwise for a tensor / array of times."""
        return (t >= self.start) & (t <= self.end)

    @property
    def width(self) -> float:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start:g}:{self.end:g}"
