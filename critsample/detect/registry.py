"""The probes of ``critsample detect``, by name, in report order. Adding a probe: its module and one line here."""

from __future__ import annotations

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
