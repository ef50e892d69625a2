"""Outside step kinds: which denoiser a plan step runs, by name (a registry, as nanoGPT's ``DiT_models``).

A :class:`~critsample.sampling.Step` carries ``kind``: ``network`` (the model itself, with its attention window: the
paper's local denoiser) or an outside kind registered here, whose loader builds a
:class:`~critsample.denoisers.Denoiser` for a host model once (cached on the host):

* ``gaussian``: exact posterior mean of a Gaussian fitted to the data (:class:`critsample.gaussian.GaussianDenoiser`);
* ``local-linear``: the Wiener denoiser on radius-r token windows (:class:`critsample.gaussian.LocalLinearDenoiser`);
* ``student``: the distilled strictly local student (``critsample.student.load_student``, imported when first used).

A new kind is one :func:`register` call. The statistics of the linear kinds come from :func:`use_data` (``--data``: an
image folder or a .pt / .npz of latents or images, with optional labels), else the host's bundled training data
(dit-digits: the digits train split; dit-fashion: the Fashion-MNIST train split); they are fitted once and stored
under ``$XDG_CACHE_HOME/critsample/gaussian`` keyed by the data's fingerprint (:class:`critsample.store.Store`: every
byte of the model-space samples and labels, so a different VAE or data set never reuses them).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .denoisers import Denoiser
from .errors import UserError
from .gaussian import GaussianDenoiser, GaussianStats, LocalLinearDenoiser, fit_stats
from .store import Store, stable_hash, tensor_digest

NETWORK = "network"


@dataclass(frozen=True)
class OutsideKind:
    name: str
    load: Callable[[Denoiser], Denoiser]  # host model -> its outside denoiser
    takes_radius: bool  # the kind reads a radius-r window (a plan gives it the outside radius)
    doc: str = ""


REGISTRY: dict[str, OutsideKind] = {}


def register(kind: OutsideKind) -> OutsideKind:
    REGISTRY[kind.name] = kind
    return kind


def kinds() -> tuple[str, ...]:
    """Every step kind: ``network`` and the registered outside kinds."""
    return (NETWORK, *REGISTRY)


def check_kind(name: str, option: str = "--kinds") -> str:
    if name not in kinds():
        raise UserError(f"{option} takes step kinds among {', '.join(kinds())}; got {name!r}.")
    return name


def takes_radius(name: str) -> bool:
    return name == NETWORK or REGISTRY[check_kind(name)].takes_radius


# -- the denoiser of a step -------------------------------------------------------------------------------------------


def _cache(model: Denoiser) -> dict:
    if "_outside_kinds" not in model.__dict__:
        model.__dict__["_outside_kinds"] = {}
    return model.__dict__["_outside_kinds"]


def attach(model: Denoiser, kind: str, denoiser: Denoiser) -> Denoiser:
    """Use ``denoiser`` for the steps of ``kind`` on ``model`` (tests, benches, a custom fit)."""
    check_kind(kind)
    _cache(model)[kind] = denoiser
    return denoiser


def denoiser_for(model: Denoiser, kind: str) -> Denoiser:
    """The denoiser that runs ``kind`` steps on ``model`` (the model itself for ``network``), loaded once."""
    if kind == NETWORK:
        return model
    cache = _cache(model)
    if kind not in cache:
        cache[kind] = REGISTRY[check_kind(kind, "A plan step's kind")].load(model)
        dev = next(model.parameters(), torch.empty(0)).device
        cache[kind].to(dev)
    return cache[kind]


def identity(model: Denoiser, plan) -> dict:
    """What the outside denoisers of ``plan`` are (per kind: its statistics' or weights' fingerprint), for the keys of
    stored samples; {} for a plan of network steps only (old keys unchanged)."""
    used = sorted({s.kind for s in plan.steps} - {NETWORK})
    out = {}
    for k in used:
        d = denoiser_for(model, k)
        stats = getattr(d, "stats", None)
        out[k] = stats.fingerprint if stats is not None else stable_hash(
            {n: tensor_digest(p.detach().cpu()).hex() for n, p in d.state_dict().items()})
    return out


def step_flops(model: Denoiser, step, grid: tuple[int, int]) -> float:
    """Analytic FLOPs per sample of one outside step (guided counts both rows); NaN when the kind has no model."""
    d = denoiser_for(model, step.kind)
    f = getattr(d, "flops", None)
    if f is None:
        return float("nan")
    if step.mode == "guided":
        return f(grid, step.radius, unconditional=False) + f(grid, step.radius, unconditional=True)
    return f(grid, step.radius, unconditional=step.mode == "uncond")


# -- statistics of the linear kinds -----------------------------------------------------------------------------------


def use_data(model: Denoiser, data: str | Path | None) -> None:
    """Fit the linear kinds of ``model`` on ``data`` (``--data``: as ``critsample detect --data``); None: the
    bundled data."""
    model.__dict__["_outside_data"] = None if data is None else str(data)
    for k in ("gaussian", "local-linear"):
        _cache(model).pop(k, None)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "critsample" / "gaussian"


def training_data(model: Denoiser) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model-space samples (and labels) the statistics are fitted on (module docstring)."""
    data = model.__dict__.get("_outside_data")
    if data is not None:
        from .detect.data import _load_user_data

        p = next(model.parameters(), None)  # latent models encode on the VAE's device; the statistics live on the CPU
        x, y = _load_user_data(Path(data), model, 10**9, p.device if p is not None else "cpu", None)
        return x.cpu(), (y.cpu() if y is not None else None)
    if model.dataset == "digits":
        from .datasets import digits_split

        x, y = digits_split("train")
    elif model.dataset == "fashion-mnist":
        from .datasets import fashion_mnist

        x, y = fashion_mnist("train")
    elif model.family == "oracle":
        g = torch.Generator().manual_seed(0)
        y = torch.arange(4096) % model.num_classes
        return model.sample_data(4096, y, generator=g).double(), y
    else:
        raise UserError(f"The gaussian and local-linear kinds of {model.name} need data statistics: pass --data with "
                        "an image folder or a .pt/.npz of latents (and optional labels).")
    return model.encode((x + 1) / 2).cpu(), y


