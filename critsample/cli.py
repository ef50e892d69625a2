"""The one command-line entry point: ``critsample detect | tune | sample | fit``.

A :class:`~critsample.errors.UserError` (bad input, a missing resource, a file that could not be written) prints its
one sentence and exits with code 2; so does an ``OSError`` of a full disk, a quota or a read-only file system (finished
work is kept: the command resumes).
Any other exception is a bug: it keeps its traceback, and the message says where to report it.
"""

from __future__ import annotations

import errno
import sys

USAGE = """usage: critsample {detect,tune,sample,fit} ...

Find the critical window of a diffusion transformer and sample or fine-tune with it.

commands:
  detect   run the probes (conditioning / locality gaps, forward-backward, windowed scans) and estimate the \
critical window
  tune     certify the cheapest adaptive or interval plan as good as full guidance (paired noise) and write it into \
the summary
  sample   sample a model, plainly or with an adaptive plan (--adaptive)
  fit      train or fine-tune a DiT with Lightning (LightningCLI: --config, --print_config)

Run `critsample COMMAND --help` for the options of a command.
"""
COMMANDS = ("detect", "tune", "sample", "fit")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk or quota, a file system gone read-only


def _fail(message: str) -> int:
    print(f"critsample: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; choose detect, tune, sample or fit.")
    from .errors import UserError  # the commands import torch; keep `critsample --help` instant

    try:
        if command == "fit":
            from .commands.fit import run_fit

            return run_fit(rest)
        if command == "sample":
            from .commands.sample import run_sample

            return run_sample(rest)
        if command == "tune":
            from .commands.tune import run_tune

            return run_tune(rest)
        from .commands.detect import run_detect

        return run_detect(rest)
    except UserError as e:
        return _fail(str(e))
    except OSError as e:
        if e.errno not in _DISK_FULL:
            _bug()
            raise
        where = f" writing {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or 'the disk is full'}{where}; the work finished so far is kept, so free space and "
                     "run the same command again to resume.")
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, the shell's convention (2 is for user errors)
        print("critsample: interrupted; run the same command again to resume from what was stored.", file=sys.stderr)
        return 130
    except Exception:
        _bug()
        raise


def _bug() -> None:
    print("critsample: internal error (a bug, not your input): please report it to the critsample issue tracker "
          "with the command line and the traceback below.", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
