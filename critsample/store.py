"""Resumable results: every unit of probe work is stored the moment it finishes, keyed by what it depends on.

A *unit* is the smallest piece of work worth keeping (one sample batch of one probe at one setting). Its key is a
hash of ``(probe name, probe config, unit params, model id, seed, STORE_VERSION)``, so

* a restarted run loads finished units and recomputes nothing (it only looks the key up);
* a changed config, model, seed or code version gives new keys and never reuses a stale unit;
* each unit draws its randomness from ``unit_generator(key)``, a ``torch.Generator`` seeded from the key alone, so
  the numbers do not depend on which units ran before, on the order, on a kill and resume, or on the rank that ran it.

Units live in ``<root>/units/<probe>/<key>.npz`` (plus a ``.json`` sidecar with the key, the readable params and the
sha256 of the ``.npz``), written by :func:`atomic_write` (a temporary file in the same folder, fsync, ``os.replace``) so
a killed run or a full disk never leaves a half-written unit. Every load checks the sidecar against the key asked for
and the file against the sidecar's checksum: a truncated, garbled, replaced or swapped unit is reported in one warning
line naming the file and computed again.

:func:`atomic_write` is the one way critsample writes a file a user keeps (summaries, run records, samples, figures):
the old file stays whole until the new one is complete; a write that fails (a full disk) raises :class:`WriteError`,
one sentence naming the file. :func:`model_fingerprint` hashes every byte of a model's weights (safetensors files once,
their digests remembered by path, size and mtime).

Sharding: :func:`run_units` gives unit ``i`` to rank ``i % world_size``; every rank writes its own units to the shared
folder and rank 0 assembles all of them after a barrier (:class:`Ranks`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .errors import UserError

STORE_VERSION = 1  # bump when a probe's numbers change for the same inputs
log = logging.getLogger("critsample")


class CorruptUnit(Exception):
    """A stored unit whose file is unreadable, does not match its recorded checksum, or whose sidecar is another
    unit's."""


class WriteError(UserError):
    """A file could not be written (a full disk, a file system gone read-only): one sentence naming it."""


_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _raise_write_error(path: Path, e: OSError) -> None:
    """Re-raise ``e``: as :class:`WriteError` (one sentence naming ``path``) when it is the disk's fault, else as is."""
    if e.errno not in _CANNOT_WRITE:
        raise e
    reason = e.strerror or errno.errorcode.get(e.errno or 0) or type(e).__name__
    raise WriteError(f"Could not write {path} ({reason}); the work finished so far is kept, so free space (or fix "
                     "the folder) and run the same command again to resume.") from None


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Write a folder whole or not at all (an exported model: ``save_pretrained`` of several parts): the block writes
    into a temporary sibling folder, which takes ``path``'s place once the block ends without an error (an existing
    folder is first renamed aside, then removed: the folder is replaced whole, so files that were in it and not written
    again are gone). A failure inside the block or in the renames leaves ``path`` as it was; a kill between the two
    renames leaves the old folder whole as ``.NAME.old-PID``. Disk errors become
    :class:`WriteError` as in :func:`atomic_write`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None

    def undo() -> None:  # the new folder goes; the old one, if moved aside, comes back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)

    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700; a user's folder gets the usual permissions
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        undo()
        _raise_write_error(path, e)
    except BaseException:
        undo()
        raise


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write ``path`` whole or not at all: ``data`` (bytes, text, or a function writing to a binary file object) goes to
    a temporary file in the same folder, is flushed and fsynced, and replaces ``path`` with ``os.replace``. Until then
    the old file is untouched; on any failure the temporary file is removed. An ``OSError`` of the disk (no space left,
    a quota, a read-only file system, no permission) becomes :class:`WriteError`, one sentence naming the file and
    saying that finished work is kept."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; a user's file gets the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_write_error(path, e)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_npz(path: str | Path, compressed: bool = False, **arrays) -> Path:
    """``numpy.savez`` (``savez_compressed``) through :func:`atomic_write`."""
    return atomic_write(path, lambda f: (np.savez_compressed if compressed else np.savez)(f, **arrays))


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
    """A short id of a model's weights: the name and :func:`weights_digest` of its state dict, which depends on every
    byte of every parameter and buffer.

    Cheap for multi-GB models loaded from safetensors (:func:`record_weight_files`): while no tensor has been replaced
    or changed in place since the load, the digest is looked up under the files' digests (each file hashed once and
    remembered by path, size and mtime; a Hugging Face cache blob is named by its sha256), so only the first load of a
    model reads its tensors. The value is the same whichever way it is found.
    """
    tensors = model.state_dict(keep_vars=True)
    files = getattr(model, "_critsample_weight_files", None)
    cache = cache_key = digest = None
    if files is not None and files["tensors"] == _tensor_identity(tensors):
        cache = _DigestCache()
        cache_key = stable_hash({"files": files["digest"],
                                 "layout": [[k, list(v.shape), str(v.dtype)] for k, v in tensors.items()]})
        digest = cache.weights.get(cache_key)
    if not isinstance(digest, str):
        digest = weights_digest(tensors)
        if cache is not None:
            cache.weights[cache_key] = digest
            cache.changed = True
            cache.save()
    return f"{name}@{hashlib.sha256(f'{name}:{digest}'.encode()).hexdigest()[:16]}"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, shape, dtype and the blake2b of all its bytes (:func:`tensor_digest`)."""
    h = hashlib.sha256()
    for k, v in tensors.items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}:".encode())
        h.update(tensor_digest(v))
    return h.hexdigest()


def tensor_digest(t: torch.Tensor, chunk: int = 1 << 26) -> bytes:
    """blake2b of every byte of ``t`` (made contiguous on the CPU a chunk of ``chunk`` bytes at a time)."""
    flat = t.detach().reshape(-1)
    h = hashlib.blake2b(digest_size=32)
    per = max(1, chunk // max(1, flat.element_size()))
    for i in range(0, flat.numel(), per):
        part = flat[i : i + per].cpu().contiguous()
        h.update((part.to(torch.uint8) if part.dtype == torch.bool else part).view(torch.uint8).numpy().data)
    return h.digest()


def _tensor_identity(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Which memory each tensor is and how often it was changed in place (torch's version counter)."""
    return {k: [v.data_ptr(), v._version, str(v.device), str(v.dtype)] for k, v in tensors.items()}


