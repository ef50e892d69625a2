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
* :func:`quality`: both, the record ``certify`` keeps for every plan, with the one-sided upper confidence bounds
  (level ``LEVEL`` = 0.95) that certification decides on:

  - ``accuracy_drop_upper``: :func:`drop_upper_bound`, an exact bound for a paired binary design. Of the ``n`` pairs,
    ``b`` are right under B and wrong under P, ``c`` the reverse (discordant pairs); (b, c, n - b - c) is trinomial
    with probabilities (p_b, p_c, 1 - p_b - p_c) and the drop is Delta = p_b - p_c. The bound inverts the exact
    one-sided test of Delta <= Delta_0 on the statistic b - c, its nuisance q = p_b + p_c restricted to a
    Clopper-Pearson set of level 1 - gamma (Berger and Boos 1994: p-value = sup over that set + gamma, gamma = 0.001).
    It is >= (b - c) / n, valid at every n (no normal approximation, no bootstrap) and conservative (exact coverage
    0.99-1.0 at n = 20; 8 vs 3 discordant pairs of 1000 give 1.38 points where the normal approximation says 1.03);
    with no discordant pair it is still > 0 and shrinks like 4.8 / n (the bootstrap would say +- 0 there);
  - ``fd_ratio_upper``: from the same paired-bootstrap resamples as its bar (one index set resamples both arms' rows):
    the estimate plus the distance from the resamples' median to their ``LEVEL`` percentile, i.e. the percentile bound
    re-centered on the estimate. The plain percentile is not used because a resample repeats rows, which raises both
    FDs and pulls their ratio toward 1: 40 mirrored digits against 40 real ones have ratio 4.0 and resampled ratios
    around 2.5, so the plain 95 % percentile (2.5) would sit below the estimate.

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
from scipy import stats as sps

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


LEVEL = 0.95  # one-sided confidence of the certification bounds
NUISANCE_GAMMA = 0.001  # Berger-Boos: confidence spent on restricting the discordance rate q


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact (Clopper-Pearson) bounds of a binomial proportion, each one-sided at level 1 - ``alpha``."""
    lo = 0.0 if k <= 0 else float(sps.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k >= n else float(sps.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def diff_cdf(t: float, n: int, q: float, delta: float) -> float:
    """P(b - c <= t) for (b, c, n - b - c) trinomial with probabilities ((q + delta) / 2, (q - delta) / 2, 1 - q):
    the number m = b + c of discordant pairs is Bin(n, q) and, given m, b is Bin(m, (q + delta) / (2 q))."""
    if q <= 0:
        return 1.0 if t >= 0 else 0.0
    m = np.arange(n + 1)
    p = min(1.0, max(0.0, (q + delta) / (2 * q)))
    return float(np.sum(sps.binom.pmf(m, n, q) * sps.binom.cdf(np.floor((m + t) / 2), m, p)))


def drop_upper_bound(b: int, c: int, n: int, level: float = LEVEL, gamma: float = NUISANCE_GAMMA,
                     grid: int = 25, tol: float = 1e-5) -> float:
    """Exact one-sided upper confidence bound of the paired drop Delta = p_b - p_c (module docstring): the largest
    Delta_0 that the test of Delta <= Delta_0 on b - c does not reject at 1 - ``level``, its p-value the sup of
    P(b - c <= b_obs - c_obs) over q in the Clopper-Pearson set of q (two-sided, level 1 - ``gamma``; ``grid`` points)
    plus ``gamma``. Bisection to ``tol``."""
    if not (0 <= b and 0 <= c and b + c <= n and n >= 1):
        raise ValueError(f"Discordant counts need 0 <= b, c and b + c <= n; got b={b}, c={c}, n={n}.")
    alpha, t = 1 - level, b - c
    q_lo, q_hi = clopper_pearson(b + c, n, gamma / 2)

    def rejected(delta: float) -> bool:
        lo = max(delta, q_lo)
        if lo > q_hi:  # no nuisance value of the confidence set is compatible with Delta_0
            return True
        p = max(diff_cdf(t, n, q, delta) for q in np.unique(np.linspace(lo, q_hi, grid)))
        return p + gamma <= alpha

    lo, hi = t / n, 1.0
    if not rejected(hi):
        return 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rejected(mid) else (mid, hi)
    return hi


def paired(judge: Judge, baseline: Scores, scores: Scores, n_boot: int, seed: int, level: float = LEVEL) -> dict:
    """Accuracy drop ``baseline - scores`` and FD ratio ``scores / baseline`` with paired-bootstrap bars (one index set
    for both sets' rows: they must be the same samples' noise, in the same order) and their one-sided upper bounds at
    ``level`` (module docstring): exact from the discordant pairs for the drop, the re-centered bootstrap percentile
    for the ratio."""
    if len(baseline) != len(scores):
        raise ValueError(f"Paired statistics need the same samples; got {len(baseline)} and {len(scores)}.")
    if n_boot < 2:
        raise ValueError(f"bootstrap needs n_boot >= 2; got {n_boot}.")
    cb, fb, cp, fp = baseline.rows, baseline.features, scores.rows, scores.features
    n = len(cb)

    def stats(i: np.ndarray) -> tuple[float, float]:
        return cb[i].mean() - cp[i].mean(), judge.fd(fp[torch.as_tensor(i)]) / judge.fd(fb[torch.as_tensor(i)])

    drop, ratio = stats(np.arange(n))
    g = torch.Generator().manual_seed(torch_seed(seed))
    reps = np.array([stats(torch.randint(n, (n,), generator=g).numpy()) for _ in range(n_boot)], dtype=np.float64)
    b = int(np.sum((cb == 1) & (cp == 0)))
    c = int(np.sum((cb == 0) & (cp == 1)))
    return {"accuracy_drop": float(drop), "accuracy_drop_sigma": float(reps[:, 0].std(ddof=1)),
            "accuracy_drop_upper": drop_upper_bound(b, c, n, level), "fd_ratio": float(ratio),
            "fd_ratio_sigma": float(reps[:, 1].std(ddof=1)),
            "fd_ratio_upper": float(ratio + np.quantile(reps[:, 1], level) - np.median(reps[:, 1])),
            "discordant": {"b": b, "c": c, "n": n},
            "level": level}


def quality(judge: Judge, scores: Scores, baseline: Scores, n_boot: int, seed: int) -> dict:
    """:func:`absolute` of ``scores`` and :func:`paired` against ``baseline`` (the same samples' noise)."""
    return {**absolute(judge, scores, n_boot, seed), **paired(judge, baseline, scores, n_boot, seed)}
