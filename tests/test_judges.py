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
            and same["fd_ratio_sigma"] == 0)
    worse = judges.quality(judge, judge.score(x.flip(-1), y), base, n_boot=10, seed=0)
    assert worse["accuracy_drop"] > 0.3 and worse["fd_ratio"] > 2 and worse["accuracy_drop_sigma"] > 0
    assert worse["accuracy"] == pytest.approx(base.rows.mean() - worse["accuracy_drop"])
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
