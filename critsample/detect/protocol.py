"""The probe protocol: what a probe declares, computes and summarizes.

A probe is one object in ``detect.registry.PROBES`` (one line there) implemented in one module:

* :meth:`Probe.units` — the stored units of work it needs (``store.Unit``: a kind, params, cost, a dependency
  ``stage``), keyed through ``Detection.store`` so that a finished unit is never recomputed. Probes may share a unit
  kind (the conditioning and locality gaps read the same trajectories); equal keys are computed once.
* :meth:`Probe.key_config` — per unit kind, everything its numbers depend on (mixed into every key of that kind).
* :meth:`Probe.compute` — the arrays of one unit, a pure function of the detection, the unit and its generator.
* :meth:`Probe.summarize` — stored arrays -> curves, arrays on disk, figures and windows (:class:`ProbeOutput`).

The helpers every probe shares live here too: the key parts common to all units (:func:`common_config`,
:func:`data_config`), the local denoisers of a run (:func:`localities`, :func:`locality_match`, :func:`window_name`,
:func:`strict_copies`), sample batches and Bernoulli bars.

``detect.run`` owns the order (stages), the store, sharding, progress; ``detect.assemble`` turns the probes' windows
into the combined window, the concurrence verdicts and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..store import Unit
from .estimators import Window

if TYPE_CHECKING:
    from .context import Detection


class Results:
    """The arrays of every unit of a run, by key, with the units of each kind in declaration order."""

    def __init__(self, units: list[Unit], arrays: dict[str, dict[str, np.ndarray]]):
        self.units_list, self.arrays = units, arrays

    def units(self, kind: str, **match) -> list[Unit]:
        """Units of ``kind`` whose params equal ``match``, sorted by their first sample index ``lo``."""
        us = [u for u in self.units_list if u.probe == kind and all(u.params.get(k) == v for k, v in match.items())]
        return sorted(us, key=lambda u: u.params.get("lo", 0))

    def __getitem__(self, unit: Unit) -> dict[str, np.ndarray]:
        return self.arrays[unit.key]

    def cat(self, units: list[Unit], name: str, axis: int = 0) -> np.ndarray:
        """Array ``name`` of ``units`` concatenated along ``axis`` (the sample axis)."""
        return np.concatenate([self.arrays[u.key][name] for u in units], axis=axis)


@dataclass
class Outputs:
    """Where a probe writes: ``figures/`` and ``arrays/`` of the run folder."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        self.figures.mkdir(parents=True, exist_ok=True)
        self.arrays.mkdir(parents=True, exist_ok=True)

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def arrays(self) -> Path:
        return self.root / "arrays"


@dataclass
class ProbeOutput:
    """What a probe contributes to the summary: its windows (by name), its record under ``summary["probes"]``, its
    figures (name -> path) and curves (name -> {"x", "series"}) for the report and W&B, and its windows by radius."""

    windows: dict[str, Window] = field(default_factory=dict)
    record: dict | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    curves: dict[str, dict] = field(default_factory=dict)
    by_radius: dict[str, dict[int, Window]] = field(default_factory=dict)
    """Per window name, the same rule at every probed radius (the nonlocality window as a function of r:
    ``detect.primary``)."""


class Probe:
    """Base class of a probe (see the module docstring). ``family``: symmetry_breaking or nonlocality."""

    name: ClassVar[str]
    family: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # unit kinds this probe can compute
    about: ClassVar[str] = ""

    def data_samples(self, det: Detection) -> int:
        """Clean data samples this probe reads (0: none); the data is loaded before the keys are made."""
        return 0

    def key_config(self, det: Detection) -> dict[str, dict]:
        raise NotImplementedError

    def units(self, det: Detection) -> list[Unit]:
        raise NotImplementedError

    def compute(self, det: Detection, unit: Unit, g: torch.Generator) -> dict:
        raise NotImplementedError

    def summarize(self, det: Detection, results: Results, out: Outputs) -> ProbeOutput:
        raise NotImplementedError


# -- helpers every probe shares ----------------------------------------------------------------------------------


def strict_copies(det: Detection, radii: list) -> list[int]:
    """Forwards per local row of the strictly local denoiser at each radius (``Denoiser.strict_copies``)."""
    return [det.model.strict_copies(det.model.token_grid, r) for r in radii]


def localities(det: Detection) -> list[str]:
    """The local denoisers a run measures, in summary order (``--locality``)."""
    return {"window": ["window"], "strict": ["strict"], "both": ["window", "strict"]}[det.cfg.locality]


def locality_match(locality: str) -> dict:
    """``Results.units`` filter of the units of one local denoiser (window units carry no ``locality`` param)."""
    return {"locality": None if locality == "window" else locality}


def window_name(name: str, det: Detection, locality: str) -> str:
    """The summary name of a nonlocality window: ``name``, or ``name_strict`` for the strict one beside a window one."""
    return f"{name}_strict" if locality == "strict" and det.cfg.locality == "both" else name


def common_config(det: Detection) -> dict:
    """What every stored unit's numbers depend on besides its own settings."""
    return {"sampler": det.cfg.sampler, "guidance": det.guidance, "class": det.class_id, "prompt": det.cfg.prompt}


def data_config(det: Detection) -> dict:
    """What the units that read clean data depend on: the --data option and the content id of the data read."""
    return {"data": det.cfg.data, "data_id": det.data_id}


def batches(total: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) sample ranges of at most ``size``."""
    return [(lo, min(total, lo + size)) for lo in range(0, total, size)]


def bernoulli(e: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Mean error and its Bernoulli one-sigma sqrt(p (1 - p) / n) (App. C.3)."""
    n = e.shape[axis]
    p = e.mean(axis)
    return p, np.sqrt(p * (1 - p) / max(n, 1))


def series_json(x, series: dict[str, tuple]) -> dict:
    """A curve set as JSON: x and, per series, (mean, one-sigma) lists."""
    return {"x": [float(v) for v in x],
            "series": {s: ([float(v) for v in m], [float(v) for v in e]) for s, (m, e) in series.items()}}
