"""``critsample tune``: argv -> :class:`~critsample.tune.TuneConfig` -> :func:`critsample.tune.run` -> print."""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from ..tune import TuneConfig, run
from .args import parse_config, pick_device

LIST_OPTIONS = ("--shifts", "--scales", "--radii", "--outside", "--kinds")


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
    q, c, base, conf = record["quality"], record["cost"], record["baseline"], record["confirmation"]
    print(f"{'certified' if record['certified'] else 'NOT certified'}: {record['name']} ({conf['decision']})")
    for label, qq in (("fresh seed " + str(conf["seed"]), q), ("in sample", record["in_sample"])):
        print(f"  {label}: accuracy {qq['accuracy']:.4f} +- {qq['accuracy_sigma']:.4f} (drop "
              f"{100 * qq['accuracy_drop']:+.2f} +- {100 * qq['accuracy_drop_sigma']:.2f} points, 95 % bound "
              f"{100 * qq['accuracy_drop_upper']:.2f}), FD {qq['fd']:.3f} +- {qq['fd_sigma']:.3f} (ratio "
              f"{qq['fd_ratio']:.3f} +- {qq['fd_ratio_sigma']:.3f}, 95 % bound {qq['fd_ratio_upper']:.3f})")
    print(f"  full guidance (search seed): accuracy {base['quality']['accuracy']:.4f}")
    print(f"  cost: {c['forwards']} forwards/sample, FLOPs {c['flops_ratio']:.3f} x full, measured "
          f"{c['speedup_seconds']:.2f}x faster")
    print(f"wrote {cfg.out}/frontier.json, {cfg.out}/frontier.png and the plan into {cfg.summary} "
          f"({record['setup']['units_computed_this_run']} plans sampled, {record['setup']['units_loaded']} stored)")
    return 0
