"""The probes of ``critsample detect``, by name, in report order. Adding a probe: its module and one line here."""

from __future__ import annotations

from ..errors import UserError
from .config import PROBE_NAMES
from .probe_forward_backward import ForwardBackward
from .probe_gaps import CondGap, LocalityGap
from .probe_scans import WindowCond, WindowLocality
from .protocol import Probe

PROBES: dict[str, Probe] = {p.name: p for p in (
    CondGap(),
    LocalityGap(),
    ForwardBackward(),
    WindowCond(),
    WindowLocality(),
)}
assert tuple(PROBES) == PROBE_NAMES, "detect.config.PROBE_NAMES must list the registry's probes in report order"


def check_probes(names: list[str]) -> None:
    """Every name is a registered probe (built in, or added to PROBES at run time); one sentence otherwise."""
    bad = [p for p in names if p not in PROBES]
    if bad:
        raise UserError(f"Unknown probe {bad[0]!r}; choose from {', '.join(PROBES)}.")
