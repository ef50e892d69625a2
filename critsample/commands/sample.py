"""``critsample sample``: argv -> :class:`~critsample.generate.SampleConfig` -> :func:`critsample.generate.run` -> print."""

from __future__ import annotations

import json

from jsonargparse import ActionConfigFile, ArgumentParser

from ..generate import SampleConfig, run
from .args import normalize_argv, parse, pick_device


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="critsample sample", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with these options (see configs/sample/).")
    p.add_class_arguments(SampleConfig, None, as_group=False)
    return p


def run_sample(argv: list[str]) -> int:
    argv = normalize_argv(argv, ("adaptive", "wandb"), {"--class": "--classes"})
    p = parser()
    ns = parse(p, _expand_lists(argv))
    ns = {k: v for k, v in vars(ns).items() if k in SampleConfig.__dataclass_fields__}
    cfg = SampleConfig(**ns)
    record = run(cfg, device=pick_device(cfg.device), progress=True)
    c = record["cost"]
    print(f"{record['plan_description']}")
    print(
        f"wrote {record['config']['out']}: {record['config']['num']} samples, "
        f"{c['model_evaluations']} model evaluations, {c['flops_per_sample']['total'] / 1e9:.3g} GFLOPs/sample, "
        f"{c['wall_seconds']:.1f} s"
    )
    return 0


def _expand_lists(argv: list[str]) -> list[str]:
    """Let ``--classes 0 1 2`` and ``--prompt a b`` take several values, as users type them."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--classes", "--prompt"):
            vals = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") or (argv[i].startswith("-") and not argv[i][1:].isdigit())):
                vals.append(argv[i])
                i += 1
            out += [a, json.dumps([int(v) for v in vals] if a == "--classes" and all(v.lstrip("-").isdigit() for v in vals) else vals)]
            continue
        out.append(a)
        i += 1
    return out
