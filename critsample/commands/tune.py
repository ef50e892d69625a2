"""``critsample tune``: argv -> :class:`~critsample.tune.TuneConfig` -> :func:`critsample.tune.run` -> print."""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from ..tune import TuneConfig, dry_run, run
from .args import parse_config, pick_device

LIST_OPTIONS = ("--shifts", "--scales", "--radii", "--outside", "--kinds")


def parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # TuneConfig's attribute docstrings are the help
    p = ArgumentParser(prog="critsample tune", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with these options.")
    p.add_class_arguments(TuneConfig, None, as_group=False)
    return p


def run_tune(argv: list[str]) -> int:
    cfg = parse_config(argv, TuneConfig, parser(), flags=("interval", "trust_pickled_weights", "dry_run"),
                       lists=LIST_OPTIONS)

    if cfg.dry_run:
        d = dry_run(cfg, device=pick_device(cfg.device))
        print(f"{d['model']}: {d['plans']} plans (full guidance + {d['plans'] - 1} candidates) x {d['num']} samples, "
              f"{d['steps']} steps, judge {d['judge']}" + (f", FD reference: {d['fd_reference_samples']} more full-"
                                                            "guidance samples" if d["fd_reference_samples"] else ""))
        for name, fw in d["forwards_per_sample"].items():
            o = d["outside_steps_per_sample"][name]
            print(f"  {name}: {fw} network forwards/sample" + (f" + {o} outside-kind steps/sample" if o else "")
                  + f", {d['flops_per_sample'][name]:.3e} FLOPs/sample")
        print(f"would spend {d['forwards']} network forwards" + (f" and {d['outside_steps']} outside-kind steps" if
                                                                 d["outside_steps"] else "")
              + f", {d['flops']:.3e} FLOPs ({d['note']}); nothing sampled")
        return 0

    def on_plan(plan, computed: bool) -> None:
        print(f"  {'measured' if computed else 'stored  '} {plan.name}", file=sys.stderr, flush=True)

    record = run(cfg, device=pick_device(cfg.device), on_plan=on_plan, progress=True)
    q, c, base, conf = record["quality"], record["cost"], record["baseline"], record["confirmation"]
    print(f"{'certified' if record['certified'] else 'NOT certified'}: {record['name']} ({conf['decision']})")
    score = q.get("score", "accuracy").replace("_", " ")
    print(f"  judge: {record['judge']['name']}")
    for label, qq in (("fresh seed " + str(conf["seed"]), q), ("in sample", record["in_sample"])):
        print(f"  {label}: {score} {qq['accuracy']:.4f} +- {qq['accuracy_sigma']:.4f} (drop "
              f"{100 * qq['accuracy_drop']:+.2f} +- {100 * qq['accuracy_drop_sigma']:.2f} points, 95 % bound "
              f"{100 * qq['accuracy_drop_upper']:.2f}), FD {qq['fd']:.3f} +- {qq['fd_sigma']:.3f} (ratio "
              f"{qq['fd_ratio']:.3f} +- {qq['fd_ratio_sigma']:.3f}, 95 % bound {qq['fd_ratio_upper']:.3f})")
    fid = record.get("fidelity") or {}
    if fid:
        print(f"  fidelity to full guidance on the same fresh noise (not certified on): SSIM {fid['ssim']:.4f} +- "
              f"{fid['ssim_sigma']:.4f}, PSNR {fid['psnr_db']:.2f} dB")
    print(f"  full guidance (search seed): {score} {base['quality']['accuracy']:.4f}")
    print(f"  cost: {c['forwards']} forwards/sample, FLOPs {c['flops_ratio']:.3f} x full, measured "
          f"{c['speedup_seconds']:.2f}x faster")
    print(f"wrote {cfg.out}/frontier.json, {cfg.out}/frontier.png and the plan into {cfg.summary} "
          f"({record['setup']['units_computed_this_run']} plans sampled, {record['setup']['units_loaded']} stored)")
    return 0
