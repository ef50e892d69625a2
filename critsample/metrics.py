"""Statistics of the probes, accumulated in float64: classifier error with Bernoulli bars, class histograms,
per-pixel MSE, bootstrap one-sigma bars, and the Frechet distance (FID) through torchmetrics.

FID. Features are extracted once per image set by a feature module (images in [0, 1] -> (N, d)): the digits
classifier's penultimate layer for digits, InceptionV3 (pool3, 2048) for real models. The Frechet distance of the
feature Gaussians, d^2 = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) (Heusel et al. 2017, eq. 6), is
computed by torchmetrics' ``FrechetInceptionDistance`` given a pass-through ``nn.Module`` (with ``num_features``,
so torchmetrics neither downloads nor probes it) over those features. Checked against torchmetrics 1.9:
with a custom module the images reach the module untouched whatever ``normalize`` says (the uint8 conversion
applies to the built-in Inception only), and ``compute`` casts the result to the features' dtype, so the
pass-through returns float64. Extracting once lets the bootstrap resample feature rows instead of images.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import digits_split, fashion_mnist
from .errors import UserError
from .models.classifiers import load_digits_classifier, load_fashion_classifier
from .models.hub import hub_offline

INCEPTION_WEIGHTS = "inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF FID weights

# ---------------------------------------------------------------------------------------------------------------
# Classifier statistics


def _labels(logits_or_labels: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> argmax labels (N,); (N,) integer labels pass through."""
    x = torch.as_tensor(logits_or_labels)
    if x.is_floating_point():
        if x.ndim != 2:
            raise ValueError(f"Logits must have shape (N, num_classes); got {tuple(x.shape)}.")
        return x.argmax(-1)
    if x.ndim != 1:
        raise ValueError(f"Labels must have shape (N,); got {tuple(x.shape)}.")
    return x.long()


def classifier_error(logits_or_labels: torch.Tensor, target: torch.Tensor | int) -> tuple[float, float]:
    """Fraction p of predictions that differ from ``target`` (labels (N,) or one class for all), with its
    Bernoulli one-sigma bar sqrt(p (1 - p) / n)."""
    pred = _labels(logits_or_labels)
    target = torch.as_tensor(target, device=pred.device).long().expand_as(pred)
    n = pred.numel()
    if n == 0:
        raise ValueError("classifier_error needs at least one prediction.")
    p = (pred != target).to(torch.float64).mean().item()
    return p, math.sqrt(p * (1.0 - p) / n)


