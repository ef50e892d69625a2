"""Metrics against formulas and an independent numpy/scipy Frechet distance."""

import json
import math
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from critsample import metrics
from critsample.errors import UserError
from critsample.models import bundled_path


def scipy_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Heusel et al. 2017, eq. 6, with scipy's matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def digit_feats():
    feats = metrics.digits_features()
    return {s: metrics.extract_features(metrics.digits_real(s), feats) for s in ("train", "test")}


def test_classifier_error_bernoulli_bars():
    target = torch.arange(50) % 10
    pred = target.clone()
    pred[[1, 5, 9, 20, 33, 41, 48]] = (pred[[1, 5, 9, 20, 33, 41, 48]] + 3) % 10
    p, se = metrics.classifier_error(pred, target)
    assert p == 7 / 50 and se == pytest.approx(math.sqrt(0.14 * 0.86 / 50), rel=1e-14)
    logits = torch.nn.functional.one_hot(pred, 10).float() * 5 + 0.1 * torch.randn(50, 10)
    assert metrics.classifier_error(logits, target) == (p, se)
    p3, se3 = metrics.classifier_error(pred[target == 3], 3)  # one class for all
    assert p3 == 1 / 5 and se3 == pytest.approx(math.sqrt(0.2 * 0.8 / 5), rel=1e-14)


def test_class_histogram():
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 3, 9])
    frac, se = metrics.class_histogram(labels, num_classes=10)
    ref = np.bincount(labels.numpy(), minlength=10) / 8
    np.testing.assert_allclose(frac.numpy(), ref, rtol=0, atol=0)
    np.testing.assert_allclose(se.numpy(), np.sqrt(ref * (1 - ref) / 8), rtol=1e-14)
    assert frac.dtype == torch.float64 and frac.sum().item() == pytest.approx(1.0)


def test_per_pixel_mse():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)
    per = ((x.double() - y.double()) ** 2).mean((1, 2, 3)).numpy()
    mse, se = metrics.per_pixel_mse(x, y)
    assert mse == pytest.approx(per.mean(), rel=1e-14)
    assert se == pytest.approx(per.std(ddof=1) / math.sqrt(6), rel=1e-12)
    np.testing.assert_allclose(metrics.per_pixel_mse(x, y, reduce=False).numpy(), per, rtol=1e-14)


def test_bootstrap_reproducible_and_close_to_theory():
    x = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = lambda s: s.mean().item()  # noqa: E731
    a = metrics.bootstrap(mean, x, n_boot=300, generator=torch.Generator().manual_seed(7))
    b = metrics.bootstrap(mean, x, n_boot=300, generator=torch.Generator().manual_seed(7))
    c = metrics.bootstrap(mean, x, n_boot=300, generator=torch.Generator().manual_seed(8))
    assert a == b and a[1] != c[1]
    assert a[0] == mean(x)
    assert a[1] == pytest.approx(x.std().item() / 20, rel=0.15)  # standard error of a mean


def test_paired_bootstrap_of_error_matches_bernoulli():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 10, (500,), generator=g)
    pred = torch.where(torch.rand(500, generator=g) < 0.2, (target + 1) % 10, target)
    p, se = metrics.classifier_error(pred, target)
    value, sigma = metrics.bootstrap(lambda a, b: metrics.classifier_error(a, b)[0], pred, target, n_boot=400,
                                     generator=g)
    assert value == p and sigma == pytest.approx(se, rel=0.15)


def test_fid_of_a_set_with_itself_is_zero():
    real = metrics.digits_real("test")
    assert abs(metrics.fid(real, real, features=metrics.digits_features())) < 1e-6


def test_fid_train_vs_test_matches_scipy(digit_feats):
    tr, te = digit_feats["train"], digit_feats["test"]
    ours = metrics.frechet_distance(te, tr)
    ref = scipy_frechet(te.numpy(), tr.numpy())
    assert ours == pytest.approx(ref, rel=1e-3)
    floor = json.loads((bundled_path("digits-classifier") / "config.json").read_text())["fid_train_vs_test"]
    assert metrics.digits_fid(metrics.digits_real("train")) == pytest.approx(floor, rel=1e-6)
    assert floor == pytest.approx(ref, rel=1e-3)


def test_fid_grows_with_a_visible_change(digit_feats):
    fake = metrics.digits_real("train").roll(2, dims=-1)  # digits moved two pixels to the right
    assert metrics.digits_fid(fake) > 10 * metrics.frechet_distance(digit_feats["test"], digit_feats["train"])


def test_fid_with_bootstrap(digit_feats):
    real, fake = metrics.digits_real("test"), metrics.digits_real("train")[:300]
    feats = metrics.digits_features()
    a = metrics.fid_with_bootstrap(real, fake, features=feats, n_boot=20, generator=torch.Generator().manual_seed(0))
    b = metrics.fid_with_bootstrap(real, fake, features=feats, n_boot=20, generator=torch.Generator().manual_seed(0))
    assert a == b and a[1] > 0
    assert a[0] == pytest.approx(metrics.fid(real, fake, features=feats), rel=1e-12)
    # the bar resamples the fake set only, with the generator's index draws: redo it with scipy
    g = torch.Generator().manual_seed(0)
    te, tr = digit_feats["test"].numpy(), digit_feats["train"][:300].numpy()
    reps = [scipy_frechet(te, tr[torch.randint(300, (300,), generator=g).numpy()]) for _ in range(20)]
    assert a[1] == pytest.approx(np.std(reps, ddof=1), rel=1e-3)


def test_inception_without_torch_fidelity_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails, as when it is not installed
    x = torch.rand(4, 3, 16, 16)
    with pytest.raises(UserError, match="torch-fidelity"):
        metrics.fid(x, x)
