"""Resumable results: every unit of probe work is stored the moment it finishes, keyed by what it depends on.

A *unit* is the smallest piece of work worth keeping (one sample batch of one probe at one setting). Its key is a
hash of ``(probe name, probe config, unit params, model id, seed, STORE_VERSION)``, so

* a restarted run loads finished units and recomputes nothing (it only looks the key up);
* a changed config, model, seed or code version gives new keys and never reuses a stale unit;
* each unit draws its randomness from ``unit_generator(key)``, a ``torch.Generator`` seeded from the key alone, so
  the numbers do not depend on which units ran before, on the order, on a kill and resume, or on the rank that ran it.

Units live in ``<root>/units/<probe>/<key>.npz`` (plus a ``.json`` with the readable params and the sha256 of the
``.npz``), written to a temporary name and moved into place with ``os.replace`` so a killed run never leaves a
half-written unit. Every load checks the checksum: a truncated, garbled or replaced unit is reported in one warning
line naming the file and computed again.

Sharding: :func:`run_units` gives unit ``i`` to rank ``i % world_size``; every rank writes its own units to the shared
folder and rank 0 assembles all of them after a barrier (:class:`Ranks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import UserError

STORE_VERSION = 1  # bump when a probe's numbers change for the same inputs
log = logging.getLogger("critsample")


class CorruptUnit(Exception):
    """A stored unit whose file is unreadable or does not match its recorded checksum."""


def stable_hash(obj: Any) -> str:
    """sha256 hex digest of a JSON-serialisable object (keys sorted, floats in repr), stable across processes."""
    text = json.dumps(obj, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    raise TypeError(f"Cannot hash {type(o).__name__} in a unit key.")


def unit_generator(key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the unit key alone (the key already contains the run seed)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(key[:15], 16))  # 60 bits: fits the generator's int64 seed
    return g


def model_fingerprint(model: torch.nn.Module, name: str = "") -> str:
    """A short id of a model's weights: the name, every tensor's name and shape, and a strided sample of its values.

    Cheap for multi-GB models (at most 4096 values per tensor are read) and different for different random inits.
    """
    h = hashlib.sha256(name.encode())
    for k, v in model.state_dict().items():
        flat = v.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return f"{name}@{h.hexdigest()[:16]}"


@dataclass
class Unit:
    """One piece of work: its kind (the folder it is stored in), its parameters (hashed into the key), its cost, and
    its stage (units of stage k + 1 may read the stored results of stage k; not part of the key)."""

    probe: str
    params: dict
    forwards: int = 0  # network evaluations (rows) the unit costs, for --dry-run and progress
    local_forwards: int = 0  # of which with window attention
    key: str = ""
    stage: int = 0


@dataclass
class Store:
    """Unit results under ``root/units``; ``config`` is the per-probe config dict mixed into every key."""

    root: Path
    model_id: str
    seed: int
    config: dict = field(default_factory=dict)  # probe name -> that probe's config
    computed: int = 0  # units computed by this process
    loaded: int = 0  # units found already finished

    def __post_init__(self):
        self.root = Path(self.root)

    def unit(self, probe: str, params: dict, forwards: int = 0, local_forwards: int = 0, stage: int = 0) -> Unit:
        key = stable_hash(
            {"v": STORE_VERSION, "probe": probe, "config": self.config.get(probe, {}), "params": params,
             "model": self.model_id, "seed": int(self.seed)}
        )
        return Unit(probe, params, forwards, local_forwards, key, stage)

    def path(self, unit: Unit) -> Path:
        return self.root / "units" / unit.probe / f"{unit.key}.npz"

    def has(self, unit: Unit) -> bool:
        """Whether the unit's file and its checksum record exist (the content is verified by :meth:`load`)."""
        path = self.path(unit)
        return path.exists() and path.with_suffix(".json").exists()

    def load(self, unit: Unit) -> dict[str, np.ndarray]:
        """The unit's arrays, verified against the checksum recorded when it was written (:class:`CorruptUnit` if not)."""
        path = self.path(unit)
        try:
            data = path.read_bytes()
            recorded = json.loads(path.with_suffix(".json").read_text()).get("sha256")
        except (OSError, ValueError) as e:
            raise CorruptUnit(f"{path} is unreadable ({type(e).__name__})") from None
        if recorded != hashlib.sha256(data).hexdigest():
            raise CorruptUnit(f"{path} does not match its recorded checksum" if recorded else f"{path} has no recorded checksum")
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CorruptUnit(f"{path} is unreadable ({type(e).__name__})") from None

    def save(self, unit: Unit, arrays: dict[str, Any]) -> None:
        """Atomic write: a temporary file in the same folder, then ``os.replace``."""
        path = self.path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for k, v in arrays.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{unit.key[:8]}-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            sha = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
            meta = json.dumps({"probe": unit.probe, "params": unit.params, "model": self.model_id, "seed": self.seed, "sha256": sha},
                              default=_jsonable, indent=1)
            _atomic_text(path.with_suffix(".json"), meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def discard(self, unit: Unit) -> None:
        """Remove a stored unit (a checkpoint that is no longer needed)."""
        self.path(unit).unlink(missing_ok=True)
        self.path(unit).with_suffix(".json").unlink(missing_ok=True)

    def get_or_compute(self, unit: Unit, compute: Callable[[torch.Generator], dict], device="cpu") -> dict[str, np.ndarray]:
        """The stored result of ``unit``, or ``compute(unit_generator(key))`` stored and returned. A corrupt stored
        unit is reported (one warning line naming the file) and computed again."""
        if self.has(unit):
            try:
                arrays = self.load(unit)
                self.loaded += 1
                return arrays
            except CorruptUnit as e:
                log.warning(f"{e}; computing the unit again.")
        out = compute(unit_generator(unit.key, device))
        self.save(unit, out)
        self.computed += 1
        return self.load(unit)


def check_writable(folder: str | Path, option: str = "--out") -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file, before any work is done; one UserError
    sentence otherwise (an existing file, a read-only or virtual file system, no permission)."""
    if not str(folder).strip():
        raise UserError(f"{option} is empty; give an output folder.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is an existing file, not a folder; give a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"Cannot write to {option} {folder}: {e.strerror or type(e).__name__}; choose a writable folder.") from None
    return folder


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Ranks:
    """Rank / world size and a barrier: from Lightning Fabric when given, from torch.distributed if initialised,
    else a single process."""

    def __init__(self, fabric=None):
        self.fabric = fabric
        if fabric is not None:
            self.rank, self.world = int(fabric.global_rank), int(fabric.world_size)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank, self.world = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world <= 1:
            return
        if self.fabric is not None:
            self.fabric.barrier()
        else:
            torch.distributed.barrier()

    def gather_counts(self, store: "Store") -> tuple[int, int]:
        """(computed, loaded) units summed over every rank on rank 0 (each rank writes its own counts next to the
        units before a barrier); other ranks get their own."""
        if self.world <= 1:
            return store.computed, store.loaded
        folder = store.root / "units"
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_text(folder / f".counts-rank{self.rank}.json", json.dumps({"computed": store.computed, "loaded": store.loaded}))
        self.barrier()
        if not self.is_main:
            return store.computed, store.loaded
        counts = [json.loads((folder / f".counts-rank{r}.json").read_text()) for r in range(self.world)]
        return sum(c["computed"] for c in counts), sum(c["loaded"] for c in counts)

    def close(self) -> None:
        """End the distributed part: a last barrier, then the process group is destroyed, so that rank 0's assembly
        (torchmetrics, which syncs whenever a process group exists) runs as a single process."""
        if self.world <= 1:
            return
        self.barrier()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_units(
    store: Store,
    units: Iterable[Unit],
    compute: Callable[[Unit, torch.Generator], dict],
    *,
    ranks: Ranks | None = None,
    device="cpu",
    on_unit: Callable[[Unit, bool], None] | None = None,
) -> dict[str, dict[str, np.ndarray]] | None:
    """Compute (or load) every unit, round-robin over ranks; rank 0 returns ``{key: arrays}`` of all units after a
    barrier, other ranks return None. ``on_unit(unit, was_computed)`` runs after each of this rank's units (progress
    bars, or a test's simulated kill)."""
    ranks = ranks or Ranks()
    units = list(units)
    mine: dict[str, dict[str, np.ndarray]] = {}
    for i, u in enumerate(units):
        if i % ranks.world != ranks.rank:
            continue
        before = store.computed
        mine[u.key] = store.get_or_compute(u, lambda g, u=u: compute(u, g), device=device)
        if on_unit is not None:
            on_unit(u, store.computed > before)
    ranks.barrier()
    if not ranks.is_main:
        return None
    missing = [u for u in units if u.key not in mine and not store.has(u)]
    if missing:
        raise RuntimeError(f"{len(missing)} units of {missing[0].probe} are missing after the barrier; is --out on a shared file system?")
    return {u.key: mine[u.key] if u.key in mine else store.load(u) for u in units}
