"""``critsample sample``: argv -> :class:`~critsample.generate.SampleConfig` -> :func:`critsample.generate.run` -> print."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from ..errors import UserError
from ..generate import SampleConfig, run
from .args import config_path, expand_lists, instantiate, normalize_argv, parse, pick_device, read_config_file


def parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # SampleConfig's attribute docstrings are the help
    p = ArgumentParser(prog="critsample sample", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with these options (see configs/sample/).")
    p.add_class_arguments(SampleConfig, None, as_group=False)
    return p


def run_sample(argv: list[str]) -> int:
    argv = expand_lists(normalize_argv(argv, ("adaptive", "wandb", "trust_pickled_weights", "batch_invariant"), {"--class": "--classes"}), ("--classes", "--prompt"))
    for option in ("--classes", "--prompt"):
        if option in argv and argv[argv.index(option) + 1] == "[]":
            raise UserError(f"{'--class' if option == '--classes' else option} needs at least one value (omit it for the default).")
    config = config_path(argv)
    if config is not None:
        read_config_file(config)  # a missing file or a YAML error: one sentence with the file and line
    p = parser()
    ns = instantiate(p, parse(p, argv))
    cfg = SampleConfig(**{k: getattr(ns, k) for k in SampleConfig.__dataclass_fields__})
    record = run(cfg, device=pick_device(cfg.device), progress=True)
    c = record["cost"]
    print(f"{record['plan_description']}")
    print(
        f"wrote {record['config']['out']}: {record['config']['num']} samples, "
        f"{c['model_evaluations']} model evaluations, {c['flops_per_sample']['total'] / 1e9:.3g} GFLOPs/sample, "
        f"{c['wall_seconds']:.1f} s"
    )
    return 0
