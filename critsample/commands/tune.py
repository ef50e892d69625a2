"""``critsample tune``: argv -> :class:`~critsample.tune.TuneConfig` -> :func:`critsample.tune.run` -> print."""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from ..tune import TuneConfig, run
from .args import parse_config, pick_device

LIST_OPTIONS = ("--shifts", "--scales", "--radii", "--outside")


def parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # TuneConfig's attribute docstrings are the help
    p = ArgumentParser(prog="critsample tune", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with these options.")
    p.add_class_arguments(TuneConfig, None, as_group=False)
    return p


def run_tune(argv: list[str]) -> int:
    cfg = parse_config(argv, TuneConfig, parser(), flags=("interval", "trust_pickled_weights"), lists=LIST_OPTIONS)

    def on_plan(plan, computed: bool) -> None:
        print(f"  {'measured' if computed else 'stored  '} {plan.name}", file=sys.stderr, flush=True)

    record = run(cfg, device=pick_device(cfg.device), on_plan=on_plan, progress=True)
    q, c, base = record["quality"], record["cost"], record["baseline"]
    print(f"certified: {record['name']}")
    print(f"  accuracy {q['accuracy']:.4f} +- {q['accuracy_sigma']:.4f} (drop {100 * q['accuracy_drop']:+.2f} +- "
          f"{100 * q['accuracy_drop_sigma']:.2f} points vs full {base['quality']['accuracy']:.4f}), FD {q['fd']:.3f} "
          f"+- {q['fd_sigma']:.3f} (ratio {q['fd_ratio']:.3f} +- {q['fd_ratio_sigma']:.3f})")
    print(f"  cost: {c['forwards']} forwards/sample, FLOPs {c['flops_ratio']:.3f} x full, measured "
          f"{c['speedup_seconds']:.2f}x faster")
    print(f"wrote {cfg.out}/frontier.json, {cfg.out}/frontier.png and the plan into {cfg.summary} "
          f"({record['setup']['units_computed_this_run']} plans sampled, {record['setup']['units_loaded']} stored)")
    return 0