def record_weight_files(model: torch.nn.Module, folder: str | Path) -> None:
    """Remember that ``model``'s weights are those of the safetensors files (and JSON configs) of the diffusers folder
    ``folder`` (its top level and its parts' subfolders), as loaded now, for :func:`model_fingerprint`. Call it at the
    end of a load, after any ``.to(device)``."""
    folder = Path(folder)
    files = sorted(p for p in [*folder.glob("*"), *folder.glob("*/*")] if p.suffix in (".safetensors",
                                                                                       ".json") and p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        return
    cache = _DigestCache()
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}:{cache.digest(p)};".encode())
    cache.save()
    model._critsample_weight_files = {"digest": h.hexdigest(),
                                      "tensors": _tensor_identity(model.state_dict(keep_vars=True))}


class _DigestCache:
    """sha256 of files remembered by (resolved path, size, mtime_ns), and weights digests remembered by the digests of
    the files they were loaded from, in ``$XDG_CACHE_HOME/critsample/digests.json`` (``~/.cache`` when unset). A cache
    that cannot be read or written only makes a run slower."""

    def __init__(self):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        self.path = Path(base) / "critsample" / "digests.json"
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        entries = entries if isinstance(entries, dict) else {}
        self.files = entries.get("files") if isinstance(entries.get("files"), dict) else {}
        self.weights = entries.get("weights") if isinstance(entries.get("weights"), dict) else {}
        self.changed = False

    def digest(self, path: Path) -> str:
        real = path.resolve()
        # a Hugging Face cache blob: its sha256
        if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
            return real.name
        st = real.stat()
        entry = self.files.get(str(real))
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return entry["sha256"]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        self.files[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        self.changed = True
        return h.hexdigest()

    def save(self, keep: int = 1000) -> None:
        if not self.changed:
            return
        self.files = {k: v for k, v in self.files.items() if os.path.exists(k)}
        self.weights = dict(list(self.weights.items())[-keep:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"files": self.files, "weights": self.weights}, indent=0))
        except (OSError, UserError):
            pass


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
        """The unit's arrays, verified against the checksum recorded when it was written (:class:`CorruptUnit` if
        not)."""
        path = self.path(unit)
        try:
            data = path.read_bytes()
            meta = json.loads(path.with_suffix(".json").read_text())
            recorded = meta.get("sha256")
        except (OSError, ValueError, AttributeError) as e:
            raise CorruptUnit(f"{path} is unreadable ({type(e).__name__})") from None
        if meta.get("key") != unit.key:  # a sidecar moved or copied from another unit, or one without its key
            raise CorruptUnit(f"{path.with_suffix('.json')} records the unit {str(meta['key'])[:16]}..., not this one"
                              if meta.get("key")
                              else f"{path.with_suffix('.json')} records no unit key (an older critsample wrote it)")
        if recorded != hashlib.sha256(data).hexdigest():
            raise CorruptUnit(f"{path} does not match its recorded checksum" if recorded
                              else f"{path} has no recorded checksum")
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CorruptUnit(f"{path} is unreadable ({type(e).__name__})") from None

    def save(self, unit: Unit, arrays: dict[str, Any]) -> None:
        """Atomic writes (:func:`atomic_write`) of the ``.npz`` and of its sidecar: the unit's key, readable params and
        the sha256 of the ``.npz``. The sidecar goes first: a kill between the two leaves a unit that fails its
        checksum."""
        path = self.path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for k, v in arrays.items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        meta = json.dumps({"key": unit.key, "probe": unit.probe, "params": unit.params, "model": self.model_id,
                           "seed": self.seed,
                           "sha256": hashlib.sha256(data).hexdigest()}, default=_jsonable, indent=1)
        atomic_write(path.with_suffix(".json"), meta)
        atomic_write(path, data)

    def discard(self, unit: Unit) -> None:
        """Remove a stored unit (a checkpoint that is no longer needed)."""
        self.path(unit).unlink(missing_ok=True)
        self.path(unit).with_suffix(".json").unlink(missing_ok=True)

    def get_or_compute(self, unit: Unit, compute: Callable[[torch.Generator], dict], device="cpu") -> dict[str,
                                                                                                           np.ndarray]:
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
        raise UserError(f"Cannot write to {option} {folder}: {e.strerror or type(e).__name__}; choose a writable "
                        "folder.") from None
    return folder


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
        atomic_write(folder / f".counts-rank{self.rank}.json",
                     json.dumps({"computed": store.computed, "loaded": store.loaded}))
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
        raise RuntimeError(f"{len(missing)} units of {missing[0].probe} are missing after the barrier; is --out on a "
                           "shared file system?")
    return {u.key: mine[u.key] if u.key in mine else store.load(u) for u in units}
