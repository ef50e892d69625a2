"""The options of a detection: dataclasses whose attribute docstrings are the CLI help (litgpt style), validated in
``__post_init__``, and the named presets ``fast`` and ``paper`` (edm2 style) that fill every size not given.

``configs/detect/*.yaml`` are generated from these classes (``critsample detect --preset P --print_config``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

from ..errors import UserError
from ..options import GuidanceOptions, ModelOptions, OutputOptions, SeedOptions, WandbOptions, validate_sections

PROBE_NAMES = ("cond_gap", "locality_gap", "forward_backward", "window_cond", "window_locality")
"""The built-in probes by name, in report order: the default of --probes. ``detect.registry`` maps each name to its
implementation and checks a run's names (a probe added there at run time is accepted too)."""
TRAJECTORIES = ("train", "sample_cond", "sample_uncond")
LOCALITY = ("window", "strict", "both")
PRIMARY_SYMMETRY_BREAKING = ("forward_backward", "cond_gap", "window_cond")
PRIMARY_NONLOCALITY = ("locality_gap", "window_locality")
PRIMARY_LOCALITY = ("auto", "window", "strict")


def _at_least_one(obj, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"--{prefix}{name} must be an integer >= 1; got {v!r}.")


def _check_width(name: str, w: float) -> None:
    if not (0.0 < float(w) <= 1.0):
        raise UserError(f"A window width must lie in (0, 1] (t: 0 = clean, 1 = noise); got {w} (--{name}).")


@dataclass
class GapArgs:
    """Instantaneous probes: conditioning gap (eq. 6) and locality gap (eq. 7)."""

    steps: int = 20
    """Sampler steps of the sampling trajectories; the training trajectory is probed at the same times."""
    samples: int = 8
    """Trajectories of each kind; every one is probed at every time."""
    radii: Optional[list[int]] = None
    """Local radii (Chebyshev, token grid). None: 1, 2, 4, ... below grid - 1 (fast); 0 and those (paper), or 0..4 on
    grids <= 8."""
    trajectories: list[str] = field(default_factory=lambda: ["train", "sample_cond", "sample_uncond"])
    """train (data noised forward), sample_cond (guided sampler), sample_uncond (unconditional sampler)."""
    kind: str = "eps"
    """Units of the gaps the window is read from: eps (= sigma(t) x score; default) or score (paper eqs. 6-7, which
    carries a 1/sigma(t) factor that diverges at the clean end); both are saved and plotted."""
    batch: int = 8
    """Trajectories per stored unit."""

    def __post_init__(self):
        _at_least_one(self, "gaps.", ("steps", "samples", "batch"))
        if not self.trajectories:
            raise UserError(f"--gaps.trajectories is empty; give at least one of {', '.join(TRAJECTORIES)} (omit it "
                            "for all three).")
        bad = [t for t in self.trajectories if t not in TRAJECTORIES]
        if bad:
            raise UserError(f"Unknown trajectory {bad[0]!r}; choose from {', '.join(TRAJECTORIES)}.")
        if self.kind not in ("score", "eps"):
            raise UserError(f"--gaps.kind must be score or eps; got {self.kind!r}.")


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

    def __post_init__(self):
        _at_least_one(self, "fb.", ("num_t", "samples", "steps", "batch"))
        if self.source not in ("data", "generated"):
            raise UserError(f"--fb.source must be data or generated; got {self.source!r}.")
        if not (0.0 <= self.t_min <= self.t_max <= 1.0):
            raise UserError("Forward-backward noise levels need 0 <= t_min <= t_max <= 1 (t: 0 = clean, 1 = noise); "
                            f"got [{self.t_min}, {self.t_max}].")


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
    """Radii of the local denoiser outside the window (None: the middle auto radius (fast) or the two smallest
    (paper))."""
    complement: bool = True
    """Also scan the complement: conditioning only outside the window / local inside the window."""
    batch: int = 16
    """Samples per stored unit."""

    def __post_init__(self):
        _at_least_one(self, "windows.", ("steps", "samples", "batch"))
        _check_width("windows.width", self.width)
        _check_width("windows.locality_width", self.locality_width)
        if not (0.0 < self.t0_step < 1.0):
            raise UserError(f"--windows.t0_step must lie in (0, 1); got {self.t0_step}.")


