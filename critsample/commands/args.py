"""Shared command-line plumbing: shell habits -> jsonargparse, its errors -> one sentence, and the device option."""

from __future__ import annotations

import torch
from jsonargparse import ArgumentError

from ..errors import UserError


def normalize_argv(argv: list[str], flags: tuple[str, ...], aliases: dict[str, str]) -> list[str]:
    """Shell habits -> jsonargparse: ``--flag`` alone means ``--flag=true``, ``--no-flag`` means ``--flag=false``,
    dashes in option names are accepted for underscores, and ``aliases`` rename options (``--class``)."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--") and "=" not in a:
            a = "--" + a[2:].replace("-", "_")
            a = aliases.get(a, a)
            name = a[2:]
            if name.startswith("no_") and name[3:] in flags:
                out.append(f"--{name[3:]}=false")
                continue
            if name in flags and (i + 1 == len(argv) or argv[i + 1].lower() not in ("true", "false")):
                out.append(f"--{name}=true")
                continue
        out.append(a)
    return out


def parse(parser, argv: list[str]):
    """Parse with jsonargparse, turning its (multi-line) errors into one-sentence UserErrors."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        raise UserError(" ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None


def instantiate(parser, ns):
    """``parser.instantiate(ns)``, surfacing a config class's own UserError (jsonargparse wraps it)."""
    try:
        return parser.instantiate(ns)
    except (ValueError, TypeError) as e:
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def pick_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from None