def stats_for(model: Denoiser, covariance: str = "shared") -> GaussianStats:
    """The statistics of the model's data (:func:`training_data`), fitted once and stored keyed by its fingerprint;
    their own fingerprint hashes the data's with the fit settings."""
    x, y = training_data(model)
    x = x.detach().cpu().float()
    data_fp = stable_hash({"samples": tensor_digest(x).hex(), "shape": list(x.shape),
                           "labels": None if y is None else tensor_digest(torch.as_tensor(y).long().cpu()).hex()})
    labels = None if (y is None or model.num_classes is None) else torch.as_tensor(y).long()
    store = Store(cache_root(), data_fp, 0)
    config = {"covariance": covariance, "full_max": 4096, "version": 1}
    unit = store.unit("gaussian-stats", config)
    fp = stable_hash({"data": data_fp, "unit": config})  # the statistics' identity: the data and the fit settings

    def compute(_g=None) -> dict:
        return fit_stats(x, labels, num_classes=model.num_classes if labels is not None else None,
                         covariance=covariance, fingerprint=fp).to_arrays()

    return GaussianStats.from_arrays(store.get_or_compute(unit, compute), fp)


def _student(model: Denoiser) -> Denoiser:
    try:
        mod = importlib.import_module("critsample.student")
    except ModuleNotFoundError as e:
        raise UserError("The student kind needs critsample.student (the distilled student), which this install "
                        "lacks; use the gaussian or local-linear kind.") from e
    return _check_student(mod.load_student(model), model)


def _check_student(student: Denoiser, host: Denoiser) -> Denoiser:
    """``student`` when it fits ``host`` (its samples, classes, prediction, schedule and recorded teacher), else one
    sentence naming the first difference."""
    checks = [("sample shape", tuple(student.sample_shape), tuple(host.sample_shape)),
              ("number of classes", student.num_classes, host.num_classes),
              ("prediction type", student.prediction, host.prediction),
              ("noise schedule (kind, num_train_timesteps, betas)", getattr(student, "schedule", None),
               getattr(host, "schedule", None))]
    if getattr(student, "teacher", None):
        checks.append(("recorded teacher", student.teacher, host.name))
    for what, theirs, ours in checks:
        if theirs is not None and ours is not None and theirs != ours:
            raise UserError(f"The student {student.name} does not fit {host.name}: its {what} is {theirs}, the "
                            f"host's is {ours}; distill a student of {host.name} or use another kind.")
    return student


register(OutsideKind("gaussian", lambda m: GaussianDenoiser(m, stats_for(m)), takes_radius=False,
                     doc="exact posterior mean of a Gaussian fitted to the data"))
register(OutsideKind("local-linear", lambda m: LocalLinearDenoiser(m, stats_for(m)), takes_radius=True,
                     doc="Wiener denoiser on radius-r token windows, from the same statistics"))
register(OutsideKind("student", _student, takes_radius=False,  # it reads its own radius (fixed by its weights)
                     doc="distilled strictly local student (critsample.student.load_student)"))