@dataclass
class PrimaryArgs:
    """The primary test, declared before the data (``detect.primary``): one symmetry-breaking window against one
    nonlocality window at one radius and one local denoiser. Its concurrence outcome is the run's verdict; every other
    pair is reported as secondary, and the nonlocality window is reported at every probed radius as d(r)."""

    symmetry_breaking: str = "forward_backward"
    """forward_backward (default: the global threshold, unbiased against theory on the oracles), cond_gap or
    window_cond."""
    nonlocality: str = "locality_gap"
    """locality_gap (default: the radius-r locality gap, eq. 7, with an exact oracle counterpart) or window_locality
    (the conditioning-fixed scan at radius r). Local forward-backward is not a nonlocality window: it enters as its
    excess over the global threshold (``forward_backward_excess``)."""
    radius: int = 2
    """Radius r of the primary nonlocality window (always probed: added to the probe's radii when missing; a grid too
    small for it, max(h, w) - 2 < r, is refused with a sentence naming this option)."""
    locality: str = "auto"
    """Local denoiser of the primary nonlocality window: auto (strict where the truncated one's receptive field,
    depth x r tokens, covers the grid, i.e. depth x r >= grid - 1; window otherwise; the oracles' local score is
    strict already), window or strict. The scans have a window denoiser only."""

    def __post_init__(self):
        for name, allowed in (("symmetry_breaking", PRIMARY_SYMMETRY_BREAKING),
                              ("nonlocality", PRIMARY_NONLOCALITY), ("locality", PRIMARY_LOCALITY)):
            if getattr(self, name) not in allowed:
                raise UserError(f"--primary.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if not isinstance(self.radius, int) or isinstance(self.radius, bool) or self.radius < 0:
            raise UserError(f"--primary.radius must be an integer >= 0; got {self.radius!r}.")
        if self.nonlocality == "window_locality" and self.locality == "strict":
            raise UserError("--primary.locality strict needs --primary.nonlocality locality_gap: the windowed scans "
                            "have a window (truncated-attention) local denoiser only.")


@dataclass(kw_only=True)
class DetectConfig(WandbOptions, OutputOptions, GuidanceOptions, SeedOptions, ModelOptions):
    """Options of ``critsample detect`` (the shared sections: :mod:`critsample.options`)."""

    preset: str = "fast"
    """Named sizes: fast (a first look, minutes on CPU for dit-digits) or paper (App. C-like grids)."""
    probes: list[str] = field(default_factory=lambda: list(PROBE_NAMES))
    """Subset of cond_gap, locality_gap, forward_backward, window_cond, window_locality."""
    seed: int = 0
    """Run seed (any integer); every unit derives its generator from (seed, unit key)."""
    out: str = "runs/detect"
    """Output folder (also holds the stored units: rerun the same command to resume)."""
    dry_run: bool = False
    """Print the number of model evaluations and a time estimate, then exit."""
    devices: int = 1
    """Processes to shard the units over (Lightning Fabric, DDP); 1 = this process."""
    threads: Optional[int] = None
    """CPU intra-op threads (None: torch's default). On a busy shared CPU, 1 is often several times faster than 2."""
    classifier: Optional[str] = None
    """digits, resnet-50, or module.path:callable (None: digits for 8x8 digit models, resnet-50 for DiT-XL, the Bayes
    classifier for oracles)."""
    data: Optional[str] = None
    """Clean data: an image folder or .pt/.npz (keys latents or images, optional labels). Default: the digits test split
    for dit-digits, exact samples for oracles."""
    prompt: Optional[str] = None
    """Prompt of text models (SD3)."""
    class_id: Optional[int] = None
    """Class of class models (--class); None: each data image's own label, generated samples cycle through the classes
    (DiT-XL: 207)."""
    max_batch: int = 128
    """Rows per network forward."""
    locality: str = "window"
    """Local denoiser of the locality gap and of local forward-backward: window (every attention layer truncated to
    radius r, the paper's; an L-layer network still reads L r tokens), strict (the prediction at a token reads only
    its radius-r window: the network runs on masked copies of each row, min(h, 2r + 1) x min(w, 2r + 1) forwards per
    local row for DiT / PixArt, h x w for SD3 / FLUX; --dry-run counts them; the oracles' local score is strict
    already) or both (the window windows as today plus ``locality_gap_strict`` and ``forward_backward_local_strict``,
    with their own concurrence tests). The windowed scans always use window."""
    concurrence_tolerance: float = 1.0
    """Tolerance Delta of the concurrence test, in nats of log-SNR: concurrent when the 95% interval of the center
    difference lies inside [-Delta, Delta], not concurrent when outside, inconclusive otherwise."""
    primary: PrimaryArgs = field(default_factory=PrimaryArgs)
    """The primary test (declared before the data; its outcome is the verdict)."""
    gaps: GapArgs = field(default_factory=GapArgs)
    """Conditioning and locality gaps."""
    fb: ForwardBackwardArgs = field(default_factory=ForwardBackwardArgs)
    """Forward-backward."""
    windows: WindowArgs = field(default_factory=WindowArgs)
    """Windowed scans."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Input checks that need no model (one sentence each, raised as UserError); also run by ``detect.run``,
        since a config may be changed after construction."""
        validate_sections(self)
        if self.preset not in PRESETS:
            raise UserError(f"Unknown preset {self.preset!r}; choose {' or '.join(PRESETS)}.")
        if not self.probes:
            raise UserError(f"--probes is empty; choose from {', '.join(PROBE_NAMES)}.")
        bad = [p for p in self.probes if not isinstance(p, str) or not p]
        if bad:
            raise UserError(f"Unknown probe {bad[0]!r}; choose from {', '.join(PROBE_NAMES)}.")
        # the names are checked against the registry (which may hold more probes) by detect.run, before loading
        _at_least_one(self, "", ("max_batch", "devices"))
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1 (or omitted); got {self.threads}.")
        if not (self.concurrence_tolerance > 0 and math.isfinite(self.concurrence_tolerance)):
            raise UserError("--concurrence_tolerance must be a positive number of nats; got "
                            f"{self.concurrence_tolerance}.")
        if self.locality not in LOCALITY:
            raise UserError(f"Unknown --locality {self.locality!r}; choose window, strict or both.")
        for section in (self.primary, self.gaps, self.fb, self.windows):
            section.__post_init__()


    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides) -> "DetectConfig":
        """The preset's config with ``overrides`` (top-level fields, or sections as dicts / dataclasses)."""
        if preset not in PRESETS:
            raise UserError(f"Unknown preset {preset!r}; choose {' or '.join(PRESETS)}.")
        sections = {"primary": PrimaryArgs, "gaps": GapArgs, "fb": ForwardBackwardArgs, "windows": WindowArgs}
        kw = {}
        for name, klass in sections.items():
            given = overrides.pop(name, None)
            values = {**PRESETS[preset].get(name, {}), **(_as_dict(given) if given is not None else {})}
            kw[name] = klass(**values)
        return cls(preset=preset, **kw, **overrides)