def class_histogram(logits_or_labels: torch.Tensor, num_classes: int | None = None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Fraction of predictions in each class (float64, (K,)) and the Bernoulli one-sigma bar of each fraction."""
    pred = _labels(logits_or_labels)
    if num_classes is None:
        x = torch.as_tensor(logits_or_labels)
        num_classes = x.shape[1] if x.is_floating_point() else int(pred.max()) + 1
    n = pred.numel()
    frac = torch.bincount(pred.cpu(), minlength=num_classes).to(torch.float64) / n
    return frac, (frac * (1 - frac) / n).sqrt()


def per_pixel_mse(x: torch.Tensor, y: torch.Tensor, reduce: bool = True) -> Any:
    """Mean squared difference per pixel (and channel) of each image pair (B, ...).

    ``reduce=True``: (mean over images, its one-sigma standard error std / sqrt(B)); else the (B,) float64 values.
    """
    per = (x.to(torch.float64) - y.to(torch.float64)).square().flatten(1).mean(1)  # (B,)
    if not reduce:
        return per
    b = per.numel()
    stderr = per.std(unbiased=True).item() / math.sqrt(b) if b > 1 else float("nan")
    return per.mean().item(), stderr


def _take(sample: Any, idx: torch.Tensor) -> Any:
    return sample[idx.to(sample.device)] if torch.is_tensor(sample) else sample[idx.numpy()]


def bootstrap(
    fn: Callable[..., Any],
    *samples: Any,
    n_boot: int = 200,
    generator: torch.Generator | None = None,
    paired: bool = True,
) -> tuple[float, float]:
    """``fn(*samples)`` and its bootstrap one-sigma bar: the standard deviation (ddof 1) of ``fn`` over ``n_boot``
    resamples with replacement (Efron 1979). ``paired``: one index set for all samples (same length, e.g. logits
    and labels); else each sample is resampled on its own. Indices come from ``generator`` (default: seed 0).
    Samples are tensors or numpy arrays indexed along their first axis."""
    if not samples:
        raise ValueError("bootstrap needs at least one sample.")
    if n_boot < 2:
        raise ValueError(f"bootstrap needs n_boot >= 2; got {n_boot}.")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    lengths = [len(s) for s in samples]
    if paired and len(set(lengths)) != 1:
        raise ValueError(f"Paired bootstrap needs samples of one length; got {lengths}.")
    value = float(fn(*samples))
    reps = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        if paired:
            idx = torch.randint(lengths[0], (lengths[0],), generator=g)
            resampled = [_take(s, idx) for s in samples]
        else:
            resampled = [_take(s, torch.randint(n, (n,), generator=g)) for s, n in zip(samples, lengths, strict=True)]
        reps[b] = float(fn(*resampled))
    return value, float(reps.std(ddof=1))


# ---------------------------------------------------------------------------------------------------------------
# Feature modules (images in [0, 1] -> (N, d))


class FeatureModule(nn.Module):
    """A feature map of images in [0, 1] as the ``nn.Module`` (with ``num_features``) that FID takes."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int, owner: nn.Module | None = None):
        super().__init__()
        self.fn = fn
        self.num_features = int(num_features)
        self.owner = owner  # registers the network, so .to() and .parameters() reach it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@functools.lru_cache(maxsize=4)
def digits_features(device: str = "cpu") -> FeatureModule:
    """Penultimate features (64) of the shipped digits classifier; input (B, 1, 8, 8) in [0, 1]."""
    clf = load_digits_classifier(device)
    return FeatureModule(clf.features, clf.num_features, owner=clf)


@functools.lru_cache(maxsize=4)
def fashion_features(device: str = "cpu") -> FeatureModule:
    """Penultimate features (128) of the shipped Fashion-MNIST classifier; input (B, 1, 32, 32) in [0, 1]."""
    clf = load_fashion_classifier(device)
    return FeatureModule(clf.features, clf.num_features, owner=clf)


class _InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 (pool3, 2048) on images in [0, 1]: grey -> RGB, then the uint8 quantisation
    ``(x * 255).byte()`` that torchmetrics applies with ``normalize=True``; the network resizes to 299 itself."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x.clamp(0, 1) * 255).byte())


def inception_features(device: str | torch.device = "cpu") -> nn.Module:
    """The standard FID InceptionV3 (torch-fidelity's port of the TF weights); one clear error if unavailable."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise UserError(
            "FID with the default InceptionV3 needs torch-fidelity: `pip install torch-fidelity` "
            "(or pass features=<nn.Module returning (N, d) features>)."
        ) from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not list(checkpoints.glob(f"*{INCEPTION_WEIGHTS}")):  # the weights come from a GitHub release on first use
        if hub_offline():
            raise UserError(
                f"The InceptionV3 FID weights (*{INCEPTION_WEIGHTS}) are not in {checkpoints} and HF_HUB_OFFLINE is "
                "set, so nothing is downloaded; run once with network access, or pass features=<nn.Module returning "
                "(N, d) features>."
            )
        print("critsample: downloading the InceptionV3 FID weights (1 file, about 0.1 GB) from torch-fidelity's "
              f"GitHub releases to {checkpoints}. Set HF_HUB_OFFLINE=1 to forbid downloads.", file=sys.stderr)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except Exception as e:
        raise UserError(
            f"The InceptionV3 FID weights could not be fetched ({type(e).__name__}); run once with network access "
            f"(torch-fidelity caches *{INCEPTION_WEIGHTS} in {checkpoints}), or pass features=<nn.Module returning (N, "
            "d) features>."
        ) from None
    return _InceptionFeatures(net).to(device)


@torch.no_grad()
def extract_features(images: torch.Tensor, features: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """(N, ...) images in [0, 1] -> (N, d) float64 features, on the CPU, in batches on the module's device."""
    param = next(features.parameters(), None)
    device = param.device if param is not None else images.device
    out = [features(images[i : i + batch_size].to(device)).to(torch.float64).cpu() for i in range(0, len(images),
                                                                                                  batch_size)]
    return torch.cat(out).flatten(1)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance


class _PassThrough(nn.Module):
    """Hands precomputed (N, d) features to torchmetrics as float64 (its result takes the features' dtype)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64)


def _fid_metric(num_features: int):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_PassThrough(num_features), reset_real_features=False)


class FrechetReference:
    """The Frechet distance of (N, d) feature sets to one fixed reference set (torchmetrics, float64): the reference's
    statistics are accumulated once and kept, so a bootstrap over the other set recomputes only its side."""

    def __init__(self, real_features: torch.Tensor):
        real_features = torch.as_tensor(real_features)
        self.num_features = int(real_features.shape[1])
        self.metric = _fid_metric(self.num_features)
        self.metric.update(real_features.to(torch.float64), real=True)  # kept across reset(): reset_real_features=False

    def __call__(self, fake_features: torch.Tensor) -> float:
        self.metric.reset()
        self.metric.update(torch.as_tensor(fake_features).to(torch.float64), real=False)
        return self.metric.compute().item()


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Frechet distance of the Gaussians fitted to two (N, d) feature sets (torchmetrics, float64)."""
    return FrechetReference(real_features)(fake_features)


def _resolve(features: nn.Module | None, images: torch.Tensor) -> nn.Module:
    if features is not None:
        if not hasattr(features, "num_features"):
            raise ValueError("The FID feature module needs a `num_features` attribute (its output dimension d).")
        return features
    return inception_features(images.device)


def fid(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    features: nn.Module | None = None,
    batch_size: int = 256,
) -> float:
    """FID between two image sets in [0, 1], (N, C, H, W). ``features``: an ``nn.Module`` (images -> (N, d)) with a
    ``num_features`` attribute, e.g. :func:`digits_features`; None = the standard InceptionV3."""
    features = _resolve(features, real_images)
    return frechet_distance(extract_features(real_images, features, batch_size),
                            extract_features(fake_images, features, batch_size))


def fid_with_bootstrap(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    features: nn.Module | None = None,
    n_boot: int = 100,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> tuple[float, float]:
    """(FID, one-sigma) where the bar is the bootstrap standard deviation over resamples of the fake set
    (the real set is the fixed reference). Indices come from ``generator`` (default: seed 0)."""
    features = _resolve(features, real_images)
    reference = FrechetReference(extract_features(real_images, features, batch_size))
    return bootstrap(reference, extract_features(fake_images, features, batch_size), n_boot=n_boot, generator=generator)


def digits_real(split: str = "test") -> torch.Tensor:
    """Digits images of a split, (N, 1, 8, 8) in [0, 1]."""
    return (digits_split(split)[0] + 1) / 2


def digits_fid(fake_images_0_1: torch.Tensor, split: str = "test") -> float:
    """FID of digits (N, 1, 8, 8) in [0, 1] to a digits split, in the shipped classifier's feature space.
    The floor (train split vs test split) is recorded in ``critsample/assets/digits-classifier/config.json``."""
    return fid(digits_real(split), fake_images_0_1, features=digits_features("cpu"))


def fashion_real(split: str = "test-2000") -> torch.Tensor:
    """Fashion-MNIST images of a split, (N, 1, 32, 32) in [0, 1]; the default, the 2,000 test images bundled in the
    package, is the same with or without Debian's full set (see :func:`critsample.datasets.fashion_mnist`)."""
    return (fashion_mnist(split)[0] + 1) / 2


def fashion_fid(fake_images_0_1: torch.Tensor, split: str = "test-2000") -> float:
    """FD of Fashion-MNIST images (N, 1, 32, 32) in [0, 1] to a split, in the shipped classifier's feature space.
    The floor (train split vs full test split) is recorded in ``critsample/assets/fashion-classifier/config.json``."""
    return fid(fashion_real(split), fake_images_0_1, features=fashion_features("cpu"))
