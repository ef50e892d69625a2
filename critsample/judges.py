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

  - ``accuracy_drop_upper``: :func:`drop_upper_bound`, an exact bound for a paired binary design (a judge
    declaring ``binary_rows``; otherwise the re-centered paired-bootstrap percentile). Of the ``n`` pairs,
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

Shipped (:func:`for_model` picks one by the model, ``--judge`` names one or imports the user's own):

* ``digits``, ``fashion-mnist``: :class:`ClassifierJudge` of a dataset (:data:`DATASETS`: its bundled classifier's
  accuracy and the FD of its penultimate features to the dataset's reference test images): :class:`DigitsJudge`,
  :class:`FashionJudge`; the models trained on them (dit-digits, dit-fashion) get them;
* ``imagenet``: :class:`ImageNetJudge` for class models with 1000 classes (DiT-XL/2): top-1 accuracy of
  microsoft/resnet-50 (transformers) and FD on InceptionV3 pool features (torchmetrics' FID extractor);
* ``clip``: :class:`ClipJudge` for text models: CLIP score of each image with its prompt (torchmetrics' CLIPScore / 100,
  :mod:`critsample.models.clip`, openai/clip-vit-large-patch14) and FD on CLIP image embeddings;
* ``module.path:factory``: the user's own (:func:`import_judge`): any object with ``score`` and ``fd`` as below.

A judge without a reference data set (``imagenet``, ``clip``: ImageNet or captioned images are not shipped) has
``reference = None``; :func:`critsample.certify.certify` then sets it to full guidance's samples on *reference noise*
(an independent stream of the same seed, :func:`~critsample.sampling.sample_generator`), so FD_B is the distance between
two independent draws of full guidance and the ratio rho = FD_P / FD_B says how much further the plan is.

For every family, and with no weights at all, :func:`fidelity` measures each plan against full guidance on the same
noise, image by image (torchmetrics SSIM and PSNR); it is reported beside the certified criteria, not certified on:
a plan may differ from full guidance pixel by pixel and be as good.

The score rows of a class judge are 0 / 1 and their drop gets the exact bound above; a judge with continuous rows
(CLIP score) gets the re-centered paired-bootstrap bound of the FD ratio's kind (``accuracy_drop_bound`` says which).
The record keeps the key ``accuracy`` for the judge's score whatever it is; ``score`` names it (``accuracy`` or
``clip_score``), so the tolerance ``accuracy_points`` is in percentage points of accuracy or in CLIP-score points.
``certify`` (plans), ``evaluate.digits_quality`` (benches, fine-tune evaluation) and ``bench/adaptive.py`` judge
through here, and detect's windowed scans take their FD bars from :func:`fd_bootstrap`.
"""

from __future__ import annotations

import inspect
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
from .models.classifiers import CLASSIFIERS, import_object, load_classifier, load_hf_classifier
from .options import torch_seed


@dataclass
class Scores:
    """A judge's verdict on N images: per-sample score rows, features for an FD, and (class judges) the predictions."""

    rows: np.ndarray  # (N,) float64: 1 / 0 correctness for a classifier judge, CLIP score / 100 for CLIP
    features: torch.Tensor  # (N, d) float64, cpu
    predicted: np.ndarray | None = None  # (N,) predicted class of class judges, else None

    def __len__(self) -> int:
        return len(self.rows)


def binary_rows(judge, *scores: Scores) -> bool:
    """Whether ``judge`` declares its rows 0 / 1 (``binary_rows``: the classifier judges yes, CLIP no, a user's judge
    no unless it says so): then the paired drop has the exact bound of the discordant pairs and the score a Bernoulli
    bar. Declared, never guessed from the values (a continuous judge's rows may happen to be 0 / 1)."""
    declared = bool(getattr(judge, "binary_rows", False))
    if declared and not all(np.all((s.rows == 0) | (s.rows == 1)) for s in scores):
        raise ValueError(f"Judge {getattr(judge, 'name', type(judge).__name__)} declares binary_rows but scored rows "
                         "other than 0 and 1.")
    return declared


class Judge:
    """Base of the judges (module docstring): ``score`` a batch, ``fd`` of a feature set to the reference set.

    ``name`` is recorded with every measurement; ``score_name`` says what the mean of the score rows is."""

    name: str = "judge"
    score_name: str = "accuracy"
    binary_rows: bool = False  # rows are 0 / 1 by construction (correctness): exact bounds (:func:`binary_rows`)
    targets: str = "class"  # what ``score`` compares images with: "class" ids or "prompt" strings
    fd_features: str = "features"  # what the FD is computed on (recorded)
    # the FD's fixed reference set (its statistics kept across calls); None: certify sets full guidance's samples
    reference: FrechetReference | None = None

    def score(self, images: torch.Tensor, targets) -> Scores:
        """Score rows and features of ``images`` (N, C, H, W) in [0, 1] against ``targets`` (N class ids or N
        prompts)."""
        raise NotImplementedError

    def fd(self, features: torch.Tensor) -> float:
        """Frechet distance of (N, d) features to the judge's reference set."""
        if self.reference is None:
            raise ValueError(f"Judge {self.name} has no FD reference yet; set one with set_reference(features).")
        return self.reference(features)

    def set_reference(self, features: torch.Tensor) -> None:
        """Use ``features`` (M, d) as the FD's reference set."""
        self.reference = FrechetReference(torch.as_tensor(features, dtype=torch.float64))


def describe(judge) -> dict:
    """What a judge measures, as recorded with a certification (any judge, the user's included)."""
    return {"name": str(getattr(judge, "name", type(judge).__name__)),
            "score": str(getattr(judge, "score_name", "accuracy")),
            "targets": str(getattr(judge, "targets", "class")),
            "fd_features": str(getattr(judge, "fd_features", "features"))}


class ClassifierJudge(Judge):
    """A dataset's shipped classifier: correctness of its argmax against the requested class, and FD of its
    penultimate features to the dataset's reference test images (:data:`DATASETS`)."""

    score_name = "accuracy"
    binary_rows = True  # correctness of the argmax
    fd_features = "penultimate features of the bundled classifier"

    def __init__(self, dataset: str, classifier=None):
        if dataset not in DATASETS:
            raise UserError(f"No judge for dataset {dataset!r}; the judged datasets are {', '.join(DATASETS)}.")
        classifier_name, features, reference_images = DATASETS[dataset]
        self.name = dataset
        self.classifier = classifier if classifier is not None else load_classifier(classifier_name)
        self.features = features()
        self.reference = FrechetReference(extract_features(reference_images(), self.features))

    batch_size = 64  # images per classifier forward (ResNet-50 at 224 px)

    @torch.no_grad()
    def score(self, images: torch.Tensor, targets: torch.Tensor) -> Scores:
        device = next(self.classifier.parameters(), torch.empty(0)).device
        pred = torch.cat([self.classifier.predict_logits(images[i : i + self.batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(images), self.batch_size)])
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


RESNET = "resnet-50"  # CLASSIFIERS name of the ImageNet judge's classifier
NO_WEIGHTS = "or pass your own judge with --judge module.path:factory"


class ImageNetJudge(ClassifierJudge):
    """ImageNet class models (DiT-XL/2): top-1 accuracy of microsoft/resnet-50 (transformers) against the requested
    class, FD on InceptionV3 pool features (2048, torchmetrics' FID extractor). Its FD reference is full guidance's
    samples (``reference`` None: module docstring); ``weights``: a local ResNet folder instead of the cache."""

    fd_features = "InceptionV3 pool3 (2048, torchmetrics FID extractor)"

    def __init__(self, classifier=None, features=None, weights: str | None = None, device="cpu"):
        repo = CLASSIFIERS[RESNET]
        self.name = f"imagenet ({weights or repo})"
        self.classifier = classifier if classifier is not None else load_hf_classifier(
            repo, device, folder=weights, alternative=f"pass a local folder with --judge_weights, {NO_WEIGHTS}")
        self.features = features if features is not None else _inception(device)
        self.reference = None


def _inception(device) -> torch.nn.Module:
    from . import metrics

    try:
        return metrics.inception_features(device)
    except UserError:
        raise UserError("The ImageNet judge's FD needs torchmetrics' InceptionV3 FID weights (`pip install "
                        f"torch-fidelity`, then one run with network access caches *{metrics.INCEPTION_WEIGHTS} in "
                        f"$TORCH_HOME/hub/checkpoints), {NO_WEIGHTS}.") from None


class ClipJudge(Judge):
    """Text models: CLIP score of each image with its prompt (rows: torchmetrics' CLIPScore / 100) and FD on CLIP image
    embeddings; FD reference: full guidance's samples (module docstring). ``weights``: a local CLIPModel folder."""

    score_name = "clip_score"
    binary_rows = False  # CLIP score / 100: continuous
    targets = "prompt"
    fd_features = "CLIP image embeddings"

    def __init__(self, scorer=None, weights: str | None = None, device="cpu", batch_size: int = 64):
        from .models.clip import load_clip

        self.scorer = scorer if scorer is not None else load_clip(
            weights, device, alternative=f"pass a local CLIPModel folder with --judge_weights, {NO_WEIGHTS}")
        self.name = f"clip ({self.scorer.name})"
        self.batch_size = batch_size
        self.reference = None

    @torch.no_grad()
    def score(self, images: torch.Tensor, targets) -> Scores:
        prompts = list(targets)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images need as many prompts; got {len(prompts)}.")
        rows, feats = [], []
        for i in range(0, len(images), self.batch_size):
            emb = self.scorer.image_embeds(images[i : i + self.batch_size])
            rows.append(self.scorer.score(emb, prompts[i : i + self.batch_size]).to(torch.float64).cpu())
            feats.append(emb.to(torch.float64).cpu())
        return Scores(torch.cat(rows).numpy(), torch.cat(feats))


JUDGES = {"digits": DigitsJudge, "fashion-mnist": FashionJudge}  # dataset -> its judge
NAMES = ("auto", "digits", "fashion-mnist", "imagenet", "clip")  # --judge names (or module.path:factory)


def default_judge(model) -> str:
    """The judge ``auto`` picks for ``model``: its dataset's, ``clip`` for a text model, ``imagenet`` for a class model
    of 1000 classes; else one sentence."""
    if model.dataset in JUDGES and model.num_classes is not None:
        return model.dataset
    if model.num_classes is None:
        return "clip"
    if model.num_classes == 1000:
        return "imagenet"
    raise UserError(f"{model.name} has {model.num_classes} classes and no dataset critsample knows, so no judge is "
                    "picked for it; pass your own with --judge module.path:factory.")


def for_model(model, judge: str = "auto", weights: str | None = None, device=None) -> Judge:
    """The judge ``judge`` (:data:`NAMES` or ``module.path:factory``) of ``model`` (a ``Denoiser``): ``auto`` is
    :func:`default_judge`; ``weights`` a local folder of the judge's network (imagenet, clip); one sentence when the
    judge does not fit the model (class ids vs prompts) or its weights are missing."""
    name = str(judge)
    if ":" in name:
        out = import_judge(name, model)
    else:
        if name not in NAMES:
            raise UserError(f"--judge is one of {', '.join(NAMES)} or module.path:factory; got {name!r}.")
        name = default_judge(model) if name == "auto" else name
        if weights is not None and name not in ("imagenet", "clip"):
            raise UserError(f"--judge_weights is a local folder of the imagenet or clip judge's network; the {name} "
                            "judge uses the bundled classifier.")
        device = device if device is not None else next(model.parameters(), torch.empty(0)).device
        wants = "prompt" if name == "clip" else "class"
        _check_fits(model, name, wants)
        out = (JUDGES[name]() if name in JUDGES else ImageNetJudge(weights=weights, device=device) if name == "imagenet"
               else ClipJudge(weights=weights, device=device))
    _check_fits(model, describe(out)["name"], getattr(out, "targets", "class"))
    if isinstance(out, ImageNetJudge) and out.classifier.num_classes != model.num_classes:
        raise UserError(f"The imagenet judge's classifier has {out.classifier.num_classes} classes and {model.name} "
                        f"{model.num_classes}; its accuracy would compare different labels, so pass a judge of this "
                        "model's classes with --judge module.path:factory.")
    return out


def _check_fits(model, name: str, targets: str) -> None:
    if (targets == "prompt") != (model.num_classes is None):
        kind = "text" if model.num_classes is None else "class-conditional"
        raise UserError(f"The {name} judge compares images with {targets}s, but {model.name} is {kind}; pick a judge "
                        f"for {kind} models (--judge {'clip' if model.num_classes is None else 'imagenet'}, or "
                        "module.path:factory).")


def import_judge(path: str, model=None):
    """``package.module:factory`` -> the judge ``factory(model)`` (or ``factory()`` when it takes no argument)
    returns: an object with ``score(images, targets) -> Scores`` and ``fd(features) -> float`` (and optionally
    ``name``, ``score_name``, ``targets`` = "class" or "prompt", ``binary_rows = True`` for 0 / 1 rows (exact bounds;
    default False: bootstrap bounds), and ``reference = None`` with a
    ``set_reference(features)`` method to be given full guidance's samples; :class:`Judge` shows them)."""
    obj = import_object(path, "--judge", f"--judge {path!r} is not module.path:factory.")
    if not callable(obj):
        raise UserError(f"--judge {path!r} is not callable; it should return a judge (critsample.judges.Judge).")
    try:
        takes_model = len(inspect.signature(obj).parameters) > 0
    except (TypeError, ValueError):
        takes_model = False
    try:
        judge = obj(model) if takes_model else obj()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Calling --judge {path!r} failed ({type(e).__name__}: {e}).") from None
    if not (callable(getattr(judge, "score", None)) and callable(getattr(judge, "fd", None))):
        raise UserError(f"--judge {path!r} returned a {type(judge).__name__} without score(images, targets) and "
                        "fd(features) methods (critsample.judges.Judge).")
    return judge


def fidelity(baseline: torch.Tensor, images: torch.Tensor) -> dict:
    """Paired fidelity of ``images`` to ``baseline`` (the same samples' noise under full guidance; (N, C, H, W) in
    [0, 1]), image by image, with no weights: SSIM (torchmetrics; Gaussian window of 11 pixels, sigma 1.5, or a
    uniform window of ``ssim_kernel`` pixels on images smaller than 11) as mean and one-sigma of the per-image values,
    and PSNR in dB of the pooled per-pixel MSE (inf when every image is equal), with the MSE's mean and one-sigma."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    if baseline.shape != images.shape:
        raise ValueError(f"Fidelity pairs the same samples; got shapes {tuple(baseline.shape)} and "
                         f"{tuple(images.shape)}.")
    x, y = images.to(torch.float64).cpu(), baseline.to(torch.float64).cpu()
    n = len(x)
    side = min(x.shape[-2:])
    if side >= 11:  # the standard window: Gaussian, sigma 1.5, 11 pixels
        kernel, window = 11, {"gaussian_kernel": True, "sigma": 1.5}
    else:  # small images (dit-digits' 8 x 8): a uniform window that fits
        kernel = max(1, side if side % 2 else side - 1)
        window = {"gaussian_kernel": False, "kernel_size": kernel}
    per_ssim = ssim(x, y, data_range=1.0, reduction="none", **window).reshape(n)
    per_mse = (x - y).pow(2).flatten(1).mean(1)
    mse = float(per_mse.mean())

    def sigma(v: torch.Tensor) -> float:
        return float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    return {"ssim": float(per_ssim.mean()), "ssim_sigma": sigma(per_ssim), "ssim_kernel": kernel,
            "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else float("inf"), "mse": mse, "mse_sigma": sigma(per_mse),
            "note": "per image against full guidance on the same noise; reported, not certified"}


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
    """Mean score with its one-sigma (Bernoulli for a judge declaring 0 / 1 rows, :func:`binary_rows`; else the
    standard error) and FD with its bootstrap one-sigma; ``score`` names the judge's score (module docstring)."""
    n = len(scores)
    acc = float(scores.rows.mean())
    binary = binary_rows(judge, scores)
    sigma = math.sqrt(acc * (1 - acc) / n) if binary else float(np.std(scores.rows, ddof=1) / math.sqrt(n))
    fd, fd_sigma = _fd_bootstrap(judge, scores.features, n_boot, seed)
    return {"score": str(getattr(judge, "score_name", "accuracy")), "accuracy": acc, "accuracy_sigma": sigma, "fd": fd,
            "fd_sigma": fd_sigma}


def _fd_bootstrap(judge, features, n_boot: int, seed: int) -> tuple[float, float]:
    """fd_bootstrap through the judge's own ``fd`` (a user's judge may keep its reference its own way)."""
    reference = getattr(judge, "reference", None)
    if isinstance(reference, FrechetReference):
        return fd_bootstrap(reference, features, n_boot, seed)
    features = torch.as_tensor(features, dtype=torch.float64)
    return bootstrap(judge.fd, features, n_boot=n_boot, generator=torch.Generator().manual_seed(torch_seed(seed)))


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
    out = {"accuracy_drop": float(drop), "accuracy_drop_sigma": float(reps[:, 0].std(ddof=1)), "fd_ratio": float(ratio),
           "fd_ratio_sigma": float(reps[:, 1].std(ddof=1)),
           "fd_ratio_upper": float(ratio + np.quantile(reps[:, 1], level) - np.median(reps[:, 1])), "level": level}
    if binary_rows(judge, baseline, scores):
        b = int(np.sum((cb == 1) & (cp == 0)))
        c = int(np.sum((cb == 0) & (cp == 1)))
        out.update(accuracy_drop_upper=drop_upper_bound(b, c, n, level), discordant={"b": b, "c": c, "n": n},
                   accuracy_drop_bound="exact (discordant pairs)")
    else:  # continuous rows: the re-centered paired-bootstrap percentile, as for the FD ratio
        out.update(accuracy_drop_upper=float(drop + np.quantile(reps[:, 0], level) - np.median(reps[:, 0])),
                   accuracy_drop_bound="paired bootstrap percentile, re-centered")
    return out


def quality(judge: Judge, scores: Scores, baseline: Scores, n_boot: int, seed: int) -> dict:
    """:func:`absolute` of ``scores`` and :func:`paired` against ``baseline`` (the same samples' noise)."""
    return {**absolute(judge, scores, n_boot, seed), **paired(judge, baseline, scores, n_boot, seed)}
