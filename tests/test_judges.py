"""The one judge module (critsample.judges): scores and FD features of a batch, absolute and paired bars; the same
numbers as the metrics they are built on, for certify, evaluate and detect's scans alike."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import critsample
from critsample import judges, metrics
from critsample.datasets import digits_split, fashion_mnist_bundled
from critsample.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge():
    return judges.DigitsJudge()


@pytest.fixture(scope="module")
def images():
    real = metrics.digits_real("test")
    return real[:40], digits_split("test")[1][:40].long()


def test_digits_judge_scores_are_the_classifier_and_its_fd(judge, images):
    x, y = images
    s = judge.score(x, y)
    pred = judge.classifier.predict_logits(x).argmax(1)
    assert np.array_equal(s.rows, (pred == y).double().numpy()) and np.array_equal(s.predicted, pred.numpy())
    assert s.rows.mean() > 0.9 and s.features.shape == (40, 64) and s.features.dtype == torch.float64
    assert judge.fd(s.features) == metrics.frechet_distance(metrics.extract_features(metrics.digits_real("test"),
                                                                                     judge.features), s.features)


def test_fd_bars_are_those_of_the_metrics(judge, images):
    x, _ = images
    fake = x.flip(-1)  # mirrored digits: far from the test split
    ref = metrics.fid_with_bootstrap(metrics.digits_real("test"), fake, features=judge.features, n_boot=10,
                                     generator=torch.Generator().manual_seed(4))
    assert judges.fd_bootstrap(judge.reference, metrics.extract_features(fake, judge.features), 10, seed=4) == ref


def test_paired_bars_of_a_set_against_itself_are_zero_and_a_worse_set_drops(judge, images):
    x, y = images
    base = judge.score(x, y)
    same = judges.quality(judge, base, base, n_boot=10, seed=0)
    assert (same["accuracy_drop"] == 0 and same["accuracy_drop_sigma"] == 0 and same["fd_ratio"] == 1
            and same["fd_ratio_sigma"] == 0 and same["fd_ratio_upper"] == 1)
    # no discordant pair: the exact bound is still positive (a bootstrap says +- 0 here)
    assert same["discordant"] == {"b": 0, "c": 0, "n": 40} and 0 < same["accuracy_drop_upper"] < 0.2
    worse = judges.quality(judge, judge.score(x.flip(-1), y), base, n_boot=10, seed=0)
    assert worse["accuracy_drop"] > 0.3 and worse["fd_ratio"] > 2 and worse["accuracy_drop_sigma"] > 0
    assert worse["accuracy"] == pytest.approx(base.rows.mean() - worse["accuracy_drop"])
    d = worse["discordant"]
    assert worse["accuracy_drop"] == pytest.approx((d["b"] - d["c"]) / d["n"])
    assert worse["accuracy_drop_upper"] == judges.drop_upper_bound(d["b"], d["c"], d["n"]) > worse["accuracy_drop"]
    assert worse["fd_ratio_upper"] > worse["fd_ratio"]
    with pytest.raises(ValueError):
        judges.paired(judge, base, judge.score(x[:5], y[:5]), n_boot=10, seed=0)


def test_a_model_without_a_judge_is_one_sentence():
    with pytest.raises(UserError, match="no judge"):
        judges.for_model(critsample.load("gmm-mixture"))
    assert isinstance(judges.for_model(critsample.load("dit-digits")), judges.DigitsJudge)


def test_no_module_reaches_into_the_private_fid_metric():
    for path in (ROOT / "critsample").rglob("*.py"):
        if path.name == "metrics.py":
            continue
        names = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n,
                                                                                     ast.ImportFrom) for a in n.names}
        assert "_fid_metric" not in names, path


# -- the exact bound of a paired accuracy drop --------------------------------------------------------------------


def test_clopper_pearson_is_scipys_exact_interval():
    from scipy.stats import binomtest
    for k, n in ((0, 10), (3, 10), (10, 10), (7, 1000), (500, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")  # two one-sided 95 % ends
        lo, hi = judges.clopper_pearson(k, n, 0.05)
        assert lo == pytest.approx(ci.low, abs=1e-10) and hi == pytest.approx(ci.high, abs=1e-10)


def test_difference_law_is_the_enumerated_trinomial():
    from scipy.stats import multinomial
    n = 9
    for q, delta, t in ((0.3, 0.1, 0), (0.5, -0.2, -1), (0.05, 0.05, 2), (0.8, 0.0, -3)):
        pb, pc = (q + delta) / 2, (q - delta) / 2
        brute = sum(multinomial.pmf([b, c, n - b - c], n, [pb, pc, 1 - q]) for b in range(n + 1)
                    for c in range(n + 1 - b) if b - c <= t)
        assert judges.diff_cdf(t, n, q, delta) == pytest.approx(brute, abs=1e-12)


def test_drop_bound_covers_at_95_percent_by_enumeration():
    """Exact coverage over every outcome of n = 14 pairs, at drops from 0 to 0.45 and discordance from 0 to 0.6: at
    least the nominal 95 % (the bound is conservative, not approximate), and never below the point estimate."""
    from scipy.stats import multinomial
    n = 14
    bound = {(b, c): judges.drop_upper_bound(b, c, n, tol=1e-4) for b in range(n + 1) for c in range(n + 1 - b)}
    assert all(u >= (b - c) / n for (b, c), u in bound.items())
    for pb, pc in ((0.0, 0.0), (0.05, 0.0), (0.1, 0.05), (0.3, 0.1), (0.3, 0.3), (0.5, 0.05)):
        cover = sum(multinomial.pmf([b, c, n - b - c], n, [pb, pc, 1 - pb - pc]) for (b, c), u in bound.items()
                    if u >= pb - pc - 1e-9)
        assert cover >= 0.95, (pb, pc, cover)


def test_zero_discordant_pairs_give_a_positive_bound_that_shrinks_like_one_over_n():
    bounds = [judges.drop_upper_bound(0, 0, n) for n in (50, 200, 1000)]
    assert all(b > 0 for b in bounds) and bounds[0] > bounds[1] > bounds[2]
    assert all(2 < n * b < 8 for n, b in zip((50, 200, 1000), bounds, strict=True))
    u = judges.drop_upper_bound
    assert u(5, 0, 1000) > u(0, 0, 1000) > u(0, 5, 1000)


def test_fashion_judge_is_the_fashion_classifier_and_its_fd_to_the_bundled_test_images():
    judge = judges.for_model(critsample.load("dit-fashion"))
    assert isinstance(judge, judges.FashionJudge) and judge.name == "fashion-mnist"
    x, y = metrics.fashion_real("test-2000")[:60], torch.from_numpy(fashion_mnist_bundled()[1][:60].astype(np.int64))
    s = judge.score(x, y)
    pred = judge.classifier.predict_logits(x).argmax(1)
    assert np.array_equal(s.rows, (pred == y).double().numpy()) and s.rows.mean() > 0.8
    assert s.features.shape == (60, 128) and s.features.dtype == torch.float64
    real = metrics.extract_features(metrics.fashion_real("test-2000"), metrics.fashion_features())
    assert judge.fd(s.features) == metrics.frechet_distance(real, s.features)
    assert judge.fd(s.features) < judge.fd(judge.score(x.flip(-2), y).features)  # upside-down garments: farther
