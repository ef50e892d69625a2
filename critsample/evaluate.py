"""Sample quality of a plan: seeded generation (per-sample noise), class accuracy and FID with error bars.

Shared by the benchmarks (digits quality, adaptive vs full guidance), by fine-tuning evaluation and by users who
compare plans from Python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from rich.progress import Progress

from .denoisers import NULL, Denoiser
from .judges import ClassifierJudge, DigitsJudge, fd_bootstrap
from .sampling import Plan
from .seeded import sample_images


@dataclass
class Generated:
    images: torch.Tensor  # (N, C, H, W) in [0, 1], cpu float32
    labels: torch.Tensor  # (N,) requested classes, NULL = unconditional
    seconds: float  # wall time of sampling and decoding


@torch.no_grad()
def generate(model: Denoiser, plan: Plan, labels: torch.Tensor, seed: int = 0, batch_size: int = 250,
             progress: bool = True) -> Generated:
    """Sample one image per label; sample i draws its noise from (seed, i) alone (:mod:`critsample.seeded`), so neither
    the batch size nor timing changes the results, and different seeds never share noise."""
    n_batches = -(-len(labels) // batch_size)
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{plan.name}: {len(labels)} samples", total=n_batches)
        out = sample_images(model, plan, labels, seed, batch_size, on_batch=lambda _b: bar.advance(task))
    return Generated(out.images, labels.cpu(), out.seconds)


@dataclass
class Quality:
    accuracy: float  # fraction classified as the requested class (conditional rows only)
    accuracy_sigma: float  # Bernoulli one-sigma
    fid: float
    fid_sigma: float  # bootstrap one-sigma over the generated set
    class_fractions: list[float]  # predicted class histogram of all samples, fractions

    def to_dict(self) -> dict:
        return asdict(self)


def digits_quality(gen: Generated, classifier=None, n_boot: int = 20, seed: int = 0) -> Quality:
    """Accuracy of the bundled digits classifier on conditional rows and digits-FID against the test split
    (:class:`~critsample.judges.DigitsJudge`; the FID bar is the bootstrap over the generated set)."""
    return judged_quality(gen, DigitsJudge(classifier), n_boot, seed)


def judged_quality(gen: Generated, judge: ClassifierJudge, n_boot: int = 20, seed: int = 0) -> Quality:
    """Accuracy of a classifier judge on the conditional rows of ``gen``, the predicted class fractions of all its
    rows, and the FD of all its rows to the judge's reference set (bootstrap bar over the generated set)."""
    scores = judge.score(gen.images, gen.labels)
    cond = (gen.labels != NULL).numpy()
    if cond.any():
        acc = float(scores.rows[cond].mean())
        sigma = math.sqrt(acc * (1 - acc) / int(cond.sum()))
    else:
        acc, sigma = float("nan"), float("nan")
    counts = np.bincount(scores.predicted, minlength=10).astype(np.float64)
    fid, fid_sigma = fd_bootstrap(judge.reference, scores.features, n_boot, seed)
    return Quality(acc, float(sigma), float(fid), float(fid_sigma), (counts / counts.sum()).tolist())
