"""The one argv -> config path of every command (:func:`parse_config`): shell habits -> jsonargparse, its errors -> one
sentence, the config class's own checks (:mod:`critsample.options`) before anything is loaded; and the device option."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError

from ..errors import UserError
from ..options import check_device

_NUMBER = re.compile(r"^-(\d|\.\d)")  # a negative number (or a window such as -0.2:0.5), not an option


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


def expand_lists(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """Let list options take several values as users type them (``--probes cond_gap locality_gap``), besides the
    JSON / YAML form (``--probes '[cond_gap, locality_gap]'``): the values up to the next option become a JSON list,
    of integers when every value is one."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, inline = a.partition("=")
        if name in options and not eq:
            vals = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("-") and not _NUMBER.match(argv[i])):
                vals.append(argv[i])
                i += 1
            if len(vals) == 1 and vals[0].lstrip().startswith("["):  # already a list
                out += [a, vals[0]]
            elif vals and all(v.lstrip("-").isdigit() for v in vals):
                out += [a, json.dumps([int(v) for v in vals])]
            elif vals and all(_is_number(v) for v in vals):
                out += [a, json.dumps([float(v) for v in vals])]
            else:
                out += [a, json.dumps(vals)]
            continue
        out.append(a)
        i += 1
    return out


_TYPE_WORDS = {"int": "an integer", "float": "a number", "NoneType": "nothing (null)", "str": "text",
               "bool": "true or false",
               "list": "a list"}


def one_sentence(message: str) -> str:
    """jsonargparse's report (several lines, Python type names) -> one sentence naming the option, what it expects
    and what it got."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    key = re.search(r'Parser key "([^"]+)"', text)
    if key is None:
        return text
    types = re.findall(r"Expected a <class '(\w+)'>", text)
    given = re.search(r"(?:Given value|Got value): (.*?)(?:$| - )", text)
    if not types:
        return f"--{key.group(1)}: {text.split(':', 1)[1].strip()}"
    wanted = " or ".join(dict.fromkeys(_TYPE_WORDS.get(t, t) for t in types))
    got = f"; got {given.group(1).strip()!r}" if given else ""
    return f"--{key.group(1)} expects {wanted}{got}."


def join_negative_values(argv: list[str]) -> list[str]:
    """``--option -0.2:0.5`` -> ``--option=-0.2:0.5``: argparse reads a value that starts with a dash and is not a plain
    negative number as an option ("expected one argument")."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and _NUMBER.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def parse(parser, argv: list[str]):
    """Parse with jsonargparse, turning its (multi-line) errors into one-sentence UserErrors."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        raise UserError(one_sentence(str(e))) from None


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


def parse_config(argv: list[str], cls, parser, *, flags: tuple[str, ...] = (), aliases: dict[str, str] | None = None,
                 lists: tuple[str, ...] = (), nonempty: tuple[str, ...] = ()):
    """The one argv -> config path of ``sample``, ``tune`` and ``detect``: shell habits (``normalize_argv``), list
    values as users type them (``expand_lists``, ``lists`` naming the list options), negative values
    (``join_negative_values``), the ``--config`` file checked (one sentence with file and line), jsonargparse's parse
    with its errors as one sentence, and the config class built, which validates every option that needs no model
    (:func:`critsample.options.validate_sections` and the command's own checks). ``parser`` is an ArgumentParser or a
    function of the normalized argv returning one (detect's preset fills its defaults). A list option in ``nonempty``
    given with no value is an error (omitting it gives the default)."""
    argv = expand_lists(normalize_argv(list(argv), flags, aliases or {}), lists)
    for option in nonempty:
        if option in argv and argv[argv.index(option) + 1] == "[]":
            shown = next((k for k, v in (aliases or {}).items() if v == option), option)
            raise UserError(f"{shown} needs at least one value (omit it for the default).")
    argv = join_negative_values(argv)
    config = config_path(argv)
    if config is not None:
        read_config_file(config)  # a missing file or a YAML error: one sentence with the file and line
    p = parser(argv) if callable(parser) and not hasattr(parser, "parse_args") else parser
    ns = instantiate(p, parse(p, argv))
    return cls(**{k: getattr(ns, k) for k in cls.__dataclass_fields__})


def read_config_file(path: str) -> dict:
    """A ``--config`` YAML file as a dict; a missing file or a YAML error is one sentence with the file and line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path} does not exist or is not a file.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"--config {path}{where}: {getattr(e, 'problem', None) or 'not valid YAML'}.") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option: value; got a {type(data).__name__}.")
    return data or {}


def option_value(argv: list[str], name: str) -> str | None:
    """The value of the last ``--name`` option (argparse semantics: the last one wins), read before parsing."""
    found = None
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(f"--{name}="):
            found = a.split("=", 1)[1]
    return found


def config_path(argv: list[str]) -> str | None:
    """The ``--config`` file of a command line, if any."""
    return option_value(argv, "config")


def pick_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; spelling checked by
    :func:`critsample.options.check_device`, availability here (before any model is loaded)."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..).")
    return dev
