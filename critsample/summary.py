"""``summary.json``: the one record of a detection that other commands read (schema, write, read, validate, version).

``critsample detect`` writes it (``detect.assemble``); ``critsample tune`` adds the certified ``plan``
(:func:`write_plan`); ``critsample sample --adaptive --summary`` (:func:`certified_plan`, else the window) and the
radius / loss schedules of ``critsample fit`` read it through :func:`read`. Every number carries its convention: times
are critsample t (:data:`T_CONVENTION`), noise levels log-SNR in nats (:data:`LOG_SNR_CONVENTION`). The full field list
is in ``docs/summary-schema.md``.

Versioning: :data:`SCHEMA` is ``critsample.detect.summary/<version>``; a reader accepts its own version and older
ones, and refuses a newer one with a sentence that says to upgrade. A hand-written summary without ``schema`` (a
window to reuse) is read as the current version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import UserError
from .options import TimeWindow
from .store import atomic_write

VERSION = 1
SCHEMA = f"critsample.detect.summary/{VERSION}"
T_CONVENTION = "t in [0, 1]: 0 = clean data, 1 = pure noise (DDPM: t = k / 1000; flow matching: t = sigma)"
LOG_SNR_CONVENTION = "log-SNR = log(alpha^2 / sigma^2) in nats with x_t = alpha x_0 + sigma eps; decreases as t grows"


def jsonable(obj):
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write(summary: dict, path: str | Path) -> Path:
    """Write ``summary`` (stamped with :data:`SCHEMA`) as JSON, atomically (the old file stays whole until the new one
    is complete: a full disk or a kill never leaves it cut); returns the path."""
    return atomic_write(path, json.dumps(jsonable({**summary, "schema": SCHEMA}), indent=1))


def read(path: str | Path, model: str | None = None, *, require_window: bool = True) -> dict:
    """The summary at ``path``, validated: a critsample summary of this or an older version, measured on ``model``
    (a name; None = any), with a critical window [t_start, t_end] when ``require_window``."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.exists():
        raise UserError(f"No summary at {path}; run `critsample detect --model ... --out DIR` first and pass "
                        "DIR/summary.json.")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; pass the summary.json written by `critsample detect`.") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} is not a critsample summary (a JSON object); pass the summary.json written by "
                        "`critsample detect`.")
    schema = summary.get("schema", SCHEMA)
    if not str(schema).startswith("critsample.detect.summary/"):
        raise UserError(f"{path} is not a critsample summary (no schema {SCHEMA!r}); pass the summary.json written by "
                        "`critsample detect`.")
    version = str(schema).rsplit("/", 1)[1]
    if not version.isdigit() or int(version) > VERSION:
        raise UserError(f"{path} was written by a newer critsample (schema {schema}); upgrade critsample to read it.")
    if model is not None and "model" not in summary:
        raise UserError(f"{path} does not say which model it was measured on (no 'model' key); add it or detect the "
                        f"window of {model!r}.")
    if model is not None and summary["model"] != model:
        raise UserError(f"{path} was measured on {summary['model']!r}, not on {model!r}; detect the window of this "
                        "model first.")
    if require_window:
        critical_window(summary, path)
    return summary


def critical_window(summary: dict, path: str | Path = "the summary") -> TimeWindow:
    """The combined critical window [t_start, t_end] in critsample t."""
    w = summary.get("critical_window")
    try:
        t0, t1 = float(w["t_start"]), float(w["t_end"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} has no critical_window.t_start / t_end: none was detected, or it is not a critsample "
                        "summary; give an explicit window.") from None
    try:
        return TimeWindow(t0, t1)
    except UserError:
        raise UserError(f"{path} has a critical window [{t0}, {t1}] outside 0 <= t0 < t1 <= 1 (t: 0 = clean, 1 = "
                        "noise); give an explicit window.") from None


def suggested_radius(summary: dict) -> int | None:
    """The local radius ``detect`` suggests for the steps outside the window (None when it could not suggest one)."""
    r = summary.get("suggested_radius")
    if r is None:
        return None
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise UserError(f"The summary's suggested_radius must be an integer >= 0 or null; got {r!r}.")
    return r


def certified_plan(summary: dict) -> dict | None:
    """The plan ``critsample tune`` certified and wrote as the summary's top-level ``plan`` object (``plan`` = a
    :meth:`~critsample.sampling.Plan.to_dict`, with ``quality``, ``cost``, ``tolerance``, ``baseline``), or None."""
    p = summary.get("plan")
    if p is None:
        return None
    if not isinstance(p, dict) or not isinstance(p.get("plan"), dict) or not isinstance(p["plan"].get("steps"),
                                                                                        list) or not p["plan"]["steps"]:
        raise UserError("The summary's 'plan' is not a certified plan (an object whose 'plan' has 'steps'); run "
                        "`critsample tune` again or remove it.")
    return p


def write_plan(path: str | Path, plan: dict) -> Path:
    """Set the summary's top-level ``plan`` object (read and written back whole; every other key kept)."""
    path = Path(path)
    path = path / "summary.json" if path.is_dir() else path
    summary = read(path, require_window=False)
    return write({**summary, "plan": plan}, path)
