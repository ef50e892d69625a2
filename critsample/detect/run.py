"""Running a detection: probes -> stored units (in dependency stages, sharded over ranks) -> probe outputs ->
``assemble``. :func:`run` prints nothing and parses no devices; :func:`estimate` is the dry run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..denoisers import Denoiser
from ..models import load
from ..store import Ranks, Store, Unit, check_writable, run_units
from .assemble import build_summary, write_outputs
from .config import DetectConfig
from .context import Detection
from .protocol import Outputs, Probe, Results
from .registry import PROBES, check_probes


class Progress(Protocol):
    """What :func:`run` reports to (the CLI's progress bar; None = silent)."""

    def start(self, description: str, total_forwards: int) -> None: ...
    def advance(self, unit: Unit, computed: bool) -> None: ...


def prepare(cfg: DetectConfig, model: Denoiser, device: torch.device | None = None, *,
            classifier=None) -> tuple[Detection, list[Unit]]:
    """The configured detection and its units (deduplicated by key, in probe order); nothing is computed."""
    cfg.validate()
    check_probes(cfg.probes)
    device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    det = Detection(cfg, model, device, classifier=classifier)
    probes = selected(cfg)
    n_data = max(p.data_samples(det) for p in probes)
    if n_data:
        det.data(n_data)  # the data's fingerprint is part of the keys
    key_config = {}
    for p in probes:
        key_config.update(p.key_config(det))
    det.store = Store(Path(cfg.out), det.model_id, cfg.seed, config=key_config)
    units, seen = [], set()
    for p in probes:
        for u in p.units(det):
            if u.key not in seen:
                seen.add(u.key)
                units.append(u)
    return det, units


def selected(cfg: DetectConfig) -> list[Probe]:
    """The probes of ``cfg.probes`` in registry order."""
    return [p for name, p in PROBES.items() if name in cfg.probes]


def _computer(probes: list[Probe]) -> dict[str, Probe]:
    owner: dict[str, Probe] = {}
    for p in probes:
        for kind in p.kinds:
            owner.setdefault(kind, p)
    return owner


def run(
    cfg: DetectConfig,
    model: Denoiser | None = None,
    *,
    device: torch.device | str | None = None,
    classifier=None,
    on_unit: Callable[[Unit, bool], None] | None = None,
    progress: Progress | None = None,
    fabric=None,
) -> dict | None:
    """Run (or resume) a detection; returns the summary on rank 0 (None on other ranks).

    ``model`` defaults to ``load(cfg.model)`` on ``device`` (default: CPU); ``classifier`` overrides the default one;
    ``on_unit(unit, computed)`` is called after every unit of this rank (a test's simulated kill hangs off it);
    ``fabric`` (Lightning Fabric) shards the units over its processes.
    """
    cfg.validate()
    check_probes(cfg.probes)
    check_writable(cfg.out)  # before the model loads or any unit is computed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if fabric is not None:
        device = fabric.device
    if model is None:
        model = load(cfg.model, device=device or "cpu", trust_pickled_weights=cfg.trust_pickled_weights)
    det, units = prepare(cfg, model, device, classifier=classifier)
    probes = selected(cfg)
    owner = _computer(probes)
    ranks = Ranks(fabric)
    start = time.perf_counter()
    stages = sorted({u.stage for u in units})
    if progress is not None and ranks.is_main:
        progress.start(f"detect {model.name} (model evaluations)",
                       sum(u.forwards for s in stages for i,
                           u in enumerate(x for x in units if x.stage == s) if i % ranks.world == ranks.rank))

    def advance(u: Unit, computed: bool) -> None:
        if progress is not None and ranks.is_main:
            progress.advance(u, computed)
        if on_unit is not None:
            on_unit(u, computed)

    arrays: dict[str, dict[str, np.ndarray]] = {}
    for s in stages:
        got = run_units(det.store, [u for u in units if u.stage == s], lambda u, g: owner[u.probe].compute(det, u, g),
                        ranks=ranks, device=det.device, on_unit=advance)
        if got is not None:
            arrays.update(got)
    computed, loaded = ranks.gather_counts(det.store)
    ranks.close()
    if not ranks.is_main:
        return None
    out = Path(cfg.out)
    outputs_dir = Outputs(out)
    results = Results(units, arrays)
    outputs = {p.name: p.summarize(det, results, outputs_dir) for p in probes}
    summary = build_summary(det, outputs, units, (computed, loaded), out, wall=time.perf_counter() - start)
    return write_outputs(det, summary, outputs, out)


def time_forward(model: Denoiser, device, rows: int, radius: int | None, repeats: int = 3) -> float:
    """Seconds per row of one batched forward of ``rows`` rows (after one warm-up)."""
    x = torch.randn(rows, *model.sample_shape, device=device)
    cond = model.encode_prompt([""] * rows) if model.is_text else torch.zeros(rows, dtype=torch.long, device=device)
    cond = model.null(cond)
    model.predict(x, 0.5, cond, radius=radius)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        model.predict(x, 0.5, cond, radius=radius)
        times.append(time.perf_counter() - begin)
    return float(np.median(times)) / rows


def estimate(cfg: DetectConfig, model: Denoiser | None = None, *, device: torch.device | str | None = None,
             classifier=None) -> dict:
    """The dry run: model evaluations per probe, how many are already stored, and a time estimate from a timed
    forward. Writes nothing."""
    cfg.validate()
    check_probes(cfg.probes)
    if model is None:
        model = load(cfg.model, device=device or "cpu", trust_pickled_weights=cfg.trust_pickled_weights)
    det, units = prepare(cfg, model, device, classifier=classifier)
    store = det.store
    rows = min(cfg.max_batch, 64)
    radius = (det.gap_radii or det.fb_radii or det.win_radii or [None])[0]
    per_global = time_forward(model, det.device, rows, None)
    per_local = time_forward(model, det.device, rows, radius) if radius is not None else per_global
    by_probe: dict[str, dict] = {}
    for u in units:
        d = by_probe.setdefault(u.probe, {"units": 0, "evaluations": 0, "local_evaluations": 0, "stored_units": 0,
                                          "remaining_evaluations": 0, "estimated_seconds": 0.0})
        d["units"] += 1
        d["evaluations"] += u.forwards
        d["local_evaluations"] += u.local_forwards
        done = store.has(u)
        d["stored_units"] += int(done)
        if not done:
            d["remaining_evaluations"] += u.forwards
            d["estimated_seconds"] += (u.forwards - u.local_forwards) * per_global + u.local_forwards * per_local
    strict = {}
    if cfg.locality != "window":
        radii = sorted(set(det.gap_radii) | set(det.fb_radii))
        strict = {"strict_forwards_per_local_row": {int(r): model.strict_copies(model.token_grid, r) for r in radii}}
    return {
        **strict,
        "probes": by_probe,
        "evaluations": sum(d["evaluations"] for d in by_probe.values()),
        "remaining_evaluations": sum(d["remaining_evaluations"] for d in by_probe.values()),
        "seconds_per_evaluation": {"global": per_global, "local": per_local, "timed_rows": rows},
        "estimated_seconds": sum(d["estimated_seconds"] for d in by_probe.values()),
    }
