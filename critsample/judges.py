"""Judges: the quality of a set of images, with one-sigma bars and paired bars against a baseline.

A :class:`Judge` scores a batch of images against their targets (class ids today; prompts later) and gives

* one score row per sample (:attr:`Scores.rows`: 1 / 0 correctness for a classifier judge, whose mean is the
  accuracy; a judge of text models would give a per-sample similarity), and
* features per sample for a Frechet distance (:attr:`Scores.features`) to the judge's reference set
  (:meth:`Judge.fd`: :class:`~critsample.metrics.FrechetReference`, torchmetrics in float64).

The statistics are the judge-independent part, written once:

* :func:`absolute`: mean score ``a`` with its Bernoulli bar sqrt(a (1 - a) / n) and FD ``F`` with a bootstrap bar over
  resamples of the samples (:func:`fd_bootstrap`; the reference set is fixed);
* :func:`paired`: drop ``d = a_B - a_P`` (baseline B minus plan P) and ratio ``rho = F_P / F_B``, each with a **paired
  bootstrap** bar: one index set resamples the rows of B and P together (:func:`~critsample.metrics.bootstrap`), so the
  bar is that of the difference on shared noise (samples drawn from the same (seed, i): :mod:`critsample.seeded`);
* :func:`quality`: both, the record ``certify`` keeps for every plan.

Shipped: :class:`ClassifierJudge` of a dataset (:data:`DATASETS`: its bundled classifier's accuracy and the FD of its
penultimate features to the dataset's reference test images): :class:`DigitsJudge` (the digits test split) and
:class:`FashionJudge` (the 2,000 bundled Fashion-MNIST test images). :func:`for_model` picks the judge of a model by
the dataset it was trained on; a model without one gets one sentence (:class:`UserError`).
``certify`` (plans), ``evaluate.digits_quality`` (benches, fine-tune evaluation) and ``bench/adaptive.py`` judge
through here, and detect's windowed scans take their FD bars from :func:`fd_bootstrap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .metrics import (
    FrechetReference,
    bootstrap,
    digits_features,
    digits_real,
    extract_features,
    fashion_features,
    fashion_real,
)
from .models.classifiers import load_classifier
from .options import torch_seed


@dataclass
class Scores:
    """A judge's verdict on N images: per-sample score rows, features for an FD, and (class judges) the predictions."""

    rows: np.ndarray  # (N,) float64: 1 / 0 correctness for a classifier judge
    features: torch.Tensor  # (N, d) float64, cpu
    predicted: np.ndarray | None = None  # (N,) predicted class of class judges, else None

    def __len__(self) -> int:
        return len(self.rows)


class Judge:
    """Base of the judges (module docstring): ``score`` a batch, ``fd`` of a feature set to the reference set.

    ``name`` is recorded with every measurement; ``score_name`` says what the mean of the score rows is."""

    name: str = "judge"
    score_name: str = "accuracy"
    reference: FrechetReference  # the FD's fixed reference set (its statistics kept across calls)

    def score(self, images: torch.Tensor, targets: torch.Tensor) -> Scores:
        """Score rows and features of ``images`` (N, C, H, W) in [0, 1] against ``targets`` (N,)."""
        raise NotImplementedError

    def fd(self, features: torch.Tensor) -> float:
        """Frechet distance of (N, d) features to the judge's reference set."""
        return self.reference(features)


class ClassifierJudge(Judge):
    """A dataset's shipped classifier: correctness of its argmax against the requested class, and FD of its
    penultimate features to the dataset's reference test images (:data:`DATASETS`)."""

    score_name = "accuracy"

    def __init__(self, dataset: str, classifier=None):
        if dataset not in DATASETS:
            raise UserError(f"No judge for dataset {dataset!r}; the judged datasets are {', '.join(DATASETS)}.")
        classifier_name, features, reference_images = DATASETS[dataset]
        self.name = dataset
        self.classifier = classifier if classifier is not None else load_classifier(classifier_name)
        self.features = features()
        self.reference = FrechetReference(extract_features(reference_images(), self.features))

    @torch.no_grad()
    def score(self, images: torch.Tensor, targets: torch.Tensor) -> Scores:
        pred = self.classifier.predict_logits(images).argmax(1).cpu()
        correct = (pred == torch.as_tensor(targets).cpu()).numpy().astype(np.float64)
        return Scores(correct, extract_features(images, self.features), pred.numpy())


