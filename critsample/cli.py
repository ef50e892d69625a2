"""The one command-line entry point: ``critsample detect | sample | fit``.

User errors (``UserError`` / ``ValueError`` raised while checking input) print one sentence and exit with code 2.
"""

from __future__ import annotations

import sys

USAGE = """usage: critsample {detect,sample,fit} ...

Find the critical window of a diffusion transformer and sample or fine-tune with it.

commands:
  detect   run the probes (conditioning / locality gaps, forward-backward, windowed scans) and estimate the critical window
  sample   sample a model, plainly or with an adaptive plan (--adaptive)
  fit      train or fine-tune a DiT with Lightning (LightningCLI: --config, --print_config)

Run `critsample COMMAND --help` for the options of a command.
"""


def _fail(message: str) -> int:
    print(f"critsample: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "fit":
            from .finetune.cli import run_fit

            return run_fit(rest)
        if command == "sample":
            from .commands.sample import run_sample

            return run_sample(rest)
        if command == "detect":
            from .commands.detect import run_detect

            return run_detect(rest)
    except ValueError as e:  # UserError and input validation: one sentence, no traceback
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume from what was stored.")
    return _fail(f"unknown command {command!r}; choose detect, sample or fit.")


if __name__ == "__main__":
    sys.exit(main())