def _as_dict(obj) -> dict:
    return {f.name: copy.deepcopy(getattr(obj, f.name)) for f in fields(obj)} if is_dataclass(obj) else dict(obj)


# Sizes chosen for dit-digits on a 2-core CPU (bench/detect.py): fast < 5 min, paper < 60 min.
PRESETS: dict[str, dict] = {
    # A first look: ~16k model evaluations (about 1 min on dit-digits with a free CPU core).
    "fast": {
        "gaps": {"steps": 20, "samples": 6, "batch": 6, "trajectories": ["train", "sample_cond", "sample_uncond"]},
        "fb": {"t_min": 0.05, "t_max": 0.95, "num_t": 10, "samples": 16, "steps": 20, "batch": 16},
        "windows": {"steps": 20, "width": 0.2, "locality_width": 0.2, "t0_step": 0.1, "samples": 12, "batch": 12,
                    "complement": False},
    },
    # App. C-like grids: 50-step trajectories, 37 noise levels in [0.05, 0.95] (every integrator step), windows w = 0.2
    # scanned by 0.1 with their complements. Sizes for the concurrence test's power (bench/power_sizes.py,
    # docs/oracles.md): 352 clean images per noise level (the most dit-digits' 359 test images hold in batches of
    # 32) and 96 gap trajectories; at the former 192 x 19 / 32 an oracle pair 0.78 nats inside the tolerance came out
    # "concurrent" in 44 % of seeds, at this size 73 % (80 % needs >= 576 images). 1.46M model evaluations on
    # dit-digits (551k at the former size, about 15 min with a free CPU core then).
    "paper": {
        "gaps": {"steps": 50, "samples": 96, "batch": 16, "trajectories": ["train", "sample_cond", "sample_uncond"]},
        "fb": {"t_min": 0.05, "t_max": 0.95, "num_t": 37, "samples": 352, "steps": 40, "batch": 32},
        "windows": {"steps": 25, "width": 0.2, "locality_width": 0.2, "t0_step": 0.1, "samples": 48, "batch": 24,
                    "complement": True},
    },
}