# dataset -> (classifier name for load_classifier, its feature map, the FD reference images in [0, 1])
DATASETS = {
    # the digits test split (359 images, never trained on)
    "digits": ("digits", digits_features, lambda: digits_real("test")),
    # the 2,000 test images bundled in the package: the same set with or without Debian's full Fashion-MNIST
    "fashion-mnist": ("fashion-mnist", fashion_features, lambda: fashion_real("test-2000")),
}


class DigitsJudge(ClassifierJudge):
    """The bundled digits classifier: accuracy and FD of its penultimate features (64) to the digits test split."""

    def __init__(self, classifier=None):
        super().__init__("digits", classifier)


class FashionJudge(ClassifierJudge):
    """The bundled Fashion-MNIST classifier: accuracy and FD of its penultimate features (128) to the 2,000 bundled
    test images."""

    def __init__(self, classifier=None):
        super().__init__("fashion-mnist", classifier)


JUDGES = {"digits": DigitsJudge, "fashion-mnist": FashionJudge}  # dataset -> its judge


def for_model(model) -> Judge:
    """The judge of ``model`` (a ``Denoiser``): the classifier judge of the dataset it was trained on (``digits``,
    ``fashion-mnist``); else one sentence."""
    if model.num_classes is None or model.dataset not in JUDGES:
        raise UserError(f"Quality is measured with a dataset's bundled classifier and its FD ({', '.join(DATASETS)}); "
                        f"{model.name} is not a class-conditional model trained on one of them (dit-digits, "
                        "dit-fashion), so it has no judge yet.")
    return JUDGES[model.dataset]()


# -- statistics ------------------------------------------------------------------------------------------------------


def fd_bootstrap(reference: FrechetReference | torch.Tensor | np.ndarray, features, n_boot: int,
                 seed: int = 0) -> tuple[float, float]:
    """(FD, one-sigma) of ``features`` to ``reference`` (a :class:`FrechetReference` or its (M, d) features): the bar is
    the bootstrap standard deviation over ``n_boot`` resamples of ``features``, indices from ``seed``."""
    if not isinstance(reference, FrechetReference):
        reference = FrechetReference(torch.as_tensor(reference, dtype=torch.float64))
    features = torch.as_tensor(features, dtype=torch.float64)
    return bootstrap(reference, features, n_boot=n_boot, generator=torch.Generator().manual_seed(torch_seed(seed)))


def absolute(judge: Judge, scores: Scores, n_boot: int, seed: int) -> dict:
    """Mean score with its Bernoulli one-sigma and FD with its bootstrap one-sigma."""
    n = len(scores)
    acc = float(scores.rows.mean())
    fd, fd_sigma = fd_bootstrap(judge.reference, scores.features, n_boot, seed)
    return {"accuracy": acc, "accuracy_sigma": math.sqrt(acc * (1 - acc) / n), "fd": fd, "fd_sigma": fd_sigma}


def paired(judge: Judge, baseline: Scores, scores: Scores, n_boot: int, seed: int) -> dict:
    """Accuracy drop ``baseline - scores`` and FD ratio ``scores / baseline`` with paired-bootstrap bars (one index set
    for both sets' rows: they must be the same samples' noise, in the same order)."""
    if len(baseline) != len(scores):
        raise ValueError(f"Paired statistics need the same samples; got {len(baseline)} and {len(scores)}.")
    cb, fb, cp, fp = baseline.rows, baseline.features, scores.rows, scores.features
    idx = torch.arange(len(cb))
    cache: dict = {}

    def stats(i: torch.Tensor):
        key = i.numpy().tobytes()
        if key not in cache:
            j = i.numpy()
            cache[key] = (cb[j].mean() - cp[j].mean(), judge.fd(fp[i]) / judge.fd(fb[i]))
        return cache[key]

    drop, drop_sigma = bootstrap(lambda i: stats(i)[0], idx, n_boot=n_boot,
                                 generator=torch.Generator().manual_seed(torch_seed(seed)))
    ratio, ratio_sigma = bootstrap(lambda i: stats(i)[1], idx, n_boot=n_boot,
                                   generator=torch.Generator().manual_seed(torch_seed(seed)))
    return {"accuracy_drop": drop, "accuracy_drop_sigma": drop_sigma, "fd_ratio": ratio, "fd_ratio_sigma": ratio_sigma}


def quality(judge: Judge, scores: Scores, baseline: Scores, n_boot: int, seed: int) -> dict:
    """:func:`absolute` of ``scores`` and :func:`paired` against ``baseline`` (the same samples' noise)."""
    return {**absolute(judge, scores, n_boot, seed), **paired(judge, baseline, scores, n_boot, seed)}
