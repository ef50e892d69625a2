"""The detection library: configure, run and summarize the paper's probes on a model.

``run(cfg, model) -> summary`` is what the ``critsample detect`` command, the tests and the benches call::

    from critsample import detect, load
    summary = detect.run(detect.DetectConfig.from_preset("fast", out="runs/d", wandb=False), load("dit-digits"))

Modules: ``config`` (options, presets), ``context`` (what probes share), ``data`` (clean data, classifiers),
``protocol`` (the probe protocol), ``registry`` (the probes), one module per probe family (``probe_gaps``,
``probe_forward_backward``, ``probe_scans``; the pure tensor computations they call live in ``critsample.probes``),
``estimators`` (curves -> windows, concurrence), ``assemble`` (summary, report, W&B), ``run`` (stages, store, sharding,
dry run).
"""

from .config import PRESETS, DetectConfig, ForwardBackwardArgs, GapArgs, WindowArgs
from .context import Detection, auto_radii, auto_window_radii
from .data import OracleClassifier, classifier_name, load_classifier_for, load_data
from .estimators import Window
from .protocol import Probe, ProbeOutput, Results
from .registry import PROBES
from .run import estimate, prepare, run

__all__ = [
    "PRESETS", "PROBES", "DetectConfig", "Detection", "ForwardBackwardArgs", "GapArgs", "OracleClassifier", "Probe",
    "ProbeOutput", "Results", "Window", "WindowArgs", "auto_radii", "auto_window_radii", "classifier_name", "estimate",
    "load_classifier_for", "load_data", "prepare", "run",
]
