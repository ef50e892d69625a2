"""The probes of ``critsample detect``, by name, in report order. Adding a probe: its module and one line here."""

from __future__ import annotations

from .forward_backward import ForwardBackward
from .gaps import CondGap, LocalityGap
from .protocol import Probe
from .scans import WindowCond, WindowLocality

PROBES: dict[str, Probe] = {p.name: p for p in (
    CondGap(),
    LocalityGap(),
    ForwardBackward(),
    WindowCond(),
    WindowLocality(),
)}
