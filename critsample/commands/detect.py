"""``critsample detect``: argv -> :class:`~critsample.detect.DetectConfig` -> :func:`critsample.detect.run` -> print.

Probes (paper sec. 3): ``cond_gap`` (eq. 6) and ``locality_gap`` (eq. 7) along training and sampling trajectories,
``forward_backward`` (sec. 3.3), ``window_cond`` (sec. 3.4) and ``window_locality`` (sec. 3.5). Every unit of work
is stored as it finishes: a killed run started again with the same options recomputes nothing and ends with the same
numbers. Outputs in ``--out``: ``summary.json`` (docs/summary-schema.md), ``report.md`` with the figures,
``arrays/*.npz`` and ``config.yaml``; W&B (offline unless WANDB_MODE is set) under ``--out/wandb``.
"""

from __future__ import annotations

import os
import sys

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.fabric import Fabric
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import detect
from ..detect import PRESETS, DetectConfig
from ..errors import UserError
from .args import config_path, option_value, pick_device, read_config_file
from .args import parse_config as _parse

LIST_OPTIONS = ("--probes", "--gaps.trajectories", "--gaps.radii", "--fb.radii", "--windows.radii")


def _preset_of(argv: list[str]) -> str:
    preset = option_value(argv, "preset")
    config = config_path(argv)
    if config is not None:
        from_file = read_config_file(config).get("preset")  # also checks the file before jsonargparse reads it
        preset = preset or from_file
    preset = preset or "fast"
    if preset not in PRESETS:
        raise UserError(f"Unknown preset {preset!r}; choose {' or '.join(PRESETS)}.")
    return preset


def parser(preset: str = "fast") -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = ArgumentParser(
        prog="critsample detect", exit_on_error=False,
        description=__doc__.splitlines()[0]
        + " Flags: --dry-run, --no-wandb, --class N. Presets fill every size not given.",
    )
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML of these options (configs/detect/*.yaml; make one with --print_config).")
    p.add_class_arguments(DetectConfig, None, as_group=False)
    p.set_defaults({f"{sec}.{k}": v for sec, d in PRESETS[preset].items() for k, v in d.items()})
    p.set_defaults({"preset": preset})
    return p


def parse_config(argv: list[str]) -> DetectConfig:
    """The config of a ``critsample detect`` command line (presets fill every size not given)."""
    return _parse(argv, DetectConfig, lambda argv: parser(_preset_of(argv)),
                  flags=("dry_run", "wandb", "windows.complement", "trust_pickled_weights"),
                  aliases={"--class": "--class_id"}, lists=LIST_OPTIONS)


class _Bar:
    """A rich progress bar over model evaluations (only on a terminal)."""

    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(),
                            disable=not sys.stderr.isatty(), transient=True)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, description: str, total_forwards: int) -> None:
        self.task = self.bar.add_task(description, total=total_forwards)

    def advance(self, unit, computed: bool) -> None:
        self.bar.update(self.task, advance=unit.forwards,
                        description=f"{unit.probe} {'computed' if computed else 'stored'}")


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def print_estimate(est: dict, cfg: DetectConfig, name: str, file=None) -> None:
    file = file or sys.stdout
    print(f"critsample detect --dry-run: {name}, preset {cfg.preset}, probes {', '.join(cfg.probes)}", file=file)
    for probe, d in est["probes"].items():
        print(f"  {probe:18s} {d['units']:5d} units  {d['evaluations']:9d} model evaluations "
              f"({d['local_evaluations']} local)  {d['stored_units']} units stored  ~{_fmt_s(d['estimated_seconds'])}",
              file=file)
    if "strict_forwards_per_local_row" in est:
        per = ", ".join(f"r={r}: {n}" for r, n in est["strict_forwards_per_local_row"].items())
        print(f"  --locality {cfg.locality}: a strictly local row costs one forward per copy ({per}); counted above",
              file=file)
    spe = est["seconds_per_evaluation"]
    print(f"  total: {est['evaluations']} model evaluations, {est['remaining_evaluations']} still to run; "
          f"{1 / spe['global']:.0f} global / {1 / spe['local']:.0f} local evaluations per second "
          f"(timed on {spe['timed_rows']} rows) -> about {_fmt_s(est['estimated_seconds'])}", file=file)


def _fabric(cfg: DetectConfig) -> Fabric | None:
    """Lightning Fabric for --devices N, or to join a torchrun launch (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.devices <= 1 and world <= 1:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else cfg.devices
    accelerator = "cpu" if cfg.device == "cpu" or not torch.cuda.is_available() else "cuda"
    fabric = Fabric(accelerator=accelerator, devices=local, num_nodes=max(1, world // local) if world > 1 else 1,
                    strategy="ddp")
    fabric.launch()
    return fabric


def run_detect(argv: list[str]) -> int:
    """``critsample detect``: exit 0 on success; user errors raise UserError (exit 2 in cli.py)."""
    cfg = parse_config(argv)
    device = pick_device(cfg.device)
    if cfg.dry_run:
        print_estimate(detect.estimate(cfg, device=device), cfg, cfg.model)
        return 0
    with _Bar() as bar:
        summary = detect.run(cfg, device=device, progress=bar, fabric=_fabric(cfg))
    if summary is None:  # not rank 0
        return 0
    cw = summary.get("critical_window") or {}
    if cw:
        print(f"critical window of {summary['model']}: t in [{cw['t_start']:.3f}, {cw['t_end']:.3f}] (center "
              f"{cw['center']:.3f} +- {cw['uncertainty']:.3f}; log-SNR {cw['log_snr_start']:.2f} .. "
              f"{cw['log_snr_end']:.2f})")
    else:
        print(f"no critical window could be estimated for {summary['model']} (see {cfg.out}/report.md)")
    v = summary.get("concurrence", {}).get("primary")
    if v:
        print(f"primary test ({v['symmetry_breaking']} vs {v['nonlocality']}, r = {v['radius']}, {v['locality']}): "
              f"{v['verdict']}")
    print(f"wrote {cfg.out}/summary.json, {cfg.out}/report.md")
    return 0
