"""A configured detection: the model and what every probe shares (its data, classifier, conditioning rows, resolved
radii and guidance, the store of finished units). Probes read it; they never parse options or touch devices."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..attention import check_radius
from ..denoisers import Cond, Denoiser, tile_rows
from ..errors import UserError
from ..options import global_radius, is_global
from ..probes.rows import class_rows
from ..sampling import check_steps, sample_generators
from ..store import Store, model_fingerprint
from . import primary
from .data import classifier_name, load_classifier_for, load_data

if TYPE_CHECKING:
    from .config import DetectConfig


def auto_radii(grid: int, preset: str) -> list[int]:
    """Default radii on a grid x grid token grid (grid - 1 is already global)."""
    pow2 = [r for r in (2**k for k in range(12)) if not is_global(r, grid)]
    if preset == "paper" and grid <= 8:
        return list(range(0, min(5, global_radius(grid))))
    return ([0] if preset == "paper" else []) + pow2


def auto_window_radii(grid: int, preset: str) -> list[int]:
    pow2 = auto_radii(grid, "fast") or [0]
    return pow2[:2] if preset == "paper" else [pow2[len(pow2) // 2]]


class Detection:
    """The shared state of one detection run (see the module docstring)."""

    def __init__(self, cfg: DetectConfig, model: Denoiser, device: torch.device, *, classifier=None):
        self.cfg, self.model, self.device = cfg, model, device
        self.grid = max(model.token_grid)
        self.text = model.is_text
        self._check_model()
        self.guidance = float(cfg.guidance if cfg.guidance is not None else model.default_guidance)
        r0 = [cfg.primary.radius]  # the primary radius is always probed (detect.primary)
        top = global_radius(model.token_grid) - 1  # the largest truly local radius of the grid
        if {"locality_gap", "window_locality"} & set(cfg.probes) and cfg.primary.radius > top:
            raise UserError(f"--primary.radius {cfg.primary.radius} does not fit {model.name}'s "
                            f"{'x'.join(map(str, model.token_grid))} token grid; "
                            + (f"pass --primary.radius in 0..{top}." if top >= 0 else
                               "it has no local radius: drop the locality_gap and window_locality probes."))
        self.gap_radii = self._radii(cfg.gaps.radii, auto_radii(self.grid, cfg.preset),
                                     r0) if "locality_gap" in cfg.probes else []
        self.fb_radii = self._radii(cfg.fb.radii, auto_radii(self.grid, "fast"))
        self.win_radii = self._radii(cfg.windows.radii, auto_window_radii(self.grid, cfg.preset),
                                     r0 if "window_locality" in cfg.probes else [])
        self.primary = primary.resolve(cfg.primary, model, self.grid)
        # radii of the strictly local gap units: every gap radius with --locality strict|both; the primary radius
        # alone when the primary rule asks for strict and --locality is window; none otherwise
        self.gap_strict_radii = (list(self.gap_radii) if cfg.locality != "window" else
                                 [cfg.primary.radius] if self.gap_radii and primary.needs_strict_gaps(
                                     self.primary, cfg.locality) else [])
        self.t0s = [round(k * cfg.windows.t0_step, 10) for k in range(int(math.ceil(1.0 / cfg.windows.t0_step - 1e-9)))]
        self.fb_times = np.linspace(cfg.fb.t_min, cfg.fb.t_max, cfg.fb.num_t).tolist()
        self.class_id = (cfg.class_id if cfg.class_id is not None
                         else (207 if (model.num_classes or 0) == 1000 else None))
        self.model_id = model_fingerprint(model, model.name)
        self.store: Store | None = None  # set by detect.run once the unit keys are known
        self.cache: dict[str, Any] = {}  # per-run memo of probes (plans, concatenated arrays)
        self._classifier = classifier
        self._prompt_row = None
        self._data: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.data_id: str | None = None

    # -- checks and conditioning --------------------------------------------------------------
    def _check_model(self) -> None:
        cfg, m = self.cfg, self.model
        for section in ("gaps", "fb", "windows"):
            check_steps(m, getattr(cfg, section).steps, f"--{section}.steps")
        if self.text:
            if cfg.class_id is not None:
                raise UserError(f"{m.name} is text-conditional: use --prompt, not --class.")
            if not cfg.prompt:
                raise UserError(f"{m.name} is text-conditional: give --prompt TEXT.")
        else:
            if cfg.prompt is not None:
                raise UserError(f"{m.name} is class-conditional: use --class N, not a text prompt.")
            if cfg.class_id is not None and not 0 <= cfg.class_id < m.num_classes:
                raise UserError(f"Class {cfg.class_id} is outside {m.name}'s classes 0..{m.num_classes - 1}.")

    def _radii(self, given, default, required=()) -> list[int]:
        radii = list(default if given is None else given) + list(required)
        check_radius(radii, self.model.token_grid, bound="local", model=self.model.name)
        return sorted(set(int(r) for r in radii))

    def cond_rows(self, n: int, offset: int, labels: torch.Tensor | None = None) -> Cond:
        """Conditioning of n generated samples (class cycle or --class; the prompt for text models)."""
        if self.text:
            if self._prompt_row is None:
                self._prompt_row = self.model.encode_prompt([self.cfg.prompt])
            return tile_rows(self._prompt_row, n)
        if labels is not None:
            return labels.to(self.device)
        return class_rows(self.model, n, self.class_id, offset).to(self.device)

    def null_rows(self, n: int) -> Cond:
        return self.model.null(self.cond_rows(n, 0))

    # -- data and classifier ------------------------------------------------------------------
    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = load_classifier_for(self.cfg, self.model, self.device)
        return self._classifier

    @property
    def classifier_name(self) -> str:
        return classifier_name(self.cfg, self.model)

    def data(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First n clean samples in model space and their labels (None when unknown)."""
        if self._data is None or self._data[0].shape[0] < n:
            self._data = load_data(self.cfg, self.model, n, self.device, self.class_id)
            self.data_id = hashlib.sha256(self._data[0].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        x, y = self._data
        if x.shape[0] < n:
            raise UserError(f"The data has {x.shape[0]} samples but {n} are needed; lower --gaps.samples / "
                            "--fb.samples or give more --data.")
        return x[:n], (y[:n] if y is not None else None)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.predict_logits(images.to(self.device))

    def generators(self, lo: int, hi: int, stream: str = "") -> list[torch.Generator]:
        """One generator per sample index in [lo, hi), from (seed, stream, index) alone: the paired design. Sample i
        starts from the same noise at every scan position, radius and arm (and in the sampled gap trajectories), so
        the probes' differences are paired; ``stream`` separates independent draws (forward-backward's forward noise,
        the training trajectory's eps, generated clean images)."""
        return sample_generators(int(self.cfg.seed), lo, hi, stream)

    @property
    def chance(self) -> float | None:
        """Classifier error of a random class, 1 - 1/K, the forward-backward plateau (None when K is unknown)."""
        k = getattr(self.classifier, "num_classes", None) or self.model.num_classes
        return 1.0 - 1.0 / int(k) if k else None

    def memo(self, key: str, make):
        """``make()`` once per run (plans, arrays that several probes read)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def resolved(self) -> dict:
        """What the defaults resolved to (written next to the config)."""
        return {"guidance": self.guidance, "gap_radii": self.gap_radii, "gap_strict_radii": self.gap_strict_radii,
                "primary": self.primary, "fb_radii": self.fb_radii,
                "window_radii": self.win_radii,
                "t0s": self.t0s, "fb_times": self.fb_times, "class_id": self.class_id, "model_id": self.model_id}
