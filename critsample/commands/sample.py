"""``critsample sample``: argv -> :class:`~critsample.generate.SampleConfig` -> :func:`critsample.generate.run`
-> print."""

from __future__ import annotations

import math

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from ..generate import SampleConfig, run
from .args import parse_config, pick_device


def parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # SampleConfig's attribute docstrings are the help
    p = ArgumentParser(prog="critsample sample", description=" ".join(__doc__.split()), exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with these options (see configs/sample/).")
    p.add_class_arguments(SampleConfig, None, as_group=False)
    return p


def run_sample(argv: list[str]) -> int:
    cfg = parse_config(argv, SampleConfig, parser(),
                       flags=("adaptive", "wandb", "trust_pickled_weights", "batch_invariant"),
                       aliases={"--class": "--classes"}, lists=("--classes", "--prompt", "--kinds"),
                       nonempty=("--classes", "--prompt"))
    record = run(cfg, device=pick_device(cfg.device), progress=True)
    c = record["cost"]
    flops = c["flops_per_sample"]
    gflops = f"{flops['total'] / 1e9:.3g} GFLOPs/sample" if math.isfinite(flops["total"]) else flops.get(
        "note", "no FLOPs count")
    print(f"{record['plan_description']}")
    print(
        f"wrote {record['config']['out']}: {record['config']['num']} samples, "
        f"{c['model_evaluations']} model evaluations, {gflops}, "
        f"{c['wall_seconds']:.1f} s"
    )
    return 0
