"""Weights & Biases logging at the edge of the commands (the probes and samplers never import wandb).

Offline by default: ``WANDB_MODE=offline`` unless the user set WANDB_MODE; runs go under ``<out>/wandb`` and can be
uploaded later with ``wandb sync <out>/wandb/offline-run-*``.

W&B is a copy of results the commands have already written to ``--out``: a W&B failure (it cannot write under a
read-only HOME, a broken install, a server error) is one warning line and the command still succeeds (:func:`guarded`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger("critsample")


def guarded(fn):
    """``fn(..., out, ...)`` whose failure (any ``Exception``) is one warning line saying that the results are on disk
    under ``out``; it then returns None. Call it only after the results are written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            out = kwargs.get("out", args[1] if len(args) > 1 else "--out")
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            log.warning(f"W&B logging failed ({type(e).__name__}{': ' + reason if reason else ''}); the results are "
                        f"written under {out} and nothing was lost; fix W&B (e.g. a writable WANDB_DIR or HOME) or "
                        "pass --no-wandb.")
            return None

    return wrapper


def start(out: str | Path, *, name: str, config: dict, job_type: str, project: str = "critsample"):
    """A W&B run writing under ``out/wandb`` (offline unless WANDB_MODE is set)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    out = Path(out)
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, name=name, job_type=job_type, dir=str(out), config=config,
                      reinit="finish_previous")


@guarded
def log_detect(summary: dict, out: str | Path, *, figures: dict[str, Path], curves: dict[str, dict],
               config: dict) -> str | None:
    """Log a detection: the config, every curve as a table and a line plot, figures (heatmaps, scans, strips) as
    images, the window table and the summary scalars. Returns the run's local folder."""
    import wandb

    run = start(out, name=f"detect-{summary['model']}", config=config, job_type="detect")
    try:
        payload = {}
        for name, c in curves.items():  # c = {"x": [...], "x_label": str, "series": {label: (mean, err)}}
            rows = [[float(x), label, float(m), float(e)] for label, (mean, err) in c["series"].items() for x, m,
                    e in zip(c["x"], mean, err, strict=True)]
            table = wandb.Table(columns=[c.get("x_label", "t"), "series", "mean", "err"], data=rows)
            payload[f"tables/{name}"] = table
            for label, (mean, _) in c["series"].items():
                t = wandb.Table(columns=[c.get("x_label", "t"), "mean"],
                                data=[[float(x), float(m)] for x, m in zip(c["x"], mean, strict=True)])
                payload[f"curves/{name}/{label}"] = wandb.plot.line(t, c.get("x_label", "t"), "mean",
                                                                    title=f"{name} {label}")
        for name, path in figures.items():
            if path is not None and Path(path).exists():
                payload[f"figures/{name}"] = wandb.Image(str(path))
        cols = ["probe", "family", "t_start", "t_end", "center", "uncertainty", "log_snr_start", "log_snr_end", "valid"]
        payload["windows"] = wandb.Table(columns=cols,
                                         data=[[w.get(k) for k in cols] for w in summary.get("windows", {}).values()])
        run.log(payload)
        cw = summary.get("critical_window") or {}
        run.summary.update({f"critical_window/{k}": v for k, v in cw.items() if isinstance(v, (int, float))})
        for pair, v in (summary.get("concurrence") or {}).items():
            run.summary.update({f"concurrence/{pair}/{k}": v[k] for k in ("overlap_fraction", "distance_in_sigma",
                                                                          "concurrent") if k in v})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


@guarded
def log_sample_run(record: dict, out: str | Path) -> str | None:
    """Log a ``critsample sample`` run: config, plan, cost and the sample grid."""
    import wandb

    out = Path(out)
    run = start(out, name=f"sample-{record['model']}", config=record.get("config", {}), job_type="sample")
    try:
        payload = {}
        grid = out / record.get("outputs", {}).get("grid", "grid.png")
        if grid.exists():
            payload["samples"] = wandb.Image(str(grid))
        run.log(payload)
        cost = record.get("cost", {})
        run.summary.update({f"cost/{k}": v for k, v in cost.items() if isinstance(v, (int, float))})
        run.summary.update({"plan": record.get("plan_description", "")})
        return str(Path(run.dir).parent)
    finally:
        run.finish()
